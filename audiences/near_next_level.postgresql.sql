-- Member upgrade audience (flow: member_upgrade), PostgreSQL: same columns and rules as
-- near_next_level.sql. Loyalty members who have covered at least (1 - `ratio`) of the way
-- from their level's threshold to the next one, e.g. with ratio 0.2: bronze with 800+
-- points, silver with 4,200+, gold with 17,000+. Platinum is the top level and is never
-- included. Tier = current level.
-- The ladder repeats audiences/demo_shop.py's LEVELS; LEAD() finds each next level.
WITH levels (level, min_points) AS (
    VALUES ('bronze', 0), ('silver', 1000), ('gold', 5000), ('platinum', 20000)
),
ladder AS (
    SELECT level,
           min_points,
           LEAD(level) OVER (ORDER BY min_points)      AS next_level,
           LEAD(min_points) OVER (ORDER BY min_points) AS next_level_points
    FROM levels
)
SELECT c.customer_id,
       c.first_name,
       c.last_name,
       c.email,
       c.phone,
       c.wechat_openid,
       c.locale,
       c.timezone,
       c.city,
       m.level AS tier,
       m.level,
       l.next_level,
       m.points,
       l.next_level_points,
       l.next_level_points - m.points AS points_needed,
       -- integer division, as in SQLite: progress is rounded down
       (100 * (m.points - l.min_points) / (l.next_level_points - l.min_points)) AS progress_pct
FROM members AS m
JOIN ladder AS l ON l.level = m.level
JOIN customers AS c ON c.customer_id = m.customer_id
WHERE l.next_level IS NOT NULL
  AND m.points < l.next_level_points
  AND l.next_level_points - m.points
      <= CAST(:ratio AS numeric) * (l.next_level_points - l.min_points)
ORDER BY c.customer_id
