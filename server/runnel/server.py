"""``Server``: runnel as a library, running inside the caller's event loop.

    async with runnel.Server(config) as server:
        print(server.url)
        await server.serve_forever()

Everything lives on the instance (plugin manager, routes, apps, the runner of
async runs, connections), so several servers can run in one process.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import pluggy

from .access_log import AccessLog
from .apps import AppRegistry
from .config import Config, ConfigError
from .dispatch import Dispatcher
from .errors import HTTPError
from .http import HttpProtocol, ServerState
from .http.cors import Cors
from .http.open_files import connection_cap, raise_open_file_limit
from .metrics import Metrics
from .plugins import make_plugin_manager
from .routing import Router
from .runs import Runner, store_for
from .serializers import Negotiator

if TYPE_CHECKING:
    from .hookspecs import AuthFactory, BackendFactory
    from .http import Request
    from .serializers import Serializer
    from .supervisor import WorkerSlot

logger = logging.getLogger("runnel.server")

# After the shutdown grace, connections cut off get this long to flush their last words
# (a stream's error event, a 503) before they are aborted.
CUT_OFF_FLUSH = 1.0


def _registry(kind: str, into: dict[Any, Any]) -> Callable[[Any, Any], None]:
    def register(name: Any, value: Any) -> None:
        if name in into:
            raise ValueError(f"{kind} {name!r} is registered twice")
        into[name] = value

    return register


class Server:
    def __init__(self, config: Config | None = None, *, plugins: Iterable[object] = (),
                 load_entrypoints: bool = True, worker: WorkerSlot | None = None) -> None:
        """``worker``: this server is one of a supervisor's workers (``runnel.supervisor``):
        it listens with SO_REUSEPORT beside its siblings and shares their run store."""
        self.config = config if config is not None else Config()
        self.worker = worker
        self.apps = AppRegistry()
        self.router = Router()
        self.backends: dict[str, BackendFactory] = {}
        self.auth_kinds: dict[str, AuthFactory] = {}
        self.serializers: dict[bytes, Serializer] = {}
        self.negotiator: Negotiator | None = None
        self.runs: Runner | None = None  # made in build(), next to the apps
        # Paths whose request bodies may exceed [server] max_body_bytes (a file upload): their
        # limit. Filled by the surfaces as they register their routes.
        self.body_limits: dict[str, int] = {}
        self.metrics: Metrics | None = None  # made in build(); GET /metrics renders it
        # Set by stop() from its first moment: readiness (GET /readyz) answers 503 from then on.
        self.draining = False
        self.pm: pluggy.PluginManager | None = None  # made in build(); the server is built once it is set
        # Per-server objects that plugins share: kept on the server, not in module
        # globals, so servers in one process stay apart.
        self.state: dict[str, object] = {}
        self._extra_plugins = tuple(plugins)
        self._load_entrypoints = load_entrypoints
        # Set together by start(), the listener last of those stop() needs.
        self._listener: asyncio.Server | None = None
        self._address: tuple[str, int] | None = None
        self._server_state: ServerState | None = None
        self._loading: asyncio.Task[None] | None = None
        self._stopped: asyncio.Event | None = None
        self._force = False

    # -- building ---------------------------------------------------------------
    def build(self) -> Server:
        """Load plugins and build auth, apps and routes from the config (no I/O, no loop).

        Raises ConfigError naming the key and file for anything the config gets wrong.
        """
        if self.pm is not None:
            return self
        config = self.config
        pm = make_plugin_manager(load_entrypoints=self._load_entrypoints, plugins=self._extra_plugins)
        pm.hook.runnel_register_backends(register=_registry("backend", self.backends))
        pm.hook.runnel_register_auth_kinds(register=_registry("auth kind", self.auth_kinds))
        pm.hook.runnel_register_serializers(
            register=lambda serializer: _registry("serializer", self.serializers)(serializer.media_type, serializer)
        )
        # Chooses a stream framing by Accept; routes may ask it too (before start()).
        self.negotiator = Negotiator(self.serializers)
        try:
            factory = self.auth_kinds.get(config.auth.kind)
            if factory is None:
                raise ConfigError(
                    f"unknown auth kind {config.auth.kind!r}; installed: {', '.join(sorted(self.auth_kinds))}",
                    key="auth.kind",
                )
            pm.register(factory(config.table("auth", config.auth.options), config), name=f"auth:{config.auth.kind}")
            for name, app_config in config.apps.items():
                backend = self.backends.get(app_config.backend)
                if backend is None:
                    installed = ", ".join(sorted(self.backends)) or "none"
                    raise ConfigError(
                        f"unknown backend {app_config.backend!r}; installed: {installed}",
                        key=f"apps.{name}.backend",
                    )
                self.apps.add(name, backend(app_config, config.table(f"apps.{name}", app_config.options), self))
            # Before the routes: surfaces register their run views on it.
            store = store_for(config, under_supervisor=True) if self.worker else None
            self.runs = Runner(config, self.apps, store=store)
        except ConfigError as error:
            # The same error, or its copy naming the file: chained, the plugin's traceback stays.
            raise error.with_source(config.source) if config.source else error  # noqa: B904
        # A worker's metrics are summed with its siblings' (runnel.metrics; the supervisor
        # gives every worker one PROMETHEUS_MULTIPROC_DIR).
        multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") if self.worker is not None else None
        self.runs.metrics = (metrics := Metrics(self.apps, multiprocess_dir or None)).runs
        self.metrics = metrics
        pm.register(metrics, name="metrics")
        log_format = config.server.access_log_format
        if log_format is not None:
            pm.register(AccessLog(log_format, metrics.app_name), name="access_log")

        pm.hook.runnel_register_routes(register=self.router.add, server=self)
        self.pm = pm
        return self

    # -- running ----------------------------------------------------------------
    async def start(self) -> Server:
        self.build()
        pm, runs, negotiator = self.pm, self.runs, self.negotiator
        assert pm is not None and runs is not None and negotiator is not None  # build() made them
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        settings = self.config.server
        finished_hook = pm.hook.runnel_request_finished
        finished: Callable[[Request, int, float], None] | None = None
        others = [impl for impl in finished_hook.get_hookimpls() if impl.plugin is not self.metrics]
        if not others and self.metrics is not None:
            # The metrics alone (no access log, no plugin): called directly, without
            # pluggy's dispatch (~4 us a request, measured).
            finished = self.metrics.runnel_request_finished
        elif others:
            def finished(request: Request, status: int, elapsed: float) -> None:
                finished_hook(request=request, status=status, elapsed=elapsed)
        # Descriptors first: the connection cap is derived from what the process may open.
        max_connections = connection_cap(settings.max_connections, raise_open_file_limit())
        cors = Cors(settings.cors_allow_origins) if settings.cors_allow_origins else None
        dispatcher = Dispatcher(self.router, pm.hook.runnel_authenticate, cors)
        self._server_state = ServerState(
            dispatch=dispatcher,
            fail=dispatcher.fail,
            negotiate=negotiator,
            max_header_bytes=settings.max_header_bytes,
            max_body_bytes=settings.max_body_bytes,
            body_limits=self.body_limits,
            max_stream_buffer_bytes=settings.max_stream_buffer_bytes,
            header_timeout=settings.header_timeout,
            max_queue_wait=settings.max_queue_wait,
            keepalive_timeout=settings.keepalive_timeout,
            body_timeout=settings.body_timeout,
            body_min_rate=settings.body_min_rate,
            write_timeout=settings.write_timeout,
            max_connections=max_connections,
            server_header=settings.server_header.encode("latin-1"),
            cors=cors,
            finished=finished,
        )
        assert self.metrics is not None  # build() made it
        self.metrics.bind(self._server_state, runs)
        try:
            await runs.start()
        except ConfigError as error:  # its store cannot be used
            raise error.with_source(self.config.source) if self.config.source else error  # noqa: B904
        try:
            await _call_lifecycle(pm.hook.runnel_startup(server=self))
            server_state = self._server_state
            listener = self._listener = await loop.create_server(
                lambda: HttpProtocol(server_state, loop), settings.host, settings.port, backlog=settings.backlog,
                reuse_port=self.worker is not None,
            )
        except BaseException:
            await runs.close()  # let go of the store (and its file lock)
            raise
        # Kept, not looked up, so the address stays known after stop().
        self._address = listener.sockets[0].getsockname()[:2]
        logger.debug("serving at most %s connections", max_connections or "unlimited")
        self._loading = loop.create_task(self.apps.start_all())
        return self

    @property
    def port(self) -> int:
        return self._bound()[1]

    @property
    def host(self) -> str:
        return self._bound()[0]

    def _bound(self) -> tuple[str, int]:
        if self._address is None:
            raise RuntimeError("the server has not been started")
        return self._address

    @property
    def url(self) -> str:
        host = self.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def connections(self) -> frozenset[HttpProtocol]:
        """The open connections (HttpProtocol objects), as of now; empty before start()."""
        state = self._server_state
        return frozenset(state.connections) if state is not None else frozenset()

    async def wait_ready(self) -> bool:
        """Wait until every app has loaded or failed; True when all are ready."""
        if self._loading is None:
            raise RuntimeError("the server has not been started")
        await asyncio.shield(self._loading)
        return all(state == "ready" for state in self.apps.states().values())

    async def serve_forever(self) -> None:
        if self._stopped is None:
            raise RuntimeError("the server has not been started")
        await self._stopped.wait()

    def force_stop(self) -> None:
        """Make a ``stop()`` in progress cut its grace period short."""
        self._force = True

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish for ``grace`` seconds, cut off the rest.

        A request still in flight then is ended with a 503 "server is shutting down" in
        its route's shape (a stream's error event and terminator, or the response) and
        its handler cancelled; what is not flushed within CUT_OFF_FLUSH is aborted.
        """
        listener, stopped, loading = self._listener, self._stopped, self._loading
        if listener is None or stopped is None or stopped.is_set():
            return
        assert self._server_state is not None and loading is not None and self.pm is not None and self.runs is not None
        grace = self.config.server.shutdown_grace if grace is None else grace
        self.draining = True
        loop = asyncio.get_running_loop()
        drain_until = loop.time() + self.config.server.shutdown_drain_delay
        # Still serving, but not ready: a load balancer that polls /readyz stops sending first.
        while loop.time() < drain_until and not self._force:
            await asyncio.sleep(min(0.05, drain_until - loop.time()))
        listener.close()
        connections = self._server_state.connections
        for connection in list(connections):
            connection.shutdown()
        deadline = loop.time() + grace
        while connections and loop.time() < deadline and not self._force:
            await asyncio.sleep(0.02)
        if connections:
            error = HTTPError(503, "Server is shutting down", code="server_shutting_down",
                              headers=((b"retry-after", b"1"),))
            for connection in list(connections):
                connection.cut_off(error)
            # Even when forced: a second is what a client's "the server went away" costs.
            deadline = loop.time() + CUT_OFF_FLUSH
            while connections and loop.time() < deadline:
                await asyncio.sleep(0.01)
        for connection in list(connections):
            connection.abort()
        if not loading.done():
            loading.cancel()
        await asyncio.gather(loading, return_exceptions=True)
        await _call_lifecycle(self.pm.hook.runnel_shutdown(server=self))
        await self.runs.close()  # before the apps: no run calls a closed app
        await self.apps.close_all()
        if self.metrics is not None:
            await self.metrics.close()
        stopped.set()

    async def __aenter__(self) -> Server:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


async def _call_lifecycle(results: Iterable[object]) -> None:
    for result in results:
        if inspect.isawaitable(result):
            await result
