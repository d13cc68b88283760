"""Transfer and lease statistics: ``KVConnectorStats`` in the engine, ``llmd:*`` on ``/metrics``.

Counters are deltas since the last report and are summed when vLLM aggregates worker and
scheduler stats; gauges (``held_blocks``, ``held_requests``) come from the scheduler only and keep
the latest value. Metric names use the ``llmd:`` prefix because vLLM unregisters every ``vllm:``
collector when its Prometheus logger starts (vLLM 0.32: ``PrometheusStatLogger.__init__`` in
vllm/v1/metrics/loggers.py calls ``unregister_vllm_metrics`` in vllm/v1/metrics/prometheus.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
from vllm_llmd.connectors.peer_serve import SERVE_AMOUNTS, SERVE_EVENTS

from vllm_llmd.wire.tier_metrics import ENDPOINT_INFO, PEER_LOAD_BLOCKS, PEER_LOAD_SECONDS

COUNTERS = (
    "bytes_read",  # bytes pulled by this (decode) engine
    "blocks_read",
    "transfers_ok",
    "transfers_failed",  # pulls given up (error, timeout, handshake failure) → local prefill
    "transfer_seconds",  # sum of wall time of completed pulls
    "handshakes_ok",
    "handshakes_failed",
    "leases_started",  # prefill side: requests whose blocks were held for a consumer
    "leases_released",  # ... released because the consumer reported it read them
    "leases_expired",  # ... released because the lease ran out
    "blocks_leased",
    "kv_params_refused",  # requests whose kv_transfer_params were refused (served locally instead)
    "relayout_transfers",  # decode side: pulls re-laid out on receive (another block size or byte order)
    "relayout_bytes",  # ... bytes written into this engine's cache by those re-layouts
    "relayout_seconds",  # ... time spent re-laying out
    "staged_out_bytes",  # host-staging transports (RBLN): device -> host copies before a peer reads
    "staged_in_bytes",  # ... host -> device copies after a pull
)
GAUGES = ("held_blocks", "held_requests")
#: per-holder peer-load counters (connectors/peer_load.py) are keys ``peer|<holder engine id>|<what>``,
#: ``what`` one of PEER_RESULTS (loads by result) or PEER_AMOUNTS
PEER_PREFIX = "peer|"
PEER_RESULTS = ("ok", "refused", "evicted", "unreachable", "timeout", "failed")
PEER_AMOUNTS = ("bytes", "blocks", "seconds")
#: what this engine's DRAM tier served peers (connectors/peer_serve.py, the holder's scheduler):
#: keys ``serve|<reader label>|<what>``, ``what`` one of SERVE_EVENTS or SERVE_AMOUNTS
SERVE_PREFIX = "serve|"
#: where this engine serves KV (``<engine id>|<host>:<port>``), reported once by the scheduler
ENDPOINT = "endpoint"


def _peer_keys(data: dict[str, Any]) -> list[str]:
    """The per-peer counters: a reader's loads by holder and a holder's service by reader."""
    return [k for k in data if k.startswith((PEER_PREFIX, SERVE_PREFIX))]


@dataclass
class LLMDConnectorStats(KVConnectorStats):
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in COUNTERS:
            self.data.setdefault(key, 0)
        self.data.setdefault("memory", "")

    def add(self, key: str, value: float = 1) -> None:
        self.data[key] = self.data.get(key, 0) + value

    def set_gauge(self, key: str, value: float) -> None:
        self.data[key] = value

    def reset(self) -> None:
        memory = self.data.get("memory", "")
        self.data = {key: 0 for key in COUNTERS}
        self.data["memory"] = memory

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key in COUNTERS:
            self.data[key] = self.data.get(key, 0) + other.data.get(key, 0)
        for key in GAUGES:
            if key in other.data:
                self.data[key] = other.data[key]
        for key in _peer_keys(other.data):
            self.data[key] = self.data.get(key, 0) + other.data[key]
        if other.data.get(ENDPOINT):
            self.data[ENDPOINT] = other.data[ENDPOINT]
        if other.data.get("memory"):
            self.data["memory"] = other.data["memory"]
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {k: self.data.get(k, 0) for k in COUNTERS if self.data.get(k)}
        out.update({k: self.data[k] for k in GAUGES if k in self.data})
        out.update({k: self.data[k] for k in _peer_keys(self.data) if self.data[k]})
        return out

    def is_empty(self) -> bool:
        return (
            not any(self.data.get(k) for k in COUNTERS)
            and not any(k in self.data for k in GAUGES)
            and not any(self.data[k] for k in _peer_keys(self.data))
            and not self.data.get(ENDPOINT)
        )

    def clone_and_reset(self) -> LLMDConnectorStats:
        out = LLMDConnectorStats(data=dict(self.data))
        self.reset()
        return out


class LLMDPromMetrics(KVConnectorPromMetrics):
    """``llmd:kv_*`` series per engine."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues) -> None:  # type: ignore[no-untyped-def]
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        lbl = list(labelnames)
        self._bytes = self._counter_cls(
            name="llmd:kv_transfer_bytes",
            documentation="KV bytes pulled from prefill engines by this engine's connector.",
            labelnames=[*lbl, "memory"],
        )
        self._blocks = self._counter_cls(
            name="llmd:kv_transfer_blocks", documentation="KV blocks pulled from prefill engines.", labelnames=lbl
        )
        self._transfers = self._counter_cls(
            name="llmd:kv_transfers",
            documentation="KV pulls by result (failed pulls fall back to a local prefill).",
            labelnames=[*lbl, "result"],
        )
        self._seconds = self._counter_cls(
            name="llmd:kv_transfer_seconds", documentation="Wall time spent in completed KV pulls.", labelnames=lbl
        )
        self._handshakes = self._counter_cls(
            name="llmd:kv_handshakes", documentation="Side-channel handshakes by result.", labelnames=[*lbl, "result"]
        )
        self._leases = self._counter_cls(
            name="llmd:kv_leases",
            documentation="Prefill-side block leases by event (started, released by the consumer, expired).",
            labelnames=[*lbl, "event"],
        )
        self._refused = self._counter_cls(
            name="llmd:kv_params_refused",
            documentation="Requests whose kv_transfer_params the connector refused (served without a transfer).",
            labelnames=lbl,
        )
        self._relayouts = self._counter_cls(
            name="llmd:kv_relayout_transfers",
            documentation="Pulls whose blocks were re-laid out on receive (the peer's block size or layout differs).",
            labelnames=lbl,
        )
        self._relayout_bytes = self._counter_cls(
            name="llmd:kv_relayout_bytes",
            documentation="KV bytes written into this engine's cache by re-layouts on receive.",
            labelnames=lbl,
        )
        self._relayout_seconds = self._counter_cls(
            name="llmd:kv_relayout_seconds", documentation="Time spent re-laying out received KV.", labelnames=lbl
        )
        self._staged = self._counter_cls(
            name="llmd:kv_staged_bytes",
            documentation="KV bytes copied between device and host staging (RBLN), by direction.",
            labelnames=[*lbl, "direction"],
        )
        self._peer_loads = self._counter_cls(
            name="llmd:kv_peer_loads",
            documentation="Prefix loads from a peer's DRAM tier by holder and result (all but ok: prefilled locally).",
            labelnames=[*lbl, "peer", "result"],
        )
        self._peer_bytes = self._counter_cls(
            name="llmd:kv_peer_load_bytes",
            documentation="KV bytes read from peers' DRAM tiers.",
            labelnames=[*lbl, "peer"],
        )
        self._peer_blocks = self._counter_cls(
            name=PEER_LOAD_BLOCKS,
            documentation="KV blocks read from peers' DRAM tiers.",
            labelnames=[*lbl, "peer"],
        )
        self._peer_seconds = self._counter_cls(
            name=PEER_LOAD_SECONDS,
            documentation="Wall time of completed peer loads (NIXL read), by holder.",
            labelnames=[*lbl, "peer"],
        )
        self._served_pins = self._counter_cls(
            name="llmd:kv_peer_pins",
            documentation="Holder side of peer loads, by reader: pins of this engine's DRAM tier granted or "
            "refused, leases released by the reader or expired.",
            labelnames=[*lbl, "reader", "event"],
        )
        self._served_blocks = self._counter_cls(
            name="llmd:kv_peer_served_blocks",
            documentation="DRAM-tier blocks pinned for peers to read, by reader.",
            labelnames=[*lbl, "reader"],
        )
        self._served_bytes = self._counter_cls(
            name="llmd:kv_peer_served_bytes",
            documentation="Bytes of the DRAM-tier blocks pinned for peers to read, by reader.",
            labelnames=[*lbl, "reader"],
        )
        self._endpoint = self._gauge_cls(
            name=ENDPOINT_INFO,
            documentation="Where this engine's connector serves KV to peers (1; engine_id, side_channel labels).",
            labelnames=[*lbl, "engine_id", "side_channel"],
            multiprocess_mode="mostrecent",
        )
        self._held = self._gauge_cls(
            name="llmd:kv_lease_held_blocks",
            documentation="Blocks held under a lease for a decode engine.",
            labelnames=lbl,
            multiprocess_mode="mostrecent",
        )
        self._held_reqs = self._gauge_cls(
            name="llmd:kv_lease_held_requests",
            documentation="Requests whose blocks are held under a lease.",
            labelnames=lbl,
            multiprocess_mode="mostrecent",
        )

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        d = transfer_stats_data
        labels = self.per_engine_labelvalues[engine_idx]
        if d.get("bytes_read"):
            self._bytes.labels(*labels, d.get("memory") or "DRAM").inc(d["bytes_read"])
        if d.get("blocks_read"):
            self._blocks.labels(*labels).inc(d["blocks_read"])
        for result, key in (("ok", "transfers_ok"), ("failed", "transfers_failed")):
            if d.get(key):
                self._transfers.labels(*labels, result).inc(d[key])
        if d.get("transfer_seconds"):
            self._seconds.labels(*labels).inc(d["transfer_seconds"])
        for result, key in (("ok", "handshakes_ok"), ("failed", "handshakes_failed")):
            if d.get(key):
                self._handshakes.labels(*labels, result).inc(d[key])
        leases = (("started", "leases_started"), ("released", "leases_released"), ("expired", "leases_expired"))
        for event, key in leases:
            if d.get(key):
                self._leases.labels(*labels, event).inc(d[key])
        if d.get("kv_params_refused"):
            self._refused.labels(*labels).inc(d["kv_params_refused"])
        for key, counter in (
            ("relayout_transfers", self._relayouts),
            ("relayout_bytes", self._relayout_bytes),
            ("relayout_seconds", self._relayout_seconds),
        ):
            if d.get(key):
                counter.labels(*labels).inc(d[key])
        for direction, key in (("d2h", "staged_out_bytes"), ("h2d", "staged_in_bytes")):
            if d.get(key):
                self._staged.labels(*labels, direction).inc(d[key])
        for key in _peer_keys(d):
            side, engine, what = key.split("|", 2)
            if not d[key]:
                continue
            if side + "|" == SERVE_PREFIX:  # engine: the reader this holder served
                self._observe_served(labels, engine, what, d[key])
            elif what in PEER_RESULTS:
                self._peer_loads.labels(*labels, engine, what).inc(d[key])
            elif what == "bytes":
                self._peer_bytes.labels(*labels, engine).inc(d[key])
            elif what == "blocks":
                self._peer_blocks.labels(*labels, engine).inc(d[key])
            elif what == "seconds":
                self._peer_seconds.labels(*labels, engine).inc(d[key])
        if d.get(ENDPOINT):
            engine_id, _, side_channel = str(d[ENDPOINT]).partition("|")
            self._endpoint.labels(*labels, engine_id, side_channel).set(1)
        if "held_blocks" in d:
            self._held.labels(*labels).set(d["held_blocks"])
        if "held_requests" in d:
            self._held_reqs.labels(*labels).set(d["held_requests"])

    def _observe_served(self, labels: list[Any], reader: str, what: str, n: float) -> None:
        if what in SERVE_EVENTS:
            self._served_pins.labels(*labels, reader, what).inc(n)
        elif what == SERVE_AMOUNTS[0]:
            self._served_blocks.labels(*labels, reader).inc(n)
        elif what == SERVE_AMOUNTS[1]:
            self._served_bytes.labels(*labels, reader).inc(n)
