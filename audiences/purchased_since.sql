-- Journey condition: a paid order in the period Herald binds (`since`: the earliest
-- reference moment of the recipients asked about; `until`: now). Herald keeps only the
-- keys it asks about and, with `at: placed_at`, only orders after each one's own moment.
SELECT customer_id, placed_at
FROM orders
WHERE status = 'paid'
  AND placed_at >= :since
  AND placed_at < :until
