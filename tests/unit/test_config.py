import dataclasses
import os
import pickle
from pathlib import Path

import pytest

from runnel.config import (
    REQUIRED,
    AppConfig,
    AuthConfig,
    Config,
    ConfigError,
    ServerConfig,
    Table,
    apply_environment,
    config_from_dict,
    load_config,
    override_server,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "conf" / "examples"


def write(tmp_path: Path, text: str, name: str = "runnel.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def raises_config_error(fn, *args, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return info.value


# --- ConfigError ------------------------------------------------------------------


def test_config_error_str_leaves_out_missing_parts():
    assert str(ConfigError("bad", key="server.port", source="a.toml")) == "a.toml: server.port: bad"
    assert str(ConfigError("bad", key="server.port")) == "server.port: bad"
    assert str(ConfigError("bad", source="a.toml")) == "a.toml: bad"
    assert str(ConfigError("bad")) == "bad"


def test_config_error_with_source_only_fills_a_missing_source():
    error = ConfigError("bad", key="k")
    named = error.with_source("x.toml")
    assert (named.message, named.key, named.source) == ("bad", "k", "x.toml")
    assert error.source is None  # a copy, not a mutation
    assert ConfigError("bad", source="first").with_source("second").source == "first"


def test_config_error_pickles_with_key_and_source():
    error = pickle.loads(pickle.dumps(ConfigError("bad", key="k", source="s")))
    assert (error.message, error.key, error.source) == ("bad", "k", "s")


# --- defaults and examples -----------------------------------------------------------


def test_defaults():
    server = ServerConfig()
    assert (server.host, server.port, server.backlog) == ("127.0.0.1", 8000, 2048)
    assert (server.log_level, server.access_log, server.server_header) == ("info", False, "runnel")
    assert (server.max_header_bytes, server.max_body_bytes) == (16384, 8388608)
    assert (server.header_timeout, server.keepalive_timeout) == (10.0, 5.0)
    assert (server.body_timeout, server.write_timeout, server.shutdown_grace) == (30.0, 30.0, 30.0)
    config = Config()
    assert config.server == ServerConfig()
    assert config.auth == AuthConfig(kind="none", options={})
    assert config.apps == {}
    assert (config.source, config.base_dir) == (None, None)


def test_empty_file_gives_defaults(tmp_path):
    path = write(tmp_path, "")
    config = load_config(path)
    assert config.server == ServerConfig()
    assert config.auth == AuthConfig()
    assert config.apps == {}
    assert config.source == str(path)
    assert config.base_dir == str(tmp_path)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ServerConfig().port = 1  # type: ignore[misc]


def test_every_example_loads():
    paths = sorted(EXAMPLES.glob("*.toml"))
    assert {"server.toml", "api_keys.toml", "echo.toml"} <= {p.name for p in paths}
    for path in paths:
        assert isinstance(load_config(path), Config), path


def test_server_example_covers_every_key_at_its_default():
    import tomllib

    text = (EXAMPLES / "server.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    # runs_path's, runs', files_path's and max_queue_wait's defaults (unset: the per-user
    # default; SQLite; next to it; no limit) have no TOML spelling: they are shown commented out.
    assert set(data["server"]) == {f.name for f in dataclasses.fields(ServerConfig)} - {
        "runs_path", "runs", "files_path", "max_queue_wait"}
    assert "\n# max_queue_wait = " in text
    assert "\n# runs_path = " in text
    assert "\n# runs = " in text
    assert "\n# files_path = " in text
    assert load_config(EXAMPLES / "server.toml").server == ServerConfig()


def test_echo_and_api_key_examples():
    echo = load_config(EXAMPLES / "echo.toml").apps["echo"]
    assert echo.backend == "echo"
    assert echo.options == {"pace_ms": 20, "load_seconds": 0, "max_generations": 10000,
                            "served_model_name": "runnel/echo"}
    auth = load_config(EXAMPLES / "api_keys.toml").auth
    assert auth.kind == "api_key"
    assert all(isinstance(k, str) for k in auth.options["keys"])


# --- [server] validation ---------------------------------------------------------------


def test_values_are_read(tmp_path):
    path = write(
        tmp_path,
        """
        [server]
        host = "0.0.0.0"
        port = 0
        log_level = "DEBUG"
        access_log = true
        server_header = ""
        header_timeout = 2.5
        shutdown_grace = 0
        """,
    )
    server = load_config(path).server
    assert (server.host, server.port, server.access_log, server.server_header) == ("0.0.0.0", 0, True, "")
    assert server.log_level == "debug"
    assert server.header_timeout == 2.5
    assert server.shutdown_grace == 0.0


def test_unknown_server_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "[server]\nprot = 80\n")
    error = raises_config_error(load_config, path)
    assert error.key == "server.prot"
    assert error.source == str(path)
    assert str(error).startswith(f"{path}: server.prot: ")
    assert "unknown" in error.message
    assert "'port'" in error.message  # suggestion / list of valid keys
    assert "keepalive_timeout" in error.message  # valid keys are listed


def test_unknown_top_level_key(tmp_path):
    error = raises_config_error(load_config, write(tmp_path, "[servers]\nport = 1\n"))
    assert error.key == "servers"
    assert "unknown" in error.message


def test_wrong_type(tmp_path):
    path = write(tmp_path, '[server]\nport = "abc"\n')
    error = raises_config_error(load_config, path)
    assert error.key == "server.port"
    assert error.source == str(path)
    assert error.message == "expected an integer, got string 'abc'"


def test_server_must_be_a_table():
    error = raises_config_error(config_from_dict, {"server": 5})
    assert error.key == "server"
    assert "table" in error.message


@pytest.mark.parametrize("name", ["port", "backlog", "max_body_bytes", "header_timeout", "shutdown_grace"])
def test_bool_is_not_a_number(name):
    error = raises_config_error(config_from_dict, {"server": {name: True}})
    assert error.key == f"server.{name}"
    assert "boolean true" in error.message


def test_float_is_not_an_int():
    error = raises_config_error(config_from_dict, {"server": {"port": 80.0}})
    assert error.key == "server.port"
    assert "integer" in error.message


def test_int_accepted_for_float_and_stored_as_float():
    server = config_from_dict({"server": {"body_timeout": 7, "keepalive_timeout": 1}}).server
    assert server.body_timeout == 7.0 and type(server.body_timeout) is float
    assert type(server.keepalive_timeout) is float


def test_bool_field_rejects_int():
    error = raises_config_error(config_from_dict, {"server": {"access_log": 1}})
    assert error.key == "server.access_log"


@pytest.mark.parametrize(
    "name, value, words",
    [
        ("port", -1, "between 0 and 65535"),
        ("port", 65536, "between 0 and 65535"),
        ("backlog", 0, "at least 1"),
        ("max_header_bytes", 1023, "at least 1024"),
        ("max_body_bytes", -1, "at least 0"),
        ("header_timeout", 0, "greater than 0"),
        ("keepalive_timeout", -1.5, "greater than 0"),
        ("body_timeout", 0.0, "greater than 0"),
        ("write_timeout", float("inf"), "finite"),
        ("header_timeout", float("nan"), "finite"),
        ("shutdown_grace", -0.1, "at least 0"),
        ("log_level", "loud", "debug, info, warning, error"),
        ("host", "", "empty"),
        ("server_header", "a\r\nX-Evil: 1", "control"),
    ],
)
def test_out_of_range(name, value, words):
    error = raises_config_error(config_from_dict, {"server": {name: value}}, source="f.toml")
    assert error.key == f"server.{name}"
    assert error.source == "f.toml"
    assert words in error.message


def test_range_edges_are_allowed():
    server = config_from_dict(
        {"server": {"port": 65535, "backlog": 1, "max_header_bytes": 1024, "max_body_bytes": 0}}
    ).server
    assert (server.port, server.backlog, server.max_header_bytes, server.max_body_bytes) == (65535, 1, 1024, 0)


def test_run_and_webhook_defaults():
    server = ServerConfig()
    # None: the per-user default, runnel.runs.default_runs_path (tests/unit/test_run_store_path.py).
    assert (server.runs_path, server.runs_retention, server.runs_workers) == (None, 1800.0, 8)
    assert (server.webhook_allowed_hosts, server.webhook_secret, server.webhook_retry_delay) == ((), "", 2.0)
    assert server.runsync_timeout == 90.0


def test_run_and_webhook_values_are_read(tmp_path):
    path = write(
        tmp_path,
        """
        [server]
        runs_path = ""
        runs_retention = 60
        runs_workers = 1
        webhook_allowed_hosts = ["Hooks.Example.com", "127.0.0.1:8080", "::1"]
        webhook_secret = "s3cret"
        webhook_retry_delay = 0
        runsync_timeout = 0.5
        """,
    )
    server = load_config(path).server
    assert (server.runs_path, server.runs_retention, server.runs_workers) == ("", 60.0, 1)
    assert type(server.runs_retention) is float
    assert server.webhook_allowed_hosts == ("hooks.example.com", "127.0.0.1:8080", "::1")
    assert (server.webhook_secret, server.webhook_retry_delay, server.runsync_timeout) == ("s3cret", 0.0, 0.5)
    hash(server)  # still hashable: the host list is kept as a tuple


@pytest.mark.parametrize(
    "name, value, words",
    [
        ("runs_retention", 0, "greater than 0"),
        ("runs_retention", float("inf"), "finite"),
        ("runs_workers", 0, "between 1 and 1024"),
        ("runs_workers", 2.0, "integer"),
        ("webhook_retry_delay", -1, "at least 0"),
        ("runsync_timeout", 0, "greater than 0"),
        ("runs_path", 5, "string"),
        ("webhook_secret", True, "string"),
        ("webhook_allowed_hosts", "example.com", "array"),
        ("webhook_allowed_hosts", ["ok.example", 3], "item 1"),
        ("webhook_allowed_hosts", [""], "item 0"),
        ("webhook_allowed_hosts", ["http://example.com/"], "host name"),
        ("webhook_allowed_hosts", ["a b"], "host name"),
    ],
)
def test_run_and_webhook_values_are_checked(name, value, words):
    error = raises_config_error(config_from_dict, {"server": {name: value}}, source="f.toml")
    assert (error.key, error.source) == (f"server.{name}", "f.toml")
    assert words in error.message


# --- [auth] and [apps] -----------------------------------------------------------------------


def test_auth_table(tmp_path):
    path = write(tmp_path, '[auth]\nkind = "api_key"\nkeys = ["a", "b"]\nkeys_file = "k.txt"\n')
    auth = load_config(path).auth
    assert auth.kind == "api_key"
    assert auth.options == {"keys": ["a", "b"], "keys_file": "k.txt"}


@pytest.mark.parametrize(
    "auth, key",
    [
        ("x", "auth"),
        ({}, "auth.kind"),
        ({"kind": ""}, "auth.kind"),
        ({"kind": 3}, "auth.kind"),
    ],
)
def test_bad_auth(auth, key):
    error = raises_config_error(config_from_dict, {"auth": auth}, source="s.toml")
    assert (error.key, error.source) == (key, "s.toml")


def test_apps_keep_file_order(tmp_path):
    names = ["zeta", "alpha", "m.1", "b_2", "Q-3"]
    text = "".join(f'[apps."{n}"]\nbackend = "echo"\nx = {i}\n' for i, n in enumerate(names))
    apps = load_config(write(tmp_path, text)).apps
    assert list(apps) == names
    assert apps["alpha"] == AppConfig(name="alpha", backend="echo", options={"x": 1})


def test_app_options_exclude_backend(tmp_path):
    path = write(tmp_path, '[apps.e]\nbackend = "echo"\npace_ms = 5\n[apps.e.nested]\na = 1\n')
    app = load_config(path).apps["e"]
    assert app.options == {"pace_ms": 5, "nested": {"a": 1}}


def test_tool_parser_is_a_core_app_key_checked_against_the_formats(tmp_path):
    path = write(tmp_path, '[apps.e]\nbackend = "echo"\ntool_parser = "llama3_json"\npace_ms = 5\n')
    app = load_config(path).apps["e"]
    assert app.tool_parser == "llama3_json" and app.options == {"pace_ms": 5}  # not the backend's to refuse
    assert load_config(write(tmp_path, '[apps.e]\nbackend = "echo"\n')).apps["e"].tool_parser is None
    error = raises_config_error(config_from_dict, {"apps": {"e": {"backend": "echo", "tool_parser": "hermez"}}})
    assert error.key == "apps.e.tool_parser" and "hermes" in error.message
    error = raises_config_error(config_from_dict, {"apps": {"e": {"backend": "echo", "tool_parser": 1}}})
    assert error.key == "apps.e.tool_parser"


def test_missing_backend(tmp_path):
    path = write(tmp_path, "[apps.echo]\npace_ms = 20\n")
    error = raises_config_error(load_config, path)
    assert (error.key, error.source) == ("apps.echo.backend", str(path))
    assert "required" in error.message


@pytest.mark.parametrize("backend", ["", 7])
def test_bad_backend(backend):
    error = raises_config_error(config_from_dict, {"apps": {"a": {"backend": backend}}})
    assert error.key == "apps.a.backend"


@pytest.mark.parametrize("name", ["-lead", ".hidden", "has space", "slash/name", "é", "", "ok\n"])
def test_bad_app_name(name):
    error = raises_config_error(config_from_dict, {"apps": {name: {"backend": "echo"}}})
    assert error.key == f"apps.{name}"
    assert "name" in error.message


@pytest.mark.parametrize("apps, key", [([], "apps"), ({"a": "echo"}, "apps.a")])
def test_apps_must_be_tables(apps, key):
    error = raises_config_error(config_from_dict, {"apps": apps})
    assert error.key == key


# --- file errors ------------------------------------------------------------------------


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, '[server]\nport = 1\nhost = "unterminated\n')
    error = raises_config_error(load_config, path)
    assert error.source == str(path)
    assert str(error).startswith(str(path))
    assert "line 3" in str(error)


def test_missing_file_is_a_config_error(tmp_path):
    path = tmp_path / "nope.toml"
    error = raises_config_error(load_config, path)
    assert error.source == str(path)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes(b'[server]\nhost = "\xff"\n')
    error = raises_config_error(load_config, path)
    assert error.source == str(path)


def test_load_accepts_str_path_and_resolves_base_dir(tmp_path, monkeypatch):
    write(tmp_path, "[server]\nport = 1\n")
    monkeypatch.chdir(tmp_path)
    config = load_config("runnel.toml")
    assert config.source == "runnel.toml"
    assert config.base_dir == str(tmp_path)
    assert config.server.port == 1


# --- environment and command line --------------------------------------------------------


def test_environment_overrides():
    config = apply_environment(
        Config(),
        {
            "RUNNEL_HOST": "0.0.0.0",
            "RUNNEL_PORT": " 9001 ",
            "RUNNEL_LOG_LEVEL": "WARNING",
            "RUNNEL_ACCESS_LOG": "yes",
            "UNRELATED": "x",
        },
    )
    assert (config.server.host, config.server.port) == ("0.0.0.0", 9001)
    assert (config.server.log_level, config.server.access_log) == ("warning", True)
    assert config.server.backlog == 2048  # untouched


@pytest.mark.parametrize("text, expected", [("1", True), ("on", True), ("TRUE", True), ("0", False), ("off", False), ("no", False)])
def test_environment_booleans(text, expected):
    base = Config(server=ServerConfig(access_log=not expected))
    assert apply_environment(base, {"RUNNEL_ACCESS_LOG": text}).server.access_log is expected


def test_environment_leaves_input_alone_and_ignores_empty():
    base = Config(source="f.toml", base_dir="/d")
    assert apply_environment(base, {}) == base
    assert apply_environment(base, {"RUNNEL_PORT": "", "RUNNEL_API_KEYS": " "}) == base
    changed = apply_environment(base, {"RUNNEL_PORT": "1"})
    assert base.server.port == 8000
    assert (changed.source, changed.base_dir) == ("f.toml", "/d")


@pytest.mark.parametrize(
    "var, value, words",
    [
        ("RUNNEL_PORT", "abc", "integer"),
        ("RUNNEL_PORT", "8000.5", "integer"),
        ("RUNNEL_PORT", "70000", "between 0 and 65535"),
        ("RUNNEL_LOG_LEVEL", "chatty", "debug"),
        ("RUNNEL_ACCESS_LOG", "maybe", "yes"),
        ("RUNNEL_API_KEYS", ",,", "keys"),
    ],
)
def test_bad_environment(var, value, words):
    error = raises_config_error(apply_environment, Config(source="f.toml"), {var: value})
    assert (error.key, error.source) == (var, "environment")
    assert str(error).startswith(f"environment: {var}: ")
    assert words in error.message


def test_environment_api_keys():
    base = Config(auth=AuthConfig(kind="api_key", options={"keys": ["old"], "keys_file": "k"}))
    auth = apply_environment(base, {"RUNNEL_API_KEYS": " a, b ,,c"}).auth
    assert auth.kind == "api_key"
    assert auth.options == {"keys": ["a", "b", "c"], "keys_file": "k"}
    assert base.auth.options["keys"] == ["old"]


def test_environment_api_keys_turn_on_api_key_auth():
    assert apply_environment(Config(), {"RUNNEL_API_KEYS": "k"}).auth == AuthConfig("api_key", {"keys": ["k"]})
    custom = Config(auth=AuthConfig(kind="custom"))
    assert apply_environment(custom, {"RUNNEL_API_KEYS": "k"}).auth.kind == "custom"


def test_override_server():
    base = Config(source="f.toml")
    config = override_server(base, host="::", port=0, header_timeout=3, log_level=None)
    assert (config.server.host, config.server.port) == ("::", 0)
    assert config.server.header_timeout == 3.0 and type(config.server.header_timeout) is float
    assert config.server.log_level == "info"  # None = flag not given
    assert base.server.port == 8000
    assert config.source == "f.toml"


@pytest.mark.parametrize(
    "fields, key",
    [
        ({"port": 99999}, "server.port"),
        ({"port": "80"}, "server.port"),
        ({"port": True}, "server.port"),
        ({"colour": "blue"}, "server.colour"),
    ],
)
def test_bad_override(fields, key):
    error = raises_config_error(override_server, Config(), **fields)
    assert (error.key, error.source) == (key, "command line")


# --- Table ----------------------------------------------------------------------------------


def test_table_get_and_finish():
    table = Table({"n": 3, "t": 2, "s": "x", "b": False, "u": "a"}, key="apps.e", source="f.toml")
    assert table.get("n", int) == 3
    t = table.get("t", float)
    assert t == 2.0 and type(t) is float
    assert table.get("s", str) == "x"
    assert table.get("b", bool) is False
    assert table.get("u", (int, str)) == "a"
    assert table.get("missing", int, 5) == 5
    assert table.get("missing2", str, None) is None
    table.finish()


def test_config_table_uses_config_source():
    table = Config(source="f.toml").table("auth", {"x": 1})
    error = raises_config_error(table.finish)
    assert (error.key, error.source) == ("auth.x", "f.toml")


def test_table_required():
    error = raises_config_error(Table({}, key="apps.e", source="f.toml").get, "model", str)
    assert (error.key, error.source) == ("apps.e.model", "f.toml")
    assert str(error) == "f.toml: apps.e.model: is required"
    assert REQUIRED is not None


def test_table_wrong_type():
    table = Table({"n": "3", "b": True, "f": 1.5}, key="apps.e", source="f.toml")
    error = raises_config_error(table.get, "n", int)
    assert (error.key, error.message) == ("apps.e.n", "expected an integer, got string '3'")
    assert raises_config_error(table.get, "b", int).key == "apps.e.b"
    assert raises_config_error(table.get, "b", float).key == "apps.e.b"
    assert raises_config_error(table.get, "f", int).key == "apps.e.f"


def test_table_unknown_key():
    table = Table({"pace_ms": 1, "pase_ms": 2, "later": 3}, key="apps.echo", source="f.toml")
    table.get("pace_ms", int)
    table.get("served_model_name", str, None)
    error = raises_config_error(table.finish)
    assert (error.key, error.source) == ("apps.echo.pase_ms", "f.toml")
    assert "unknown" in error.message
    assert "pace_ms" in error.message and "served_model_name" in error.message
    assert "apps.echo.pase_ms" in str(error) and "f.toml" in str(error)


def test_table_get_list():
    table = Table({"keys": ["a", "b"], "nums": [1, 2.5], "bad": ["a", 1], "notlist": "a"}, key="auth")
    keys = table.get_list("keys", str)
    assert keys == ["a", "b"]
    keys.append("c")
    assert table.get_list("keys", str) == ["a", "b"]  # a fresh list each time
    nums = table.get_list("nums", float)
    assert nums == [1.0, 2.5] and all(type(n) is float for n in nums)
    error = raises_config_error(table.get_list, "bad", str)
    assert error.key == "auth.bad[1]"
    assert "integer 1" in error.message
    assert raises_config_error(table.get_list, "notlist", str).key == "auth.notlist"
    assert table.get_list("absent", str, []) == []
    assert raises_config_error(table.get_list, "absent2", str).message == "is required"
    table.finish()


def test_table_path(tmp_path, monkeypatch):
    table = Table({"rel": "keys.txt", "abs": "/etc/keys", "home": "~/k", "num": 3, "empty": ""}, key="auth")
    assert table.path("rel", "/srv/conf") == os.path.join("/srv/conf", "keys.txt")
    assert table.path("abs", "/srv/conf") == "/etc/keys"
    assert table.path("home", "/srv/conf") == os.path.join(os.path.expanduser("~"), "k")
    monkeypatch.chdir(tmp_path)
    assert table.path("rel", None) == str(tmp_path / "keys.txt")
    assert table.path("absent", "/x", None) is None
    assert raises_config_error(table.path, "num", "/x").key == "auth.num"
    assert raises_config_error(table.path, "empty", "/x").key == "auth.empty"
    assert raises_config_error(table.path, "absent2", "/x").key == "auth.absent2"


def test_table_path_against_config_base_dir(tmp_path):
    path = write(tmp_path, '[auth]\nkind = "api_key"\nkeys_file = "sub/keys.txt"\n')
    config = load_config(path)
    table = config.table("auth", config.auth.options)
    assert table.path("keys_file", config.base_dir) == str(tmp_path / "sub" / "keys.txt")
    table.finish()


def test_table_error_and_non_table():
    table = Table({"n": 0}, key="apps.e", source="f.toml")
    error = table.error("n", "must be at least 1")
    assert isinstance(error, ConfigError)
    assert str(error) == "f.toml: apps.e.n: must be at least 1"
    error = raises_config_error(Table, [1], key="apps.e", source="f.toml")
    assert error.key == "apps.e"


def test_table_does_not_see_later_changes_to_data():
    data = {"a": 1}
    table = Table(data, key="t")
    data["b"] = 2
    table.get("a", int)
    table.finish()


def test_ignore_unknown_fields_is_a_boolean():
    assert config_from_dict({"server": {"ignore_unknown_fields": True}}).server.ignore_unknown_fields is True
    assert config_from_dict({}).server.ignore_unknown_fields is False
    error = raises_config_error(config_from_dict, {"server": {"ignore_unknown_fields": "yes"}})
    assert error.key == "server.ignore_unknown_fields"


@pytest.mark.parametrize("origins", [["app.example.com"], ["https://a.example/path"], ["ftp://a"], [5], ["https://"]])
def test_cors_allow_origins_are_origins(origins):
    error = raises_config_error(config_from_dict, {"server": {"cors_allow_origins": origins}})
    assert error.key == "server.cors_allow_origins"


def test_cors_allow_origins_default_off_and_normalised():
    assert config_from_dict({}).server.cors_allow_origins == ()
    config = config_from_dict({"server": {"cors_allow_origins": ["*", "HTTPS://App.Example.com:8443"]}})
    assert config.server.cors_allow_origins == ("*", "https://app.example.com:8443")


# -- operations (issue 14) ------------------------------------------------------------------


@pytest.mark.parametrize("value, stored, log_format", [(False, False, None), (True, True, "text"),
                                                       ("off", False, None), ("text", True, "text"),
                                                       ("json", "json", "json")])
def test_access_log_takes_a_format_and_the_old_booleans(value, stored, log_format):
    server = config_from_dict({"server": {"access_log": value}}).server
    assert server.access_log == stored and type(server.access_log) is type(stored)
    assert server.access_log_format == log_format


def test_access_log_refuses_other_formats_naming_the_choices():
    error = raises_config_error(config_from_dict, {"server": {"access_log": "xml"}})
    assert error.key == "server.access_log"
    assert '"text" or "json"' in error.message and "'xml'" in error.message


def test_environment_access_log_format():
    assert apply_environment(Config(), {"RUNNEL_ACCESS_LOG": "json"}).server.access_log_format == "json"
    assert apply_environment(Config(), {"RUNNEL_ACCESS_LOG": "text"}).server.access_log_format == "text"
    error = raises_config_error(apply_environment, Config(), {"RUNNEL_ACCESS_LOG": "JSONL"})
    assert "json" in error.message and error.key == "RUNNEL_ACCESS_LOG"


def test_metrics_public_and_drain_delay():
    server = config_from_dict({"server": {"metrics_public": True, "shutdown_drain_delay": 5}}).server
    assert (server.metrics_public, server.shutdown_drain_delay) == (True, 5.0)
    assert (ServerConfig().metrics_public, ServerConfig().shutdown_drain_delay) == (False, 0.0)
    error = raises_config_error(config_from_dict, {"server": {"shutdown_drain_delay": -1}})
    assert error.key == "server.shutdown_drain_delay"


@pytest.mark.parametrize("literal", ["0", "-1.0", "604801", "inf", "nan", '"soon"'])
def test_max_queue_wait_is_a_positive_number_of_seconds_up_to_a_week(tmp_path, literal):
    path = tmp_path / "runnel.toml"
    path.write_text(f"[server]\nmax_queue_wait = {literal}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "server.max_queue_wait" in str(caught.value)
    path.write_text("[server]\nmax_queue_wait = 2.5\n", encoding="utf-8")
    assert load_config(path).server.max_queue_wait == 2.5
