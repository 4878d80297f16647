"""The open-file limit raised at start-up, and the connection cap derived from it."""

from __future__ import annotations

import logging

import pytest

from runnel.http import open_files

resource = pytest.importorskip("resource")


@pytest.fixture
def lowered():
    """The soft limit lowered below the hard one for the test, and put back after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(soft, 256)
    if hard != resource.RLIM_INFINITY and hard <= low:
        pytest.skip("the hard open-file limit leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    yield low, hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_soft_limit_is_raised_to_the_hard_limit_and_logged(lowered, caplog):
    low, hard = lowered
    with caplog.at_level(logging.INFO, logger="runnel.http"):
        now = open_files.raise_open_file_limit()
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == now > low
    if hard != resource.RLIM_INFINITY:
        assert now == hard
    assert f"raised the open-file limit from {low} to {now}" in caplog.text


def test_a_limit_that_cannot_be_raised_is_kept_and_logged(lowered, monkeypatch, caplog):
    low, _ = lowered

    def refuse(*args):
        raise ValueError("not allowed here")

    monkeypatch.setattr(resource, "setrlimit", refuse)
    with caplog.at_level(logging.WARNING, logger="runnel.http"):
        assert open_files.raise_open_file_limit() == low
    assert "could not raise the open-file limit" in caplog.text and "not allowed here" in caplog.text


def test_the_connection_cap_leaves_room_for_other_descriptors(caplog):
    assert open_files.connection_cap(0, 1024) == 1024 - 102  # a tenth kept back
    assert open_files.connection_cap(0, 200) == 200 - 64  # at least 64
    assert open_files.connection_cap(0, None) == 0  # no limit known: no cap
    assert open_files.connection_cap(500, 1024) == 500
    with caplog.at_level(logging.WARNING, logger="runnel.http"):
        assert open_files.connection_cap(5000, 1024) == 5000  # the operator's choice, with a warning
    assert "may run out of descriptors" in caplog.text
