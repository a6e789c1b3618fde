"""Benchmark scripts and the side-by-side comparison harness (`compare/`).

Not part of the installed package: run them from the repository root (`python
benchmarks/offline.py ...`, `python -m benchmarks.compare.compare ...`), with the `bench`
extra installed. The client users run against a server is `fleetlm bench` (fleetlm/bench/).
Commands and results: docs/benchmarks.md.
"""
