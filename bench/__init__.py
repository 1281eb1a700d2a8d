"""Benchmarks: each prints a table; none asserts timings."""
