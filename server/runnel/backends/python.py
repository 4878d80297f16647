"""Built-in plugin: the ``python`` backend, whose apps are modules of plain functions.

    [apps.hello]
    backend = "python"
    module = "examples/hello/main.py"   # a .py file (relative to the config file), or
                                        # an importable module name: "pkg.mod"
    workers = 8                         # threads for sync functions (default 8)
    max_queue = 64                      # calls that may wait for a thread (default 64)
    setup = "setup"                     # module-level function run once at start-up
                                        # (default "setup"; "" for none)

Every public function of the module is a function of the app: a callable whose
name does not start with ``_``, that is not a class, and that was defined in the
module itself (``__module__`` is the module), so imported names are not exposed.
The setup function is not a function of the app.

The module is imported (in a worker thread) and its setup function run in
``start()``, so ``/health`` answers 503 while either is slow.

``FunctionApp.invoke`` is the one way in, for every caller (the ``/v4`` routes in
``runnel.surfaces.functions``, the RunPod job API, async runs in ``runnel.runs``):

    result = await app.invoke("greet", {"name": "Ada"}, run_id)
    if isinstance(result, FunctionStream):   # a generator: values as they are yielded
        try:
            async for value in result: ...
        finally:
            await result.aclose()             # stops the function when the caller gives up

How a function runs:

- ``async def``: awaited on the event loop; cancelling the caller cancels it.
- ``def``: called in the app's threads (``workers`` daemon threads,
  ``runnel.workers.DaemonThreads``). A thread cannot be stopped: cancelling the caller
  abandons the call, which still runs to its end (a call still waiting for a thread is
  not run). ``close()`` drops the waiting calls and abandons the running ones: the
  process exits even past a function that never returns.
- ``async def`` with ``yield``: an async generator, pulled on the loop; cancelling or
  ``aclose()`` ends it (its ``finally`` runs).
- ``def`` with ``yield``: a generator; each ``next()`` runs in the app's threads. ``aclose()``
  stops pulling and closes it in the app's threads (after a ``next()`` still running there).
- A function that returns a generator, an async iterator or an awaitable (e.g. a plain
  ``def run(stream=False)`` returning a generator only when asked to stream) is handled
  the same way, so ``invoke``'s result, not ``is_streaming``, is what tells.
- A function that declares a ``run_id`` parameter receives the run id; a caller cannot
  supply it.

The thread pool's queue is bounded: at most ``workers + max_queue`` calls that need it
(sync calls, until their thread is done; sync generators, until closed) are admitted at
once; one more is refused with 429 and ``Retry-After`` before anything runs, so an
overloaded app answers at once instead of making every caller wait its turn. Callers
bounded elsewhere (async runs: ``runs_workers``) pass ``bounded=False``; they still count.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import importlib.util
import inspect
import logging
import os
import re
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..errors import HTTPError
from ..hookspecs import hookimpl
from ..workers import DaemonThreads

logger = logging.getLogger("runnel.functions")

__all__ = ["Function", "FunctionApp", "FunctionStream", "make_python_app"]

RUN_ID = "run_id"
BUSY_RETRY_AFTER = b"1"  # seconds; a thread frees up as soon as any call ends
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_DONE = object()


def _marked(obj, test) -> bool:
    """``test`` on a function, or on a callable instance's ``__call__``."""
    if test(obj):
        return True
    call = getattr(type(obj), "__call__", None)  # noqa: B004 (the method itself, to test its marker)
    return not inspect.isfunction(obj) and call is not None and test(call)


