"""Shared pieces of the robustness suite: the real router on an event loop in a background thread
(so hypothesis, which drives plain functions, can fuzz it over real TCP), a raw HTTP/1.1 client that
can send malformed requests, and process RSS / fd readings."""

from __future__ import annotations

import asyncio
import http.client
import os
import socket
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from router_fakes import FakeBackend, config_for, start_router

T = TypeVar("T")

#: counts per test, printed at the end of the run (tests/robustness/conftest.py)
REPORT: dict[str, dict[str, Any]] = {}


class ThreadedRouter:
    """The router (``start_router``: the CLI's own runner and limits) and ``n`` stand-in backends."""

    def __init__(self, n_backends: int = 2, **cfg: Any) -> None:
        self._cfg = cfg
        self._n = n_backends
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="router-under-test", daemon=True)
        self.backends: list[FakeBackend] = []
        self.router: Any = None
        self.port = 0

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> ThreadedRouter:
        self._thread.start()

        async def up() -> None:
            self.backends = [await FakeBackend(name).start() for name in "ab"[: self._n]]
            self.router, self._srv = await start_router(config_for(self.backends, **self._cfg))
            self.port = self._srv.port

        self.call(up())
        return self

    def stop(self) -> None:
        async def down() -> None:
            await self._srv.close()
            for b in self.backends:
                await b.close()

        self.call(down())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def raw_request(port: int, data: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` as is on a new connection; the parsed answer. ``(0, {}, b"")`` if the router
    closed the connection without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)  # no half-close: aiohttp takes EOF for a client that left
        resp = http.client.HTTPResponse(sock)
        try:
            resp.begin()
        except (http.client.RemoteDisconnected, ConnectionResetError, http.client.BadStatusLine):
            return 0, {}, b""
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def http_request(port: int, method: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    if not any(k.lower() in ("content-length", "transfer-encoding") for k in headers):
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def rss_mib(pid: int | None = None) -> float:
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def open_fds(pid: int | None = None) -> int:
    return len(os.listdir(f"/proc/{pid or os.getpid()}/fd"))
