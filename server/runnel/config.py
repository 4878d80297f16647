"""Runnel's configuration: a TOML file, then environment variables, then CLI flags.

Everything here is checked as it is read, so a mistake is reported once, at
start-up, as ``<file>: <key>: <what is wrong>`` rather than surfacing later as a
confusing failure deep inside the server. The core only validates what it owns
([server], the shape of [auth] and [apps]); the rest of an auth or app table is
handed to its plugin, which reads it through :class:`Table` so that its errors
look exactly like the core's.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import functools
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .tools import tool_parser_names

__all__ = [
    "REQUIRED",
    "AppConfig",
    "AuthConfig",
    "Config",
    "ConfigError",
    "ServerConfig",
    "Table",
    "apply_environment",
    "config_from_dict",
    "load_config",
    "override_server",
]

LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """A configuration mistake. str() is '<source>: <key>: <message>' (parts that are None left out)."""

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None):
        super().__init__(message)
        self.message = message
        self.key = key
        self.source = source

    def __str__(self) -> str:
        return ": ".join(part for part in (self.source, self.key, self.message) if part is not None)

    def with_source(self, source: str) -> ConfigError:
        """A copy naming ``source``, unless this error already names where it came from."""
        if self.source is not None:
            return self
        return ConfigError(self.message, key=self.key, source=source)

    def __reduce__(self):
        # Exception pickling replays only self.args; keep key and source across processes.
        return (functools.partial(ConfigError, key=self.key, source=self.source), (self.message,))


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Default for :meth:`Table.get` and friends meaning 'the key must be present'."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0 = pick a free port
    backlog: int = 2048
    log_level: str = "info"
    # One log line per finished request: False (off), True (text, as before "json" existed)
    # or "json" (a JSON object a line). "text" and "off" are read as True and False.
    access_log: bool | str = False
    server_header: str = "runnel"  # "" = send no Server header
    max_header_bytes: int = 16384  # whole request head: request line + headers
    max_body_bytes: int = 8388608
    # A stream whose client falls this far behind (bytes waiting to be sent) is dropped:
    # a model cannot pause, so this is what a client that stops reading may cost.
    max_stream_buffer_bytes: int = 4194304
    header_timeout: float = 10.0  # deadline for a whole request head, from its first byte
    keepalive_timeout: float = 5.0  # idle keep-alive connections are closed after this
    body_timeout: float = 30.0  # a body making no progress this long -> 408
    write_timeout: float = 30.0  # a client that stops reading this long is dropped
    shutdown_grace: float = 30.0  # in-flight requests get this long at shutdown
    # Processes serving the port (runnel.supervisor): 1 serves in this process; more start
    # a supervisor and that many workers, each with its own event loop and apps.
    workers: int = 1
    # Hostile clients (issue 10): what one connection, and all of them, may hold.
    # Connections served at once; past it new ones get 503 + Retry-After and are closed.
    # 0 = derived from the open-file limit (see runnel.http.open_files), so the process
    # never runs out of descriptors.
    max_connections: int = 0
    # A request body must average this many bytes a second (after body_timeout's grace)
    # once its handler reads it, or 408: a byte every few seconds cannot hold a connection.
    # 0 = no floor (body_timeout alone, which each byte restarts).
    body_min_rate: float = 1024.0
    # Async runs (runnel.runs) and their webhooks.
    # SQLite file of async runs, opened only when an app can take runs (a python function app).
    # None: one per server in the per-user data directory (runnel.runs.default_runs_path);
    # relative: to the working directory; "" = memory (runs are lost with the process).
    runs_path: str | None = None
    # Runs shared by several servers: a Redis URL ("redis://host:6379/0", "rediss://...",
    # "unix:///path?db=0"); runs_path is then not used. None: the SQLite file above.
    runs: str | None = None
    # Seconds a claim on a running run lasts unless renewed (every third of it): a server that
    # died holding runs has them recovered this long after.
    runs_lease: float = 30.0
    runs_retention: float = 1800.0  # finished runs are kept this long, then purged
    runs_workers: int = 8  # background runs executing at once
    runs_max_queued: int = 10000  # runs waiting in the store; past it a new run is refused (429)
    webhook_allowed_hosts: tuple[str, ...] = ()  # hosts webhooks may be sent to; none by default
    webhook_secret: str = ""  # signs webhooks (HMAC-SHA256); "" = unsigned
    webhook_retry_delay: float = 2.0  # seconds between webhook attempts
    runsync_timeout: float = 90.0  # RunPod /runsync waits this long for a result
    # The deadline (runnel.deadlines) of a generation request that sends no X-Request-Deadline:
    # work still waiting for the model after this many seconds is dropped, 504. None: no limit.
    # Runs and batch lines are not bounded by it (they wait in their queues by design).
    max_queue_wait: float | None = None
    # The Batch API (runnel.surfaces.openai.files, .batches). Directory of uploaded files and
    # batch progress; None: next to the SQLite run store (runnel.surfaces.openai.files.files_dir).
    # Servers sharing runs through Redis must share this directory too.
    files_path: str | None = None
    files_max_bytes: int = 209715200  # an uploaded file's size (OpenAI's: 200 MB); past it 413
    batch_max_lines: int = 50000  # requests in one batch's input file (OpenAI's: 50,000)
    # Batch lines executing at once on this server, all batches together; each waits until
    # its model has no interactive request waiting, so a batch never starves live traffic.
    batch_concurrency: int = 2
    # Client compatibility (issue 12).
    # Unknown fields in an OpenAI request body: False = a 400 naming the field (as OpenAI);
    # True = accepted and ignored, for clients that send vendor extras.
    ignore_unknown_fields: bool = False
    # Origins ("https://app.example.com", or "*") whose browser scripts may call the server:
    # preflights answered, responses carry Access-Control-Allow-Origin. Empty: CORS off.
    cors_allow_origins: tuple[str, ...] = ()
    # Operations (issue 14).
    metrics_public: bool = False  # GET /metrics without authentication (for a scraper inside the network)
    # On SIGTERM, /readyz answers 503 this many seconds while requests are still taken, so a
    # load balancer stops sending before the listener closes and shutdown_grace begins.
    shutdown_drain_delay: float = 0.0

    @property
    def access_log_format(self) -> str | None:
        """``"text"``, ``"json"``, or None when the access log is off."""
        if self.access_log is True:
            return "text"
        return self.access_log or None


@dataclass(frozen=True, slots=True)
class AuthConfig:
    kind: str = "none"  # validated later, by the plugin that provides this kind
    options: Mapping[str, Any] = field(default_factory=dict)  # rest of [auth], unvalidated here


# Sub-tables of [apps.NAME] that belong to a surface, not to the app's backend:
# [apps.NAME.openai], [apps.NAME.runpod], ... Each surface validates its own.
SURFACE_TABLES = ("openai", "runpod", "baseten", "functions")


@dataclass(frozen=True, slots=True)
class AppConfig:
    name: str
    backend: str
    options: Mapping[str, Any] = field(default_factory=dict)  # rest of the table, for the backend
    surfaces: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # SURFACE_TABLES present
    # How the app's model writes tool calls (runnel.tools.FORMATS); None: the backend's default.
    tool_parser: str | None = None


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    apps: Mapping[str, AppConfig] = field(default_factory=dict)  # in file order
    source: str | None = None  # the file it came from, for error messages
    base_dir: str | None = None  # relative paths in plugin tables resolve against this (None: cwd)
    # Settings that a later layer set, by config key ("server.port", "auth.keys"): the
    # (key, source) an error about them must name instead, e.g. ("RUNNEL_PORT", "environment").
    origins: Mapping[str, tuple[str, str]] = field(default_factory=dict)

    def table(self, key: str, data: Mapping[str, Any]) -> Table:
        """A :class:`Table` over a plugin's options whose errors name this config's file
        (or the variable or flag that set a value)."""
        return Table(data, key=key, source=self.source, origins=self.origins)

    def origin(self, key: str) -> tuple[str, str | None]:
        """(key, source) that set the setting ``key``, for errors about it found later."""
        return self.origins.get(key, (key, self.source))


# --- value checking shared by the core and by Table ---------------------------------

_KIND_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    list: "an array",
    dict: "a table",
    Mapping: "a table",
}


def _kind_name(kinds: tuple[type, ...]) -> str:
    return " or ".join(_KIND_NAMES.get(k, f"a {k.__name__}") for k in kinds)


def _describe(value: Any) -> str:
    """How a wrong value is shown in an error: its TOML type, and the value when short."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"string {shown!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, (datetime.date, datetime.time)):
        return "a date/time"
    return type(value).__name__


