"""Every hook in runnel.hookspecs, implemented by a test plugin and seen to be called
with its documented arguments on a real server; plus how plugins are found."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pluggy
import pytest

import runnel
from runnel import HTTPError, Principal, Response, hookimpl, hookspecs, json_response
from runnel.config import Table
from runnel.plugins import DEFAULT_PLUGINS, describe_plugins, make_plugin_manager
from runnel.routing import Route
from runnel.testing import H11Client, error_body, raw_exchange, request, wait_until

REPO = Path(__file__).resolve().parents[2]


# -- runnel_register_backends -------------------------------------------------------------


class CounterApp:
    def __init__(self, name, start_at, events):
        self.name = name
        self.value = start_at
        self.events = events

    async def start(self):
        await asyncio.sleep(0.01)
        self.events.append(("start", self.name))

    async def close(self):
        self.events.append(("close", self.name))


class CounterBackend:
    def __init__(self):
        self.factory_calls = []
        self.events = []

    @hookimpl
    def runnel_register_backends(self, register):
        def factory(app_config, table, server):
            self.factory_calls.append((app_config, table, server))
            start_at = table.get("start_at", int, default=0)
            table.finish()
            return CounterApp(app_config.name, start_at, self.events)

        register("counter", factory)

    @hookimpl
    def runnel_register_routes(self, register, server):
        async def bump(request):
            app = server.apps.get(request.path_params["app"])
            if app is None:
                raise HTTPError(404, "no such counter")
            app.value += 1
            return json_response({"app": app.name, "value": app.value})

        register("POST", "/counter/{app}", bump)


def test_runnel_register_backends(start_server):
    backend = CounterBackend()
    config = {"apps": {"first": {"backend": "counter", "start_at": 41}, "second": {"backend": "counter"}}}
    thread = start_server(config, plugins=[backend], load_entrypoints=False)
    server = thread.server
    assert [call[0].name for call in backend.factory_calls] == ["first", "second"]
    app_config, table, called_with = backend.factory_calls[0]
    assert app_config.backend == "counter"
    assert isinstance(table, Table)
    assert table.key == "apps.first"
    assert called_with is server
    assert sorted(backend.events) == [("start", "first"), ("start", "second")]
    assert server.apps.states() == {"first": "ready", "second": "ready"}

    assert request(thread.port, "POST", "/counter/first", body=b"").json() == {"app": "first", "value": 42}
    assert request(thread.port, "POST", "/counter/second", body=b"").json() == {"app": "second", "value": 1}
    thread.stop()
    assert sorted(e for e in backend.events if e[0] == "close") == [("close", "first"), ("close", "second")]


def test_backend_table_errors_name_the_key():
    config = runnel.config_from_dict({"apps": {"c": {"backend": "counter", "start_at": "zero"}}}, source="x.toml")
    with pytest.raises(runnel.ConfigError) as info:
        runnel.Server(config, plugins=[CounterBackend()], load_entrypoints=False).build()
    assert str(info.value) == "x.toml: apps.c.start_at: expected an integer, got string 'zero'"
    config = runnel.config_from_dict({"apps": {"c": {"backend": "counter", "start": 1}}})
    with pytest.raises(runnel.ConfigError) as info:
        runnel.Server(config, plugins=[CounterBackend()], load_entrypoints=False).build()
    assert str(info.value).startswith("apps.c.start: unknown key 'start'")


# -- runnel_register_routes -------------------------------------------------------


class RouteRecorder:
    def __init__(self):
        self.servers = []

    @hookimpl
    def runnel_register_routes(self, register, server):
        self.servers.append(server)

        async def open_route(request):
            return json_response({"apps": sorted(server.apps.states())})

        async def closed_route(request):
            return json_response({"subject": request.principal.subject})

        async def failing(request):
            raise HTTPError(400, "nope", code="bad")

        returned = register("GET", "/plug/open", open_route, public=True)
        assert isinstance(returned, Route)
        register("GET", "/plug/closed/{rest:path}", closed_route)
        register(
            "GET",
            "/plug/failing",
            failing,
            errors=lambda request, error: Response(error.status, f"<{error.code}>".encode(), media_type=b"text/html"),
        )


def test_runnel_register_routes(start_server):
    recorder = RouteRecorder()
    config = {"auth": {"kind": "api_key", "keys": ["plug-key-0001"]}, "apps": {"echo": {"backend": "echo"}}}
    thread = start_server(config, plugins=[recorder])
    assert recorder.servers == [thread.server]
    with H11Client(thread.port) as client:
        # public=True skips authentication; the handler reaches apps through `server`.
        assert client.request("GET", "/plug/open").json() == {"apps": ["echo"]}
        assert client.request("GET", "/plug/closed/a/b").status == 401
        reply = client.request("GET", "/plug/closed/a/b", headers=[("authorization", "Bearer plug-key-0001")])
        assert reply.status == 200
        reply = client.request("GET", "/plug/failing", headers=[("authorization", "Bearer plug-key-0001")])
        assert (reply.status, reply.body, reply.header(b"content-type")) == (400, b"<bad>", b"text/html")


# -- runnel_register_serializers ----------------------------------------------------


class PipeSerializer:
    media_type = b"text/x-pipe"

    def encode(self, event):
        return b"|" + orjson.dumps(event) + b"|\n"

    def encode_error(self, error):
        return b"!" + orjson.dumps(error) + b"!\n"


class PipePlugin:
    def __init__(self):
        self.registered = 0

    @hookimpl
    def runnel_register_serializers(self, register):
        register(PipeSerializer())
        self.registered += 1

    @hookimpl
    def runnel_register_routes(self, register, server):
        async def two_then_fail(request):
            stream = request.stream()
            stream.send({"i": 0})
            stream.send("text")
            await asyncio.sleep(0)
            raise HTTPError(409, "conflict mid-stream", code="late")

        register("GET", "/pipe/fail", two_then_fail)


def test_runnel_register_serializers(start_server):
    plugin = PipePlugin()
    thread = start_server({"apps": {"echo": {"backend": "echo"}}}, plugins=[plugin])
    assert plugin.registered == 1
    body = b'{"prompt": "p q", "max_tokens": 2, "stream": true}'
    with H11Client(thread.port) as client:
        reply = client.request("POST", "/echo/echo", headers=[("accept", "text/x-pipe")], body=body)
        assert reply.header(b"content-type") == b"text/x-pipe"
        assert reply.body == b'|{"index":0,"token":"p"}|\n|{"index":1,"token":" q"}|\n|{"done":true,"tokens":2}|\n'

        # Chosen by q-value, not by order.
        accept = "text/event-stream;q=0.4, text/x-pipe;q=0.9"
        reply = client.request("POST", "/echo/echo", headers=[("accept", accept)], body=body)
        assert reply.header(b"content-type") == b"text/x-pipe"
        # Not asked for: the default stays SSE.
        reply = client.request("POST", "/echo/echo", body=body)
        assert reply.header(b"content-type") == b"text/event-stream"
        assert reply.body.startswith(b'data: {"index":0,"token":"p"}\n\n')

        reply = client.request("GET", "/pipe/fail", headers=[("accept", "text/x-pipe")])
        error = orjson.dumps(error_body("conflict mid-stream", "invalid_request_error", "late"))
        assert reply.body == b'|{"i":0}|\n|"text"|\n!' + error + b"!\n"


def test_serializer_media_type_registered_twice_raises():
    class Again:
        @hookimpl
        def runnel_register_serializers(self, register):
            register(PipeSerializer())
            register(PipeSerializer())

    with pytest.raises(ValueError, match="registered twice"):
        runnel.Server(plugins=[Again()], load_entrypoints=False).build()


# -- runnel_register_auth_kinds -------------------------------------------------------


class TeamAuth:
    def __init__(self, header: bytes, teams: list[str]):
        self.header = header
        self.teams = teams

    @hookimpl
    def runnel_authenticate(self, request, route):
        team = request.header(self.header)
        if team is None:
            return None  # nobody else vouches either: 401
        if team.decode() not in self.teams:
            raise HTTPError(403, f"team {team.decode()} may not use {route.template}")
        return Principal(team.decode(), "team")


class TeamAuthKind:
    def __init__(self):
        self.calls = []

    @hookimpl
    def runnel_register_auth_kinds(self, register):
        def factory(table, config):
            self.calls.append((table, config))
            header = table.get("header", str)
            teams = table.get_list("teams", str)
            table.finish()
            return TeamAuth(header.encode(), teams)

        register("team", factory)

    @hookimpl
    def runnel_register_routes(self, register, server):
        async def whoami(request):
            return json_response({"subject": request.principal.subject, "kind": request.principal.kind})

        register("GET", "/whoami", whoami)


def test_runnel_register_auth_kinds(start_server):
    kind = TeamAuthKind()
    thread = start_server(
        {"auth": {"kind": "team", "header": "x-team", "teams": ["red", "blue"]}}, plugins=[kind], load_entrypoints=False
    )
    [(table, config)] = kind.calls
    assert isinstance(table, Table) and table.key == "auth"
    assert config is thread.server.config
    assert isinstance(thread.server.pm.get_plugin("auth:team"), TeamAuth)
    with H11Client(thread.port) as client:
        assert client.request("GET", "/whoami", headers=[("x-team", "red")]).json() == {"subject": "red", "kind": "team"}
        reply = client.request("GET", "/whoami", headers=[("x-team", "green")])
        assert (reply.status, reply.json()) == (403, error_body("team green may not use /whoami", "permission_error"))
        reply = client.request("GET", "/whoami")
        assert reply.status == 401
        assert reply.json() == error_body("Request is not authenticated", "authentication_error")
        assert client.request("GET", "/health").status == 200


def test_auth_kind_options_are_checked_by_the_kind():
    config = runnel.config_from_dict({"auth": {"kind": "team", "header": "x-team", "teams": [], "colour": "red"}})
    with pytest.raises(runnel.ConfigError) as info:
        runnel.Server(config, plugins=[TeamAuthKind()], load_entrypoints=False).build()
    assert str(info.value) == "auth.colour: unknown key 'colour'; valid keys: header, teams"


# -- runnel_authenticate --------------------------------------------------------------


class Recorder:
    """runnel_authenticate and runnel_request_finished, recording their arguments."""

    def __init__(self):
        self.auth_calls = []
        self.finished = []

    @hookimpl
    def runnel_authenticate(self, request, route):
        self.auth_calls.append((request.method, request.path, request.request_id, route))
        if request.header(b"x-deny") is not None:
            raise HTTPError(403, "denied by header")
        return Principal("recorder", "test", {"id": request.request_id})

    @hookimpl
    def runnel_request_finished(self, request, status, elapsed):
        self.finished.append((request.method, request.path, request.request_id, status, elapsed))

    @hookimpl
    def runnel_register_routes(self, register, server):
        async def sleepy(request):
            await asyncio.sleep(0.05)
            return json_response({"subject": request.principal.subject, "claims": dict(request.principal.claims)})

        async def crash(request):
            raise RuntimeError("boom")

        async def streamed(request):
            stream = request.stream()
            for i in range(3):
                await asyncio.sleep(0.02)
                stream.send(i)

        register("GET", "/sleepy/{n}", sleepy)
        register("GET", "/crash", crash)
        register("GET", "/streamed", streamed)


def test_runnel_authenticate(start_server):
    recorder = Recorder()
    thread = start_server({}, plugins=[recorder], load_entrypoints=False)
    reply = request(thread.port, "GET", "/sleepy/1", headers=[("x-request-id", "auth-1")])
    assert reply.json() == {"subject": "recorder", "claims": {"id": "auth-1"}}
    reply = request(thread.port, "GET", "/sleepy/2", headers=[("x-deny", "1")])
    assert reply.status == 403
    assert reply.json() == error_body("denied by header", "permission_error")
    request(thread.port, "GET", "/health")  # public: not asked
    request(thread.port, "GET", "/nowhere")  # no route: not asked
    assert [call[:3] for call in recorder.auth_calls] == [
        ("GET", "/sleepy/1", "auth-1"),
        ("GET", "/sleepy/2", reply.header(b"x-request-id").decode()),
    ]
    route = recorder.auth_calls[0][3]
    assert isinstance(route, Route)
    assert (route.method, route.template, route.public) == ("GET", "/sleepy/{n}", False)


# -- runnel_request_finished ------------------------------------------------------------


def test_runnel_request_finished(start_server):
    recorder = Recorder()
    thread = start_server({}, plugins=[recorder], load_entrypoints=False)
    with H11Client(thread.port) as client:
        assert client.request("GET", "/sleepy/1", headers=[("x-request-id", "fin-1")]).status == 200
        assert client.request("GET", "/nowhere", headers=[("x-request-id", "fin-2")]).status == 404
        assert client.request("GET", "/crash", headers=[("x-request-id", "fin-3")]).status == 500
        assert client.request("GET", "/sleepy/2", headers=[("x-request-id", "fin-4"), ("x-deny", "1")]).status == 403
        assert client.request("GET", "/streamed", headers=[("x-request-id", "fin-5")]).body == (
            b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        )
    # A request the HTTP layer refuses is finished too.
    big = raw_exchange(thread.port, b"POST /sleepy/3 HTTP/1.1\r\nHost: a\r\nX-Request-Id: fin-6\r\n"
                                    b"Content-Length: 999999999999\r\n\r\n")
    assert big.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n")

    wait_until(lambda: len(recorder.finished) == 6)
    seen = {rid: (method, path, status) for method, path, rid, status, _ in recorder.finished}
    assert seen == {
        "fin-1": ("GET", "/sleepy/1", 200),
        "fin-2": ("GET", "/nowhere", 404),
        "fin-3": ("GET", "/crash", 500),
        "fin-4": ("GET", "/sleepy/2", 403),
        "fin-5": ("GET", "/streamed", 200),
        "fin-6": ("POST", "/sleepy/3", 413),
    }
    elapsed = {rid: value for _, _, rid, _, value in recorder.finished}
    assert all(isinstance(value, float) and value >= 0 for value in elapsed.values())
    # Lower bounds (with slack for the loop clock's millisecond resolution): the
    # handler slept 50 ms; the stream paced three events 20 ms apart, to the last byte.
    assert elapsed["fin-1"] >= 0.045
    assert elapsed["fin-5"] >= 0.055


# -- runnel_startup / runnel_shutdown -----------------------------------------------


class SyncLifecycle:
    def __init__(self, events):
        self.events = events

    @hookimpl
    def runnel_startup(self, server):
        self.events.append(("sync startup", server, server.apps.states()))

    @hookimpl
    def runnel_shutdown(self, server):
        self.events.append(("sync shutdown", server))


class AsyncLifecycle:
    def __init__(self, events):
        self.events = events
        self.port = None

    @hookimpl
    async def runnel_startup(self, server):
        await asyncio.sleep(0.05)
        self.events.append(("async startup done", server))

    @hookimpl
    def runnel_shutdown(self, server):
        # A plain function returning an awaitable counts too.
        return self._shutdown(server)

    async def _shutdown(self, server):
        await asyncio.sleep(0.01)
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except ConnectionRefusedError:
            refused = True
        else:
            writer.close()
            await writer.wait_closed()
            refused = False
        self.events.append(("async shutdown done", server, refused))


class LifecycleRoutes:
    def __init__(self, events):
        self.events = events

    @hookimpl
    def runnel_register_routes(self, register, server):
        async def ping(request):
            self.events.append(("request",))
            return json_response("pong")

        register("GET", "/ping", ping)


def test_runnel_startup_and_runnel_shutdown(start_server):
    events = []
    backend = CounterBackend()
    backend.events = events
    late = AsyncLifecycle(events)
    thread = start_server(
        {"apps": {"c": {"backend": "counter"}}},
        plugins=[backend, SyncLifecycle(events), late, LifecycleRoutes(events)],
        load_entrypoints=False,
    )
    late.port = thread.port
    assert request(thread.port, "GET", "/ping").json() == "pong"
    thread.stop()
    server = thread.server
    names = [event[0] for event in events]
    # Both startup results ran (the coroutine was awaited) before anything was served;
    # shutdown ran after serving stopped, and before the apps were closed.
    assert names == [
        "sync startup",  # pluggy calls the later-registered async one first; its coroutine is awaited after
        "async startup done",
        "start",
        "request",
        "sync shutdown",
        "async shutdown done",
        "close",
    ]
    for event in events:
        if event[0] not in ("start", "close", "request"):
            assert event[1] is server
    sync_startup = next(e for e in events if e[0] == "sync startup")
    assert sync_startup[2] == {"c": "loading"}  # apps are built, not yet loaded
    async_shutdown = next(e for e in events if e[0] == "async shutdown done")
    assert async_shutdown[2] is True  # no longer accepting connections


def test_failing_startup_hook_fails_start():
    class Refuse:
        @hookimpl
        def runnel_startup(self, server):
            raise RuntimeError("not today")

    async def main():
        server = runnel.Server(runnel.config_from_dict({"server": {"port": 0}}), plugins=[Refuse()],
                               load_entrypoints=False)
        with pytest.raises(RuntimeError, match="not today"):
            await server.start()

    from runnel.cli import run

    run(main())


# -- every hook has a test here ---------------------------------------------------------


def test_every_hookspec_is_exercised_in_this_file():
    pm = pluggy.PluginManager("runnel")
    pm.add_hookspecs(hookspecs)
    names = sorted(name for name in vars(pm.hook) if name.startswith("runnel_"))
    assert len(names) == 8, names
    source = Path(__file__).read_text()
    for name in names:
        assert f"def {name}(" in source, f"no plugin here implements {name}"
        assert f"def test_{name}" in source or f"and_{name}(" in source, f"no test here is named for {name}"


# -- loading plugins ------------------------------------------------------------------


def test_importing_runnel_loads_no_plugin():
    code = (
        "import sys, runnel\n"
        "print('runnel_echo' in sys.modules)\n"
        "import runnel.plugins\n"
        "pm = runnel.plugins.make_plugin_manager(load_entrypoints=False)\n"
        "print('runnel_echo' in sys.modules)\n"
        "pm = runnel.plugins.make_plugin_manager()\n"
        "print('runnel_echo' in sys.modules, pm.get_plugin('echo') is sys.modules['runnel_echo'])\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNEL_")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "False\nFalse\nTrue True\n"


def test_load_entrypoints_false_keeps_echo_out():
    names = [name for name, _ in make_plugin_manager(load_entrypoints=False).list_name_plugin()]
    assert names == list(DEFAULT_PLUGINS)
    # Other plugins may be installed in this environment too; built-ins always come first.
    names = [name for name, _ in make_plugin_manager().list_name_plugin()]
    assert names[: len(DEFAULT_PLUGINS)] == list(DEFAULT_PLUGINS)
    assert "echo" in names[len(DEFAULT_PLUGINS):]

    config = runnel.config_from_dict({"apps": {"e": {"backend": "echo"}}})
    with pytest.raises(runnel.ConfigError) as info:
        runnel.Server(config, load_entrypoints=False).build()
    # Only the built-in backend is left: python function apps.
    assert str(info.value) == "apps.e.backend: unknown backend 'echo'; installed: python"


def test_extra_plugins_are_registered_after_entry_points():
    plugin = SyncLifecycle([])
    pm = make_plugin_manager(plugins=[plugin])
    assert [p for _, p in pm.list_name_plugin()][-1] is plugin


def test_describe_plugins_lists_echo_distribution():
    rows = describe_plugins(make_plugin_manager())
    assert rows[:3] == [
        {"name": "runnel.serializers", "distribution": "runnel (built in)",
         "hooks": ["runnel_register_serializers"]},
        {"name": "runnel.auth.none", "distribution": "runnel (built in)", "hooks": ["runnel_register_auth_kinds"]},
        {"name": "runnel.auth.api_key", "distribution": "runnel (built in)", "hooks": ["runnel_register_auth_kinds"]},
    ]
    echo = [row for row in rows if row["name"] == "echo"]
    assert echo == [
        {"name": "echo", "distribution": "runnel-echo 0.1.0",
         "hooks": ["runnel_register_backends", "runnel_register_routes"]},
    ]


def test_plugin_sets_are_per_server(start_server):
    """A plugin given to one server is not seen by another in the same process."""
    with_routes = start_server({}, plugins=[LifecycleRoutes([])], load_entrypoints=False)
    without = start_server({}, load_entrypoints=False)
    assert request(with_routes.port, "GET", "/ping").json() == "pong"
    assert request(without.port, "GET", "/ping").status == 404
    assert with_routes.port != without.port
