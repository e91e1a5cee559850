"""A real cloud server on a loopback port, in a background thread: what `cdcca demo`, the
end-to-end tests, the benchmarks and the TUI tests use instead of a remote cloud."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from device.contracts.config import Settings

from .round_job import make_runner
from .server import create_app, uvicorn_limits


class LoopbackCloud:
    """``with LoopbackCloud(settings) as cloud: cloud.url, cloud.add_device("laptop")``."""

    def __init__(self, settings: Settings, model_dir: Path | None = None, runner=None):
        self.settings = settings
        self.app = create_app(settings, runner or make_runner(settings, model_dir))
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._server = None
        self._thread = None

    def add_device(self, name: str) -> str:
        return self.app.state.store.add_device(name)

    def start(self) -> "LoopbackCloud":
        import uvicorn

        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning",
                                                     **uvicorn_limits(self.settings)))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._server.started:
            raise RuntimeError("loopback cloud did not start")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(30)
        self._sock.close()

    def __enter__(self) -> "LoopbackCloud":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
