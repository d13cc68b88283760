"""Helpers for tests, examples and benchmarks: a locally generated model, engine processes."""
