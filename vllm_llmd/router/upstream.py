"""Stage 5 of the request path: send the request to the decision's pods in rank order and relay
the answer to the client unchanged.

* Until the client has received a byte, a pod that fails is replaced by the next pod in the
  ranking, ``pool.max_retries`` times (Envoy's ``retry_on: connect-failure,reset,5xx`` with a
  per-try timeout): a refused or reset connection (the pod is ejected at once), no answer within
  ``pool.first_byte_timeout_s``, or a 5xx answer (both count toward ejection). The last pod's 5xx
  is relayed as it came.
* A streamed answer (``text/event-stream``) is relayed chunk by chunk as it arrives; a gap longer
  than ``pool.stream_idle_timeout_s`` or a pod failing mid-stream aborts the client's connection
  (a truncated stream, never a clean end). Other answers are read whole, up to
  :data:`MAX_BUFFERED_BYTES` (beyond that they are relayed as they arrive), then sent.
* A request whose client left is never sent again: the front cancels its handler, and every retry
  first checks that the client is still there.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import BytesPayload

from vllm_llmd.pd.peer import PeerPlan, peer_queued_tokens
from vllm_llmd.router.attempt import Attempt
from vllm_llmd.router.config import PoolConfig
from vllm_llmd.router.errors import error_response
from vllm_llmd.router.metrics import RouterMetrics
from vllm_llmd.router.observe import REQUEST_ID, RequestObserver, RequestRecord
from vllm_llmd.router.pool import Pod, PodPool
from vllm_llmd.router.scheduling import Decision, SchedRequest, Scheduler

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Trailers",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
    )
)
#: a request body is read decoded (aiohttp decompresses ``Content-Encoding``; ``max_body_bytes``
#: bounds the decoded size) and forwarded as the UTF-8 JSON the router parsed, so the client's
#: encoding and content type must not travel with it
_REQUEST_DROP = HOP_BY_HOP | {"content-encoding", "content-type"}
#: a non-streamed answer longer than this is relayed as it arrives instead of being held whole
MAX_BUFFERED_BYTES = 16 << 20
_CACHED_TOKENS = re.compile(rb'"cached_tokens"\s*:\s*(\d{1,12})\b')


#: a body over this is written to the pod in steps of this size (:func:`body_payload`)
WRITE_STEP_BYTES = 1 << 20


class _StepwiseBody(BytesPayload):
    """A large request body written ``WRITE_STEP_BYTES`` at a time, each step waiting for the socket
    to take it (aiohttp writes a ``bytes`` body in one call: ~90 ms of event loop for 16 MiB here)."""

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        view = memoryview(self._value)
        if content_length is not None:
            view = view[:content_length]
        for i in range(0, len(view), WRITE_STEP_BYTES):
            await writer.write(view[i : i + WRITE_STEP_BYTES])  # drains once past its 64 KiB limit


def body_payload(body: bytes) -> bytes | BytesPayload:
    """What to hand aiohttp as a request's ``data``: a large body is written in steps."""
    return _StepwiseBody(body) if len(body) > WRITE_STEP_BYTES else body


def forward_headers(headers: Any, drop: frozenset[str] = HOP_BY_HOP) -> dict[str, str]:
    out: dict[str, str] = {}
    conn_listed = {t.strip().lower() for t in headers.get("Connection", "").split(",") if t.strip()}
    for k, v in headers.items():
        lk = k.lower()
        if lk in drop or lk in conn_listed:
            continue
        out[k] = v
    return out


def request_headers(request: web.Request, body: bool = True, content_type: str | None = None) -> dict[str, str]:
    """The client's headers as sent on to a pod (with a body: the router's own JSON's content type,
    or ``content_type`` for a body passed as it came, e.g. multipart)."""
    out = forward_headers(request.headers, _REQUEST_DROP)
    if body:
        out["Content-Type"] = content_type or "application/json"
    return out


def pod_headers(request: web.Request, rid: str | None, content_type: str | None = None) -> dict[str, str]:
    """:func:`request_headers` with one ``X-Request-Id``, ``rid`` (the request's, :mod:`.observe`),
    on every leg of a request: llm-d's routing sidecar sends one id on the prefill and the decode leg
    (``internal/proxy/connector_nixlv2.go``) and vLLM makes each engine's own id unique from it
    (``vllm/v1/engine/input_processor.py``: ``f"{external_req_id}-{random_uuid():.8}"``)."""
    out = request_headers(request, content_type=content_type)
    if rid is not None:
        for k in [k for k in out if k.lower() == "x-request-id"]:
            del out[k]
        out[REQUEST_ID] = rid
    return out


