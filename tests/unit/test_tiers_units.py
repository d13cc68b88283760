"""The tiers' small parts without an engine: the config block, the copy worker, tenant labels, stats."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from vllm.v1.kv_offload.base import (
    CanonicalKVCacheRef,
    CanonicalKVCaches,
    CanonicalKVCacheTensor,
    GPULoadStoreSpec,
)
from vllm.v1.kv_offload.cpu.common import CPULoadStoreSpec
from vllm_llmd.connectors.config import ConnectorConfigError, LLMDConnectorConfig
from vllm_llmd.connectors.tiers.config import TiersConfig, physical_memory_bytes
from vllm_llmd.connectors.tiers.host_copy import HostCopyWorker, _runs
from vllm_llmd.connectors.tiers.stats import CombinedStats, TierPromMetrics, TierStats
from vllm_llmd.connectors.tiers.tenants import OTHER, TopTenants, tenant_of


# ---- config ---------------------------------------------------------------------------------------
def test_a_valid_block_parses_and_turns_into_vllm_offloading_config(tmp_path: Path):
    cfg = LLMDConnectorConfig.from_extra(
        {"tiers": {"dram": {"capacity": "1MiB"}, "disk": {"path": str(tmp_path / "d"), "capacity": "2 MiB"}}}
    )
    assert cfg.tiers is not None and int(cfg.tiers.dram.capacity) == 2**20
    assert cfg.events_medium == ""  # lease events off: "CPU" names the DRAM tier now
    extra = cfg.tiers.offloading_extra_config()
    assert extra["spec_name"] == "LLMDTieringSpec" and extra["self_describing_kv_events"] is True
    assert extra["cpu_bytes_to_use"] == 2**20
    (disk,) = extra["secondary_tiers"]
    assert disk["type"] == "ChecksummedDiskTier" and disk["capacity_bytes"] == 2 * 2**20
    assert (disk["store_threshold"], disk["max_tracker_size"]) == (2, 64_000)  # vLLM's names, our defaults
    assert (tmp_path / "d").is_dir()


@pytest.mark.parametrize(
    ("tiers", "message"),
    [
        ({"dram": {"capacity": 0}}, r"tiers\.dram\.capacity must be positive"),
        ({"dram": {"capacity": "0 GiB"}}, r"tiers\.dram\.capacity must be positive"),
        ({"dram": {"capacity": "lots"}}, r"tiers\.dram\.capacity: could not parse"),
        ({"dram": {"capacity": physical_memory_bytes() + 1}}, r"tiers\.dram\.capacity = \d+ bytes is larger than"),
        ({"dram": {"capacity": "1MiB", "evict": "lru"}}, r"tiers\.dram\.evict: Extra inputs"),
        ({"dram": {"capacity": "1MiB"}, "disk": {"path": "/x"}}, r"tiers\.disk\.capacity: Field required"),
        *(
            (
                {"dram": {"capacity": "1MiB"}, "disk": {"path": "/x", "capacity": "1MiB", key: bad}},
                rf"tiers\.disk\.{key}: {msg}",
            )
            for key, bad, msg in (
                ("store_threshold", 0, "Input should be greater than or equal to 1"),
                ("store_threshold", "2", "Input should be a valid integer"),
                ("store_threshold", 1.5, "Input should be a valid integer"),
                ("store_threshold", True, "Input should be a valid integer"),
                ("store_threshold", 5000, "Input should be less than or equal to 1024"),
                ("max_tracker_size", 0, "Input should be greater than or equal to 1"),
                ("max_tracker_size", 10**9, "Input should be less than or equal to"),
            )
        ),
        ({}, r"tiers\.dram: Field required"),
        ("1GiB", r"tiers must be a mapping"),
    ],
)
def test_bad_blocks_are_start_up_errors_naming_the_key(tiers, message):
    with pytest.raises(ConnectorConfigError, match=message):
        LLMDConnectorConfig.from_extra({"tiers": tiers})


def test_an_unwritable_disk_path_is_a_start_up_error_naming_the_key(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConnectorConfigError, match=r"tiers\.disk\.path '.*file/kv' is not a writable directory"):
        TiersConfig.parse({"dram": {"capacity": "1MiB"}, "disk": {"path": str(blocker / "kv"), "capacity": "1MiB"}})


def test_a_disk_capacity_beyond_the_filesystem_is_a_start_up_error(tmp_path: Path):
    st = os.statvfs(tmp_path)
    too_big = st.f_blocks * st.f_frsize + 1
    with pytest.raises(ConnectorConfigError, match=r"tiers\.disk\.capacity = \d+ bytes is larger than the filesystem"):
        TiersConfig.parse({"dram": {"capacity": "1MiB"}, "disk": {"path": str(tmp_path), "capacity": too_big}})


def test_lease_events_cannot_reuse_a_tier_medium():
    with pytest.raises(ConnectorConfigError, match="events_medium must not be CPU or STORAGE"):
        LLMDConnectorConfig.from_extra({"events_medium": "CPU", "tiers": {"dram": {"capacity": "1MiB"}}})
    cfg = LLMDConnectorConfig.from_extra({"events_medium": "LEASE", "tiers": {"dram": {"capacity": "1MiB"}}})
    assert cfg.events_medium == "LEASE"
    assert LLMDConnectorConfig.from_extra({}).events_medium == "CPU"  # unchanged without tiers


# ---- the copy worker --------------------------------------------------------------------------------
def test_runs_coalesce_consecutive_blocks():
    assert _runs(np.array([4, 5, 6, 9, 1]), np.array([0, 1, 2, 3, 7])) == [(4, 0, 3), (9, 3, 1), (1, 7, 1)]


def _caches(num_blocks: int, pages: list[int], groups: list[list[int]]) -> tuple[CanonicalKVCaches, list[torch.Tensor]]:
    tensors = [
        CanonicalKVCacheTensor(torch.randint(-128, 127, (num_blocks, p + 64), dtype=torch.int8), p) for p in pages
    ]
    refs = [[CanonicalKVCacheRef(t, pages[t]) for t in g] for g in groups]
    return CanonicalKVCaches(tensors, refs), [t.tensor for t in tensors]


def test_host_copy_worker_stores_and_loads_whole_pages_per_group():
    caches, engine = _caches(12, [256, 512], [[0, 1], [1]])
    # the DRAM-tier views are strided rows of a bigger buffer, as SharedOffloadRegion makes them
    base = torch.zeros(10 * 2048, dtype=torch.int8)
    views = [torch.as_strided(base, (10, 256), (2048, 0 + 1), 0), torch.as_strided(base, (10, 512), (2048, 1), 256)]
    w = HostCopyWorker(caches, views)
    # group 0: engine blocks 3,4 -> chunks 0,1 ; group 1: engine block 7 -> chunk 5
    assert w.submit_store(1, GPULoadStoreSpec([3, 4, 7], [2, 1], [0, 0]), CPULoadStoreSpec([0, 1, 5]))
    assert torch.equal(views[0][0], engine[0][3, :256]) and torch.equal(views[1][1], engine[1][4, :512])
    assert torch.equal(views[1][5], engine[1][7, :512])
    assert not views[0][5].any()  # group 1 does not use tensor 0
    before = engine[0].clone()
    assert w.submit_load(2, CPULoadStoreSpec([0, 1]), GPULoadStoreSpec([10, 11], [2, 0], [0, 0]))
    assert torch.equal(engine[0][10, :256], before[3, :256]) and torch.equal(engine[1][11, :512], engine[1][4, :512])
    assert torch.equal(engine[0][10, 256:], before[10, 256:])  # padding beyond the page untouched
    results = w.get_finished()
    assert [r.job_id for r in results] == [1, 2] and all(r.success for r in results)
    assert results[0].transfer_size == 2 * 256 + 2 * 512 + 512
    samples = w.take_samples()
    assert [s.is_load for s in samples] == [False, True] and w.get_finished() == []


def test_host_copy_worker_refuses_mismatched_specs():
    caches, _ = _caches(4, [128], [[0]])
    w = HostCopyWorker(caches, [torch.zeros((4, 128), dtype=torch.int8)])
    with pytest.raises(ValueError, match="engine blocks for"):
        w.submit_store(1, GPULoadStoreSpec([0, 1], [2], [0]), CPULoadStoreSpec([0]))


# ---- tenants ----------------------------------------------------------------------------------------
class _Req:
    def __init__(self, salt=None, xargs=None):  # type: ignore[no-untyped-def]
        self.cache_salt = salt
        self.sampling_params = type("SP", (), {"extra_args": xargs})()


def test_tenants_come_from_the_salt_hashed_or_from_an_xarg():
    a = tenant_of(_Req(salt="secret-a"), "cache_salt", "llmd_tenant")
    assert a.startswith("salt:") and "secret" not in a and len(a) == 17
    assert a == tenant_of(_Req(salt="secret-a"), "cache_salt", "x") != tenant_of(_Req(salt="b"), "cache_salt", "x")
    assert tenant_of(_Req(), "cache_salt", "x") == "none"
    assert tenant_of(_Req(xargs={"llmd_tenant": "team-a"}), "xarg", "llmd_tenant") == "team-a"
    assert tenant_of(_Req(xargs={"llmd_tenant": "y" * 500}), "xarg", "llmd_tenant") == "y" * 64
    assert tenant_of(_Req(xargs=None), "xarg", "llmd_tenant") == "none"


def test_top_tenants_bounds_labels_and_follows_volume():
    top = TopTenants(top_k=2, reselect_every=10)
    labels = {top.observe(f"t{i}", 1) for i in range(1000)}  # a thousand one-off tenants: no churn
    assert labels == {"t0", "t1", OTHER} and top.version == 2
    for _ in range(50):  # two heavy tenants appear and take the labels over
        top.observe("heavy-a", 1000)
        top.observe("heavy-b", 900)
    assert top.labelled == {"heavy-a", "heavy-b"}
    assert top.observe("t5", 1) == OTHER
    for _ in range(100):  # a tenant of similar volume does not take a label over (no flapping)
        top.observe("heavy-c", 850)
    assert top.labelled == {"heavy-a", "heavy-b"}


# ---- stats and metrics --------------------------------------------------------------------------------
def test_combined_stats_aggregate_sums_counters_and_keeps_latest_gauges():
    a, b = TierStats(), TierStats()
    a.add("dram", "stored", 3)
    a.gauge("dram", "blocks", 3)
    a.sample("dram", 0.001)
    b.add("dram", "stored", 2)
    b.gauge("dram", "blocks", 5)
    b.sample("dram", 0.002)
    b.tenant("t", "prompt", 10)
    x, y = CombinedStats(), CombinedStats()
    x.tiers, y.tiers = a, b
    x.pd.add("transfers_ok")
    x.aggregate(y)
    d = x.to_dict()
    assert d["tiers"]["c"] == {"dram|stored": 5} and d["tiers"]["g"] == {"dram|blocks": 5}
    assert d["tiers"]["h"] == {"dram": [0.001, 0.002]} and d["tiers"]["t"] == {"t|prompt": 10}
    assert d["pd"]["transfers_ok"] == 1
    again = CombinedStats(d)  # what the API-server process rebuilds from the dict
    assert not again.is_empty() and again.reduce()["tier:dram|stored"] == 5
    assert CombinedStats().is_empty()


def _registry_classes(reg: CollectorRegistry):  # type: ignore[no-untyped-def]
    def bind(cls):  # type: ignore[no-untyped-def]
        class Bound(cls):  # type: ignore[misc, valid-type]
            def __init__(self, *a, **kw):  # type: ignore[no-untyped-def]
                kw.pop("multiprocess_mode", None)
                super().__init__(*a, registry=reg, **kw)

        return Bound

    return bind(Counter), bind(Gauge), bind(Histogram)


class _Base:
    def __init__(self, reg: CollectorRegistry) -> None:
        self._counter_cls, self._gauge_cls, self._histogram_cls = _registry_classes(reg)
        self.per_engine_labelvalues = {0: ["m", "0"]}


def test_prometheus_series_and_tenant_labels_are_bounded():
    reg = CollectorRegistry()
    prom = TierPromMetrics(_Base(reg), ["model_name", "engine"])  # type: ignore[arg-type]
    st = TierStats()
    st.add("dram", "stored", 4)
    st.add("disk", "err:corrupt", 1)
    st.add("disk", "skipped", 3)
    st.gauge("disk", "blocks", 7)
    st.sample("disk", 0.004)
    st.tenant("a", "prompt", 100)
    st.tenant("a", "hit:dram", 64)
    st.tenant_labels(["a"])
    prom.observe(st.data, 0)
    v = reg.get_sample_value
    labels = {"model_name": "m", "engine": "0"}
    assert v("llmd:kv_tier_stored_blocks_total", {**labels, "tier": "dram"}) == 4
    assert v("llmd:kv_tier_errors_total", {**labels, "tier": "disk", "kind": "corrupt"}) == 1
    assert v("llmd:kv_tier_skipped_blocks_total", {**labels, "tier": "disk"}) == 3
    assert v("llmd:kv_tier_blocks", {**labels, "tier": "disk"}) == 7
    assert v("llmd:kv_tier_load_seconds_count", {**labels, "tier": "disk"}) == 1
    assert v("llmd:kv_tenant_hit_tokens_total", {**labels, "tenant": "a", "tier": "dram"}) == 64
    st2 = TierStats()
    st2.tenant_labels(["b"])  # "a" is no longer among the top tenants: its series go
    st2.tenant("b", "prompt", 5)
    prom.observe(st2.data, 0)
    assert v("llmd:kv_tenant_prompt_tokens_total", {**labels, "tenant": "a"}) is None
    assert v("llmd:kv_tenant_hit_tokens_total", {**labels, "tenant": "a", "tier": "dram"}) is None
    assert v("llmd:kv_tenant_prompt_tokens_total", {**labels, "tenant": "b"}) == 5


def test_engines_without_tiers_still_get_their_pd_series():
    """LLMDConnector always builds CombinedPromMetrics; an engine without tiers sends the flat P/D stats."""
    from types import SimpleNamespace

    from vllm_llmd.connectors.stats import LLMDConnectorStats
    from vllm_llmd.connectors.tiers.stats import CombinedPromMetrics

    reg = CollectorRegistry()
    c, g, h = _registry_classes(reg)
    prom = CombinedPromMetrics(
        SimpleNamespace(kv_transfer_config=None),
        {Counter: c, Gauge: g, Histogram: h},
        ["model_name", "engine"],
        {0: ["m", "0"]},
    )
    flat = LLMDConnectorStats()
    flat.add("bytes_read", 4096)
    flat.data["memory"] = "DRAM"
    prom.observe(flat.to_dict(), 0)
    assert (
        reg.get_sample_value("llmd:kv_transfer_bytes_total", {"model_name": "m", "engine": "0", "memory": "DRAM"})
        == 4096
    )
    combined = CombinedStats()
    combined.pd.add("bytes_read", 10)
    combined.pd.data["memory"] = "DRAM"
    prom.observe(combined.to_dict(), 0)
    assert (
        reg.get_sample_value("llmd:kv_transfer_bytes_total", {"model_name": "m", "engine": "0", "memory": "DRAM"})
        == 4106
    )


def test_tiers_on_a_vllm_before_032_are_a_start_up_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import vllm_llmd.vllm_compat as compat

    monkeypatch.setattr(compat, "installed_vllm_version", lambda: "0.30.0+cpu")
    with pytest.raises(ConnectorConfigError, match=r"tiers needs vLLM 0.32 or newer .* this is vLLM 0.30.0\+cpu"):
        LLMDConnectorConfig.from_extra({"tiers": {"dram": {"capacity": "1MiB"}}})