def _typed(value: Any, kind: type | tuple[type, ...], *, key: str | None, source: str | None) -> Any:
    """``value`` if it is of ``kind``, else ConfigError.

    bool is an int subclass in Python, but ``port = true`` is certainly a mistake, so a
    bool only passes where bool is asked for. An int passes where float is asked for
    (``timeout = 5`` is natural TOML) and comes back as a float.
    """
    kinds = kind if isinstance(kind, tuple) else (kind,)
    checks = tuple(Mapping if k is dict else k for k in kinds)
    if isinstance(value, bool):
        ok = bool in kinds
    elif isinstance(value, int) and int not in kinds and float in kinds:
        return float(value)
    else:
        ok = isinstance(value, checks)
    if not ok:
        raise ConfigError(f"expected {_kind_name(kinds)}, got {_describe(value)}", key=key, source=source)
    return value


def _unknown_key(name: str, valid: list[str] | tuple[str, ...], *, key: str, source: str | None) -> ConfigError:
    hint = difflib.get_close_matches(name, valid, n=1)
    message = f"unknown key {name!r}"
    if hint:
        message += f" (did you mean {hint[0]!r}?)"
    message += f"; valid keys: {', '.join(valid) if valid else '(none)'}"
    return ConfigError(message, key=key, source=source)


