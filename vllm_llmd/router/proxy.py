"""The OpenAI-compatible proxy: the aiohttp application and the request path, read top-down.

A generation request goes through one module per stage, each with typed input and output:

1. :mod:`.request` -- the HTTP request -> a validated :class:`~.request.ClientRequest`;
   :mod:`.models` -- the available pods serving its model (or adapter) -> the candidates;
   :mod:`.admission` -- when every candidate is saturated, a bounded wait for a slot, or 429;
2. :mod:`.prompt` -- its tokens and block keys -> a :class:`~.scheduling.SchedRequest`;
3. :mod:`.scheduling` -- prefix view, filters, scorers, picker -> a :class:`~.scheduling.Decision`;
4. :mod:`.pd_legs` -- the P/D decider's choice and the prefill leg -> the decode body, or colocated;
   or a peer load priced cheapest (:func:`~.pd_legs.peer_load_body`) -> the body with its params;
5. :mod:`.upstream` -- forward (with retries before the first byte) and relay the answer.

Each try on a pod is an :class:`~.attempt.Attempt` (in-flight work, routing-memory hooks). The HTTP
front's limits are :mod:`.front`; error answers :mod:`.errors`. At ~410 lines this module is over the
house's ~400: what is left here is the wiring of those stages (``RouterApp``, tracing hooks included)
and the simple endpoints (models, version, health), which read best beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from vllm_llmd.router.admission import Admission
from vllm_llmd.router.auth import key_middleware
from vllm_llmd.router.candidates import CandidateViews
from vllm_llmd.router.config import RouterConfig
from vllm_llmd.router.endpoints import GET_ENDPOINTS, POST_ENDPOINTS
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
from vllm_llmd.router.metrics import RouterMetrics, SubscriberCollector
from vllm_llmd.router.models import ModelCatalog
from vllm_llmd.router.observe import RequestObserver, RequestRecord, request_id
from vllm_llmd.router.pd_legs import PrefillLeg, peer_load_body
from vllm_llmd.router.pool import PodPool
from vllm_llmd.router.probes import ProbeResult, Probes
from vllm_llmd.router.prompt import PromptStage
from vllm_llmd.router.request import ClientRequest, Endpoint, RequestParser
from vllm_llmd.router.scheduling import Candidate, Decider, Decision, NoCandidate, SchedRequest, Scheduler
from vllm_llmd.router.scheduling.estimated_ttft import TTFTCosts
from vllm_llmd.router.tokenize import PromptTokenizer, TokenizerPool
from vllm_llmd.router.upstream import Upstream, read_capped, request_headers

if TYPE_CHECKING:
    from vllm_llmd.router.tracing import Tracing

log = logging.getLogger(__name__)

#: a pod's model list is small; a larger answer is not relayed
MAX_MODELS_BYTES = 1 << 20
Routed = tuple[list[Candidate], list[Candidate], SchedRequest, Decision]


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
        tracer_provider: Any | None = None,
    ) -> None:
        """``tracer_provider``: an OpenTelemetry tracer provider to trace with (else one exporting to
        ``server.otlp_traces_endpoint``, if set; :mod:`.tracing`)."""
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
        if subscriber is not None:
            metrics.registry.register(SubscriberCollector(subscriber))
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
        self.catalog = ModelCatalog(cfg.models)
        speeds = scheduler.ctx.speeds
        self.candidates = CandidateViews(cfg.index.block_size, speeds)
        if speeds is not None:  # what was learned of a pod is dropped when it goes or turns unhealthy
            pool.on_pod_lost.append(speeds.forget)
            pool.on_pods_set.append(lambda pods: speeds.set_pods({p.id: p.prefill_speed for p in pods}))
            speeds.set_pods({p.id: p.prefill_speed for p in pool.pods})
        self.admission = Admission(cfg.admission)
        self.inflight.on_done = self.admission.released
        self.observer = RequestObserver(metrics.registry, cfg.server.access_log)
        self.tracing: Tracing | None = None
        if tracer_provider is not None or cfg.server.otlp_traces_endpoint:
            from vllm_llmd.router.tracing import Tracing, exporter_provider

            endpoint = cfg.server.otlp_traces_endpoint
            owned = tracer_provider is None and endpoint is not None
            self.tracing = Tracing(tracer_provider or exporter_provider(endpoint or ""), owned)
        self.upstream = Upstream(cfg.pool, pool, metrics, self.observer, self.tracing)
        self.prefill_leg = PrefillLeg(cfg.pool, pool, self.upstream, self.prefill_scheduler)
        middlewares = [json_errors, self.guard.middleware]
        server_span = self.tracing.server_middleware() if self.tracing is not None else None
        if server_span is not None:  # outermost: the server span sees every answer, errors too
            middlewares.insert(0, server_span)
        if cfg.server.api_keys:  # before the body budget: a request without a key is not read
            middlewares.append(key_middleware(cfg.server.api_keys))
        middlewares.append(self.bodies.middleware)
        self.app = web.Application(client_max_size=cfg.max_body_bytes, middlewares=middlewares)
        for ep in POST_ENDPOINTS.values():  # every OpenAI / vLLM endpoint (vllm_llmd.router.endpoints)
            self.app.router.add_post(ep.path, self._handler(ep), expect_handler=expect_handler)
        for path in GET_ENDPOINTS:
            self.app.router.add_get(path, self.handle_get)
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
        self.pool.learn_tier_prices = self.scheduler.prices_tiers
        if self.tracing is not None:
            with self.tracing.background():  # the pool's health checks and scrapes are not traced
                await self.pool.start(session)
        else:
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
        if self.tracing is not None:
            self.tracing.shutdown()

    # ---- the request path --------------------------------------------------------------------
    def _handler(self, endpoint: Endpoint) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._generate(request, endpoint)

        return handle

    async def _generate(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        rec = RequestRecord(request_id(request.headers), request.method, endpoint.path, request.remote or "", 0.0)
        rec.t0 = time.perf_counter()
        try:
            resp = await self._route(request, endpoint, rec)
            rec.status = resp.status
            return resp
        except HTTPError as e:
            rec.status = e.status
            raise
        except asyncio.CancelledError:
            rec.status = 499  # the client left (nginx's code for it)
            raise
        finally:
            self.observer.finish(rec)

    async def _route(self, request: web.Request, endpoint: Endpoint, rec: RequestRecord) -> web.StreamResponse:
        m = self.metrics
        tr = self.tracing
        try:
            creq = await self.parser.parse(request, endpoint)  # 1. parse and validate
            span = tr.route_span() if tr is not None else None
            t0 = time.perf_counter()
            try:
                decode, prefill, req, decision = await self.decide(creq, len(creq.body))  # 2. and 3.
            except BaseException as e:
                if span is not None and tr is not None:
                    tr.failed(span, e)
                raise
            m.decision_seconds.observe(time.perf_counter() - t0)
        except HTTPError as e:
            m.requests.labels(endpoint.path, str(e.status)).inc()
            raise
        rec.model, rec.prompt_tokens = creq.model, req.prompt_tokens
        self.observe_decision(decision, req)
        body, prefill_pod = creq.body, None
        if span is not None and tr is not None:
            tr.decided(span, creq.model, req, decision)
        if endpoint.pd:
            body, prefill_pod = await self._disaggregate(request, creq, req, decision, decode, prefill, rec, span)
        elif span is not None:
            span.set_attribute("llmd.pd", "colocated")
            span.end()
        peer = None
        if prefill_pod is None and endpoint.prompt != "raw":  # 4b. a peer load priced cheapest
            loaded = peer_load_body(creq, req, decision, self.metrics.peer_loads)
            if loaded is not None:
                body, peer = loaded
        with tr.leg("decode") if prefill_pod is not None and tr is not None else contextlib.nullcontext():
            return await self.upstream.forward(  # 5. forward and relay
                request,
                endpoint.path,
                body,
                req,
                decision,
                self.scheduler,
                remote_kv=prefill_pod is not None,
                prefill_pod=prefill_pod,
                content_type=request.headers.get("Content-Type", "") if endpoint.prompt == "raw" else None,
                rec=rec,
                peer=peer,
            )

    async def decide(self, creq: ClientRequest, body_size: int) -> Routed:
        """Stages 2 and 3 (also gateway mode's): the pods serving the request's model, its tokens and
        block keys, the scheduler's decision -> (decode candidates, prefill candidates, request, decision)."""
        decode, prefill = self.candidate_pods(creq)
        if self.cfg.admission.max_requests_per_pod is not None:  # every pod saturated: wait or 429
            await self.admission.admit(decode)
            decode, prefill = self.candidate_pods(creq)
        req = await self.prompts.build(creq, body_size)  # 2. tokens and block keys
        return decode, prefill, req, self.schedule(req, decode)  # 3. prefix view -> ranked pods

    def candidate_pods(self, creq: ClientRequest) -> tuple[list[Candidate], list[Candidate]]:
        """The available pods serving the request's model (or LoRA adapter) as candidates: (decode
        or both, prefill). Marks ``creq.lora`` when the model is an adapter on those pods."""
        pods = self.catalog.select(creq.model, self.pool.available(), self.pool.pods)
        if self.catalog.is_adapter(pods, creq.model):
            creq.lora = creq.model
        cands = self.candidates.of(pods)
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
        rec: RequestRecord | None = None,
        span: Any | None = None,
    ) -> tuple[bytes, str | None]:
        """The body for the decode pod and the prefill pod that produced its KV (``None``: colocated).
        ``span``: the request's ``llmd.route`` span (:mod:`.tracing`), ended here once P/D is decided."""
        decider = self.decider
        sources = None
        if decider is not None and decider.active(prefill):
            sources = decider.sources(req, decision, decode, prefill)
            pd = "aggregated" if sources is None else "disaggregated"
        else:
            pd = "colocated"
        if span is not None:
            span.set_attribute("llmd.pd", pd)
            if sources is not None:
                span.set_attribute("llmd.prefill_sources", [c.id for c in sources])
            span.end()
        if sources is None:
            if pd == "aggregated":
                self.metrics.pd_requests.labels("aggregated").inc()
            return creq.body, None
        outcomes = self.metrics.pd_requests
        rid = rec.request_id if rec is not None else None
        with self.tracing.leg("prefill") if self.tracing is not None else contextlib.nullcontext():
            leg = await self.prefill_leg.run(request, creq, req, sources, rid)
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
                "route prompt=%d tokens first_key=%x -> %s predicted_cached=%d cached=%s totals=%s costs=%s speeds=%s",
                req.prompt_tokens,
                req.block_keys[0] if req.block_keys else 0,
                pid,
                decision.predicted_cached_tokens,
                dict(req.view.cached) if req.view is not None else None,
                {k: round(v, 3) for k, v in decision.totals.items()},
                costs.costs if costs is not None else None,
                {c.id: (round(c.prefill_speed, 3), round(c.decode_speed, 3)) for c in decision.ranked},
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
            speeds = self.scheduler.ctx.speeds
            ps, ds = p.prefill_speed, 1.0  # as the candidates see them (candidates.py)
            if speeds is not None:
                ps, ds = speeds.prefill_speed(p.id, ps), speeds.decode_speed(p.id, ps)
            m.pod_speed.labels(p.id, "prefill").set(ps)
            m.pod_speed.labels(p.id, "decode").set(ds)
            if self.pool.learn_tier_prices:
                for medium, price in p.tier_prices.prices.tiers.items():
                    m.tier_price.labels(p.id, medium).set(price)
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

    async def handle_get(self, request: web.Request) -> web.StreamResponse:
        """A GET endpoint any healthy pod answers (``/version``)."""
        return await self._from_a_pod(request, request.path, lambda status: status < 500)

    async def handle_models(self, request: web.Request) -> web.StreamResponse:
        """The union of the models and adapters the pods serve (:mod:`.models`); before any pod's
        list is known, the first available pod's own answer."""
        cards = self.catalog.listing(self.pool.pods)
        if cards is not None:
            return web.json_response({"object": "list", "data": cards})
        return await self._from_a_pod(request, "/v1/models", lambda status: status == 200, "application/json")

    async def _from_a_pod(
        self, request: web.Request, path: str, ok: Callable[[int], bool], content_type: str | None = None
    ) -> web.Response:
        """The first available pod's whole answer to ``GET path`` whose status ``ok`` accepts (a pod
        that fails is reported to the pool; the next is tried), else 503."""
        session = self.upstream.session
        assert session is not None
        for pod in self.pool.available():
            try:
                async with (
                    asyncio.timeout(self.cfg.pool.health_timeout_s),
                    session.get(pod.url + path, headers=request_headers(request, body=False)) as r,
                ):
                    data, complete = await read_capped(r, MAX_MODELS_BYTES)
                    if ok(r.status) and complete:
                        return web.Response(status=r.status, body=data, content_type=content_type or r.content_type)
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                self.pool.report_failure(pod, f"GET {path} failed: {type(e).__name__}")
        return error_response(503, "no pod available", headers={"Retry-After": str(self.pool.retry_after_s())})
