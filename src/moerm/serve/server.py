"""Running the app on uvicorn: in the foreground (`moerm serve`) or on a background thread (tests, benchmark).

Both run uvicorn with `GuardedH11Protocol`, uvicorn's h11 protocol plus two connection guards uvicorn lacks:
a deadline for each request head (`header_timeout_s`: a slow-header client is disconnected) and a cap on open
connections (`max_connections`: when a new connection would pass it, the one that has waited longest for a request
is closed); it also bounds how much of a body answered early (413) is discarded before the connection closes.
uvicorn's own `limit_concurrency` backs the cap (503 when every connection is busy with a request) and
`timeout_keep_alive` closes idle keep-alive connections. The request body's size and deadline are the app's
(`moerm.serve.app._BodyGuard`).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import threading
import time
from collections.abc import Callable
from typing import Any, Self

import h11
import httpx
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from moerm.serve.app import SystemSource, create_app
from moerm.serve.config import MAX_DRAIN_BYTES, ServeConfig

log = logging.getLogger("moerm.serve")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 HTTP/1.1 protocol with a request-head deadline and a cap on open connections.

    Subclass it with the two class attributes set (`guarded_protocol` does). A connection is *waiting* when no
    request of it is being handled: just opened, idle between keep-alive requests, or with a request head still
    arriving. A waiting connection that has started a request head (or just opened) must complete it within
    `header_timeout_s`, or it is closed.
    """

    header_timeout_s: float = 10.0
    max_connections: int = 1000
    max_drain_bytes: int = MAX_DRAIN_BYTES  # most bytes of a refused body discarded before the connection closes
    on_event: Callable[[str], None] | None = None  # called with "header_timeout" / "connection_evicted"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self.waiting_since = 0.0
        self._drained = 0

    def _busy(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        self.waiting_since = self.loop.time()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if not self._busy() and not self.transport.is_closing():
            self._event("header_timeout")
            self.transport.close()

    def _event(self, name: str) -> None:
        if self.on_event is not None:
            self.on_event(name)

    def _make_room(self) -> None:
        """Close the connection that has waited longest for a request, if the cap is passed."""
        open_now = 0
        victim: GuardedH11Protocol | None = None
        for c in self.connections:
            if c.transport is None or c.transport.is_closing():
                continue
            open_now += 1
            if c is self or not isinstance(c, GuardedH11Protocol) or c._busy():
                continue
            if victim is None or c.waiting_since < victim.waiting_since:
                victim = c
        if open_now > self.max_connections and victim is not None:
            self._event("connection_evicted")
            victim.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()
        if len(self.connections) > self.max_connections:
            self._make_room()

    def data_received(self, data: bytes) -> None:
        if not self._busy():
            if self._head_timer is None:
                self._arm()  # the next request's head starts arriving
            if self.conn.their_state is h11.SEND_BODY:  # the rest of a body answered early (413): discarded
                self._drained += len(data)
                if self._drained > self.max_drain_bytes:
                    self.transport.close()
                    return
        super().data_received(data)
        if self._busy():
            self._disarm()

    def on_response_complete(self) -> None:
        self.waiting_since = self.loop.time()
        self._drained = 0
        super().on_response_complete()
        if self._busy():  # a pipelined request started at once
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def guarded_protocol(cfg: ServeConfig, on_event: Callable[[str], None] | None = None) -> type[GuardedH11Protocol]:
    """A `GuardedH11Protocol` class with `cfg`'s header deadline and connection cap."""
    return type("MoermH11Protocol", (GuardedH11Protocol,), {
        "header_timeout_s": float(cfg.header_timeout_s), "max_connections": int(cfg.max_connections),
        "on_event": staticmethod(on_event) if on_event is not None else None})


def uvicorn_config(app: Any, cfg: ServeConfig, host: str | None = None, port: int | None = None,
                   log_level: str = "info", keep_alive_s: float | None = None) -> uvicorn.Config:
    """uvicorn's settings for the app: the guarded protocol, connection limits and keep-alive from `cfg`."""
    state = getattr(getattr(app, "state", None), "moerm", None)
    on_event = state.metrics.observe_rejected if state is not None else None
    keep_alive = cfg.keep_alive_s if keep_alive_s is None else keep_alive_s
    return uvicorn.Config(app, host=cfg.host if host is None else host, port=cfg.port if port is None else port,
                          log_level=log_level, http=guarded_protocol(cfg, on_event), ws="none",
                          limit_concurrency=cfg.max_connections + 1,  # past the cap only when every one is busy
                          timeout_keep_alive=keep_alive,  # type: ignore[arg-type]  # a float works
                          timeout_graceful_shutdown=None)


def _raise_open_files_limit(needed: int) -> None:
    """Raise the soft open-files limit towards `needed` (connections + headroom) if the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        target = soft
    if target < needed:
        log.warning("the open-files limit is %d, below --max-connections %d plus headroom; lower --max-connections "
                    "or raise `ulimit -n`", target, needed - 64)


def run_server(source: SystemSource, cfg: ServeConfig, log_level: str = "info") -> None:
    """Serve until SIGINT / SIGTERM; uvicorn then stops accepting, finishes in-flight requests and exits."""
    if not log.handlers:  # the server's own lines (model ready, load or scoring failures) beside uvicorn's
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
        log.setLevel(log_level.upper())
    _raise_open_files_limit(cfg.max_connections + 64)
    app = create_app(source, cfg)
    uvicorn.Server(uvicorn_config(app, cfg, log_level=log_level)).run()


class BackgroundServer:
    """A real uvicorn server on a background thread; port 0 picks a free port.

    Use as a context manager: `with BackgroundServer(app) as srv: httpx.get(srv.url + "/health")`.
    `stop()` asks for a graceful shutdown (as SIGTERM would) and waits for it. The connection guards come from
    `cfg`, by default the app's own settings (an app from `create_app`) or ServeConfig's defaults.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 keep_alive_s: float | None = None, cfg: ServeConfig | None = None):
        self.app = app
        state = getattr(getattr(app, "state", None), "moerm", None)
        cfg = cfg or (state.cfg if state is not None else ServeConfig())
        self.server = uvicorn.Server(uvicorn_config(app, cfg, host=host, port=port, log_level=log_level,
                                                    keep_alive_s=keep_alive_s))
        self.host = host
        self.port = port
        self.thread = threading.Thread(target=self.server.run, name="moerm-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> Self:
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

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.thread.is_alive():
            self.stop()
