"""Running the app on uvicorn: in the foreground (`moerm serve`) or on a background thread (tests, benchmark)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import httpx
import uvicorn

from moerm.serve.app import SystemSource, create_app
from moerm.serve.config import ServeConfig


def run_server(source: SystemSource, cfg: ServeConfig, log_level: str = "info") -> None:
    """Serve until SIGINT / SIGTERM; uvicorn then stops accepting, finishes in-flight requests and exits."""
    log = logging.getLogger("moerm.serve")
    if not log.handlers:  # the server's own lines (model ready, load or scoring failures) beside uvicorn's
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
        log.setLevel(log_level.upper())
    app = create_app(source, cfg)
    uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=log_level,
                                  timeout_keep_alive=cfg.keep_alive_s, timeout_graceful_shutdown=None)).run()


class BackgroundServer:
    """A real uvicorn server on a background thread; port 0 picks a free port.

    Use as a context manager: `with BackgroundServer(app) as srv: httpx.get(srv.url + "/health")`.
    `stop()` asks for a graceful shutdown (as SIGTERM would) and waits for it.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 keep_alive_s: float = ServeConfig.keep_alive_s):
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    timeout_keep_alive=keep_alive_s, timeout_graceful_shutdown=None))
        self.host = host
        self.port = port
        self.thread = threading.Thread(target=self.server.run, name="moerm-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        """Start listening (the model may still be loading: see `wait_ready`)."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn exited during start-up (see its log above)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"uvicorn did not start within {timeout} s")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def wait_ready(self, timeout: float = 120.0, headers: dict[str, str] | None = None) -> None:
        """Poll /health until the model is loaded (200); raise if loading failed or took too long."""
        deadline = time.monotonic() + timeout
        while True:
            r = httpx.get(self.url + "/health", headers=headers, timeout=5.0)
            if r.status_code == 200:
                return
            if r.json().get("status") == "error":
                raise RuntimeError(f"model failed to load: {r.json().get('error')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"model not ready within {timeout} s")
            time.sleep(0.05)

    def stop(self, timeout: float = 60.0) -> None:
        """Graceful shutdown: stop accepting, finish in-flight requests, run the app's shutdown."""
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"uvicorn did not stop within {timeout} s")

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.thread.is_alive():
            self.stop()
