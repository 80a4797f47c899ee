"""Benchmarks: ``python -m benchmarks.<name> [--json]``; with --json the last stdout line is one JSON object."""
