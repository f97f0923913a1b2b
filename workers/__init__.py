"""The session.closed consumers: `audit` (a row per event in PostgreSQL) and
`push-cleanup` (the closed session's push tokens removed from Redis), each its own
process sharing one runner (consumer.py), plus `replay-dlq` for dead-lettered messages."""
