"""The whole repository's tests (tests/, plugins/*/tests, benchmarks/loadgen) share one harness.

It is a module shipped with runnel, ``runnel.testing``, whose fixtures come from the
plugin loaded here; a plugin's own test suite loads it the same way.
"""

import pytest

# Before the plugin imports the package: its helpers' asserts then report like a test's own.
pytest.register_assert_rewrite("runnel.testing")

pytest_plugins = ["runnel.testing.pytest_plugin"]
