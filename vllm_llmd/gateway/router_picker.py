"""A :class:`~vllm_llmd.gateway.picker.Picker` over today's router objects (the one module to swap).

It runs the proxy's request path (``vllm_llmd.router.proxy``) up to the decision, on the same
``RouterApp`` (``vllm_llmd.router.server.build_router``: same config, scheduler, tokenizer, index,
pool, in-flight tracker and metrics), and keeps each try's bookkeeping in the router's own
:class:`~vllm_llmd.router.attempt.Attempt`, driven by Envoy's response events instead of an HTTP
client:

* pick: stage 1 on the body Envoy sent (``RequestParser.build``: JSON, model, max tokens, prompt,
  the client's transfer params stripped), ``candidate_pods()`` (prefill pods are not picked),
  stage 2 (``prompts.build``: tokens and block keys, off the event loop for big bodies), stage 3
  (``schedule``: which runs the chosen pod's request hooks), ``observe_decision``; an attempt on the
  best pod; the ranking's first ``1 + fallbacks`` pods as Envoy's endpoint list (``fallbacks``
  defaults to ``pool.max_retries``, the proxy's retry budget);
* response headers: if Envoy served from a fallback, the earlier pods failed before answering
  (``report_connect_failure``, as the proxy does) and the attempt moves to the pod that served;
  5xx counts toward ejection, anything else is a success;
* first byte: the attempt's prefill part is released; end: the attempt ends (in-flight released,
  the routing memory entry starts to age);
* proxy mode's per-request histograms (:class:`~vllm_llmd.router.observe.RequestObserver`, same
  names and labels), from what the picker sees: the request's duration from Envoy's request headers
  (``Pick.started``) to the end of the ext_proc stream, for requests whose response started; TTFT
  (to the first chunk) and inter-token latency (between chunks, as Envoy relays them) for watched
  SSE streams only (``--watch-streams``, the default: otherwise no body reaches the picker).

Not here yet: P/D (a prefill leg needs the picker to call the prefill pod before answering Envoy);
pods with ``role: prefill`` are never picked and ``pd.peers`` is ignored (logged at start).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from vllm_llmd.gateway.picker import Pick, Reject
from vllm_llmd.router.attempt import Attempt
from vllm_llmd.router.endpoints import POST_ENDPOINTS, Endpoint
from vllm_llmd.router.errors import HTTPError
from vllm_llmd.router.pool import Pod
from vllm_llmd.router.proxy import RouterApp
from vllm_llmd.router.scheduling import SchedRequest

log = logging.getLogger(__name__)

_GENERATION: dict[str, Endpoint] = {p: e for p, e in POST_ENDPOINTS.items() if e.prompt != "raw"}


class _Attempt:
    """One request's bookkeeping on the pod currently serving it: a router :class:`Attempt`, moved
    to another pod when Envoy falls back."""

    __slots__ = ("app", "attempt", "cached", "done", "itl", "last", "model", "path", "pod", "req", "responded")

    def __init__(self, app: RouterApp, path: str, model: str, req: SchedRequest, pod: Pod) -> None:
        self.app, self.path, self.model, self.req = app, path, model, req
        self.done = self.responded = False
        #: the stream's inter-token histogram child (from its first chunk) and the last chunk's time
        self.itl: Any = None
        self.last = 0.0
        self._start(pod, scheduled=True)

    def _start(self, pod: Pod, scheduled: bool) -> None:
        view = self.req.view
        self.cached = view.cached.get(pod.id, 0) if view is not None else 0
        self.pod = pod
        self.attempt = Attempt(
            pod,
            self.req,
            self.app.scheduler,
            self.app.inflight,
            prefill_tokens=max(0, self.req.prompt_tokens - self.cached),
            decode_tokens=self.req.max_tokens,
            scheduled=scheduled,
        )
        self.attempt.__enter__()

    def move_to(self, pod: Pod) -> None:
        """Envoy retried on ``pod`` (a fallback): account the request there from now on."""
        self.attempt.__exit__(None, None, None)
        self.app.metrics.retries.labels(pod.id).inc()
        self._start(pod, scheduled=False)

    def first_byte(self) -> None:
        self.attempt.answering()

    def end(self) -> None:
        if not self.done:
            self.done = True
            self.attempt.__exit__(None, None, None)


class RouterAppPicker:
    """Gateway-mode decisions from a :class:`RouterApp` built by ``build_router(cfg)``."""

    def __init__(self, app: RouterApp, fallbacks: int | None = None) -> None:
        self.app = app
        self.fallbacks = app.cfg.pool.max_retries if fallbacks is None else fallbacks
        self.session_header = app.cfg.session_header.lower()
        self.traffic_class_header = app.cfg.traffic_class_header.lower()
        if any(p.role == "prefill" for p in app.cfg.pods) or app.cfg.pd.peers:
            log.warning("gateway mode does not run P/D yet: prefill pods are not picked, pd.peers is ignored")

    # ---- decision ----------------------------------------------------------------------------
    async def pick(self, path: str, headers: Mapping[str, str], body: bytes) -> Pick | Reject:
        path = path.partition("?")[0]
        endpoint = _GENERATION.get(path)
        if endpoint is None:
            return Pick([])  # not ours to route: Envoy's own load balancing
        app = self.app
        m = app.metrics
        try:
            t0 = time.perf_counter()
            creq = app.parser.build(  # 1.
                endpoint, body, headers.get(self.session_header), headers.get(self.traffic_class_header)
            )
            _decode, _prefill, req, decision = await app.decide(creq, len(body))  # 2., 3. (and model pools)
            m.decision_seconds.observe(time.perf_counter() - t0)
        except HTTPError as e:
            m.requests.labels(path, str(e.status)).inc()
            return Reject(e.status, e.message, e.err_type, e.headers or {})
        app.observe_decision(decision, req)
        ranked = decision.ranked[: 1 + self.fallbacks]
        pod = app.pool.get(ranked[0].id)
        attempt = _Attempt(app, path, creq.model, req, pod) if pod is not None else None
        new_body = creq.body if creq.body is not body else None  # re-encoded: something was stripped
        return Pick([c.id for c in ranked], new_body, attempt)

    # ---- response events ---------------------------------------------------------------------
    def on_response_headers(self, pick: Pick, status: int, served: str | None) -> Mapping[str, str]:
        a: _Attempt | None = pick.attempt
        if a is None:
            return {}
        app = self.app
        m = app.metrics
        a.responded = True
        if served and served != a.pod.id and not a.done:
            # Envoy went down the list: every endpoint before ``served`` failed before answering
            for ep in pick.endpoints:
                if ep == served:
                    break
                failed = app.pool.get(ep)
                if failed is not None:
                    m.upstream_errors.labels(ep, "before_first_byte").inc()
                    app.pool.report_connect_failure(failed, "envoy retried on another pod")
            new = app.pool.get(served)
            if new is not None:
                a.move_to(new)
        if status >= 500:
            app.pool.report_failure(a.pod, f"HTTP {status}")
            m.upstream_errors.labels(a.pod.id, "5xx").inc()
        else:
            app.pool.report_success(a.pod)
        m.requests.labels(a.path, str(status)).inc()
        return {"x-llmd-pod": a.pod.id, "x-llmd-predicted-cached-tokens": str(a.cached)}

    def on_first_byte(self, pick: Pick) -> None:
        if pick.attempt is not None:
            pick.attempt.first_byte()

    def on_response_data(self, pick: Pick, data: bytes) -> None:
        a: _Attempt | None = pick.attempt
        if a is None:
            return
        now = time.perf_counter()
        if a.itl is None:  # the first chunk: the first token (vLLM streams one chunk per token or interval)
            obs = self.app.observer
            if pick.started:
                obs.ttft.labels(a.model, a.pod.id).observe(now - pick.started)
            a.itl = obs.itl.labels(a.model, a.pod.id)
        else:
            a.itl.observe(now - a.last)
        a.last = now
        if b"cached_tokens" in data:
            self.app.upstream.observe_reported(a.pod, data)

    def on_response_end(self, pick: Pick, complete: bool) -> None:
        a: _Attempt | None = pick.attempt
        if a is not None:
            if a.responded and not a.done and pick.started:
                self.app.observer.duration.labels(a.path, a.model, a.pod.id).observe(time.perf_counter() - pick.started)
            a.end()