# --- [server] rules: (type, normaliser). A normaliser returns the value or raises ValueError.


def _finite(value: float) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")


def _between(low: int, high: int) -> Callable[[Any], Any]:
    def check(value):
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return check


def _at_least(low: float) -> Callable[[Any], Any]:
    def check(value):
        _finite(value)
        if not value >= low:
            raise ValueError(f"must be at least {low}, got {value}")
        return value

    return check


def _queue_wait(value: float) -> float:
    from .deadlines import MAX_SECONDS  # the header's range: a default no request could ask for is refused

    _finite(value)
    if not 0 < value <= MAX_SECONDS:
        raise ValueError(f"must be greater than 0 and at most {MAX_SECONDS:.0f} (seconds), got {value}")
    return value


def _above(low: float) -> Callable[[Any], Any]:
    def check(value):
        _finite(value)
        if not value > low:
            raise ValueError(f"must be greater than {low}, got {value}")
        return value

    return check


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _log_level(value: str) -> str:
    # Accept "INFO" too: upper case is what most people type for log levels.
    if value.lower() not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}; got {value!r}")
    return value.lower()


def _hosts(value: list) -> tuple[str, ...]:
    hosts = []
    for index, host in enumerate(value):
        if type(host) is not str or not host.strip() or any(c.isspace() or c in "/?#@" for c in host):
            raise ValueError(f"item {index} must be a host name, an address or host:port, got {host!r}")
        hosts.append(host.strip().lower())
    return tuple(hosts)


def _origins(value: list) -> tuple[str, ...]:
    origins = []
    for index, origin in enumerate(value):
        if origin == "*":
            origins.append(origin)
            continue
        scheme, _, rest = origin.lower().partition("://") if type(origin) is str else ("", "", "")
        if (scheme not in ("http", "https") or not rest or any(c.isspace() or c in "/?#@" for c in rest)
                or not rest.isascii()):
            raise ValueError(f"item {index} must be \"*\" or an origin such as \"https://app.example.com\" "
                             f"(scheme, host and port only), got {origin!r}")
        origins.append(f"{scheme}://{rest}")  # as browsers send it: lower case
    return tuple(origins)


def _runs_url(value: str) -> str:
    if value.partition("://")[0] not in ("redis", "rediss", "unix"):
        raise ValueError(f"must be a Redis URL (redis://host:port/db, rediss://..., unix:///path), got {value!r}")
    return value


ACCESS_LOG_FORMATS = ("text", "json")


def _access_log(value: bool | str) -> bool | str:
    # true/false as before; "text" is what true always meant, "off" what false did.
    if type(value) is bool:
        return value
    if value == "json":
        return value
    if value in ("text", "off"):
        return value == "text"
    raise ValueError(f'must be true, false, "text" or "json", got {value!r}')


def _header_value(value: str) -> str:
    # A control character here would break (or split) every response's head.
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError("must not contain control characters")
    return value


