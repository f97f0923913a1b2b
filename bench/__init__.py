"""`python -m bench`: throughput, sustained-rate and soak benchmarks of the close endpoint
against a bare aiohttp endpoint (the ceiling), on 127.0.0.1 and names of their own."""
