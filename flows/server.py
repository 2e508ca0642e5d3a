"""A local Prefect server for the CLI, when the user has not pointed us at one.

With PREFECT_API_URL set, that server is used as it is (a team's Postgres-backed server). Without
it, `prefect server start` runs as a child process on a free loopback port, its SQLite database
under the work dir's `prefect/` folder, analytics off; it stops when the command ends, unless
the caller keeps it to browse the UI.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

QUIET_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


def configure_environment(prefect_home: Path) -> None:
    """Call before prefect is imported: its settings are read from the environment."""
    os.environ.update(QUIET_ENV)
    os.environ.setdefault("PREFECT_HOME", str(prefect_home))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(api_url: str, process: subprocess.Popen | None, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"prefect server exited with code {process.returncode}; see {log_path}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.25)
    raise RuntimeError(f"prefect server did not answer at {api_url} within {timeout_s:.0f} s; see {log_path}")


class LocalServer:
    """A Prefect server process on loopback; `wait_ready` blocks until its API answers."""

    def __init__(self, prefect_home: Path, api_url: str | None = None):
        self.prefect_home = prefect_home
        self.process: subprocess.Popen | None = None
        self.log_path = prefect_home / "server.log"
        self.api_url = api_url or self._start()

    def _start(self) -> str:
        self.prefect_home.mkdir(parents=True, exist_ok=True)
        port = free_port()
        env = {**os.environ, **QUIET_ENV, "PREFECT_HOME": str(self.prefect_home)}
        env.pop("PREFECT_API_URL", None)
        # The UI's JavaScript calls the API at this address; its default is port 4200, not ours.
        env["PREFECT_SERVER_UI_API_URL"] = f"http://127.0.0.1:{port}/api"
        command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return f"http://127.0.0.1:{port}/api"

    def wait_ready(self, timeout_s: float = 90.0) -> str:
        wait_healthy(self.api_url, self.process, timeout_s, self.log_path)
        return self.api_url

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def flush_prefect_logs() -> None:
    """Send buffered run logs and events before the server goes away; otherwise Prefect's
    background workers retry against a closed port for over a minute at exit."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=15)


@contextlib.contextmanager
def prefect_server(prefect_home: Path, keep: bool = False) -> Iterator[LocalServer]:
    """A Prefect server for this command: the configured one, or a local one started now.

    The local server boots in the background while the caller imports its flows (both take
    seconds on a small machine); call `wait_ready()` before the first flow run. PREFECT_API_URL
    is set before anything imports prefect, so every client in this process talks to it.
    """
    configured = os.environ.get("PREFECT_API_URL")
    server = LocalServer(prefect_home, api_url=configured)
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        yield server
    finally:
        flush_prefect_logs()
        if server.process is not None:
            if keep:
                print(f"Prefect UI: {server.api_url[:-4]}  (server pid {server.process.pid}; stop: kill {server.process.pid})")
            else:
                server.stop()
                os.environ.pop("PREFECT_API_URL", None)
