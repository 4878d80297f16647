"""``runnel serve --workers N``: a supervisor and N worker processes on one port.

The supervisor validates the config, binds the port itself first (so a port in use is
reported once, and port 0 becomes one port every worker shares), takes the SQLite run
store's lock for its workers (``SQLiteRunStore.hold_for_workers``), then starts each
worker as ``python -m runnel serve --workers 1`` with its slot in the environment
(``WorkerSlot``). A worker listens with ``SO_REUSEPORT``, so the kernel spreads
connections over the workers; each has its own event loop, apps and runner.

A worker writes one byte to the supervisor's pipe once it listens. One that exits
before that at start-up stops the whole server (exit status 1, or the worker's own: 2
for a config error). One that dies later is started again after a back-off (doubling
from BACKOFF_FIRST up to BACKOFF_MAX; reset once a worker has stayed up STABLE_AFTER
seconds). SIGTERM or SIGINT is forwarded to every worker (a second one too: it cuts
their grace short); the supervisor exits once they have, killing any still there
``shutdown_grace`` + STOP_SLACK seconds later. Workers run in their own session, so a
terminal's Ctrl-C reaches them once, through the supervisor; a worker whose
supervisor is gone stops itself (``watch_supervisor``).

Prometheus: each worker gets ``PROMETHEUS_MULTIPROC_DIR`` (the supervisor's own, else
a directory it makes and removes), so ``prometheus_client``'s multiprocess mode sums
every worker's metrics (``runnel.metrics``); a dead worker's live gauges are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

from .config import Config, ConfigError, override_server

logger = logging.getLogger("runnel.supervisor")

__all__ = ["WorkerSlot", "serve_workers", "watch_supervisor", "worker_slot"]

BACKOFF_FIRST = 0.5  # seconds before restarting a worker that died
BACKOFF_MAX = 30.0
STABLE_AFTER = 30.0  # a worker up this long that dies is restarted after BACKOFF_FIRST again
STOP_SLACK = 5.0  # past shutdown_grace (and a worker's cut-off flush), a worker still running is killed
WATCH_INTERVAL = 1.0  # how often a worker checks that its supervisor is alive

# The environment a worker is started with (private to runnel: set by the supervisor).
ENV_INDEX = "RUNNEL_WORKER_INDEX"
ENV_COUNT = "RUNNEL_WORKER_COUNT"
ENV_CORES = "RUNNEL_WORKER_CORES"
ENV_READY_FD = "RUNNEL_WORKER_READY_FD"


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    """Which of a supervisor's workers this process is. Apps size themselves by it:
    ``cores`` is this worker's share of the CPUs (threads beyond it oversubscribe), and a
    GPU app with no device index set takes GPU ``index % device_count``."""

    index: int  # 0 .. count - 1
    count: int
    cores: int
    ready_fd: int | None = None  # written to once the worker listens

    def environ(self) -> dict[str, str]:
        env = {ENV_INDEX: str(self.index), ENV_COUNT: str(self.count), ENV_CORES: str(self.cores)}
        if self.ready_fd is not None:
            env[ENV_READY_FD] = str(self.ready_fd)
        return env


def worker_slot(environ: Mapping[str, str] = os.environ) -> WorkerSlot | None:
    """This process's slot when a supervisor started it, else None."""
    try:
        index, count, cores = int(environ[ENV_INDEX]), int(environ[ENV_COUNT]), int(environ[ENV_CORES])
    except (KeyError, ValueError):
        return None
    fd = environ.get(ENV_READY_FD, "")
    return WorkerSlot(index, count, max(1, cores), int(fd) if fd.isdigit() else None)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def report_listening(slot: WorkerSlot) -> None:
    """(A worker) tell the supervisor it listens."""
    if slot.ready_fd is not None:
        with contextlib.suppress(OSError):
            os.write(slot.ready_fd, b"L")
            os.close(slot.ready_fd)


