"""Benchmarks: measured side by side in one run, reported as tables and JSON."""
