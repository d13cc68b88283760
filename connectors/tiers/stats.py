"""Tier residency metrics: a payload inside ``LLMDConnector``'s ``KVConnectorStats``, ``llmd:kv_tier_*``
and ``llmd:kv_tenant_*`` on the engine's ``/metrics``.

The connector's stats become ``{"pd": <LLMDConnectorStats data>, "tiers": <this payload>}``
(:class:`CombinedStats`); vLLM sums the worker's and the scheduler's stats with ``aggregate`` and
ships the dict to the API-server process, where :class:`CombinedPromMetrics` hands each half to its
own Prometheus metrics (the P/D half to ``connectors/stats.py``'s ``LLMDPromMetrics``, unchanged).

Tier payload (string keys only: it crosses processes as msgpack):

- ``c``: counters, ``"<tier>|<what>"`` -> delta (summed when aggregated);
- ``g``: gauges, ``"<tier>|<what>"`` -> value (latest wins; only the scheduler sets them);
- ``h``: load-back time samples, ``"<tier>"`` -> [seconds, ...] (concatenated);
- ``t``: tenant counters, ``"<label>|<what>"`` -> delta; ``tl``: the labelled tenants when that set
  changed (the Prometheus side removes series of tenants no longer labelled).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
from vllm_llmd.connectors.stats import LLMDConnectorStats, LLMDPromMetrics

from vllm_llmd.wire.tier_metrics import TIER_LOAD_SECONDS, TIER_LOADED_TOKENS

#: load-back time buckets (seconds): DRAM loads of a few blocks take ~0.1 ms, disk reads ~ms
LOAD_SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

#: counter ``what`` -> (metric suffix, help)
COUNTERS = {
    "stored": ("stored_blocks", "Blocks written into the tier (DRAM: from the engine or promoted from disk)."),
    "evicted": ("evicted_blocks", "Blocks the tier dropped to make room."),
    "promoted": ("promoted_blocks", "Blocks read back from this tier into the DRAM tier."),
    "dropped": ("dropped_blocks", "Blocks the tier did not store (no room, or the write failed)."),
    "skipped": (
        "skipped_blocks",
        "Offers of a block the tier did not write because the block had been offered fewer than its "
        "store_threshold times (vLLM's store_threshold rule; disk tier).",
    ),
    "loaded_tokens": (  # the router learns load-back speeds from it (vllm_llmd.wire.tier_metrics)
        TIER_LOADED_TOKENS.removeprefix("llmd:kv_tier_"),
        "Prompt tokens loaded into the engine's KV cache, by the tier they were found in.",
    ),
}
GAUGES = {
    "blocks": "Blocks held by the tier.",
    "bytes": "Bytes held by the tier.",
    "capacity_blocks": "Blocks the tier can hold.",
    "capacity_bytes": "Bytes the tier can hold.",
}


def _empty() -> dict[str, Any]:
    return {"c": {}, "g": {}, "h": {}, "t": {}}


@dataclass
class TierStats:
    """The tier half of the stats (see the module docstring)."""

    data: dict[str, Any] = field(default_factory=_empty)

    def add(self, tier: str, what: str, n: float = 1) -> None:
        if n:
            c = self.data["c"]
            k = f"{tier}|{what}"
            c[k] = c.get(k, 0) + n

    def gauge(self, tier: str, what: str, value: float) -> None:
        self.data["g"][f"{tier}|{what}"] = value

    def sample(self, tier: str, seconds: float) -> None:
        self.data["h"].setdefault(tier, []).append(seconds)

    def tenant(self, label: str, what: str, n: int) -> None:
        if n:
            t = self.data["t"]
            k = f"{label}|{what}"
            t[k] = t.get(k, 0) + n

    def tenant_labels(self, labels: list[str]) -> None:
        self.data["tl"] = labels

    def aggregate(self, other: dict[str, Any]) -> None:
        for part in ("c", "t"):
            mine = self.data.setdefault(part, {})
            for k, v in other.get(part, {}).items():
                mine[k] = mine.get(k, 0) + v
        self.data.setdefault("g", {}).update(other.get("g", {}))
        mine_h = self.data.setdefault("h", {})
        for k, v in other.get("h", {}).items():
            mine_h.setdefault(k, []).extend(v)
        if "tl" in other:
            self.data["tl"] = other["tl"]

    def is_empty(self) -> bool:
        d = self.data
        return not (d.get("c") or d.get("g") or d.get("h") or d.get("t") or "tl" in d)

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        out: dict[str, int | float] = {f"tier:{k}": v for k, v in d.get("c", {}).items()}
        out.update({f"tier:{k}": v for k, v in d.get("g", {}).items()})
        for k, v in d.get("h", {}).items():
            out[f"tier:{k}|load_ms_avg"] = round(1000 * sum(v) / len(v), 3) if v else 0
        return out


class CombinedStats(KVConnectorStats):
    """``LLMDConnector``'s stats: the P/D half (``LLMDConnectorStats``) and the tier half."""

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        data = dict(data or {})
        self.pd = LLMDConnectorStats(data=dict(data.get("pd") or {}))
        self.tiers = TierStats(data=_merge_defaults(data.get("tiers")))
        self.data = {"pd": self.pd.data, "tiers": self.tiers.data}

    def _sync(self) -> None:
        self.data = {"pd": self.pd.data, "tiers": self.tiers.data}

    def to_dict(self) -> dict[str, Any]:
        self._sync()
        return self.data

    def reset(self) -> None:
        self.pd.reset()
        self.tiers = TierStats()
        self._sync()

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        if isinstance(other, CombinedStats):
            self.pd.aggregate(other.pd)
            self.tiers.aggregate(other.tiers.data)
        elif isinstance(other, LLMDConnectorStats):
            self.pd.aggregate(other)
        self._sync()
        return self

    def reduce(self) -> dict[str, int | float]:
        return {**self.pd.reduce(), **self.tiers.reduce()}

    def is_empty(self) -> bool:
        return self.pd.is_empty() and self.tiers.is_empty()


