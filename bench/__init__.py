"""Load benchmarks of the sidecar against a direct upstream and a minimal aiohttp proxy.

`python -m bench.run` (or `make bench`); see `bench/run.py` for what it measures.
"""
