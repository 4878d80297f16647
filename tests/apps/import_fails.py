"""A module that cannot be imported: its app fails to load (tests/e2e/test_functions.py)."""

raise RuntimeError('no model here')
