-- Churn risk (journey: churn_winback): customers whose last paid order is between
-- `from_days` and `to_days` days old: drifting away, not gone yet (the win-back flow takes
-- them after 90 days). Same RFM profile and tiers as lapsed_customers.sql.
--
-- RFM is scored over ALL paying customers, then filtered: a lapsed former best customer
-- keeps a high frequency and monetary score, which is exactly who a win-back should try
-- hardest to win. Scores are quintiles (NTILE 5), 5 = best; ties are broken by the other
-- measures and then customer_id so a rerun gives every customer the same scores.
-- Timestamps are stored as UTC; the now parameter is Herald's clock (bound as UTC text by Herald).
WITH paid AS (
    SELECT customer_id,
           MAX(placed_at)        AS last_order_at,
           COUNT(*)              AS order_count,
           ROUND(SUM(amount), 2) AS total_spent
    FROM orders
    WHERE status = 'paid'
    GROUP BY customer_id
),
scored AS (
    SELECT customer_id, last_order_at, order_count, total_spent,
           NTILE(5) OVER (ORDER BY last_order_at, customer_id)              AS recency_score,
           NTILE(5) OVER (ORDER BY order_count, total_spent, customer_id)   AS frequency_score,
           NTILE(5) OVER (ORDER BY total_spent, order_count, customer_id)   AS monetary_score
    FROM paid
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
       CASE
           -- bought often and a lot (4+5, 5+4 or 5+5): the most generous offer
           WHEN s.frequency_score + s.monetary_score >= 9 THEN 'champions'
           -- solid repeat customers
           WHEN s.frequency_score >= 3 AND s.monetary_score >= 3 THEN 'loyal'
           -- ordinary value, but lapsed recently enough to still be warm
           WHEN s.recency_score >= 2 THEN 'at_risk'
           -- low value and long gone: contact gently and cheaply
           ELSE 'hibernating'
       END AS tier,
       date(s.last_order_at) AS last_order_date,
       CAST(julianday(:now) - julianday(s.last_order_at) AS INTEGER) AS days_since_order,
       s.order_count,
       s.total_spent,
       s.recency_score,
       s.frequency_score,
       s.monetary_score
FROM scored AS s
JOIN customers AS c ON c.customer_id = s.customer_id
WHERE julianday(s.last_order_at) < julianday(:now) - :from_days
  AND julianday(s.last_order_at) >= julianday(:now) - :to_days
ORDER BY c.customer_id
