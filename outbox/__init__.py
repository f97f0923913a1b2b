"""The outbox's own processes: the relay that publishes outbox entries to RabbitMQ, and
the expiry sweeper that records `session.expired` events into the outbox."""
