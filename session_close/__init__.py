"""Code shared by the API (service/) and the workers (workers/): settings, the Redis
key contract and scripts, the events, the AMQP topology and logging."""

from importlib.metadata import version

# The one source of the version is pyproject.toml; everything else asks here.
__version__ = version("eliab-session-close")
