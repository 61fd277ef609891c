"""Measurement and fault-injection tooling: used by `scripts/benchmark.py`, `scripts/chaos.py` and the
tests, never by a training run (so it is not in `harness/`)."""
