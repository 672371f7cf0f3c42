-- Conversions of the win-back flow: paid orders placed in the period Herald binds as
-- `since` and `until` (the time that can hold an order attributed to a campaign run).
-- Timestamps are naive UTC, as everywhere in the demo shop; on SQLite they are text
-- that sorts.
SELECT customer_id, placed_at, amount
FROM orders
WHERE status = 'paid'
  AND placed_at >= :since
  AND placed_at < :until
