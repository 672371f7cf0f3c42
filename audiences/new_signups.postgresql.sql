-- Welcome audience (flow: welcome), PostgreSQL: same columns and rules as
-- new_signups.sql. Customers who signed up within the last `days` days; tier 'ordered'
-- when they have already placed an order (paid or not), else 'browsing'.
-- Timestamps are stored as UTC without a zone; the now parameter is Herald's clock, bound as UTC.
WITH recent AS (
    SELECT customer_id, first_name, last_name, email, phone, wechat_openid, locale,
           timezone, city, signup_at
    FROM customers
    WHERE signup_at >= CAST(:now AS timestamp) - CAST(:days AS integer) * INTERVAL '1 day'
),
placed AS (
    SELECT customer_id, COUNT(*) AS order_count
    FROM orders
    WHERE customer_id IN (SELECT customer_id FROM recent)
    GROUP BY customer_id
)
SELECT r.customer_id,
       r.first_name,
       r.last_name,
       r.email,
       r.phone,
       r.wechat_openid,
       r.locale,
       r.timezone,
       r.city,
       CASE WHEN p.customer_id IS NULL THEN 'browsing' ELSE 'ordered' END AS tier,
       r.signup_at,
       CAST(FLOOR(EXTRACT(EPOCH FROM CAST(:now AS timestamp) - r.signup_at) / 86400)
            AS integer) AS days_since_signup,
       COALESCE(p.order_count, 0) AS order_count
FROM recent AS r
LEFT JOIN placed AS p ON p.customer_id = r.customer_id
ORDER BY r.customer_id
