"""Measurements shown in docs/performance.md; run from the repository root
(`python -m benchmarks.X`)."""
