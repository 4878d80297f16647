"""What every test under tests/ shares beyond the runnel.testing harness."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_data_home(tmp_path_factory):
    """Run stores a config does not place (the per-user default, in $XDG_DATA_HOME) go to a
    directory of this session, not the home of whoever runs the tests; servers started as
    subprocesses inherit it."""
    before = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("data-home"))
    yield
    if before is None:
        os.environ.pop("XDG_DATA_HOME", None)
    else:
        os.environ["XDG_DATA_HOME"] = before
