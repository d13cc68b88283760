"""Stage 4 of the request path: prefill/decode (and 4b, a peer load: :func:`peer_load_body`).
The decider (``pd.decider``,
:mod:`vllm_llmd.router.scheduling.deciders`) says whether a request gets a prefill leg and which
pods may run it; :class:`PrefillLeg` runs that leg and returns the decode leg's body.

The prefill pod is ranked by the prefill profile among the decider's sources and sent the prefill
leg (:func:`vllm_llmd.pd.build_prefill_request`: one token, not streamed,
``kv_transfer_params.do_remote_decode``); the decode body is the client's request with the prefill
engine's ``kv_transfer_params`` (:func:`vllm_llmd.pd.build_decode_request`). A pod that cannot be
reached or does not answer in time is replaced by the next in the ranking; a prefill pod that
answers badly, or without usable ``kv_transfer_params``, makes the request fall back to the decode
pod alone (``llmd_router_pd_requests_total{outcome="fallback"}``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from vllm_llmd.pd import PDError, build_decode_request, build_prefill_request
from vllm_llmd.pd.peer import PeerPlan
from vllm_llmd.pd.requests import build_peer_load_request
from vllm_llmd.router.attempt import Attempt
from vllm_llmd.router.config import PoolConfig
from vllm_llmd.router.pool import PodPool
from vllm_llmd.router.request import ClientRequest
from vllm_llmd.router.scheduling import Candidate, Decision, NoCandidate, SchedRequest, Scheduler
from vllm_llmd.router.scheduling.estimated_ttft import PeerPlans
from vllm_llmd.router.scheduling.framework import PluginOutputs
from vllm_llmd.router.upstream import Upstream, body_payload, client_gone, pod_headers, read_capped

log = logging.getLogger(__name__)

#: a prefill answer is one token and the KV transfer parameters
MAX_PREFILL_ANSWER_BYTES = 1 << 20
_decoder = msgspec.json.Decoder()


class PrefillLeg:
    def __init__(self, cfg: PoolConfig, pool: PodPool, upstream: Upstream, scheduler: Scheduler) -> None:
        self.cfg = cfg
        self.pool = pool
        self.upstream = upstream
        self.scheduler = scheduler

    async def run(
        self,
        request: web.Request,
        creq: ClientRequest,
        req: SchedRequest,
        sources: list[Candidate],
        rid: str | None = None,
    ) -> tuple[bytes, str] | None:
        """The decode leg's body and the prefill pod, or ``None`` to serve the request colocated.
        ``rid``: the request's id, sent in ``X-Request-Id`` as on the decode leg (:func:`.pod_headers`)."""
        session = self.upstream.session
        assert session is not None
        preq = replace(req, view=None, outputs=PluginOutputs())  # scored afresh among the sources
        try:
            decision = self.scheduler.schedule(preq, sources)
        except NoCandidate:
            return None
        assert preq.view is not None
        leg = creq.encode(build_prefill_request(creq.payload, chat=creq.endpoint.chat))
        headers = pod_headers(request, rid)
        for i, cand in enumerate(decision.ranked[: 1 + self.cfg.max_retries]):
            pod = self.pool.get(cand.id)
            if pod is None:
                continue
            if i > 0 and client_gone(request):
                return None
            uncached = max(0, preq.prompt_tokens - preq.view.cached.get(pod.id, 0))
            attempt = Attempt(
                pod,
                preq,
                self.scheduler,
                self.pool.inflight,
                prefill_tokens=uncached,
                decode_tokens=1,
                scheduled=i == 0,
            )
            with attempt:
                try:
                    async with (
                        asyncio.timeout(self.cfg.first_byte_timeout_s),
                        session.post(
                            pod.url + creq.endpoint.path,
                            data=body_payload(leg),
                            headers=headers,
                            timeout=self.upstream.timeout,
                        ) as r,
                    ):
                        data, complete = await read_capped(r, MAX_PREFILL_ANSWER_BYTES)
                        status = r.status
                    attempt.answering()
                    if status != 200 or not complete:
                        log.warning("prefill pod %s answered %d: serving aggregated", pod.id, status)
                        if status >= 500:
                            self.pool.report_failure(pod, f"prefill HTTP {status}")
                        return None
                    self.pool.report_success(pod)
                    decode = build_decode_request(creq.payload, _decoder.decode(data))
                    return creq.encode(decode), pod.id
                except TimeoutError:
                    self.pool.report_failure(pod, f"prefill leg: no answer within {self.cfg.first_byte_timeout_s:g} s")
                except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as e:
                    if client_gone(request):  # our own doing: the client left and the leg was dropped
                        raise asyncio.CancelledError from e
                    self.pool.report_connect_failure(pod, f"prefill leg: {type(e).__name__}: {e}")
                except (PDError, msgspec.DecodeError, RecursionError) as e:
                    log.warning("prefill pod %s gave no usable kv_transfer_params (%s): serving aggregated", pod.id, e)
                    return None
        return None


def peer_load_body(
    creq: ClientRequest, req: SchedRequest, decision: Decision, counter: Any
) -> tuple[bytes, PeerPlan] | None:
    """Stage 4b: the chosen pod's body with router-built peer-load params when ``estimated-ttft``
    (``peer_loads``) priced loading from a peer cheapest for it (docs/peer-loading.md), counted in
    ``counter`` (per pod), and the plan (what the load saves is not queued on the pod:
    :func:`vllm_llmd.pd.peer.peer_queued_tokens`); ``None``: send the body as it is."""
    plans = req.outputs.get(PeerPlans)
    plan = plans.plans.get(decision.chosen.id) if plans is not None else None
    if plans is None or plan is None or plan.peer is None or plan.peer not in plans.holders:
        return None
    host, port, block_size, held = plans.holders[plan.peer]
    try:
        payload = build_peer_load_request(creq.payload, plan.peer, host, port, block_size, held)
    except PDError as exc:
        log.warning("peer load not asked: %s", exc)
        return None
    counter.labels(decision.chosen.id).inc()
    return creq.encode(payload), plan
