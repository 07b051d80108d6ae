"""A server in a background thread of this process: for notebooks, scripts and tests
that want to talk HTTP to a model they already hold, without a second process."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from ..errors import GPT2LabError


class BackgroundServer:
    """uvicorn serving `app` on a thread; `.url` is its base address. Stop it with
    `.stop()` or by leaving a `with` block."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, timeout: float = 60):
        import uvicorn

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as e:
            self._sock.close()
            raise GPT2LabError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self.host, self.port = self._sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise GPT2LabError(f"the server on {self.url} did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(30)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
