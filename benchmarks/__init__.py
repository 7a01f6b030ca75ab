"""Measurements that go into the README; run from the repository root (`python -m benchmarks.X`)."""
