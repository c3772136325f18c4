"""Benchmarks: one module per stage, each reusing the real code path and printing a ratio against a baseline measured in the same run, then one JSON line."""
