"""The RBLN transport against fakes of Rebellions' stack (vllm_llmd/testing/fakes/rbln.py), with NIXL
for real: host staging (allocator, block copies, the runner's copy op), platform detection and the
``transport: auto`` choice, hand-offs RBLN <-> CPU-layout engines over UCX with different block sizes
and byte orders (re-layout on receive), RBLN <-> RBLN block for block, the RBLN NIXL backend when
``nixl_rbln`` imports, and the d2d registration contract with ``nixl_rbln``.

The two endpoints of a hand-off are two NIXL agents in this process (UCX moves the bytes between
them as between processes; tests/unit/test_transport_nixl.py covers a separate process).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from kv_helpers import HEAD_SIZE, HEADS, LAYERS, fill, make_cache, token_values, views_of
from vllm_llmd.connectors.layout import KVLayout, mapping_problems, plan_tokens
from vllm_llmd.connectors.platform import PlatformError, choose, detect, is_rbln_platform
from vllm_llmd.connectors.relayout import describe
from vllm_llmd.connectors.transports import KVTransport, MemoryKind, TransportError, XferState, make_transport
from vllm_llmd.connectors.transports.rbln import RblnTransport, rsd_group
from vllm_llmd.connectors.transports.staging import HostStaging, aligned_host_empty
from vllm_llmd.connectors.xpull import CrossLayoutPuller, PoolTooSmall

from vllm_llmd.testing.fakes import rbln as fakes
from vllm_llmd.testing.wait import wait_until

PAGE = 4096


# ---- staging ----------------------------------------------------------------------------------
def test_staging_is_page_aligned_and_comes_from_rebel_when_it_imports() -> None:
    assert "rebel" not in sys.modules
    t, who = aligned_host_empty(10_001)
    assert who == "mmap" and t.numel() == 10_001 and t.data_ptr() % PAGE == 0
    with fakes.installed():
        t, who = aligned_host_empty(10_001)
        assert who == "rebel.kv_cache.aligned_tensor" and t.numel() == 10_001 and t.data_ptr() % PAGE == 0
        assert t.dtype == torch.uint8


@pytest.mark.parametrize("kv_first", [False, True])
def test_host_staging_copies_exactly_the_blocks_asked(kv_first: bool) -> None:
    kind = "rbln-kv-first" if kv_first else "rbln-blocks-first"
    device = make_cache(kind, 8, 32)
    fill(views_of(kind, device, 32), [5, 1, 2, 6], 100)  # 4 blocks of 32 tokens, 100 filled
    axes = {n: 1 if kv_first else 0 for n in device}
    staging = HostStaging(device, axes)
    regions, layers = staging.regions()
    assert len(regions) == LAYERS * (2 if kv_first else 1) and layers[0] == next(iter(device))
    assert all(r.base_addr % PAGE == 0 for r in regions[:: 2 if kv_first else 1])
    assert staging.to_host([1, 2, 5]) == 3 * LAYERS * 2 * HEADS * 32 * HEAD_SIZE * 2
    host_views = views_of(kind, staging.host, 32)
    dev_views = views_of(kind, device, 32)
    for h, d in zip(host_views, dev_views, strict=True):
        assert torch.equal(h[[1, 2, 5]], d[[1, 2, 5]]) and h[[1, 2, 5]].any()
        assert not h[[0, 3, 4, 6, 7]].any()  # block 6 holds tokens but was not asked for
    for h in host_views:
        h[3] = 7
    staging.to_device([3])
    assert all(bool((d[3] == 7).all()) for d in dev_views)
    assert staging.bytes_out and staging.bytes_in


def test_staging_delegates_to_the_runner_copy_op() -> None:
    device = make_cache("rbln-blocks-first", 6, 32)
    fill(views_of("rbln-blocks-first", device, 32), [0, 4], 64)
    calls = []

    def op(src, dst, src_ids, dst_ids, direction):  # vllm-rbln's runner op, wrapped to be seen
        calls.append((direction, list(src_ids)))
        fakes.copy_host_device_kv_blocks(src, dst, src_ids, dst_ids, direction, block_axes=dict.fromkeys(device, 0))

    staging = HostStaging(device, dict.fromkeys(device, 0))
    staging.copy_op = op
    staging.to_host([4, 0])
    assert calls == [("d2h", [4, 0])]
    for h, d in zip(staging.host.values(), device.values(), strict=True):
        assert torch.equal(h[[0, 4]], d[[0, 4]]) and h[[0, 4]].any()


# ---- platform -----------------------------------------------------------------------------------
def test_platform_detection_reads_the_tensors_and_vllm_rbln_platform() -> None:
    from vllm.platforms import current_platform

    assert is_rbln_platform(fakes.RblnPlatform) and is_rbln_platform(fakes.RblnPlatform())
    assert not is_rbln_platform(current_platform)  # the CPU platform this venv runs
    assert detect("rbln", fakes.RblnPlatform).kind == "rbln"
    assert detect("cpu", current_platform).kind == "cpu"
    assert detect("cuda", None).kind == "cuda"
    # vllm-rbln's optimum path (or device tensors off): the KV cache is not reachable
    with pytest.raises(PlatformError, match="VLLM_RBLN_USE_DEVICE_TENSOR=1"):
        detect("cpu", fakes.RblnPlatform)
    # the KV tensors themselves say rbln (torch-rbln renamed PrivateUse1)
    caches = fakes.fake_rbln_kv_caches(1, 2, 1, 32, 8)
    assert detect(next(iter(caches.values())).device.type, None).kind == "rbln"


def test_transport_auto_chooses_per_platform() -> None:
    cpu, cuda, npu = detect("cpu"), detect("cuda"), detect("rbln", fakes.RblnPlatform)
    assert choose("auto", cpu).transport == "nixl" and choose("auto", cuda).backends == ("UCX",)
    auto_npu = choose("auto", npu)
    assert (auto_npu.transport, auto_npu.rbln_path, auto_npu.backends) == ("rbln", "host", ("UCX",))
    with_adapter = choose("auto", npu, nixl_rbln_available=True)
    assert with_adapter.backends == ("RBLN", "UCX") and "nixl_rbln" in with_adapter.reason
    assert choose("auto", npu, rbln_path="d2d", nixl_rbln_available=True).rbln_path == "d2d"
    assert choose("nixl", cpu, backends=("UCX", "POSIX")).backends == ("UCX", "POSIX")
    for bad, match in (
        (lambda: choose("nixl", npu), "cannot register KV memory on an RBLN device"),
        (lambda: choose("rbln", cuda), "needs an RBLN engine"),
        (lambda: choose("auto", npu, rbln_path="d2d"), "nixl-rbln"),
        (lambda: choose("rsd", cpu), "unknown transport"),
    ):
        with pytest.raises(PlatformError, match=match):
            bad()


def test_rsd_group_from_torch_rbln_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    assert rsd_group(3) == (3,)
    monkeypatch.setenv("RBLN_NPUS_PER_DEVICE", "2")
    assert rsd_group(1) == (2, 3)
    monkeypatch.setenv("RBLN_DEVICE_MAP", "[0,4],[1,5]")
    assert rsd_group(1) == (1, 5)


# ---- hand-offs over NIXL ------------------------------------------------------------------------
@dataclass
class Engine:
    transport: KVTransport
    caches: dict[str, torch.Tensor]
    views: list[torch.Tensor]  # where the engine's attention reads (device tensors on RBLN)
    wire: KVLayout  # what peers read (staging on RBLN)
    puller: CrossLayoutPuller


def engine(kind: str, num_blocks: int, block_size: int, nixl_rbln: fakes.FakeNixlRbln | None = None) -> Engine:
    caches = make_cache(kind, num_blocks, block_size)
    views = views_of(kind, caches, block_size)
    if kind.startswith("rbln"):
        with fakes.installed(nixl_rbln=nixl_rbln):
            t = make_transport("rbln", MemoryKind.DRAM, kv_caches=caches, num_blocks=num_blocks)
        assert isinstance(t, RblnTransport) and t.staging is not None
        wire = describe(views_of(kind, t.staging.host, block_size), kind)
    else:
        t = make_transport("nixl", MemoryKind.DRAM)
        from vllm_llmd.connectors.transports import Region

        t.register(
            [Region(base_addr=c.data_ptr(), num_blocks=num_blocks, block_len=c[0].numel() * 2) for c in caches.values()]
        )
        wire = describe(views, kind)
    return Engine(t, caches, views, wire, CrossLayoutPuller(t, views, 1 << 20))


def pull(dst: Engine, src: Engine, remote_ids: list[int], local_ids: list[int], first: int, end: int) -> None:
    """What a decode worker does for a cross-layout pull: descriptors, READ, wait, re-layout."""
    peer = dst.transport.add_peer(src.transport.local_metadata(), src.transport.regions)
    assert mapping_problems(describe(dst.views, "x"), src.wire) == {}
    plan = plan_tokens(remote_ids, src.wire.block_size, local_ids, dst.views[0].shape[3], first, end)
    xp = dst.puller.start(peer, src.wire, plan, b"llmd:done:r1")
    assert xp is not None
    state = wait_until(lambda: (s := dst.transport.poll(xp.handle)) != XferState.PENDING and s, 20, "the READ")
    assert state == XferState.DONE
    dst.transport.release(xp.handle)
    assert dst.puller.finish(xp) == LAYERS * 2 * HEADS * (end - first) * HEAD_SIZE * 2
    assert dst.puller.pool.free_bytes == dst.puller.pool.nbytes
    got = wait_until(lambda: [m for _, m in src.transport.get_notifs()], 10, "the completion notice")
    assert got == [b"llmd:done:r1"]


def check(views: list[torch.Tensor], local_ids: list[int], first: int, end: int) -> None:
    s = views[0].shape[3]
    for layer, v in enumerate(views):
        for i, b in enumerate(local_ids):
            lo = first + i * s
            cnt = min(s, end - lo)
            assert torch.equal(v[b, :, :, :cnt], token_values(layer, np.arange(lo, lo + cnt))), (layer, b)


@pytest.mark.nixl
@pytest.mark.parametrize("npu_kind", ["rbln-blocks-first", "rbln-kv-first"])
def test_npu_prefill_to_cpu_decode_and_cpu_prefill_to_npu_decode(npu_kind: str) -> None:
    npu, cpu = engine(npu_kind, 6, 64), engine("cpu", 12, 32)
    try:
        # prefill on the NPU (blocks 4, 1, 3 hold 150 tokens), staged out, pulled by the CPU engine
        fill(npu.views, [4, 1, 3], 150)
        npu.transport.stage_out([4, 1, 3])
        pull(cpu, npu, [4, 1, 3], [7, 2, 9, 0, 5], 0, 150)
        check(cpu.views, [7, 2, 9, 0, 5], 0, 150)
        # and back: the CPU engine prefills 200 tokens, the NPU (prefix hit of its first block) decodes
        for v in cpu.views:
            v.zero_()
        fill(cpu.views, [10, 11, 3, 6, 8, 1, 2], 200)
        for v in npu.views:
            v.zero_()
        pull(npu, cpu, [10, 11, 3, 6, 8, 1, 2], [2, 5, 0], 64, 200)
        check(npu.views, [2, 5, 0], 64, 200)
        assert not npu.views[0][[1, 3, 4]].any()
    finally:
        npu.transport.close()
        cpu.transport.close()


@pytest.mark.nixl
def test_npu_to_npu_same_geometry_moves_blocks_directly_then_stages_in() -> None:
    p, d = engine("rbln-blocks-first", 5, 64), engine("rbln-blocks-first", 5, 64)
    try:
        fill(p.views, [3, 0], 100)
        p.transport.stage_out([3, 0])
        peer = d.transport.add_peer(p.transport.local_metadata(), p.transport.regions)
        pairs_l = [(r, b) for r in range(LAYERS) for b in (1, 4)]
        pairs_r = [(r, b) for r in range(LAYERS) for b in (3, 0)]
        h = d.transport.read_blocks(peer, pairs_l, pairs_r, b"done")
        wait_until(lambda: d.transport.poll(h) != XferState.PENDING, 20, "the READ")
        assert d.transport.poll(h) == XferState.DONE
        d.transport.release(h)
        assert not d.views[0].any()  # bytes are in staging, not yet on the device
        d.transport.stage_in([1, 4])
        check(d.views, [1, 4], 0, 100)
    finally:
        p.transport.close()
        d.transport.close()


@pytest.mark.nixl
def test_rbln_backend_is_created_through_nixl_rbln_and_preferred() -> None:
    adapter = fakes.FakeNixlRbln(alias_ucx=True)
    npu, cpu = engine("rbln-blocks-first", 4, 64, adapter), engine("cpu", 8, 32)
    try:
        assert adapter.backend_calls and adapter.backend_calls[0]["device_id"] == 0
        assert isinstance(npu.transport, RblnTransport) and npu.transport.rbln_backend
        assert npu.transport.backends_available[0] == "RBLN"
        fill(npu.views, [2], 64)
        npu.transport.stage_out([2])
        pull(cpu, npu, [2], [5, 6], 0, 64)  # the CPU engine (UCX only) still reads the NPU's staging
        check(cpu.views, [5, 6], 0, 64)
    finally:
        npu.transport.close()
        cpu.transport.close()


@pytest.mark.nixl
def test_a_pull_waits_for_room_in_the_receive_pool_and_refuses_what_never_fits() -> None:
    npu, cpu = engine("rbln-blocks-first", 40, 64), engine("cpu", 80, 32)
    try:
        peer = cpu.transport.add_peer(npu.transport.local_metadata(), npu.transport.regions)
        puller = CrossLayoutPuller(cpu.transport, cpu.views, 64 << 10)
        per_block = npu.wire.page_bytes * LAYERS  # one NPU block of every layer: 8 KiB
        big = plan_tokens(list(range(40)), 64, list(range(80)), 32, 0, 40 * 64)
        with pytest.raises(PoolTooSmall, match="relayout_buffer_mb"):
            puller.start(peer, npu.wire, big, b"")  # 320 KiB > 64 KiB
        fits = (64 << 10) // per_block
        whole = plan_tokens(list(range(fits)), 64, list(range(80)), 32, 0, fits * 64)
        first = puller.start(peer, npu.wire, whole, b"")
        assert first is not None and puller.pool.free_bytes == 0
        small = plan_tokens([0], 64, [0, 1], 32, 0, 64)
        assert puller.start(peer, npu.wire, small, b"") is None  # full: try again later
        wait_until(lambda: cpu.transport.poll(first.handle) != XferState.PENDING, 20, "the READ")
        cpu.transport.release(first.handle)
        puller.abandon(first)
        again = puller.start(peer, npu.wire, small, b"")
        assert again is not None
        wait_until(lambda: cpu.transport.poll(again.handle) != XferState.PENDING, 20, "the READ")
        cpu.transport.release(again.handle)
        puller.finish(again)
        assert puller.pool.free_bytes == puller.pool.nbytes
    finally:
        npu.transport.close()
        cpu.transport.close()


def test_without_the_rbln_plugin_the_host_path_falls_back_to_ucx(caplog: pytest.LogCaptureFixture) -> None:
    adapter = fakes.FakeNixlRbln()  # imports, but no RBLN backend appears on the agent
    npu = engine("rbln-blocks-first", 2, 32, adapter)
    try:
        assert isinstance(npu.transport, RblnTransport)
        assert not npu.transport.rbln_backend and npu.transport.backends_available == ("UCX",)
        assert "no RBLN backend" in caplog.text
    finally:
        npu.transport.close()


# ---- d2d: the nixl_rbln registration contract --------------------------------------------------
@pytest.mark.parametrize("kv_first", [False, True])
def test_d2d_registers_device_memory_through_nixl_rbln_after_warm_up(
    monkeypatch: pytest.MonkeyPatch, kv_first: bool
) -> None:
    import nixl._api

    monkeypatch.setattr(nixl._api, "nixl_agent", fakes.FakeNixlAgent)
    adapter = fakes.FakeNixlRbln(areas=2, alias_ucx=True)
    caches = fakes.fake_rbln_kv_caches(LAYERS, 4, HEADS, 64, HEAD_SIZE, kv_first=kv_first, device_index=1)
    with fakes.installed(nixl_rbln=adapter):
        t = RblnTransport(caches, num_blocks=4, path="d2d", stripe_width=0)
        assert t.memory == MemoryKind.VRAM and t.staging is None and not t.stages
        assert t.pending and not adapter.register_calls  # deferred until warm-up is over
        t.finalize()
        t.finalize()  # idempotent
    call = adapter.register_calls[0]
    assert len(adapter.register_calls) == 1
    assert (call["device_id"], call["mem"], call["rbln_ctx_ptr"], call["stripe_width"]) == (1, "VRAM", 0x5EB1, 0)
    page = 2 * HEADS * 64 * HEAD_SIZE * 2
    per_layer = [(0, page // 2), (page * 4 // 2, page // 2)] if kv_first else [(0, page)]
    assert [(off, n) for _, off, n in call["regions"]] == per_layer * LAYERS
    regions = t.regions
    assert len(regions) == LAYERS * len(per_layer) * 2  # two chiplet areas per region
    assert {r.block_len for r in regions} == {per_layer[0][1] // 2}
    assert {r.device_id for r in regions} == {1} and len(t.region_layers) == len(regions)
    assert adapter.backend_calls[0]["stripe_width"] == 0
    t.close()


def test_d2d_without_nixl_rbln_is_refused_with_the_fix() -> None:
    caches = fakes.fake_rbln_kv_caches(1, 2, 1, 32, 8)
    with pytest.raises(TransportError, match="rbln_path 'host'"):
        RblnTransport(caches, num_blocks=2, path="d2d")


def test_the_plugin_names_the_platform_in_engine_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_llmd.connectors import platform as platform_mod

    from vllm_llmd import plugin

    monkeypatch.setattr(platform_mod, "current_vllm_platform", lambda: fakes.RblnPlatform())
    assert plugin.platform_name("worker") == "rbln" and plugin.platform_name("engine_core") == "rbln"
    assert plugin.platform_name("api_server") == "-"  # the API server never resolves the platform
    monkeypatch.setattr(platform_mod, "current_vllm_platform", lambda: None)
    assert plugin.platform_name("worker") == "-"
