"""A real ``dijiang-deploy serve`` process on 127.0.0.1 for tests: started, waited for, stopped."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


class ServerProcess:
    """``dijiang-deploy serve EXPORT --port 0 ARGS...``; ``url`` once ready.

    Stops with SIGTERM (then SIGKILL after ``stop_timeout``); ``returncode``
    is the exit status. Output is kept in ``lines``.
    """

    def __init__(self, export: Path, *args: str, env: dict[str, str] | None = None, ready_timeout: float = 120):
        self.cmd = [sys.executable, "-m", "dijiang_deploy.cli", "serve", str(export), "--port", "0", *args]
        self.env = dict(os.environ, TOKENIZERS_PARALLELISM="false", **(env or {}))
        self.ready_timeout = ready_timeout
        self.lines: list[str] = []
        self.url: str | None = None
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None

    def __enter__(self) -> "ServerProcess":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env)
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                m = re.search(r"ready on (http://\S+)", line)
                if m:
                    self.url = m.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(self.ready_timeout) or self.url is None:
            self.stop()
            raise RuntimeError("server did not become ready:\n" + "\n".join(self.lines[-40:]))

    def stop(self, timeout: float = 60) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            self.returncode = None if self.proc is None else self.proc.returncode
            return self.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.returncode = self.proc.wait()
        return self.returncode

    def output(self) -> str:
        time.sleep(0.05)
        return "\n".join(self.lines)
