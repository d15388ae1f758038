"""Benchmark scripts over the `tidal` package: run each from the repository root as `python -m benchmarks.NAME`."""