def client_gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


async def read_capped(resp: aiohttp.ClientResponse, cap: int) -> tuple[bytes, bool]:
    """Up to ``cap`` bytes of the body (a chunk more at most), and whether that was all of it."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await resp.content.readany()
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
        if size > cap:
            return b"".join(chunks), False


class Upstream:
    def __init__(
        self,
        cfg: PoolConfig,
        pool: PodPool,
        metrics: RouterMetrics,
        observer: RequestObserver | None = None,
        tracing: Any | None = None,
    ) -> None:
        """``tracing``: a :class:`~.tracing.Tracing` whose client spans the session's requests get."""
        self.cfg = cfg
        self.tracing = tracing
        self.pool = pool
        self.metrics = metrics
        self.observer = observer
        #: per request: connect, then the longest wait for more bytes (a stream's idle gap)
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=cfg.connect_timeout_s, sock_read=cfg.stream_idle_timeout_s
        )
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> aiohttp.ClientSession:
        # an idle pooled connection is dropped before vLLM's own keep-alive timeout closes it
        # (VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s): reusing one the pod is closing fails the request there
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=4)
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.connect_timeout_s),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            trace_configs=[self.tracing.client_trace_config()] if self.tracing is not None else None,
        )
        return self.session

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def forward(
        self,
        request: web.Request,
        path: str,
        body: bytes,
        req: SchedRequest,
        decision: Decision,
        scheduler: Scheduler,
        *,
        remote_kv: bool = False,
        prefill_pod: str | None = None,
        content_type: str | None = None,
        rec: RequestRecord | None = None,
        peer: PeerPlan | None = None,
    ) -> web.StreamResponse:
        """Send to the best pod; until the client has received a byte, a failed pod is replaced by
        the next one in the ranking. ``rec``: the request's record (its id goes to the pod; the pod,
        status and chunk times are filled in, :mod:`.observe`). ``peer``: the chosen pod's peer-load
        plan when the body asks it to load (what the load saves is not queued on it)."""
        assert self.session is not None
        m = self.metrics
        headers = pod_headers(request, rec.request_id if rec is not None else None, content_type)
        ranked = decision.ranked[: 1 + self.cfg.max_retries]
        view = req.view
        last_err = ""
        for i, cand in enumerate(ranked):
            pod = self.pool.get(cand.id)
            if pod is None:
                continue
            if i > 0:
                if client_gone(request):  # a request whose client left is never sent again
                    break
                m.retries.labels(pod.id).inc()
            cached = view.cached.get(pod.id, 0) if view is not None else 0
            # with remote KV the decode pod loads the prompt instead of computing it
            uncached = 0 if remote_kv else max(0, req.prompt_tokens - cached)
            if i == 0:
                uncached = peer_queued_tokens(uncached, peer)
            attempt = Attempt(
                pod,
                req,
                scheduler,
                self.pool.inflight,
                prefill_tokens=uncached,
                decode_tokens=req.max_tokens,
                scheduled=i == 0,
            )
            with attempt:
                upstream: aiohttp.ClientResponse | None = None
                try:
                    async with asyncio.timeout(self.cfg.first_byte_timeout_s):
                        upstream = await self.session.post(
                            pod.url + path, data=body_payload(body), headers=headers, timeout=self.timeout
                        )
                        streamed = upstream.status == 200 and upstream.content_type == "text/event-stream"
                        if streamed:
                            data, complete = await upstream.content.readany(), False
                            if not data:
                                raise aiohttp.ServerDisconnectedError("stream ended before the first byte")
                        else:
                            data, complete = await read_capped(upstream, MAX_BUFFERED_BYTES)
                    if upstream.status >= 500 and i + 1 < len(ranked) and not client_gone(request):
                        # a 5xx before any byte reached the client: the next pod in the ranking gets it
                        last_err = f"HTTP {upstream.status}"
                        m.upstream_errors.labels(pod.id, "5xx").inc()
                        self.pool.report_failure(pod, last_err)
                        continue
                    attempt.answering(streamed=streamed and upstream.status == 200)
                    out_headers = self._response_headers(upstream, pod, cached, prefill_pod)
                    if rec is not None:
                        rec.pod, rec.status = pod.id, upstream.status
                        out_headers[REQUEST_ID] = rec.request_id
                    return await self._relay(request, path, upstream, data, complete, pod, out_headers, attempt, rec)
                except TimeoutError:
                    last_err = f"no answer within {self.cfg.first_byte_timeout_s:g} s"
                    m.upstream_errors.labels(pod.id, "timeout").inc()
                    self.pool.report_failure(pod, last_err)
                except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as e:
                    if client_gone(request):  # our own doing: the client left and its upstream was dropped
                        raise asyncio.CancelledError from e
                    last_err = f"{type(e).__name__}: {e}"
                    m.upstream_errors.labels(pod.id, "before_first_byte").inc()
                    self.pool.report_connect_failure(pod, last_err)
                finally:
                    if upstream is not None:
                        upstream.release()
        if client_gone(request):
            raise asyncio.CancelledError  # nobody to answer (the front cancels the handler too)
        status = 504 if last_err.startswith("no answer within") else 502
        m.requests.labels(path, str(status)).inc()
        return error_response(status, f"no pod could take the request ({last_err})")

    def _response_headers(
        self, upstream: aiohttp.ClientResponse, pod: Pod, predicted: int, prefill_pod: str | None
    ) -> dict[str, str]:
        h = forward_headers(upstream.headers)
        h["X-LLMD-Pod"] = pod.id
        h["X-LLMD-Predicted-Cached-Tokens"] = str(predicted)
        if prefill_pod is not None:
            h["X-LLMD-Prefill-Pod"] = prefill_pod
        return h

    async def _relay(
        self,
        request: web.Request,
        path: str,
        upstream: aiohttp.ClientResponse,
        data: bytes,
        complete: bool,
        pod: Pod,
        headers: dict[str, str],
        attempt: Attempt | None = None,
        rec: RequestRecord | None = None,
    ) -> web.StreamResponse:
        m = self.metrics
        if upstream.status >= 500:
            self.pool.report_failure(pod, f"HTTP {upstream.status}")
            m.upstream_errors.labels(pod.id, "5xx").inc()
        else:
            self.pool.report_success(pod)
        m.requests.labels(path, str(upstream.status)).inc()
        if complete:
            self.observe_reported(pod, data)
            return web.Response(status=upstream.status, body=data, headers=headers)
        out = web.StreamResponse(status=upstream.status, headers=headers)
        await out.prepare(request)
        chunk = data
        obs = self.observer if rec is not None and upstream.content_type == "text/event-stream" else None
        itl = last = None
        if obs is not None:
            assert rec is not None
            obs.first_chunk(rec)
            itl, last = obs.itl_for(rec), time.perf_counter()
        while chunk:
            try:
                await out.write(chunk)
            except ConnectionResetError:
                upstream.close()  # the client went away: drop the upstream so the engine aborts
                return out
            except asyncio.CancelledError:
                upstream.close()
                raise
            if b"cached_tokens" in chunk:
                self.observe_reported(pod, chunk)
            try:
                chunk = await upstream.content.readany()
                if chunk and attempt is not None:
                    attempt.chunk(chunk)
                if itl is not None and chunk:
                    now = time.perf_counter()
                    itl.observe(now - last)
                    last = now
            except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
                # the pod failed mid-stream: the client already has bytes, so it cannot be retried
                m.upstream_errors.labels(pod.id, "midstream").inc()
                self.pool.report_failure(pod, f"stream broke: {e}")
                upstream.close()
                # the client must see a broken stream, not a clean end: abort its connection
                log.warning("pod %s failed mid-stream (%s): aborting the client stream", pod.id, e)
                if request.transport is not None:
                    request.transport.abort()
                return out
        await out.write_eof()
        if attempt is not None and upstream.status == 200:
            attempt.completed = True
        return out

    def observe_reported(self, pod: Pod, data: bytes) -> None:
        """Count the cached prompt tokens the engine reports in an answer (its usage details)."""
        mm = _CACHED_TOKENS.search(data)
        if mm:
            self.metrics.reported_hit_tokens.labels(pod.id).inc(int(mm.group(1)))
