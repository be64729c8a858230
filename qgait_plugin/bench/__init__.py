"""Benchmarks and diagnostics that print figures (speed and memory goals live here, not in tests)."""
