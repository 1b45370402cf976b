"""Benchmarks: ``python -m bench --help``. They print figures; they assert nothing."""
