"""Benchmarks, one module each, run as ``python -m benchmarks.<name>`` (see BENCHMARKS.md)."""