class Function:
    """One function of a FunctionApp, with what ``invoke`` needs to know about it."""

    __slots__ = ("name", "fn", "signature", "kind", "wants_run_id", "var_keyword", "parameters", "required")

    def __init__(self, name: str, fn) -> None:
        self.name = name
        self.fn = fn
        self.signature = inspect.signature(fn)
        if _marked(fn, inspect.isasyncgenfunction):
            self.kind = "async_generator"
        elif _marked(fn, inspect.isgeneratorfunction):
            self.kind = "generator"
        elif _marked(fn, inspect.iscoroutinefunction):
            self.kind = "async"
        else:
            self.kind = "sync"
        keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        params = self.signature.parameters
        self.wants_run_id = RUN_ID in params and params[RUN_ID].kind in keyword
        self.var_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        # What a caller may pass by name (run_id is the server's to give).
        self.parameters = frozenset(
            name for name, p in params.items() if p.kind in keyword and name != RUN_ID
        )
        self.required = tuple(
            name for name, p in params.items()
            if p.default is inspect.Parameter.empty and name != RUN_ID
            and p.kind in (*keyword, inspect.Parameter.POSITIONAL_ONLY)
        )

    @property
    def streaming(self) -> bool:
        """Declared as a generator (sync or async)."""
        return self.kind in ("generator", "async_generator")

    def arguments(self, kwargs: dict, run_id: str) -> dict:
        """``kwargs`` checked against the signature (HTTPError 422), plus the run id if wanted."""
        for key in kwargs:
            if key == RUN_ID and self.wants_run_id:
                raise HTTPError(422, f"Argument 'run_id' of function '{self.name}' is set by the server, "
                                "not by the caller", param=key, code="unexpected_argument")
            if key not in self.parameters and not self.var_keyword:
                raise HTTPError(422, f"Unexpected argument '{key}' for function '{self.name}'",
                                param=key, code="unexpected_argument")
        for name in self.required:
            if name not in kwargs:
                raise HTTPError(422, f"Missing required argument '{name}' for function '{self.name}'",
                                param=name, code="missing_argument")
        if self.wants_run_id:
            kwargs = {**kwargs, RUN_ID: run_id}
        try:  # what the checks above cannot see (e.g. positional-only parameters)
            self.signature.bind(**kwargs)
        except TypeError as exc:
            raise HTTPError(422, f"Invalid arguments for function '{self.name}': {exc}",
                            code="invalid_arguments") from None
        return kwargs

    def __repr__(self) -> str:
        return f"Function({self.name}{self.signature}, {self.kind})"


class FunctionStream:
    """The values a generator function yields, as an async iterator.

    Always ``await aclose()`` when done with it (``finally``): that is what stops the
    function when the caller stops early (client gone, error while sending).
    """

    __slots__ = ()  # so that the subclasses' slots take effect

    def __aiter__(self) -> FunctionStream:
        return self

    async def __anext__(self) -> Any:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError


class _AsyncStream(FunctionStream):
    __slots__ = ("_iterator",)

    def __init__(self, iterator) -> None:
        self._iterator = iterator

    async def __anext__(self) -> Any:
        return await self._iterator.__anext__()

    async def aclose(self) -> None:
        close = getattr(self._iterator, "aclose", None)
        if close is not None:
            await close()


def _in_context(call: Callable[[], Any]) -> Callable[[], Any]:
    """``call`` run in a copy of the caller's context (contextvars), as ``run_in_executor`` would."""
    return functools.partial(contextvars.copy_context().run, call)


class _ThreadStream(FunctionStream):
    """A sync generator pulled one ``next()`` at a time in the app's threads.

    Invariant: at most one thread touches the generator at a time (a generator used
    while it runs raises ValueError): a ``next()`` is only asked for once the previous
    one is done with it (``_running``), and the generator is closed only when no
    ``next()`` is running or waiting for a thread.
    """

    __slots__ = ("_generator", "_threads", "_running", "_closed", "_release")

    def __init__(self, generator, threads: DaemonThreads, release: Callable[[], None]) -> None:
        self._generator = generator
        self._threads = threads
        self._running = False  # a next() is in a thread or waiting for one
        self._closed = False
        self._release = release  # called once, when the stream is closed: its slot is free

    async def __anext__(self) -> Any:
        if self._closed:
            raise StopAsyncIteration
        self._running = True
        pull = functools.partial(next, self._generator, _DONE)
        value = await self._threads.run(_in_context(pull), skip_cancelled=True, done=self._pulled)
        if value is _DONE:
            self._closed = True
            self._release()
            raise StopAsyncIteration
        return value

    def _pulled(self) -> None:
        """(On the loop) a thread is done with a next(): it returned, raised or was skipped."""
        self._running = False
        if self._closed:  # aclose() came meanwhile and left the closing to this
            self._close()

    async def aclose(self) -> None:
        # Never awaits: this runs in finally blocks of cancelled tasks. The generator
        # is closed in a thread, after a next() that is still running there.
        if self._closed:
            return
        self._closed = True
        self._release()
        if not self._running:
            self._close()

    def _close(self) -> None:
        try:
            self._threads.run(functools.partial(_close_generator, self._generator))
        except RuntimeError:  # the threads are closed: the app is closing
            _close_generator(self._generator)


