"""Worker start-up (connectors/kv_setup.py): platform detection, the transport ``auto`` picks, the
registered regions, and the canonical layouts a peer reads; RBLN against the fakes, NIXL for real."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from kv_helpers import HEAD_SIZE, HEADS, LAYERS, make_cache
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm_llmd.connectors.kv_setup import setup_kv
from vllm_llmd.connectors.platform import PlatformError
from vllm_llmd.connectors.relayout import canonical
from vllm_llmd.connectors.transports import MemoryKind
from vllm_llmd.connectors.transports.nixl import NixlTransport
from vllm_llmd.connectors.transports.rbln import RblnTransport

from vllm_llmd.testing.fakes import rbln as fakes

pytestmark = pytest.mark.nixl


def kv_config(caches: dict[str, torch.Tensor], num_blocks: int, block_size: int) -> SimpleNamespace:
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=HEADS, head_size=HEAD_SIZE, dtype=torch.bfloat16)
    group = SimpleNamespace(layer_names=list(caches), kv_cache_spec=spec)
    return SimpleNamespace(num_blocks=num_blocks, kv_cache_groups=[group])


def test_cpu_engine_registers_its_cache_as_it_is() -> None:
    from vllm.platforms import current_platform

    caches = make_cache("cpu", 6, 32)
    s = setup_kv(caches, kv_config(caches, 6, 32), platform=current_platform, cpu_isa="vec")
    try:
        assert isinstance(s.transport, NixlTransport)
        assert (s.platform.kind, s.choice.transport, s.layout) == ("cpu", "nixl", "blocks_first")
        assert s.memory == MemoryKind.DRAM
        assert [r.base_addr for r in s.transport.regions] == [t.data_ptr() for t in caches.values()]
        assert s.region_groups == [0] * LAYERS and s.num_kv_groups == 1
        assert s.wire_layout is not None and s.wire_layout.kind == "cpu-vec" and s.wire_layout.block_size == 32
        assert s.local_views is not None and canonical(s.local_views[0][0]).shape == (6, HEADS, 32, HEAD_SIZE)
    finally:
        s.transport.close()


@pytest.mark.parametrize("kv_first", [False, True])
def test_rbln_engine_gets_the_rbln_transport_and_peers_read_its_staging(kv_first: bool) -> None:
    caches = fakes.fake_rbln_kv_caches(LAYERS, 4, HEADS, 64, HEAD_SIZE, kv_first=kv_first)
    with fakes.installed():
        s = setup_kv(caches, kv_config(caches, 4, 64), platform=fakes.RblnPlatform)
    try:
        assert isinstance(s.transport, RblnTransport) and s.transport.staging is not None
        assert (s.platform.kind, s.choice.transport, s.choice.rbln_path) == ("rbln", "rbln", "host")
        assert s.layout == ("kv_first" if kv_first else "blocks_first")
        assert s.region_groups == [0] * len(s.transport.regions)
        assert s.wire_layout is not None and s.local_views is not None
        staged = {t.data_ptr() for t in s.transport.staging.host.values()}
        device = {t.data_ptr() for t in caches.values()}
        assert {lk.k.base_addr for lk in s.wire_layout.layers} <= staged  # peers read the staging ...
        assert {k.data_ptr() for k, _ in s.local_views} <= device  # ... re-layouts write the device cache
        assert s.wire_layout.kind == ("rbln-kv-first" if kv_first else "rbln-blocks-first")
    finally:
        s.transport.close()


def test_impossible_combinations_stop_start_up_with_the_fix() -> None:
    caches = fakes.fake_rbln_kv_caches(1, 2, HEADS, 32, HEAD_SIZE)
    with pytest.raises(PlatformError, match="use 'auto' or 'rbln'"):
        setup_kv(caches, kv_config(caches, 2, 32), transport="nixl", platform=fakes.RblnPlatform)
    cpu = make_cache("cpu", 2, 32)
    with pytest.raises(PlatformError, match="VLLM_RBLN_USE_DEVICE_TENSOR=1"):
        setup_kv(cpu, kv_config(cpu, 2, 32), platform=fakes.RblnPlatform)
    with pytest.raises(PlatformError, match="nixl-rbln"):
        setup_kv(caches, kv_config(caches, 2, 32), rbln_path="d2d", platform=fakes.RblnPlatform)


def test_the_cpu_kernels_packing_is_probed_and_published() -> None:
    """The wire layout of a CPU engine is what vLLM's attention kernel does, measured at start-up:
    vLLM's AMX kernel tiles K and V (on this machine's Xeon), the vec kernel keeps K dim-major; with
    no kernel to probe, no layout is published (peers laid out differently are then refused)."""
    from vllm.platforms import current_platform

    kernels = [("vec", False)] + ([("amx", True)] if torch.cpu._is_amx_tile_supported() else [])
    for isa, tiled in kernels:
        caches = make_cache("cpu", 4, 32)
        s = setup_kv(caches, kv_config(caches, 4, 32), platform=current_platform, cpu_isa=isa)
        try:
            assert s.wire_layout is not None and s.wire_layout.kind == f"cpu-{isa}"
            assert s.wire_layout.layers[0].k.tiled == tiled and s.wire_layout.layers[0].v.tiled == tiled
        finally:
            s.transport.close()
    caches = make_cache("cpu", 4, 32)
    s = setup_kv(caches, kv_config(caches, 4, 32), platform=current_platform, cpu_isa=None)
    try:
        assert s.wire_layout is None and s.local_views is None and len(s.transport.regions) == LAYERS
    finally:
        s.transport.close()