_SERVER_RULES: dict[str, tuple[type | tuple[type, ...], Callable[[Any], Any] | None]] = {
    "host": (str, _non_empty),
    "port": (int, _between(0, 65535)),
    "backlog": (int, _at_least(1)),
    "log_level": (str, _log_level),
    "access_log": ((bool, str), _access_log),
    "server_header": (str, _header_value),
    "max_header_bytes": (int, _at_least(1024)),
    "max_body_bytes": (int, _at_least(0)),
    "max_stream_buffer_bytes": (int, _at_least(65536)),
    "header_timeout": (float, _above(0)),
    "keepalive_timeout": (float, _above(0)),
    "body_timeout": (float, _above(0)),
    "write_timeout": (float, _above(0)),
    "shutdown_grace": (float, _at_least(0)),
    "workers": (int, _between(1, 256)),
    "max_connections": (int, _at_least(0)),
    "body_min_rate": (float, _at_least(0)),
    "runs_path": (str, None),
    "runs": (str, _runs_url),
    "runs_lease": (float, _above(0)),
    "runs_retention": (float, _above(0)),
    "runs_workers": (int, _between(1, 1024)),
    "runs_max_queued": (int, _between(1, 100_000_000)),
    "webhook_allowed_hosts": (list, _hosts),
    "webhook_secret": (str, None),
    "webhook_retry_delay": (float, _at_least(0)),
    "runsync_timeout": (float, _above(0)),
    "max_queue_wait": (float, _queue_wait),
    "files_path": (str, _non_empty),
    "files_max_bytes": (int, _between(1, 209715200)),
    "batch_max_lines": (int, _between(1, 50000)),
    "batch_concurrency": (int, _between(1, 1024)),
    "ignore_unknown_fields": (bool, None),
    "cors_allow_origins": (list, _origins),
    "metrics_public": (bool, None),
    "shutdown_drain_delay": (float, _at_least(0)),
}
_SERVER_KEYS = tuple(_SERVER_RULES)


def _server_value(name: str, value: Any, *, key: str, source: str | None) -> Any:
    """One [server] value, type-checked and range-checked, errors under ``key``."""
    kind, normalise = _SERVER_RULES[name]
    value = _typed(value, kind, key=key, source=source)
    if normalise is not None:
        try:
            value = normalise(value)
        except ValueError as e:
            raise ConfigError(str(e), key=key, source=source) from None
    return value


def _server_from(base: ServerConfig, values: Mapping[str, Any], *, prefix: str, source: str | None) -> ServerConfig:
    checked = {}
    for name, value in values.items():
        key = f"{prefix}.{name}"
        if name not in _SERVER_RULES:
            raise _unknown_key(name, _SERVER_KEYS, key=key, source=source)
        checked[name] = _server_value(name, value, key=key, source=source)
    return dataclasses.replace(base, **checked)


# --- building a Config ----------------------------------------------------------------

_TOP_LEVEL_KEYS = ("server", "auth", "apps")
_APP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _auth_from(data: Any, *, source: str | None) -> AuthConfig:
    data = _typed(data, dict, key="auth", source=source)
    options = dict(data)
    # kind is required once [auth] is written: defaulting to "none" would silently turn
    # off the authentication the user was evidently trying to configure.
    if "kind" not in options:
        raise ConfigError("is required (the auth kind, e.g. \"api_key\")", key="auth.kind", source=source)
    kind = _typed(options.pop("kind"), str, key="auth.kind", source=source)
    if not kind.strip():
        raise ConfigError("must not be empty", key="auth.kind", source=source)
    return AuthConfig(kind=kind, options=options)


