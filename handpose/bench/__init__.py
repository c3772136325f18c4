"""Benchmarks, one module per stage.

Each reuses the real code path, prints a ratio against a baseline or limit measured in the same
run, and ends with one JSON line.
"""
