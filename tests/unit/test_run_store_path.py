"""Where a server keeps its runs when no runs_path is given (runnel.runs.default_runs_path)."""

from __future__ import annotations

import os

from runnel.config import config_from_dict
from runnel.runs import default_runs_path


def config(source, port=8000):
    return config_from_dict({"server": {"port": port}}, source=source)


def test_one_file_per_config_and_port_in_the_data_home(tmp_path):
    environ = {"XDG_DATA_HOME": str(tmp_path)}
    path = default_runs_path(config("conf/runnel.toml"), environ)
    assert os.path.dirname(path) == str(tmp_path / "runnel")
    assert os.path.basename(path).startswith("runs-runnel-8000-") and path.endswith(".sqlite3")
    # The same server (config and port) again: the same file, so it finds its runs after a restart.
    assert default_runs_path(config("conf/runnel.toml"), environ) == path
    others = {default_runs_path(config("other/runnel.toml"), environ),
              default_runs_path(config("conf/runnel.toml", 8001), environ), default_runs_path(config(None), environ)}
    assert path not in others and len(others) == 3


def test_without_an_absolute_xdg_data_home_it_is_under_the_home_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for environ in ({}, {"XDG_DATA_HOME": "relative/dir"}):  # the XDG spec: a relative value is ignored
        path = default_runs_path(config(None), environ)
        assert os.path.dirname(path) == str(tmp_path / ".local" / "share" / "runnel")
        assert os.path.basename(path).startswith("runs-default-8000-")


def test_a_redis_url_picks_the_redis_store_and_the_environment_overrides_the_file():
    from runnel.config import apply_environment
    from runnel.runs import store_for
    from runnel.runs.redis import RedisRunStore

    base = config_from_dict({"server": {"runs": "redis://db.internal:6380/2", "runs_path": "ignored.sqlite3",
                                        "runs_retention": 60}}, source="f.toml")
    store = store_for(base)
    assert isinstance(store, RedisRunStore) and store.retention == 60
    assert (store.name, store.key) == ("redis://db.internal:6380/2", "server.runs")
    from_env = store_for(apply_environment(base, {"RUNNEL_RUNS_URL": "redis://:secret@other:6379/0"}))
    assert (from_env.name, from_env.key) == ("redis://other:6379/0", "RUNNEL_RUNS_URL")  # no password in logs


def test_runs_must_be_a_redis_url():
    import pytest

    from runnel.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        config_from_dict({"server": {"runs": "postgres://db/runs"}}, source="f.toml")
    assert caught.value.key == "server.runs" and "Redis URL" in caught.value.message
