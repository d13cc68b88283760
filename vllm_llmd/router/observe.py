"""Per-request observability: the request id, latency histograms and the access log line.

* **Request id.** A client's ``X-Request-Id`` is kept, else the router makes one (``uuid4`` hex); it
  is sent to the pod in ``X-Request-Id``, which vLLM 0.32 takes as the request's id
  (``vllm/entrypoints/serve/engine/serving.py``, ``_base_request_id``), and returned to the client.
  Every leg of a request carries it, the P/D prefill leg too (:func:`.upstream.pod_headers`).
* **Histograms** (with ``model`` and ``pod`` labels; names as vLLM's own, under the router's prefix:
  ``vllm:e2e_request_latency_seconds``, ``vllm:time_to_first_token_seconds``,
  ``vllm:inter_token_latency_seconds`` in ``vllm/v1/metrics/loggers.py``, same buckets):
  ``llmd_router_request_duration_seconds{endpoint,model,pod}`` (request received to answer
  relayed), ``llmd_router_time_to_first_token_seconds{model,pod}`` (to the first streamed chunk)
  and ``llmd_router_inter_token_latency_seconds{model,pod}`` (between two reads of a stream from the
  pod: vLLM sends a chunk per token, or per ``--stream-interval``; chunks that arrive together are
  one read). Only requests that reached a pod are observed, so the ``model`` label holds served
  models only. Gateway mode observes the same histograms from Envoy's ext_proc events
  (``vllm_llmd.gateway.router_picker``: duration from Envoy's request headers to the stream's end,
  TTFT and inter-token latency for watched SSE streams only).
* **Access log.** ``server.access_log``: ``off`` (default), ``text`` or ``json``: one line per
  request on the ``vllm_llmd.router.access`` logger, after it ends.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from prometheus_client import Histogram
from prometheus_client.registry import CollectorRegistry

access_log = logging.getLogger("vllm_llmd.router.access")

REQUEST_ID = "X-Request-Id"
#: vLLM's buckets (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)  # fmt: skip
#: longest client request id kept (a longer one is replaced)
MAX_REQUEST_ID = 256


def request_id(headers: Any) -> str:
    rid = headers.get(REQUEST_ID)
    if isinstance(rid, str) and 0 < len(rid) <= MAX_REQUEST_ID and rid.isprintable():
        return rid
    return uuid.uuid4().hex


@dataclass(slots=True)
class RequestRecord:
    """One request as the access log and the histograms see it; the stages fill it in."""

    request_id: str
    method: str
    path: str
    client: str
    t0: float
    model: str = ""
    pod: str = ""
    status: int = 0
    #: seconds to the first streamed chunk (``None``: not streamed, or it never came)
    ttft: float | None = None
    prompt_tokens: int = 0
    streamed: bool = False


class RequestObserver:
    def __init__(self, registry: CollectorRegistry, access: str = "off") -> None:
        self.duration = Histogram(
            "llmd_router_request_duration_seconds",
            "Request received to answer relayed, requests that reached a pod",
            ["endpoint", "model", "pod"],
            buckets=E2E_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "llmd_router_time_to_first_token_seconds",
            "Request received to the first streamed chunk relayed",
            ["model", "pod"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.itl = Histogram(
            "llmd_router_inter_token_latency_seconds",
            "Time between two streamed chunks relayed",
            ["model", "pod"],
            buckets=ITL_BUCKETS,
            registry=registry,
        )
        self.access = access

    def itl_for(self, rec: RequestRecord) -> Any:
        """The inter-token histogram's child for this request (looked up once, observed per chunk)."""
        return self.itl.labels(rec.model, rec.pod)

    def first_chunk(self, rec: RequestRecord) -> None:
        rec.streamed = True
        rec.ttft = time.perf_counter() - rec.t0
        self.ttft.labels(rec.model, rec.pod).observe(rec.ttft)

    def finish(self, rec: RequestRecord) -> None:
        took = time.perf_counter() - rec.t0
        if rec.pod:
            self.duration.labels(rec.path, rec.model, rec.pod).observe(took)
        if self.access == "off" or not access_log.isEnabledFor(logging.INFO):
            return
        if self.access == "json":
            line = {
                "ts": time.time(),
                "request_id": rec.request_id,
                "client": rec.client,
                "method": rec.method,
                "path": rec.path,
                "status": rec.status,
                "model": rec.model,
                "pod": rec.pod,
                "duration_ms": round(took * 1e3, 3),
                "ttft_ms": None if rec.ttft is None else round(rec.ttft * 1e3, 3),
                "prompt_tokens": rec.prompt_tokens,
                "stream": rec.streamed,
            }
            access_log.info("%s", json.dumps(line, ensure_ascii=False))
        else:
            ttft = "-" if rec.ttft is None else f"{rec.ttft * 1e3:.1f}"
            access_log.info(
                '%s "%s %s" %d model=%s pod=%s %.1fms ttft=%sms prompt_tokens=%d id=%s',
                rec.client,
                rec.method,
                rec.path,
                rec.status,
                rec.model or "-",
                rec.pod or "-",
                took * 1e3,
                ttft,
                rec.prompt_tokens,
                rec.request_id,
            )
