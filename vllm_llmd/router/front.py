"""The HTTP front: the router's listening server and the limits that keep slow or hostile clients
from taking it down.

* **Header timeout.** aiohttp arms its keep-alive timer when a connection is made and again after
  each answer, and closes a connection still waiting for a request's headers when it fires
  (``aiohttp/web_protocol.py``, ``RequestHandler.connection_made`` / ``_process_keepalive``), so
  ``keepalive_timeout`` is both the idle keep-alive timeout and the time a client has to send its
  headers: ``server.header_timeout_s``.
* **Body timeout.** The body is read by the request stage within ``server.body_timeout_s``
  (:func:`read_body`); a client trickling it gets a 408.
* **Bodies in flight.** :class:`BodyBudget` bounds the bytes of request bodies the router holds at
  once (``server.max_body_bytes_in_flight``): a body counts its ``Content-Length`` (or
  ``max_body_bytes`` when that is unknown or the body is compressed) from before it is read until
  its request ends; a request that would exceed the budget gets a 503 before its body is read.
* **Connections.** :class:`ConnectionGuard` bounds client connections (``server.max_connections``,
  by default half the open-file limit, which the router first raises to its hard limit). When a
  new connection would exceed the bound, the oldest connection that has not sent a complete request
  yet (idle or still sending headers) is closed, else the oldest still sending a body, else the new
  one: a flood of idle partial connections (issue 9: 20k of them filled the fd limit and refused
  every new client) only ever displaces itself.
* **Logs.** aiohttp logs every malformed request at ERROR; its server logger is rate-limited
  (:class:`RateLimitFilter`) so a client cannot flood the log.
* **Abandoned requests.** Handlers are cancelled when their client disconnects
  (``handler_cancellation``, as aiohttp's own test server does), so the upstream request is dropped
  and its in-flight accounting released at once.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from vllm_llmd.router.config import ServerConfig
from vllm_llmd.router.errors import HTTPError, error_response

log = logging.getLogger(__name__)

_IDLE, _BODY, _ACTIVE = 0, 1, 2


class RateLimitFilter(logging.Filter):
    """At most ``per_minute`` records a minute through a logger, then one note of how many were
    dropped: a client cannot flood the log (aiohttp logs every malformed request at ERROR)."""

    def __init__(self, per_minute: int = 20) -> None:
        super().__init__()
        self.per_minute = per_minute
        self._window = 0.0
        self._count = 0
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = record.created
        if now - self._window >= 60.0:
            if self._dropped:
                record.msg = f"{record.msg} (and {self._dropped} similar records dropped in the last minute)"
            self._window, self._count, self._dropped = now, 0, 0
        self._count += 1
        if self._count > self.per_minute:
            self._dropped += 1
            return False
        return True


def limit_server_logs() -> None:
    """Rate-limit aiohttp's server logger (once per process)."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, RateLimitFilter) for f in logger.filters):
        logger.addFilter(RateLimitFilter())


def raise_fd_limit() -> int:
    """Raise the soft open-file limit to the hard one; the soft limit in effect."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def default_max_connections(fd_limit: int) -> int:
    """Half the fds left after a reserve: each client connection may hold an upstream one."""
    return max(16, (fd_limit - 256) // 2)


class ConnectionGuard:
    """Tracks client connections (oldest first) and what each is doing; keeps them under ``limit``."""

    def __init__(self, limit: int, on_close: Callable[[str], None] | None = None) -> None:
        self.limit = limit
        self._conns: OrderedDict[RequestHandler, int] = OrderedDict()
        #: called with "displaced" or "refused" for each connection the guard closes
        self._on_close = on_close
        self.evicted = 0
        self.refused = 0

    def __len__(self) -> int:
        return len(self._conns)

    def made(self, handler: RequestHandler) -> None:
        self._conns[handler] = _IDLE
        if len(self._conns) <= self.limit:
            return
        for state in (_IDLE, _BODY):
            victim = next((h for h, s in self._conns.items() if s == state and h is not handler), None)
            if victim is not None:
                self.evicted += 1
                self._close(victim, "displaced")
                return
        self.refused += 1
        self._close(handler, "refused")

    def _close(self, handler: RequestHandler, reason: str) -> None:
        self.lost(handler)
        handler.force_close()
        if self._on_close is not None:
            self._on_close(reason)

    def lost(self, handler: RequestHandler) -> None:
        self._conns.pop(handler, None)

    def set_state(self, handler: Any, state: int) -> None:
        if handler in self._conns:
            self._conns[handler] = state

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        proto = request.protocol
        self.set_state(proto, _BODY if request.can_read_body else _ACTIVE)
        try:
            return await handler(request)
        finally:
            self.set_state(proto, _IDLE)


def body_received(request: web.Request, guard: ConnectionGuard | None) -> None:
    """The request's body is in: its connection is no longer one to close first."""
    if guard is not None:
        guard.set_state(request.protocol, _ACTIVE)


_RESERVED = web.RequestKey("llmd_body_bytes_reserved", int)


