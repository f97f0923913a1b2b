"""Code shared by the API (service/) and the workers (workers/): settings, the Redis
key contract and scripts, the session.closed event, the AMQP topology and logging."""
