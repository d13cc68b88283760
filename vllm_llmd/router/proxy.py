"""The OpenAI-compatible proxy: parse just enough of the request to route it, pick a pod, stream
the pod's answer back unchanged.

Bodies and headers pass through as sent, except hop-by-hop headers and client-sent
``kv_transfer_params`` / ``ec_transfer_params`` (top level, ``vllm_xargs`` or ``extra_body``: every
way vLLM 0.32 turns a request field into ``Request.kv_transfer_params``, see
:mod:`vllm_llmd.pd.requests`), which are always stripped: clients must never steer KV transfers.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from vllm_llmd.pd.requests import has_client_kv_params, strip_client_kv_params
from vllm_llmd.router.config import RouterConfig
from vllm_llmd.router.errors import HTTPError, error_response, json_errors
from vllm_llmd.router.front import (
    ConnectionGuard,
    RouterRunner,
    body_received,
    default_max_connections,
    expect_handler,
    make_runner,
    raise_fd_limit,
    read_body,
)
from vllm_llmd.router.inflight import InflightTracker
from vllm_llmd.router.metrics import RouterMetrics
from vllm_llmd.router.pool import Pod, PodPool
from vllm_llmd.router.prefix_memory import text_block_keys, token_block_keys
from vllm_llmd.router.scheduling import Candidate, Decision, SchedRequest, Scheduler
from vllm_llmd.router.scheduling.profile import NoCandidate
from vllm_llmd.router.tokenize import PromptTokenizer, TokenizerPool

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
_CACHED_TOKENS = re.compile(rb'"cached_tokens"\s*:\s*(\d+)')
_DEFAULT_MAX_TOKENS = 16  # vLLM's completions default; chat defaults to "the rest of the context"
#: token ids are hashed as uint32 (vllm_llmd.index.keys); vLLM rejects ids beyond the vocabulary itself
_TOKEN_ID_LIMIT = 1 << 32
#: far above any context length; keeps the load arithmetic in floats' range (issue 9: a 400-digit
#: max_tokens made every other request fail with OverflowError while it was in flight)
_MAX_TOKENS_LIMIT = (1 << 31) - 1
_PREDICTED = web.RequestKey("llmd_predicted_cached", int)
_PREFILL_POD = web.RequestKey("llmd_prefill_pod", str)
_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def _max_tokens(payload: dict[str, Any], chat: bool) -> int:
    """The request's output budget as vLLM reads it (chat: ``max_completion_tokens`` first); each
    given value must be an integer in ``[0, _MAX_TOKENS_LIMIT]``."""
    found: int | None = None
    for key in ("max_completion_tokens", "max_tokens") if chat else ("max_tokens", "max_completion_tokens"):
        v = payload.get(key)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= _MAX_TOKENS_LIMIT:
            raise HTTPError(400, f"'{key}' must be an integer in [0, {_MAX_TOKENS_LIMIT}]", "BadRequestError")
        if found is None:
            found = v
    return _DEFAULT_MAX_TOKENS if found is None else found


def _client_gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


def _forward_headers(headers: Any, drop: frozenset[str] = HOP_BY_HOP) -> dict[str, str]:
    out: dict[str, str] = {}
    conn_listed = {t.strip().lower() for t in headers.get("Connection", "").split(",") if t.strip()}
    for k, v in headers.items():
        lk = k.lower()
        if lk in drop or lk in conn_listed:
            continue
        out[k] = v
    return out


#: a request body is read decoded (aiohttp decompresses ``Content-Encoding``; ``max_body_bytes``
#: bounds the decoded size) and forwarded as the UTF-8 JSON the router parsed, so the client's
#: encoding and content type must not travel with it
_REQUEST_DROP = HOP_BY_HOP | {"content-encoding", "content-type"}


def _request_headers(request: web.Request) -> dict[str, str]:
    out = _forward_headers(request.headers, _REQUEST_DROP)
    out["Content-Type"] = "application/json"
    return out


class RouterApp:
    """Owns the HTTP side: the aiohttp application, the client session and the proxy handlers."""

    def __init__(
        self,
        cfg: RouterConfig,
        pool: PodPool,
        scheduler: Scheduler,
        inflight: InflightTracker,
        tokenizer: PromptTokenizer | None,
        metrics: RouterMetrics,
        index: Any | None = None,
        subscriber: Any | None = None,
        prefill_scheduler: Scheduler | None = None,
    ) -> None:
        self.cfg = cfg
        self.pool = pool
        self.scheduler = scheduler
        self.prefill_scheduler = prefill_scheduler or scheduler
        self.inflight = inflight
        self.tokenizer = tokenizer
        self.tokenizer_pool = (
            TokenizerPool(cfg.tokenizer.workers, cfg.tokenizer.max_pending, cfg.tokenizer.inline_chars)
            if tokenizer is not None
            else None
        )
        self.metrics = metrics
        self.index = index
        self.subscriber = subscriber
        self.session: aiohttp.ClientSession | None = None
        #: per upstream read: connect, then the longest wait for more bytes (a stream's idle gap)
        self._upstream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=cfg.pool.connect_timeout_s, sock_read=cfg.pool.stream_idle_timeout_s
        )
        self.models = set(cfg.models)
        self.default_model = cfg.models[0] if cfg.models else None
        self._chat_fallback_logged = False
        self._cand_cache: dict[str, _CachedCandidate] = {}
        limit = cfg.server.max_connections or default_max_connections(raise_fd_limit())
        self.guard = ConnectionGuard(limit)
        self.app = web.Application(client_max_size=cfg.max_body_bytes, middlewares=[json_errors, self.guard.middleware])
        self.app.router.add_post("/v1/completions", self.handle_completions, expect_handler=expect_handler)
        self.app.router.add_post("/v1/chat/completions", self.handle_chat, expect_handler=expect_handler)
        self.app.router.add_get("/v1/models", self.handle_models)
        self.app.router.add_get("/health", self.handle_health)
        self.app.router.add_get("/metrics", self.handle_metrics)
        self.app.on_startup.append(self._startup)
        self.app.on_cleanup.append(self._cleanup)

    # ---- lifecycle ---------------------------------------------------------------------------
    def runner(self) -> RouterRunner:
        """The server runner with the front's limits (``vllm_llmd.router.front``)."""
        return make_runner(self.app, self.cfg.server, self.guard)

    async def _startup(self, app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=60)
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.pool.connect_timeout_s),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )
        self.pool.scrape_metrics = self.scheduler.needs_metrics
        await self.pool.start(self.session)
        if self.subscriber is not None:
            self.subscriber.start()

    async def _cleanup(self, app: web.Application) -> None:
        if self.subscriber is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.subscriber.stop)
        await self.pool.stop()
        if self.session is not None:
            await self.session.close()
        if self.tokenizer_pool is not None:
            self.tokenizer_pool.close()

    # ---- simple endpoints --------------------------------------------------------------------
    async def handle_health(self, request: web.Request) -> web.Response:
        n = len(self.pool.available())
        if n == 0:
            self.metrics.requests.labels("/health", "503").inc()
            return web.json_response(
                {"status": "unavailable", "pods_available": 0},
                status=503,
                headers={"Retry-After": str(self.pool.retry_after_s())},
            )
        return web.json_response({"status": "ok", "pods_available": n})

    async def handle_metrics(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        m = self.metrics
        now = time.monotonic()
        for p in self.pool.pods:
            m.pod_available.labels(p.id).set(1 if p.available(now, self.cfg.pool.max_inflight_per_pod) else 0)
            m.inflight.labels(p.id).set(p.inflight_requests)
        m.memory_blocks.set(len(self.scheduler.ctx.memory))
        if self.index is not None:
            try:
                m.index_blocks.set(self.index.stats().blocks)
            except Exception:  # the index is another component's; its stats are best effort here
                log.debug("index stats failed", exc_info=True)
        if self.tokenizer is not None:
            m.tokenizer_cache_hits.set(self.tokenizer.cache_hits)
        resp = web.Response(body=generate_latest(m.registry))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def handle_models(self, request: web.Request) -> web.StreamResponse:
        assert self.session is not None
        for pod in self.pool.available():
            try:
                async with self.session.get(pod.url + "/v1/models", headers=_request_headers(request)) as r:
                    data = await r.read()
                    if r.status == 200:
                        return web.Response(body=data, content_type="application/json")
            except (aiohttp.ClientError, OSError):
                self.pool.report_failure(pod, "GET /v1/models failed")
        if self.models:
            created = int(time.time())
            data_list = [{"id": m, "object": "model", "created": created, "owned_by": "vllm-llmd"} for m in self.models]
            return web.json_response({"object": "list", "data": data_list})
        return error_response(
            503, "no pod available", "ServiceUnavailableError", {"Retry-After": str(self.pool.retry_after_s())}
        )

    # ---- generation --------------------------------------------------------------------------
    async def handle_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "/v1/completions", chat=False)

    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "/v1/chat/completions", chat=True)

    async def _read_json(self, request: web.Request) -> tuple[bytes, dict[str, Any]]:
        body = await read_body(request, self.cfg.max_body_bytes, self.cfg.server.body_timeout_s)
        body_received(request, self.guard)
        if not body:
            raise HTTPError(400, "empty request body: expected a JSON object", "BadRequestError")
        try:
            payload = _decoder.decode(body)
        except msgspec.DecodeError as e:
            raise HTTPError(400, f"malformed JSON body: {e}", "BadRequestError") from e
        except RecursionError as e:  # msgspec's depth limit is the interpreter's recursion limit
            raise HTTPError(400, "malformed JSON body: nested too deeply", "BadRequestError") from e
        if not isinstance(payload, dict):
            raise HTTPError(400, "the JSON body must be an object", "BadRequestError")
        return body, payload

    def _check_model(self, payload: dict[str, Any]) -> str:
        model = payload.get("model")
        if model is None:
            return self.default_model or ""
        if not isinstance(model, str):
            raise HTTPError(400, "'model' must be a string", "BadRequestError")
        if self.models and model not in self.models:
            raise HTTPError(404, f"The model `{model}` does not exist.", "NotFoundError")
        return model

    async def _sched_request(
        self, payload: dict[str, Any], model: str, chat: bool, session_id: str | None, body_size: int
    ) -> SchedRequest:
        tok = self.tokenizer
        pool = self.tokenizer_pool
        token_ids: Sequence[int] | None = None
        text = ""
        if chat:
            messages = payload.get("messages")
            if not isinstance(messages, list) or not messages:
                raise HTTPError(400, "'messages' must be a non-empty list", "BadRequestError")
            if tok is not None and pool is not None and tok.has_chat_template:
                try:
                    token_ids = await pool.run(body_size, tok.encode_chat_ids, payload)
                except Exception as e:  # a template error is the engine's to report; route approximately
                    log.debug("chat template failed: %s", e)
                    if not self._chat_fallback_logged:
                        log.warning("chat template failing: such chat requests use approximate scoring")
                        self._chat_fallback_logged = True
            if token_ids is None:
                text = "".join(
                    f"{m.get('role', '')}: {m.get('content', '')}\n" if isinstance(m, dict) else str(m)
                    for m in messages
                )
        else:
            prompt = payload.get("prompt")
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]  # a batch: route by its first prompt
            if isinstance(prompt, str):
                text = prompt
                if tok is not None and pool is not None:
                    specials = bool(payload.get("add_special_tokens", True))
                    token_ids = await pool.run(len(prompt), tok.encode_ids, prompt, specials)
            elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
                if prompt and (min(prompt) < 0 or max(prompt) >= _TOKEN_ID_LIMIT):
                    raise HTTPError(400, f"token ids must be in [0, {_TOKEN_ID_LIMIT})", "BadRequestError")
                token_ids = prompt
            else:
                raise HTTPError(400, "'prompt' must be a string, a list of strings or token ids", "BadRequestError")
        bs = self.scheduler.ctx.block_size
        lora = None
        # only the first max_prompt_blocks blocks take part in routing (bounds the work per request)
        cap = self.cfg.index.max_prompt_blocks * bs
        if token_ids is not None:
            head = token_ids if len(token_ids) <= cap else token_ids[:cap]
            if self.index is not None and hasattr(self.index, "block_keys"):
                keys = self.index.block_keys(model, head, lora=lora)
            else:
                keys = token_block_keys(head, bs)
            n = len(token_ids)
        else:
            keys = text_block_keys(text[: 4 * cap], bs)
            n = max(1, len(text) // 4)
        mt = _max_tokens(payload, chat)
        return SchedRequest(model, token_ids, text, n, mt, keys, session_id=session_id, lora=lora)

    def _candidates(self, pods: list[Pod]) -> list[Candidate]:
        """The scheduler's view of ``pods``; one cached :class:`Candidate` per pod (its load is a
        live reference), refreshed only where the pod's scraped metrics changed."""
        cache = self._cand_cache
        out = []
        for p in pods:
            c = cache.get(p.id)
            if c is None or c.pod is not p:
                c = cache[p.id] = _CachedCandidate(
                    Candidate(
                        id=p.id,
                        prefill_speed=p.prefill_speed,
                        has_events=p.config.events is not None,
                        role=p.role,
                        load=self.inflight.load(p.id),
                        metrics=p.metrics,
                        capacity_blocks=p.capacity_blocks,
                    ),
                    p,
                )
            cand = c.cand
            if cand.metrics is not p.metrics:
                cand.metrics = p.metrics
                cand.capacity_blocks = p.capacity_blocks
            out.append(cand)
        return out

    async def _generate(self, request: web.Request, path: str, chat: bool) -> web.StreamResponse:
        m = self.metrics
        try:
            body, payload = await self._read_json(request)
            t0 = time.perf_counter()
            model = self._check_model(payload)
            if has_client_kv_params(payload):  # a client never steers a KV transfer
                payload = strip_client_kv_params(payload)
                body = _encoder.encode(payload)
            available = self.pool.available()
            pods = [p for p in available if p.role != "prefill"]
            prefill_pods = [p for p in available if p.role == "prefill"]
            if not pods:
                raise HTTPError(
                    503, "no healthy pod", "ServiceUnavailableError", {"Retry-After": str(self.pool.retry_after_s())}
                )
            req = await self._sched_request(
                payload, model, chat, request.headers.get(self.cfg.session_header), len(body)
            )
            try:
                decision = self.scheduler.schedule(req, self._candidates(pods))
            except NoCandidate as e:
                raise HTTPError(
                    503, str(e), "ServiceUnavailableError", {"Retry-After": str(self.pool.retry_after_s())}
                ) from e
            m.decision_seconds.observe(time.perf_counter() - t0)
        except HTTPError as e:
            m.requests.labels(path, str(e.status)).inc()
            return error_response(e.status, e.message, e.err_type, e.headers)
        self._observe_decision(decision, req)
        request[_PREDICTED] = decision.predicted_cached_tokens
        stream = bool(payload.get("stream", False))
        remote_kv = False
        sources: list[Pod] | None = None
        if prefill_pods:
            from vllm_llmd.pd import should_disaggregate  # P/D code is only needed with prefill pods

            if should_disaggregate(req.prompt_tokens, decision.predicted_cached_tokens, self.cfg.pd.threshold_tokens):
                sources = prefill_pods
        elif self.cfg.pd.peers and len(pods) > 1:
            sources = self._peer_kv_source(req, decision, pods)
        if sources is None:
            if prefill_pods or self.cfg.pd.peers:
                m.pd_requests.labels("aggregated").inc()
        else:
            decode_body = await self._prefill_leg(request, path, payload, req, sources, chat)
            if decode_body is not None:
                body, remote_kv = decode_body, True
                m.pd_requests.labels("disaggregated").inc()
            else:
                m.pd_requests.labels("fallback").inc()
        return await self._forward(request, path, body, req, decision, stream, remote_kv)

    def _peer_kv_source(self, req: SchedRequest, decision: Decision, pods: list[Pod]) -> list[Pod] | None:
        """Selective P/D among ``role: both`` pods: the peer that should produce the prompt's KV for
        the chosen decode pod (``vllm_llmd.pd.selective``), or ``None`` to serve it colocated."""
        from vllm_llmd.pd import PodCost, SelectiveParams, choose_kv_source

        view = req.scratch.get("prefix_view")
        if view is None:
            return None
        pd = self.cfg.pd
        params = SelectiveParams(pd.threshold_tokens, pd.transfer_token_weight, pd.leg_overhead_tokens)

        def cost(p: Pod) -> PodCost:
            ld = self.inflight.load(p.id)
            uncached = max(0, req.prompt_tokens - view.cached.get(p.id, 0))
            return PodCost(p.id, uncached, ld.prefill_tokens, ld.decode_tokens, p.prefill_speed)

        chosen = decision.chosen.id
        by_id = {p.id: p for p in pods if p.role == "both"}
        if chosen not in by_id:
            return None
        src = choose_kv_source(
            req.prompt_tokens, cost(by_id[chosen]), [cost(p) for i, p in by_id.items() if i != chosen], params
        )
        if src is None:
            return None
        log.debug(
            "peer P/D: %s pulls from %s (remote %.0f < local %.0f)", chosen, src.pod, src.remote_cost, src.local_cost
        )
        return [by_id[src.pod]]

    async def _prefill_leg(
        self,
        request: web.Request,
        path: str,
        payload: dict[str, Any],
        req: SchedRequest,
        prefill_pods: list[Pod],
        chat: bool,
    ) -> bytes | None:
        """Run the prefill leg on a prefill pod; the decode body (with the prefill engine's
        ``kv_transfer_params``), or ``None`` to serve the request aggregated on the decode pod."""
        from vllm_llmd.pd import PDError, build_decode_request, build_prefill_request

        assert self.session is not None
        preq = replace(req, scratch={})
        try:
            decision = self.prefill_scheduler.schedule(preq, self._candidates(prefill_pods))
        except NoCandidate:
            return None
        leg = _encoder.encode(build_prefill_request(payload, chat=chat))
        headers = _request_headers(request)
        for cand in decision.ranked[: 1 + self.cfg.pool.max_retries]:
            pod = self.pool.get(cand.id)
            if pod is None:
                continue
            ticket = self.inflight.start(pod.id, max(0, req.prompt_tokens - decision.predicted_cached_tokens), 1)
            pod.inflight_requests += 1
            try:
                async with (
                    asyncio.timeout(self.cfg.pool.first_byte_timeout_s),
                    self.session.post(pod.url + path, data=leg, headers=headers, timeout=self._upstream_timeout) as r,
                ):
                    data = await r.read()
                    if r.status != 200:
                        log.warning("prefill pod %s answered %d: serving aggregated", pod.id, r.status)
                        if r.status >= 500:
                            self.pool.report_failure(pod, f"prefill HTTP {r.status}")
                        return None
                self.pool.report_success(pod)
                decode = build_decode_request(payload, _decoder.decode(data))
                request[_PREFILL_POD] = pod.id
                return _encoder.encode(decode)
            except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as e:
                self.pool.report_connect_failure(pod, f"prefill leg: {type(e).__name__}: {e}")
                continue
            except (PDError, msgspec.DecodeError) as e:
                log.warning("prefill pod %s gave no usable kv_transfer_params (%s): serving aggregated", pod.id, e)
                return None
            finally:
                self.inflight.done(ticket)
                pod.inflight_requests -= 1
                if req.block_keys:
                    self.scheduler.ctx.memory.insert(pod.id, req.block_keys)
        return None

    def _observe_decision(self, decision: Decision, req: SchedRequest) -> None:
        m = self.metrics
        pid = decision.chosen.id
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "route prompt=%d tokens first_key=%x -> %s predicted_cached=%d totals=%s costs=%s",
                req.prompt_tokens,
                req.block_keys[0] if req.block_keys else 0,
                pid,
                decision.predicted_cached_tokens,
                {k: round(v, 3) for k, v in decision.totals.items()},
                req.scratch.get("estimated_ttft_cost"),
            )
        m.decisions.labels(pid).inc()
        m.predicted_hit_tokens.labels(pid).inc(decision.predicted_cached_tokens)
        m.prompt_tokens.labels(pid).inc(req.prompt_tokens)
        for name, scores in decision.scores.items():
            s = scores.get(pid, 0.0)
            m.scorer_score.labels(name).observe(s)
            if s >= max(scores.values()) - 1e-12:
                m.scorer_decisive.labels(name).inc()

    async def _forward(
        self,
        request: web.Request,
        path: str,
        body: bytes,
        req: SchedRequest,
        decision: Decision,
        stream: bool,
        remote_kv: bool = False,
    ) -> web.StreamResponse:
        """Send to the best pod; until the client has received a byte, a failed pod is replaced by
        the next one in the ranking (``pool.max_retries`` times)."""
        assert self.session is not None
        m = self.metrics
        headers = _request_headers(request)
        view = req.scratch.get("prefix_view")
        attempts = decision.ranked[: 1 + self.cfg.pool.max_retries]
        last_err = ""
        for i, cand in enumerate(attempts):
            pod = self.pool.get(cand.id)
            if pod is None:
                continue
            if i > 0:
                if _client_gone(request):  # a request whose client left is never sent again
                    break
                m.retries.labels(pod.id).inc()
                if req.block_keys:
                    self.scheduler.ctx.memory.insert(pod.id, req.block_keys, pending=True)
            cached = view.cached.get(pod.id, 0) if view is not None else 0
            request[_PREDICTED] = cached
            # with remote KV the decode pod loads the prompt instead of computing it
            uncached = 0 if remote_kv else max(0, req.prompt_tokens - cached)
            ticket = self.inflight.start(pod.id, uncached, req.max_tokens)
            pod.inflight_requests += 1
            upstream: aiohttp.ClientResponse | None = None
            try:
                async with asyncio.timeout(self.cfg.pool.first_byte_timeout_s):
                    upstream = await self.session.post(
                        pod.url + path, data=body, headers=headers, timeout=self._upstream_timeout
                    )
                    if stream and upstream.status == 200:
                        data = await upstream.content.readany()
                        if not data:
                            raise aiohttp.ServerDisconnectedError("stream ended before the first byte")
                    else:
                        data = await upstream.read()
                if upstream.status >= 500 and i + 1 < len(attempts) and not _client_gone(request):
                    # a 5xx before any byte reached the client: the next pod in the ranking gets it
                    last_err = f"HTTP {upstream.status}"
                    m.upstream_errors.labels(pod.id, "5xx").inc()
                    self.pool.report_failure(pod, last_err)
                    continue
                if stream and upstream.status == 200:
                    return await self._relay_stream(request, upstream, data, pod, ticket)
                return self._relay_whole(request, path, upstream, data, pod, ticket)
            except TimeoutError:
                # nothing has reached the client yet: try the next pod
                last_err = f"no answer within {self.cfg.pool.first_byte_timeout_s:g} s"
                m.upstream_errors.labels(pod.id, "timeout").inc()
                self.pool.report_failure(pod, last_err)
                continue
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as e:
                last_err = f"{type(e).__name__}: {e}"
                m.upstream_errors.labels(pod.id, "before_first_byte").inc()
                self.pool.report_connect_failure(pod, last_err)
                continue
            finally:
                if upstream is not None:
                    upstream.release()
                self.inflight.done(ticket)
                pod.inflight_requests -= 1
                if req.block_keys:  # the speculative entry starts to age now
                    self.scheduler.ctx.memory.insert(pod.id, req.block_keys)
        if _client_gone(request):
            raise asyncio.CancelledError  # nobody to answer (aiohttp cancels the handler too)
        status = 504 if last_err.startswith("no answer within") else 502
        m.requests.labels(path, str(status)).inc()
        return error_response(status, f"no pod could take the request ({last_err})")

    def _response_headers(self, request: web.Request, upstream: aiohttp.ClientResponse, pod: Pod) -> dict[str, str]:
        h = _forward_headers(upstream.headers)
        h["X-LLMD-Pod"] = pod.id
        h["X-LLMD-Predicted-Cached-Tokens"] = str(request.get(_PREDICTED, 0))
        if _PREFILL_POD in request:
            h["X-LLMD-Prefill-Pod"] = request[_PREFILL_POD]
        return h

    def _relay_whole(
        self, request: web.Request, path: str, upstream: aiohttp.ClientResponse, data: bytes, pod: Pod, ticket: Any
    ) -> web.StreamResponse:
        """A non-streaming answer (or an error answer), read whole by the caller."""
        m = self.metrics
        if upstream.status >= 500:
            self.pool.report_failure(pod, f"HTTP {upstream.status}")
            m.upstream_errors.labels(pod.id, "5xx").inc()
        else:
            self.pool.report_success(pod)
        self.inflight.first_token(ticket)
        self._observe_reported(pod, data)
        m.requests.labels(path, str(upstream.status)).inc()
        return web.Response(status=upstream.status, body=data, headers=self._response_headers(request, upstream, pod))

    async def _relay_stream(
        self, request: web.Request, upstream: aiohttp.ClientResponse, first: bytes, pod: Pod, ticket: Any
    ) -> web.StreamResponse:
        """Relay an SSE stream chunk by chunk as it arrives (no buffering)."""
        m = self.metrics
        self.pool.report_success(pod)
        self.inflight.first_token(ticket)
        m.requests.labels(request.path, "200").inc()
        out = web.StreamResponse(status=upstream.status, headers=self._response_headers(request, upstream, pod))
        await out.prepare(request)
        chunk = first
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
                self._observe_reported(pod, chunk)
            try:
                chunk = await upstream.content.readany()
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
        return out

    def _observe_reported(self, pod: Pod, data: bytes) -> None:
        mm = _CACHED_TOKENS.search(data)
        if mm:
            self.metrics.reported_hit_tokens.labels(pod.id).inc(int(mm.group(1)))


class _CachedCandidate:
    __slots__ = ("cand", "pod")

    def __init__(self, cand: Candidate, pod: Pod) -> None:
        self.cand, self.pod = cand, pod