def _apps_from(data: Any, *, source: str | None) -> dict[str, AppConfig]:
    data = _typed(data, dict, key="apps", source=source)
    apps = {}
    for name, table in data.items():
        key = f"apps.{name}"
        # fullmatch, not match + $: "$" would also accept a trailing newline.
        if not isinstance(name, str) or not _APP_NAME.fullmatch(name):
            raise ConfigError(
                f"invalid app name {name!r}: it must start with a letter or digit and "
                "contain only letters, digits, '.', '_' and '-'",
                key=key,
                source=source,
            )
        options = dict(_typed(table, dict, key=key, source=source))
        if "backend" not in options:
            raise ConfigError("is required (the backend that serves this app)", key=f"{key}.backend", source=source)
        backend = _typed(options.pop("backend"), str, key=f"{key}.backend", source=source)
        if not backend.strip():
            raise ConfigError("must not be empty", key=f"{key}.backend", source=source)
        surfaces = {}
        for surface in SURFACE_TABLES:
            if surface in options:
                surfaces[surface] = dict(_typed(options.pop(surface), dict, key=f"{key}.{surface}", source=source))
        tool_parser = None
        if "tool_parser" in options:
            tool_parser = _typed(options.pop("tool_parser"), str, key=f"{key}.tool_parser", source=source)
            if tool_parser not in tool_parser_names():
                raise ConfigError(f"unknown tool parser {tool_parser!r}; runnel has {', '.join(tool_parser_names())}",
                                  key=f"{key}.tool_parser", source=source)
        apps[name] = AppConfig(name=name, backend=backend, options=options, surfaces=surfaces,
                               tool_parser=tool_parser)
    return apps


def config_from_dict(data: Mapping, *, source: str | None = None, base_dir: str | None = None) -> Config:
    """Validate parsed TOML (or an equivalent dict) into a Config."""
    data = _typed(data, dict, key=None, source=source)
    for name in data:
        if name not in _TOP_LEVEL_KEYS:
            raise _unknown_key(str(name), _TOP_LEVEL_KEYS, key=str(name), source=source)
    server = _typed(data.get("server", {}), dict, key="server", source=source)
    return Config(
        server=_server_from(ServerConfig(), server, prefix="server", source=source),
        auth=_auth_from(data["auth"], source=source) if "auth" in data else AuthConfig(),
        apps=_apps_from(data.get("apps", {}), source=source),
        source=source,
        base_dir=base_dir,
    )


def load_config(path: str | os.PathLike) -> Config:
    """Read and validate a TOML config file; every error names the file."""
    source = os.fsdecode(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file: {e.strerror or e}", source=source) from None
    except UnicodeDecodeError:
        raise ConfigError("not valid UTF-8, as TOML requires", source=source) from None
    except tomllib.TOMLDecodeError as e:
        # tomllib puts "(at line N, column M)" in its message; keep it.
        raise ConfigError(f"invalid TOML: {e}", source=source) from None
    base_dir = os.path.dirname(os.path.abspath(source))
    return config_from_dict(data, source=source, base_dir=base_dir)


# --- later layers: environment, then command line -------------------------------------

_ENV_SERVER = {
    "RUNNEL_HOST": "host",
    "RUNNEL_PORT": "port",
    "RUNNEL_LOG_LEVEL": "log_level",
    "RUNNEL_ACCESS_LOG": "access_log",
    "RUNNEL_RUNS_PATH": "runs_path",
    "RUNNEL_WORKERS": "workers",
    "RUNNEL_RUNS_URL": "runs",
}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_ENV = "environment"


def _from_env_string(name: str, text: str, kind: type | tuple[type, ...]) -> Any:
    if kind == (bool, str):  # RUNNEL_ACCESS_LOG: a boolean word, or a format name
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        if text in ACCESS_LOG_FORMATS:
            return text
        raise ConfigError(f"expected one of {'/'.join(_TRUE + _FALSE)} or {'/'.join(ACCESS_LOG_FORMATS)}, "
                          f"got {text!r}", key=name, source=_ENV)
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"expected an integer, got {text!r}", key=name, source=_ENV) from None
    if kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(f"expected one of {'/'.join(_TRUE + _FALSE)}, got {text!r}", key=name, source=_ENV)
    return text


def apply_environment(config: Config, environ: Mapping[str, str]) -> Config:
    """Config with RUNNEL_* variables applied on top.

    An empty (or blank) variable counts as unset, as `RUNNEL_PORT= runnel` usually
    means "no override" rather than "port ''".
    """
    server = {}
    origins = dict(config.origins)
    for var, name in _ENV_SERVER.items():
        text = environ.get(var, "").strip()
        if text:
            value = _from_env_string(var, text, _SERVER_RULES[name][0])
            server[name] = _server_value(name, value, key=var, source=_ENV)
            origins[f"server.{name}"] = (var, _ENV)
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, **server), origins=origins)

    text = environ.get("RUNNEL_API_KEYS", "").strip()
    if text:
        keys = [k.strip() for k in text.split(",") if k.strip()]
        if not keys:
            raise ConfigError("expected comma-separated API keys, found none", key="RUNNEL_API_KEYS", source=_ENV)
        # Setting keys under kind "none" would leave the server open while looking
        # protected, so keys without an auth kind switch on api_key auth.
        kind = "api_key" if config.auth.kind == "none" else config.auth.kind
        auth = AuthConfig(kind=kind, options={**config.auth.options, "keys": keys})
        # The auth plugin checks the keys: its errors about them must name the variable.
        config = dataclasses.replace(config, auth=auth, origins={**origins, "auth.keys": ("RUNNEL_API_KEYS", _ENV)})
    return config