async def watch_supervisor(stop) -> None:
    """(A worker) call ``stop()`` once its supervisor is gone (killed with SIGKILL), so
    no worker outlives it holding the port."""
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(WATCH_INTERVAL)
    logger.warning("the supervisor (pid %d) is gone: stopping", parent)
    await stop()


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) with SO_REUSEPORT and not listening: it reports a
    port taken before any worker starts, turns port 0 into a real one, and keeps it
    while workers restart. Connections go only to listening sockets (the workers')."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


class _Worker:
    __slots__ = ("index", "process", "listened")

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.listened = False  # since its last start


class Supervisor:
    def __init__(self, config: Config, command: list[str], count: int) -> None:
        """``command``: how to start one worker (``python -m runnel serve ... --workers 1``)."""
        self.config = config
        self.command = command
        self.count = count
        self.cores = max(1, available_cores() // count)
        self.workers = [_Worker(index) for index in range(count)]
        self._stopping: asyncio.Event | None = None
        self._signals = 0
        self._failed_start: int | None = None  # the exit status of a worker that could not start
        self._environ = dict(os.environ)
        self._metrics_dir: str | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        if not self._environ.get("PROMETHEUS_MULTIPROC_DIR"):
            self._metrics_dir = tempfile.mkdtemp(prefix="runnel-metrics-")
            self._environ["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir
        try:
            started = [loop.create_future() for _ in self.workers]
            keepers = [loop.create_task(self._keep(worker, first))
                       for worker, first in zip(self.workers, started, strict=True)]
            await asyncio.wait(started)
            if self._failed_start is None and not self._stopping.is_set():
                logger.info("%d workers listening on port %d (each sized for %d of %d cores)", self.count,
                            self.config.server.port, self.cores, available_cores())
            await asyncio.gather(*keepers)
        finally:
            if self._metrics_dir is not None:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)
        if self._failed_start is not None:
            return self._failed_start or 1
        return 0

    def _on_signal(self, signum: int) -> None:
        assert self._stopping is not None
        self._signals += 1
        if self._signals == 1:
            logger.info("%s: stopping %d workers (each finishes its requests in flight, up to %ss)",
                        signal.Signals(signum).name, self.count, self.config.server.shutdown_grace)
        else:
            logger.warning("second %s: workers stop now", signal.Signals(signum).name)
        self._stopping.set()
        self._signal_all(signal.SIGTERM)

    def _signal_all(self, signum: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signum)

    def _fail_start(self, worker: _Worker, code: int) -> None:
        assert self._stopping is not None
        logger.error("worker %d exited with status %d before it listened: stopping", worker.index, code)
        if self._failed_start is None:
            self._failed_start = code if code > 0 else 1
        self._stopping.set()
        self._signal_all(signal.SIGTERM)

    async def _keep(self, worker: _Worker, first: asyncio.Future[None]) -> None:
        """Run one worker until the supervisor stops, restarting it when it dies."""
        assert self._stopping is not None
        loop = asyncio.get_running_loop()
        failures = 0
        try:
            while not self._stopping.is_set():
                began = loop.time()
                code = await self._run_once(worker, first)
                if self._stopping.is_set():
                    break
                if not first.done():  # it never listened: the config or the machine is wrong
                    self._fail_start(worker, code)
                    break
                failures = 0 if loop.time() - began >= STABLE_AFTER else failures + 1
                delay = min(BACKOFF_FIRST * 2 ** max(failures - 1, 0), BACKOFF_MAX)
                logger.warning("worker %d (pid %d) exited with status %d%s; starting it again in %.1fs",
                               worker.index, worker.process.pid if worker.process else 0, code,
                               "" if worker.listened else " before it listened", delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
        finally:
            if not first.done():
                first.set_result(None)

    async def _run_once(self, worker: _Worker, first: asyncio.Future[None]) -> int:
        """Start the worker and wait for it to exit; its exit status (negative: killed by a signal)."""
        assert self._stopping is not None
        read_end, write_end = os.pipe()
        slot = WorkerSlot(worker.index, self.count, self.cores, write_end)
        try:
            worker.listened = False
            worker.process = process = await asyncio.create_subprocess_exec(
                *self.command, env={**self._environ, **slot.environ()}, pass_fds=(write_end,),
                start_new_session=True)
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            reader = asyncio.StreamReader()
            transport, _ = await asyncio.get_running_loop().connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), pipe)
            try:
                if await reader.read(1):  # else the worker exited (or closed it) before it listened
                    worker.listened = True
                    if not first.done():
                        first.set_result(None)
            finally:
                transport.close()
        if self._stopping.is_set():  # it may have started after the signal was forwarded
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        code = await self._wait(process)
        self._mark_dead(process.pid)
        return code

    async def _wait(self, process: asyncio.subprocess.Process) -> int:
        """The process's exit status; once stopping, it gets the grace period (and some) before SIGKILL."""
        assert self._stopping is not None
        waiting = asyncio.ensure_future(process.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait((waiting, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not waiting.done():
            try:
                await asyncio.wait_for(asyncio.shield(waiting), self.config.server.shutdown_grace + STOP_SLACK)
            except TimeoutError:
                logger.error("worker pid %d did not stop in time: killing it", process.pid)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        return await waiting

    def _mark_dead(self, pid: int) -> None:
        """prometheus_client's multiprocess mode: drop a dead worker's live gauges."""
        from prometheus_client import multiprocess  # a dependency; imported only where workers die

        directory = self._environ.get("PROMETHEUS_MULTIPROC_DIR")
        with contextlib.suppress(Exception):
            multiprocess.mark_process_dead(pid, directory)


def worker_command(config: Config, log_level: str) -> list[str]:
    """``runnel serve`` for one worker: the same config file, the supervisor's address."""
    command = [sys.executable, "-m", "runnel", "serve", "--workers", "1", "--host", config.server.host,
               "--port", str(config.server.port), "--log-level", log_level]
    if config.source:
        command[4:4] = ["--config", os.path.abspath(config.source)]
    return command


def serve_workers(config: Config, run) -> int:
    """Supervise ``config.server.workers`` workers until a signal stops them; the exit status.
    ``run`` runs a coroutine to its end (``runnel.cli.run``). Raises ConfigError when the
    run store cannot be shared, OSError when the port cannot be bound."""
    from .runs import SQLiteRunStore, StoreUnavailable
    from .server import Server

    count = config.server.workers
    with reserve_port(config.server.host, config.server.port) as reserved:
        # Port 0 is now a real port: the workers' default run store is named after it too.
        config = override_server(config, port=reserved.getsockname()[1])
        server = Server(config).build()  # config mistakes are reported once, before any worker starts
        assert server.runs is not None
        store = server.runs.store if server.runs.in_use else None
        if isinstance(store, SQLiteRunStore):
            try:
                store.hold_for_workers()
            except StoreUnavailable as exc:  # as a server's start reports it
                raise ConfigError(str(exc), key=exc.key, source=config.origin("server.runs_path")[1]) from None
        try:
            supervisor = Supervisor(config, worker_command(config, config.server.log_level), count)
            return run(supervisor.run())
        finally:
            if isinstance(store, SQLiteRunStore):
                store.release()
