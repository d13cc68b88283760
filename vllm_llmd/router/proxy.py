"""The OpenAI-compatible proxy: the aiohttp application and the request path, read top-down.

A generation request goes through one module per stage, each with typed input and output:

1. :mod:`.request` -- the HTTP request -> a validated :class:`~.request.ClientRequest`;
2. :mod:`.prompt` -- its tokens and block keys -> a :class:`~.scheduling.SchedRequest`;
3. :mod:`.scheduling` -- prefix view, filters, scorers, picker -> a :class:`~.scheduling.Decision`;
4. :mod:`.pd_legs` -- the P/D decider's choice and the prefill leg -> the decode body, or colocated;
5. :mod:`.upstream` -- forward (with retries before the first byte) and relay the answer.

Each try on a pod is an :class:`~.attempt.Attempt` (in-flight work, routing-memory hooks). The HTTP
front's limits are :mod:`.front`; error answers :mod:`.errors`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
from aiohttp import web

from vllm_llmd.router.candidates import CandidateViews
from vllm_llmd.router.config import RouterConfig
from vllm_llmd.router.errors import HTTPError, error_response, json_errors
from vllm_llmd.router.front import (
    BodyBudget,
    ConnectionGuard,
    RouterRunner,
    default_max_connections,
    expect_handler,
    make_runner,
    raise_fd_limit,
)
from vllm_llmd.router.metrics import RouterMetrics
from vllm_llmd.router.pd_legs import PrefillLeg
from vllm_llmd.router.pool import PodPool
from vllm_llmd.router.probes import ProbeResult, Probes
from vllm_llmd.router.prompt import PromptStage
from vllm_llmd.router.request import CHAT, COMPLETIONS, ClientRequest, Endpoint, RequestParser
from vllm_llmd.router.scheduling import Candidate, Decider, Decision, NoCandidate, SchedRequest, Scheduler
from vllm_llmd.router.scheduling.scorers import TTFTCosts
from vllm_llmd.router.tokenize import PromptTokenizer, TokenizerPool
from vllm_llmd.router.upstream import Upstream, read_capped, request_headers

log = logging.getLogger(__name__)

#: a pod's model list is small; a larger answer is not relayed
MAX_MODELS_BYTES = 1 << 20


class RouterApp:
    """The aiohttp application: the endpoints, and the stages of the request path wired together."""

    def __init__(
        self,
        cfg: RouterConfig,
        pool: PodPool,
        scheduler: Scheduler,
        tokenizer: PromptTokenizer | None,
        metrics: RouterMetrics,
        index: Any | None = None,
        subscriber: Any | None = None,
        prefill_scheduler: Scheduler | None = None,
        decider: Decider | None = None,
    ) -> None:
        self.cfg = cfg
        self.pool = pool
        self.inflight = pool.inflight
        self.scheduler = scheduler
        self.prefill_scheduler = prefill_scheduler or scheduler
        self.decider = decider
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.index = index
        self.subscriber = subscriber
        self.discovery: Any | None = None
        self.probes = Probes(pool, subscriber, lambda: self.discovery, cfg.server.index_sync_timeout_s)
        self.guard = ConnectionGuard(
            cfg.server.max_connections or default_max_connections(raise_fd_limit()),
            on_close=lambda reason: metrics.client_connections_closed.labels(reason).inc(),
        )
        self.bodies = BodyBudget(cfg.server.max_body_bytes_in_flight)
        tc = cfg.tokenizer
        self.tokenizer_pool = TokenizerPool(tc.workers, tc.max_pending, tc.inline_chars)
        # the stages, in the order a request meets them
        self.parser = RequestParser(cfg, self.guard, self.bodies)
        self.prompts = PromptStage(tokenizer, self.tokenizer_pool, cfg.index.block_size, cfg.index.max_prompt_blocks)
        self.candidates = CandidateViews()
        self.upstream = Upstream(cfg.pool, pool, metrics)
        self.prefill_leg = PrefillLeg(cfg.pool, pool, self.upstream, self.prefill_scheduler)
        middlewares = [json_errors, self.guard.middleware, self.bodies.middleware]
        self.app = web.Application(client_max_size=cfg.max_body_bytes, middlewares=middlewares)
        self.app.router.add_post(COMPLETIONS.path, self.handle_completions, expect_handler=expect_handler)
        self.app.router.add_post(CHAT.path, self.handle_chat, expect_handler=expect_handler)
        self.app.router.add_get("/v1/models", self.handle_models)
        self.app.router.add_get("/health", self.handle_health)
        self.app.router.add_get("/livez", self.handle_livez)
        self.app.router.add_get("/readyz", self.handle_readyz)
        self.app.router.add_get("/metrics", self.handle_metrics)
        self.app.on_startup.append(self._startup)
        self.app.on_cleanup.append(self._cleanup)

    # ---- lifecycle ---------------------------------------------------------------------------
    def runner(self) -> RouterRunner:
        """The server runner with the front's limits (``vllm_llmd.router.front``)."""
        return make_runner(self.app, self.cfg.server, self.guard)

    async def _startup(self, app: web.Application) -> None:
        session = await self.upstream.start()
        self.pool.scrape_metrics = self.scheduler.needs_metrics
        await self.pool.start(session)
        if self.subscriber is not None:
            self.subscriber.start()
        self.probes.start()

    async def _cleanup(self, app: web.Application) -> None:
        if self.subscriber is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.subscriber.stop)
        await self.pool.stop()
        await self.upstream.close()
        self.tokenizer_pool.close()

    # ---- the request path --------------------------------------------------------------------
    async def handle_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, COMPLETIONS)

    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, CHAT)

    async def _generate(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        m = self.metrics
        try:
            creq = await self.parser.parse(request, endpoint)  # 1. parse and validate
            t0 = time.perf_counter()
            decode, prefill = self.candidate_pods()
            req = await self.prompts.build(creq, len(creq.body))  # 2. tokens and block keys
            decision = self.schedule(req, decode)  # 3. prefix view -> ranked pods
            m.decision_seconds.observe(time.perf_counter() - t0)
        except HTTPError as e:
            m.requests.labels(endpoint.path, str(e.status)).inc()
            raise
        self.observe_decision(decision, req)
        body, prefill_pod = await self._disaggregate(request, creq, req, decision, decode, prefill)  # 4. P/D
        return await self.upstream.forward(  # 5. forward and relay
            request,
            endpoint.path,
            body,
            req,
            decision,
            self.scheduler,
            remote_kv=prefill_pod is not None,
            prefill_pod=prefill_pod,
        )

    def candidate_pods(self) -> tuple[list[Candidate], list[Candidate]]:
        """The available pods as candidates: (decode or both, prefill)."""
        cands = self.candidates.of(self.pool.available())
        decode = [c for c in cands if c.role != "prefill"]
        if not decode:
            raise HTTPError(503, "no healthy pod", headers={"Retry-After": str(self.pool.retry_after_s())})
        return decode, [c for c in cands if c.role == "prefill"]

    def schedule(self, req: SchedRequest, pods: list[Candidate]) -> Decision:
        try:
            return self.scheduler.schedule(req, pods)
        except NoCandidate as e:
            raise HTTPError(503, str(e), headers={"Retry-After": str(self.pool.retry_after_s())}) from e

    async def _disaggregate(
        self,
        request: web.Request,
        creq: ClientRequest,
        req: SchedRequest,
        decision: Decision,
        decode: list[Candidate],
        prefill: list[Candidate],
    ) -> tuple[bytes, str | None]:
        """The body for the decode pod and the prefill pod that produced its KV (``None``: colocated)."""
        decider = self.decider
        if decider is None or not decider.active(prefill):
            return creq.body, None
        outcomes = self.metrics.pd_requests
        sources = decider.sources(req, decision, decode, prefill)
        if sources is None:
            outcomes.labels("aggregated").inc()
            return creq.body, None
        leg = await self.prefill_leg.run(request, creq, req, sources)
        if leg is None:
            outcomes.labels("fallback").inc()
            return creq.body, None
        outcomes.labels("disaggregated").inc()
        return leg

    def observe_decision(self, decision: Decision, req: SchedRequest) -> None:
        m = self.metrics
        pid = decision.chosen.id
        if log.isEnabledFor(logging.DEBUG):
            costs = req.outputs.get(TTFTCosts)
            log.debug(
                "route prompt=%d tokens first_key=%x -> %s predicted_cached=%d totals=%s costs=%s",
                req.prompt_tokens,
                req.block_keys[0] if req.block_keys else 0,
                pid,
                decision.predicted_cached_tokens,
                {k: round(v, 3) for k, v in decision.totals.items()},
                costs.costs if costs is not None else None,
            )
        m.decisions.labels(pid).inc()
        m.predicted_hit_tokens.labels(pid).inc(decision.predicted_cached_tokens)
        m.prompt_tokens.labels(pid).inc(req.prompt_tokens)
        for name, scores in decision.scores.items():
            s = scores.get(pid, 0.0)
            m.scorer_score.labels(name).observe(s)
            if s >= max(scores.values()) - 1e-12:
                m.scorer_decisive.labels(name).inc()

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

    async def handle_livez(self, request: web.Request) -> web.Response:
        return self._probe_response(self.probes.liveness())

    async def handle_readyz(self, request: web.Request) -> web.Response:
        return self._probe_response(self.probes.readiness())

    @staticmethod
    def _probe_response(res: ProbeResult) -> web.Response:
        return web.json_response(res.as_json(), status=200 if res.ok else 503)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        m = self.metrics
        now = time.monotonic()
        for p in self.pool.pods:
            m.pod_available.labels(p.id).set(1 if p.available(now, self.cfg.pool.max_inflight_per_pod) else 0)
            m.inflight.labels(p.id).set(p.load.requests)
        m.memory_blocks.set(len(self.scheduler.ctx.memory))
        if self.index is not None:
            try:
                m.index_blocks.set(self.index.stats().blocks)
            except Exception:  # the index is another component's; its stats are best effort here
                log.debug("index stats failed", exc_info=True)
        if self.tokenizer is not None:
            m.tokenizer_cache_hits.set(self.tokenizer.cache_hits)
        m.client_connections.set(len(self.guard))
        resp = web.Response(body=generate_latest(m.registry))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def handle_models(self, request: web.Request) -> web.StreamResponse:
        session = self.upstream.session
        assert session is not None
        for pod in self.pool.available():
            try:
                async with (
                    asyncio.timeout(self.cfg.pool.health_timeout_s),
                    session.get(pod.url + "/v1/models", headers=request_headers(request, body=False)) as r,
                ):
                    data, complete = await read_capped(r, MAX_MODELS_BYTES)
                    if r.status == 200 and complete:
                        return web.Response(body=data, content_type="application/json")
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                self.pool.report_failure(pod, f"GET /v1/models failed: {type(e).__name__}")
        if self.cfg.models:
            created = int(time.time())
            data_list = [
                {"id": m, "object": "model", "created": created, "owned_by": "vllm-llmd"} for m in self.cfg.models
            ]
            return web.json_response({"object": "list", "data": data_list})
        return error_response(503, "no pod available", headers={"Retry-After": str(self.pool.retry_after_s())})