def _close_generator(generator) -> None:
    try:
        generator.close()
    except Exception:
        logger.exception("closing generator %r failed", generator)


class FunctionApp:
    """An app whose functions are a Python module's public functions.

    ``functions`` is filled by ``start()``; the server serves the app only after that.
    """

    def __init__(self, name: str, module: str, *, path: str | None = None, workers: int = 8,
                 max_queue: int = 64, setup: str = "setup") -> None:
        self.name = name
        self.module_spec = module  # what the config named: a path or a module name
        self.path = path  # the .py file, when the module is one
        self.workers = workers
        self.max_queue = max_queue
        # Admitted calls that use the pool: running in it, waiting for it, or (a sync
        # generator) able to submit to it until closed. At most workers + max_queue
        # through invoke(bounded=True).
        self.pool_calls = 0
        self.setup_name = setup
        self.module = None
        self.functions: dict[str, Function] = {}
        self.calls = 0  # invocations so far
        self._threads: DaemonThreads | None = None

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        self._threads = threads = DaemonThreads(self.workers, f"runnel-{self.name}")
        module = await threads.run(self._import)
        setup = getattr(module, self.setup_name, None) if self.setup_name else None
        if setup is not None and not callable(setup):
            logger.warning("app %r: %s.%s is not callable; no setup is run", self.name, module.__name__,
                           self.setup_name)
            setup = None
        functions = {}
        for name, value in vars(module).items():
            if name.startswith("_") or name == self.setup_name or inspect.isclass(value) or not callable(value):
                continue
            if getattr(value, "__module__", None) != module.__name__:
                continue  # imported from elsewhere
            try:
                functions[name] = Function(name, value)
            except (TypeError, ValueError):  # no signature to check calls against (some builtins)
                logger.warning("app %r: %s has no signature; it is not a function of the app", self.name, name)
        if setup is not None:
            if _marked(setup, inspect.iscoroutinefunction):
                result = await setup()
            else:
                result = await threads.run(_in_context(setup))
            if inspect.isawaitable(result):
                await result
        self.module = module
        self.functions = functions
        logger.info("app %r: functions %s", self.name, ", ".join(functions) or "(none)")

    def _import(self):
        if self.path is None:
            return importlib.import_module(self.module_spec)
        directory = os.path.dirname(self.path)
        if directory not in sys.path:  # so the module can import its siblings
            sys.path.insert(0, directory)
        name = "runnel_app_" + re.sub(r"\W", "_", self.name)
        spec = importlib.util.spec_from_file_location(name, self.path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {self.path} as a Python module")
        module = importlib.util.module_from_spec(spec)
        previous = sys.modules.get(name)
        sys.modules[name] = module  # dataclasses, pickle and friends look the module up here
        try:
            spec.loader.exec_module(module)
        except BaseException:
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
            raise
        return module

    async def close(self) -> None:
        threads, self._threads = self._threads, None
        if threads is not None:
            # Running calls cannot be stopped: they are abandoned (daemon threads, so the
            # process still exits); queued calls are dropped.
            threads.close(drop_queued=True)

    def stats(self) -> dict:
        return {"functions": list(self.functions), "workers": self.workers, "calls": self.calls,
                "pool_calls": self.pool_calls, "max_queue": self.max_queue}

    # -- calling ---------------------------------------------------------------------
    def function(self, name: str) -> Function:
        """The public function ``name``, else HTTPError 404 (private and unknown alike)."""
        function = self.functions.get(name)
        if function is None:
            raise HTTPError(404, f"No function '{name}' in app '{self.name}'", param="function",
                            code="function_not_found")
        return function

    def is_streaming(self, name: str) -> bool:
        """Whether ``name`` is declared as a generator (HTTPError 404 if there is no such function).
        A plain function may still return a generator: ``invoke``'s result is what tells."""
        return self.function(name).streaming

    async def invoke(self, name: str, kwargs: dict, run_id: str, *, bounded: bool = True) -> Any:
        """Call function ``name`` with keyword arguments ``kwargs``.

        Returns the function's result, or a :class:`FunctionStream` of the values it
        yields when it is (or returns) a generator or async iterator; the caller must
        ``aclose()`` that stream. Raises HTTPError 404 (no such public function) or 422
        (missing / unexpected argument, naming it) before calling, and 429 when the call
        needs the thread pool and ``workers + max_queue`` calls hold it already (unless
        ``bounded`` is False: the caller bounds itself); whatever the function raises
        propagates as is.
        """
        function = self.function(name)
        kwargs = function.arguments(kwargs, run_id)
        kind = function.kind
        threads = self._threads
        assert threads is not None  # made by start(); only a started app is called
        if kind == "async_generator":
            self.calls += 1
            return _AsyncStream(function.fn(**kwargs))
        if kind == "generator":
            self._admit(bounded)
            self.calls += 1
            return _ThreadStream(function.fn(**kwargs), threads, self._release)
        if kind == "async":
            self.calls += 1
            result = await function.fn(**kwargs)
        else:
            self._admit(bounded)
            self.calls += 1
            call = _in_context(functools.partial(function.fn, **kwargs))
            try:
                # Free the slot when the thread is done with the call, not when the caller
                # stops waiting: an abandoned call still holds its thread.
                future = threads.run(call, skip_cancelled=True, done=self._release)
            except BaseException:  # the threads are closed: the app is closing
                self._release()
                raise
            result = await future
            if inspect.isawaitable(result):
                result = await result
        return self._wrap(result, threads)

    def _admit(self, bounded: bool) -> None:
        if bounded and self.pool_calls >= self.workers + self.max_queue:
            raise HTTPError(429, f"App '{self.name}' is busy ({self.workers} calls running, {self.max_queue} "
                            "waiting); try again shortly", code="queue_full",
                            headers=((b"retry-after", BUSY_RETRY_AFTER),))
        self.pool_calls += 1

    def _release(self) -> None:
        self.pool_calls -= 1

    def _wrap(self, result: Any, threads: DaemonThreads) -> Any:
        if inspect.isgenerator(result):
            self._admit(False)  # the call was admitted already; its values are part of it
            return _ThreadStream(result, threads, self._release)
        if isinstance(result, AsyncIterator) and not isinstance(result, FunctionStream):
            return _AsyncStream(result)
        return result


def is_function_app(app) -> bool:
    """Duck-typed, so another backend can offer functions the same way."""
    return callable(getattr(app, "invoke", None)) and isinstance(getattr(app, "functions", None), dict)


def make_python_app(app_config, table, server) -> FunctionApp:
    raw = table.get("module", str)
    if not raw.strip():
        raise table.error("module", "must not be empty")
    path = None
    if raw.endswith(".py") or "/" in raw or os.sep in raw:
        path = table.path("module", server.config.base_dir)
        if not path.endswith(".py"):
            raise table.error("module", f"must be a .py file or an importable module name, got {raw!r}")
        if not os.path.isfile(path):
            raise table.error("module", f"no such file: {path}")
    elif not _MODULE_NAME.fullmatch(raw):
        raise table.error("module", f"must be a .py file or an importable module name, got {raw!r}")
    workers = table.get("workers", int, default=8)
    if not 1 <= workers <= 1024:
        raise table.error("workers", f"must be between 1 and 1024, got {workers}")
    max_queue = table.get("max_queue", int, default=64)
    if not 0 <= max_queue <= 1_000_000:
        raise table.error("max_queue", f"must be between 0 and 1000000, got {max_queue}")
    setup = table.get("setup", str, default="setup")
    if setup and not setup.isidentifier():
        raise table.error("setup", f"must be a function name, got {setup!r}")
    table.finish()
    return FunctionApp(app_config.name, raw, path=path, workers=workers, max_queue=max_queue, setup=setup)


@hookimpl
def runnel_register_backends(register):
    register("python", make_python_app)
