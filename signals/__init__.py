"""The transmitter: every session.closed and session.expired delivered to receivers that
do not speak AMQP (docs/signals.md)."""
