"""What every PostgreSQL user of the project (the audit worker, the transmitter) shares:
the bound on a connect or statement, and which failures are the database's rather than
the data's."""

from __future__ import annotations

import asyncpg

# Bounds every connect and statement, so a PostgreSQL that hangs is a retried failure.
DB_TIMEOUT_SECONDS = 5.0

# PostgreSQL unreachable or out of resources: retried for as long as it takes. Anything
# else (a DataError, a constraint) is the row's own failure.
TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset
    TimeoutError,
    asyncpg.PostgresConnectionError,  # class 08, the connection lost mid-statement
    asyncpg.InsufficientResourcesError,  # class 53: too many connections, disk full
    asyncpg.OperatorInterventionError,  # class 57: shutting down, starting up, cancelled
)
