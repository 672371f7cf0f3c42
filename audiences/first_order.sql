-- Journey condition (welcome_series): any order, paid or not, in the period Herald binds.
SELECT customer_id, placed_at
FROM orders
WHERE placed_at >= :since
  AND placed_at < :until