def _merge_defaults(d: dict[str, Any] | None) -> dict[str, Any]:
    out = _empty()
    if d:
        out.update(d)
    return out


class TierPromMetrics:
    """``llmd:kv_tier_*`` and ``llmd:kv_tenant_*`` series per engine."""

    def __init__(self, base: KVConnectorPromMetrics, labelnames: list[str]) -> None:
        lbl = list(labelnames)
        self._engine_labels = base.per_engine_labelvalues
        counter, gauge, histogram = base._counter_cls, base._gauge_cls, base._histogram_cls
        self._counters = {
            what: counter(name=f"llmd:kv_tier_{suffix}", documentation=doc, labelnames=[*lbl, "tier"])
            for what, (suffix, doc) in COUNTERS.items()
        }
        self._errors = counter(
            name="llmd:kv_tier_errors",
            documentation="Tier blocks that could not be served or stored, by kind (corrupt, missing, io, write); "
            "a block that could not be served is recomputed.",
            labelnames=[*lbl, "tier", "kind"],
        )
        self._gauges = {
            what: gauge(
                name=f"llmd:kv_tier_{what}",
                documentation=doc,
                labelnames=[*lbl, "tier"],
                multiprocess_mode="mostrecent",
            )
            for what, doc in GAUGES.items()
        }
        self._load_seconds = histogram(
            name=TIER_LOAD_SECONDS,
            documentation="Time of one load-back job by tier: dram = DRAM tier -> engine KV cache copy; "
            "disk = disk -> DRAM tier read and check (a disk hit then also takes a dram load).",
            labelnames=[*lbl, "tier"],
            buckets=LOAD_SECONDS_BUCKETS,
        )
        self._prompt = counter(
            name="llmd:kv_tenant_prompt_tokens",
            documentation="Prompt tokens of admitted requests, by tenant (top K tenants, the rest as 'other').",
            labelnames=[*lbl, "tenant"],
        )
        self._hits = counter(
            name="llmd:kv_tenant_hit_tokens",
            documentation="Prompt tokens served from a cache, by tenant and where they were found "
            "(engine = the engine's own prefix cache, dram, disk, remote = pulled from a prefill engine).",
            labelnames=[*lbl, "tenant", "tier"],
        )
        self._tenants_seen: dict[int, set[str]] = {}

    def observe(self, d: dict[str, Any], engine_idx: int) -> None:
        labels = self._engine_labels[engine_idx]
        for k, v in d.get("c", {}).items():
            tier, _, what = k.partition("|")
            if what.startswith("err:"):
                self._errors.labels(*labels, tier, what[4:]).inc(v)
            elif what in self._counters:
                self._counters[what].labels(*labels, tier).inc(v)
        for k, v in d.get("g", {}).items():
            tier, _, what = k.partition("|")
            if what in self._gauges:
                self._gauges[what].labels(*labels, tier).set(v)
        for tier, samples in d.get("h", {}).items():
            h = self._load_seconds.labels(*labels, tier)
            for s in samples:
                h.observe(s)
        seen = self._tenants_seen.setdefault(engine_idx, set())
        if "tl" in d:
            keep = {*d["tl"], "other", "none"}
            for gone in seen - keep:
                self._remove_tenant(labels, gone)
            seen &= keep
        for k, v in d.get("t", {}).items():
            tenant, _, what = k.partition("|")
            seen.add(tenant)
            if what == "prompt":
                self._prompt.labels(*labels, tenant).inc(v)
            elif what.startswith("hit:"):
                self._hits.labels(*labels, tenant, what[4:]).inc(v)

    def _remove_tenant(self, labels: list[Any], tenant: str) -> None:
        for metric, extra in ((self._prompt, [()]), (self._hits, [(t,) for t in ("engine", "dram", "disk", "remote")])):
            for e in extra:
                try:
                    metric.remove(*labels, tenant, *e)
                except KeyError:
                    pass


class CombinedPromMetrics(KVConnectorPromMetrics):
    """Routes each half of :class:`CombinedStats` to its metrics."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues) -> None:  # type: ignore[no-untyped-def]
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._pd = LLMDPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._tiers = TierPromMetrics(self, labelnames)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        if "pd" not in transfer_stats_data and "tiers" not in transfer_stats_data:  # an engine without tiers
            self._pd.observe(transfer_stats_data, engine_idx)
            return
        pd = transfer_stats_data.get("pd")
        if pd:
            self._pd.observe(pd, engine_idx)
        tiers = transfer_stats_data.get("tiers")
        if tiers:
            self._tiers.observe(tiers, engine_idx)
