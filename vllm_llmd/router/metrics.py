"""The router's own Prometheus metrics (a private registry, served on ``/metrics``).

No ``*_created`` series: prometheus_client adds one per counter and histogram child by default,
doubling the series for nothing a dashboard reads (issue 14); they are switched off process-wide
(``disable_created_metrics``). The per-request histograms are :mod:`.observe`'s; the KV event
subscriber's counters are read from its own statistics at scrape time (:class:`SubscriberCollector`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

disable_created_metrics()


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "llmd_router_requests", "Requests answered by the router", ["endpoint", "code"], registry=r
        )
        self.decisions = Counter("llmd_router_decisions", "Scheduling decisions by chosen pod", ["pod"], registry=r)
        self.scorer_decisive = Counter(
            "llmd_router_scorer_agrees",
            "Decisions where this scorer's own best pod was the one chosen",
            ["scorer"],
            registry=r,
        )
        self.scorer_score = Histogram(
            "llmd_router_scorer_chosen_score",
            "Score each scorer gave the chosen pod",
            ["scorer"],
            buckets=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0),
            registry=r,
        )
        self.decision_seconds = Histogram(
            "llmd_router_decision_seconds",
            "Time to tokenize and schedule one request",
            buckets=(5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1),
            registry=r,
        )
        self.predicted_hit_tokens = Counter(
            "llmd_router_prefix_predicted_hit_tokens", "Prompt tokens the router expected cached", ["pod"], registry=r
        )
        self.reported_hit_tokens = Counter(
            "llmd_router_prefix_reported_hit_tokens",
            "Prompt tokens the engine reported cached (usage.prompt_tokens_details.cached_tokens)",
            ["pod"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "llmd_router_prompt_tokens", "Prompt tokens routed (router tokenization)", ["pod"], registry=r
        )
        self.retries = Counter(
            "llmd_router_upstream_retries", "Requests retried on another pod before the first byte", ["pod"], registry=r
        )
        self.upstream_errors = Counter(
            "llmd_router_upstream_errors", "Upstream failures by pod and kind", ["pod", "kind"], registry=r
        )
        self.peer_loads = Counter(
            "llmd_router_peer_loads",
            "Requests sent to a pod with peer-load params (it loads the prefix from a peer's DRAM tier)",
            ["pod"],
            registry=r,
        )
        self.pd_requests = Counter(
            "llmd_router_pd_requests",
            "Requests in a pool with prefill pods, by outcome (disaggregated, aggregated, fallback)",
            ["outcome"],
            registry=r,
        )
        self.client_connections = Gauge("llmd_router_client_connections", "Client connections open", registry=r)
        self.client_connections_closed = Counter(
            "llmd_router_client_connections_closed",
            "Client connections the router closed at its connection limit (displaced: idle or slow; refused: new)",
            ["reason"],
            registry=r,
        )
        self.inflight = Gauge("llmd_router_inflight_requests", "Router requests in flight", ["pod"], registry=r)
        self.pod_available = Gauge("llmd_router_pod_available", "1 if the pod takes traffic", ["pod"], registry=r)
        self.pod_speed = Gauge(
            "llmd_router_pod_speed",
            "The pod's relative speed the cost model uses (learned, the configured prefill_speed as prior)",
            ["pod", "kind"],
            registry=r,
        )
        self.tier_price = Gauge(
            "llmd_router_tier_price",
            "What one prompt token found in this KV tier of the pod costs, in prefill tokens (learned "
            "load-back speed / prefill speed; vllm_llmd.router.tier_prices)",
            ["pod", "tier"],
            registry=r,
        )
        self.index_blocks = Gauge("llmd_router_index_blocks", "Block keys in the KV event index", registry=r)
        self.memory_blocks = Gauge("llmd_router_memory_blocks", "Block keys in the routing memory", registry=r)
        self.tokenizer_cache_hits = Gauge(
            "llmd_router_tokenizer_prefix_cache_hits", "Prompts tokenized from a cached prefix", registry=r
        )


class SubscriberCollector(Collector):
    """The KV event subscriber's per-pod statistics (``vllm_llmd.index.pod_sync.PodStats``) at
    scrape time: batches, reconnects, replays, replayed batches, restarts, errors, connection and
    lag (receive time minus the batch's engine timestamp, last batch)."""

    _COUNTERS = (
        ("batches", "KV event batches received live"),
        ("reconnects", "Reconnections to the pod's KV event publisher after the first connection"),
        ("replays", "Replay requests sent to the pod's replay endpoint (gaps, restarts, start-up)"),
        ("replayed_batches", "KV event batches received by replay"),
        ("restarts", "Publisher restarts detected (sequence numbers starting over)"),
        ("errors", "Malformed KV event frames and failed replays"),
    )

    def __init__(self, subscriber: Any) -> None:
        self.subscriber = subscriber

    def collect(self) -> Iterator[Any]:
        stats = self.subscriber.stats()
        for attr, doc in self._COUNTERS:
            c = CounterMetricFamily(f"llmd_router_kv_events_{attr}", doc, labels=["pod"])
            for pod, st in stats.items():
                c.add_metric([pod], float(getattr(st, attr)))
            yield c
        lag = GaugeMetricFamily(
            "llmd_router_kv_events_lag_seconds", "Receive time minus engine timestamp, last batch", labels=["pod"]
        )
        up = GaugeMetricFamily(
            "llmd_router_kv_events_connected", "1 while connected to the pod's publisher", labels=["pod"]
        )
        for pod, st in stats.items():
            if st.lag_s is not None:
                lag.add_metric([pod], st.lag_s)
            up.add_metric([pod], 1.0 if st.connected else 0.0)
        yield lag
        yield up

    def describe(self) -> Iterator[Any]:
        return iter(())