class BodyBudget:
    """Bytes of request bodies held at once; :meth:`reserve` before reading, the middleware releases."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def reserve(self, request: web.Request, max_body_bytes: int) -> None:
        n = request.content_length
        if n is None or n > max_body_bytes or request.headers.get("Content-Encoding", "identity") != "identity":
            n = max_body_bytes  # the decoded size is not known before reading: the most it may be
        if self.held + n > self.limit:
            raise HTTPError(
                503, "the router holds too many request bodies: retry", headers={"Retry-After": "1"}, close=True
            )
        self.held += n
        request[_RESERVED] = n

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        finally:
            self.held -= request.get(_RESERVED, 0)


#: the event loop runs after each this many bytes of body read (:func:`read_body`)
READ_STEP_BYTES = 1 << 20


async def read_body(request: web.Request, max_bytes: int, timeout_s: float, budget: BodyBudget | None = None) -> bytes:
    """The whole (decoded) request body within ``timeout_s``, counted in ``budget``; ``HTTPError``
    503 / 413 / 408 / 400. Read as aiohttp's ``request.read()`` does, but with the stream buffering at
    most about ``2 * READ_STEP_BYTES`` and the event loop running after every ``READ_STEP_BYTES``
    (aiohttp's read() cost the event loop 45-70 ms of CPU for 16 MiB here, in few long steps)."""
    if budget is not None:
        budget.reserve(request, max_bytes)
    try:
        async with asyncio.timeout(timeout_s):
            return await _read(request, max_bytes)
    except web.HTTPRequestEntityTooLarge as e:
        raise HTTPError(413, f"request body exceeds {max_bytes} bytes", "RequestTooLargeError", close=True) from e
    except TimeoutError as e:
        msg = f"request body not received within {timeout_s:g} s"
        raise HTTPError(408, msg, "RequestTimeoutError", close=True) from e
    except RequestPayloadError as e:  # e.g. a Content-Encoding the body does not match
        cause = e.__cause__ or e
        raise HTTPError(400, f"cannot decode the request body: {cause}", "BadRequestError", close=True) from e
    except (ConnectionError, web.HTTPBadRequest) as e:
        raise HTTPError(400, f"cannot read the request body: {e}", "BadRequestError", close=True) from e


async def _read(request: web.Request, max_bytes: int) -> bytes:
    content = request.content
    # aiohttp's read() raises the stream's buffer to the whole body (so a compressed body
    # decompresses in large chunks): then each readany() joins everything that has arrived, ~16 MiB
    # in one call. A buffer of one step bounds the work per call and still decompresses in 1 MiB chunks.
    set_chunk = getattr(content, "set_read_chunk_size", None)
    if set_chunk is not None:
        set_chunk(READ_STEP_BYTES)
    chunks: list[bytes] = []
    size = since = 0
    while chunk := await content.readany():
        size += len(chunk)
        if size > max_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=size)
        chunks.append(chunk)
        since += len(chunk)
        if since >= READ_STEP_BYTES:
            since = 0
            await asyncio.sleep(0)
    return b"".join(chunks)


async def expect_handler(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue`` as aiohttp answers it; any other ``Expect`` a JSON 417 (aiohttp's own
    handler runs outside the middlewares and fails with a plain-text 500 on a non-UTF-8 value)."""
    expect = request.headers.get("Expect", "")
    if request.version != (1, 1):
        return None
    if expect.lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
        return None
    resp = error_response(417, "only 'Expect: 100-continue' is supported", "ExpectationFailedError")
    resp.force_close()
    return resp


class RouterRunner(web.AppRunner):
    """``AppRunner`` whose server reports connections to a :class:`ConnectionGuard`."""

    def __init__(self, app: web.Application, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.guard = guard

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        made, lost, guard = server.connection_made, server.connection_lost, self.guard

        def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
            made(handler, transport)
            guard.made(handler)

        def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
            guard.lost(handler)
            lost(handler, exc)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]
        return server


def make_runner(app: web.Application, cfg: ServerConfig, guard: ConnectionGuard) -> RouterRunner:
    limit_server_logs()
    return RouterRunner(
        app,
        guard,
        access_log=None,
        handle_signals=False,
        keepalive_timeout=cfg.header_timeout_s,
        handler_cancellation=True,
        max_line_size=cfg.max_header_bytes,
        max_field_size=cfg.max_header_bytes,
        # after an early answer (408, 413), unread body bytes are drained this long, not aiohttp's 10 s
        lingering_time=2.0,
    )


class RunningServer:
    """A started runner and the port it listens on."""

    def __init__(self, runner: web.AppRunner, port: int) -> None:
        self.runner, self.port = runner, port

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_server(
    runner: web.AppRunner, host: str, port: int, backlog: int = 1024, ssl_context: Any = None
) -> RunningServer:
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=backlog, reuse_address=True, ssl_context=ssl_context)
    await site.start()
    bound = next((a[1] for a in runner.addresses if isinstance(a, tuple)), port)
    return RunningServer(runner, bound)
