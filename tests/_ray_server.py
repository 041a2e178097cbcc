"""``dijiang-deploy serve --ray`` as a test fixture: its own Ray session folder, a fixed port."""

from __future__ import annotations

import socket
import subprocess
import tempfile
from pathlib import Path

import ray

from _server import ServerProcess


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayServer(ServerProcess):
    """``serve --ray`` on a fixed port (Ray Serve's proxy binds it) with its own Ray session folder."""

    def __init__(self, export: Path, *args: str):
        self.temp = Path(tempfile.mkdtemp(prefix="djray-", dir="/tmp"))  # short: Ray's socket paths
        self.port = _free_port()
        super().__init__(export, "--ray", "--ray-temp-dir", str(self.temp), *args, ready_timeout=300)
        self.cmd[self.cmd.index("--port") + 1] = str(self.port)

    def stop(self, timeout: float = 120):
        return super().stop(timeout)

    def leftovers(self) -> list[str]:
        """Processes still running from this server's Ray session."""
        out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
        return [line for line in out.splitlines() if str(self.temp) in line]

    def connect(self) -> None:
        ray.init(address="auto", _temp_dir=str(self.temp), namespace="serve", log_to_driver=False)
