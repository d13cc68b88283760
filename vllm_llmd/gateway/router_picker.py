"""A :class:`~vllm_llmd.gateway.picker.Picker` over today's router objects (the one module to swap).

It runs the same steps as the proxy's ``RouterApp._generate`` up to the decision, on the same
``RouterApp`` (``vllm_llmd.router.server.build_router``: same config, scheduler, tokenizer, index,
pool, in-flight tracker and metrics), and then does the per-try bookkeeping of
``RouterApp._forward`` in :class:`_Attempt`, driven by Envoy's response events instead of an HTTP
client:

* pick: ``_check_model``, the ``kv_transfer_params`` strip, ``pool.available()`` without prefill pods,
  ``_sched_request``, ``scheduler.schedule(req, _candidates(pods))`` (which records the pending
  routing-memory entry), ``_observe_decision``; an in-flight ticket on the best pod; the ranking's
  first ``1 + fallbacks`` pods as Envoy's endpoint list (``fallbacks`` defaults to
  ``pool.max_retries``, the proxy's retry budget);
* response headers: if Envoy served from a fallback, the earlier pods failed before answering
  (``report_connect_failure``, as the proxy does) and the ticket moves to the pod that served;
  5xx counts toward ejection, anything else is a success;
* first byte: the ticket's prefill part is released; end: the ticket is released and the routing
  memory entry starts to age.

Not here yet: P/D (a prefill leg needs the picker to call the prefill pod before answering Envoy);
pods with ``role: prefill`` are never picked and ``pd.peers`` is ignored (logged at start).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import msgspec

from vllm_llmd.gateway.picker import Pick, Reject
from vllm_llmd.router.pool import Pod
from vllm_llmd.router.proxy import RouterApp, _HTTPError
from vllm_llmd.router.scheduling import SchedRequest
from vllm_llmd.router.scheduling.profile import NoCandidate

log = logging.getLogger(__name__)

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()
_CHAT = "/v1/chat/completions"
_GENERATION = frozenset(("/v1/completions", _CHAT))


class _Attempt:
    """One request's bookkeeping on the pod currently serving it (``RouterApp._forward``'s per try)."""

    __slots__ = ("app", "cached", "done", "first", "path", "pod", "req", "ticket")

    def __init__(self, app: RouterApp, path: str, req: SchedRequest, pod: Pod) -> None:
        self.app, self.path, self.req = app, path, req
        self.done = self.first = False
        self._start(pod)

    def _start(self, pod: Pod) -> None:
        view = self.req.scratch.get("prefix_view")
        self.cached = view.cached.get(pod.id, 0) if view is not None else 0
        self.pod = pod
        self.ticket = self.app.inflight.start(pod.id, max(0, self.req.prompt_tokens - self.cached), self.req.max_tokens)
        pod.inflight_requests += 1

    def _finish(self) -> None:
        self.app.inflight.done(self.ticket)
        self.pod.inflight_requests -= 1
        if self.req.block_keys:  # the routing-memory entry starts to age now
            self.app.scheduler.ctx.memory.insert(self.pod.id, self.req.block_keys)

    def move_to(self, pod: Pod) -> None:
        """Envoy retried on ``pod`` (a fallback): account the request there from now on."""
        self._finish()
        self.app.metrics.retries.labels(pod.id).inc()
        if self.req.block_keys:
            self.app.scheduler.ctx.memory.insert(pod.id, self.req.block_keys, pending=True)
        self._start(pod)

    def first_byte(self) -> None:
        if not self.first:
            self.first = True
            self.app.inflight.first_token(self.ticket)

    def end(self) -> None:
        if not self.done:
            self.done = True
            self._finish()


class RouterAppPicker:
    """Gateway-mode decisions from a :class:`RouterApp` built by ``build_router(cfg)``."""

    def __init__(self, app: RouterApp, fallbacks: int | None = None) -> None:
        self.app = app
        self.fallbacks = app.cfg.pool.max_retries if fallbacks is None else fallbacks
        self.session_header = app.cfg.session_header.lower()
        if any(p.role == "prefill" for p in app.cfg.pods) or app.cfg.pd.peers:
            log.warning("gateway mode does not run P/D yet: prefill pods are not picked, pd.peers is ignored")

    # ---- decision ----------------------------------------------------------------------------
    async def pick(self, path: str, headers: Mapping[str, str], body: bytes) -> Pick | Reject:
        path = path.partition("?")[0]
        if path not in _GENERATION:
            return Pick([])  # not ours to route: Envoy's own load balancing
        app = self.app
        m = app.metrics
        try:
            payload = self._payload(body)
            t0 = time.perf_counter()
            model = app._check_model(payload)
            new_body = self._strip_kv_params(payload)
            pods = [p for p in app.pool.available() if p.role != "prefill"]
            if not pods:
                raise _HTTPError(
                    503, "no healthy pod", "ServiceUnavailableError", {"Retry-After": str(app.pool.retry_after_s())}
                )
            req = app._sched_request(payload, model, path == _CHAT, headers.get(self.session_header))
            try:
                decision = app.scheduler.schedule(req, app._candidates(pods))
            except NoCandidate as e:
                raise _HTTPError(
                    503, str(e), "ServiceUnavailableError", {"Retry-After": str(app.pool.retry_after_s())}
                ) from e
            m.decision_seconds.observe(time.perf_counter() - t0)
        except _HTTPError as e:
            m.requests.labels(path, str(e.status)).inc()
            return Reject(e.status, e.message, e.err_type, e.headers or {})
        app._observe_decision(decision, req)
        ranked = decision.ranked[: 1 + self.fallbacks]
        pod = app.pool.get(ranked[0].id)
        attempt = _Attempt(app, path, req, pod) if pod is not None else None
        return Pick([c.id for c in ranked], new_body, attempt)

    @staticmethod
    def _payload(body: bytes) -> dict[str, Any]:
        """The JSON body, with the proxy's errors (``RouterApp._read_json``)."""
        if not body:
            raise _HTTPError(400, "empty request body: expected a JSON object", "BadRequestError")
        try:
            payload = _decoder.decode(body)
        except msgspec.DecodeError as e:
            raise _HTTPError(400, f"malformed JSON body: {e}", "BadRequestError") from e
        if not isinstance(payload, dict):
            raise _HTTPError(400, "the JSON body must be an object", "BadRequestError")
        return payload

    @staticmethod
    def _strip_kv_params(payload: dict[str, Any]) -> bytes | None:
        """A client never steers KV transfers (the proxy's rule): the re-encoded body, or ``None``."""
        extra = payload.get("extra_body")
        if "kv_transfer_params" in payload or (isinstance(extra, dict) and "kv_transfer_params" in extra):
            payload.pop("kv_transfer_params", None)
            if isinstance(extra, dict):
                extra.pop("kv_transfer_params", None)
            return _encoder.encode(payload)
        return None

    # ---- response events ---------------------------------------------------------------------
    def on_response_headers(self, pick: Pick, status: int, served: str | None) -> Mapping[str, str]:
        a: _Attempt | None = pick.attempt
        if a is None:
            return {}
        app = self.app
        m = app.metrics
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
        if a is not None and b"cached_tokens" in data:
            self.app._observe_reported(a.pod, data)

    def on_response_end(self, pick: Pick, complete: bool) -> None:
        if pick.attempt is not None:
            pick.attempt.end()
