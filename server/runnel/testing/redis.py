"""A real ``redis-server`` for tests: a free loopback port, a temporary directory, AOF on.

Tests of runs shared by several servers (``[server] runs = "redis://..."``) run against
it. It is never faked and never skipped: when ``redis-server`` is not installed (``make
test`` installs it where it can: see the README), starting one fails the test run
loudly, saying how to install it.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from .server import free_port, wait_until

__all__ = ["RedisServer", "redis_server_binary"]

INSTALL_HINT = ("redis-server is not installed: `make test` installs it on Debian and Ubuntu (as root: "
                "apt-get install -y redis-server); elsewhere see the README's \"Runs on Redis\"")


def redis_server_binary() -> str:
    """The ``redis-server`` to start; fails the test run (never skips) when there is none."""
    binary = shutil.which("redis-server")
    if binary is None:
        import pytest  # only here: importing the harness does not import pytest

        pytest.fail(INSTALL_HINT, pytrace=False)
    return binary


class RedisServer:
    """``redis-server`` on 127.0.0.1:``port`` with its data in ``directory``.

    ``fsync`` is the AOF's ``appendfsync``: "always" (the default here) loses no
    acknowledged write when the process is killed, so a test can kill it and expect every
    accepted run back."""

    def __init__(self, directory: Path, *, fsync: str = "always") -> None:
        self.directory = directory
        self.fsync = fsync
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> RedisServer:
        """Start it (again, on the same port and data after ``kill``) and wait until it answers."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                 "--appendonly", "yes", "--appendfsync", self.fsync, "--save", "", "--protected-mode", "no",
                 "--daemonize", "no"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_until(self.ping, timeout=15)
        return self

    def ping(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, (self.directory / "redis.log").read_text()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """One command (inline), its raw reply: for a test's set-up, such as FLUSHALL."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(" ".join(args).encode() + b"\r\n")
            return sock.recv(65536)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save; what the AOF holds is what survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.contextmanager
def running_redis(directory: Path, **options):
    server = RedisServer(directory, **options).start()
    try:
        yield server
    finally:
        server.stop()

