"""The microbenchmark suite: `python -m benchmarks [NAME...]` (or `make bench`).

Each `bench_*.py` module here exposes `run() -> dict` (see __main__.py for
the result format); the runner writes results/latest.json and one PNG chart
per benchmark.
"""