def override_server(config: Config, **fields: Any) -> Config:
    """Config with [server] fields set from command-line flags.

    A None value means "flag not given" and is skipped, so callers can pass
    argparse results straight through.
    """
    given = {name: value for name, value in fields.items() if value is not None}
    server = _server_from(config.server, given, prefix="server", source="command line")
    origins = {**config.origins, **{f"server.{name}": (f"--{name.replace('_', '-')}", "command line")
                                    for name in given}}
    return dataclasses.replace(config, server=server, origins=origins)


# --- plugin tables ----------------------------------------------------------------------


class Table:
    """A plugin's config table (an app's or auth's options): every read is typed, unread keys are errors.
    Backends use it so their errors name the key and the file just like the core's."""

    def __init__(self, data: Mapping[str, Any], *, key: str, source: str | None = None,
                 origins: Mapping[str, tuple[str, str]] | None = None):
        self.key = key
        self.source = source
        self._origins = origins or {}  # Config.origins: values a variable or flag set
        self._data = dict(_typed(data, dict, key=key, source=source))
        self._asked: list[str] = []  # names the plugin asked for, in order: the valid keys

    def _key(self, name: str) -> str:
        return f"{self.key}.{name}" if name else self.key

    def _where(self, name: str) -> tuple[str, str | None]:
        """(key, source) for an error about ``name``: the variable or flag that set it, if one did."""
        key = self._key(name)
        return self._origins.get(key, (key, self.source))

    def _lookup(self, name: str, default: Any) -> tuple[bool, Any]:
        """(found, value); raises if missing and required. Marks ``name`` as read."""
        if name not in self._asked:
            self._asked.append(name)
        if name in self._data:
            return True, self._data[name]
        if default is REQUIRED:
            raise self.error(name, "is required")
        return False, default

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = REQUIRED) -> Any:
        """The value of ``name``, of ``kind`` (an int is accepted, as a float, where float is asked).
        ``default`` is returned as is when the key is absent."""
        found, value = self._lookup(name, default)
        if not found:
            return value
        key, source = self._where(name)
        return _typed(value, kind, key=key, source=source)

    def get_list(self, name: str, item_kind: type, default: Any = REQUIRED) -> list:
        """A list whose every item is of ``item_kind``; a new list, so callers may keep it."""
        found, value = self._lookup(name, default)
        if not found:
            return value
        key, source = self._where(name)
        value = _typed(value, list, key=key, source=source)
        return [_typed(item, item_kind, key=f"{key}[{i}]", source=source) for i, item in enumerate(value)]

    def path(self, name: str, base_dir: str | None, default: Any = REQUIRED) -> str | None:
        """A file path; a relative one is made absolute against ``base_dir`` (None: the
        current directory), so it means the same wherever the server later runs from.
        ``~`` is expanded. ``default`` is returned as is when the key is absent."""
        found, value = self._lookup(name, default)
        if not found:
            return value
        key, source = self._where(name)
        value = _typed(value, str, key=key, source=source)
        if not value.strip():
            raise self.error(name, "must not be empty")
        value = os.path.expanduser(value)
        return os.path.abspath(os.path.join(base_dir or os.getcwd(), value))

    def error(self, name: str, message: str) -> ConfigError:
        """A ConfigError for ``name`` in this table, for checks only the plugin knows."""
        key, source = self._where(name)
        return ConfigError(message, key=key, source=source)

    def finish(self) -> None:
        """Raise for the first key that was never read: most likely a typo."""
        for name in self._data:
            if name not in self._asked:
                raise _unknown_key(str(name), self._asked, key=self._key(str(name)), source=self.source)
