"""A real ``runnel serve`` in a subprocess, for tests that kill servers (SIGKILL) or run several."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from .client import request
from .server import free_port

__all__ = ["ServeProcess"]


class ServeProcess:
    """``python -m runnel serve --config CONFIG --port PORT`` run in ``directory``, its output in
    ``directory/NAME.log``. ``RUNNEL_*`` variables of the test's environment are not passed on:
    the config alone says what the server does."""

    def __init__(self, directory: Path, config: Path, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.log_path = directory / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNEL_")}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "runnel", "serve", "--config", str(config), "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=directory)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ready(self) -> bool:
        """Whether it answers /health with 200 (a test's ``wait_until`` polls it); it failing
        the test, with its output, when the process has exited."""
        assert self.proc.poll() is None, self.log_path.read_text()
        try:
            return request(self.port, "GET", "/health").status == 200
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
