"""Stand-ins for Rebellions' stack (vllm-rbln, torch-rbln, rebel-compiler, nixl-rbln), none of which
can run without an RBLN NPU and Rebellions' own package index.

Written from the sources of vllm-rbln 0.12.0 and torch-rbln 0.12.0 (the PyPI wheels, read only) and
from how vllm-rbln's own tests fake the hardware (``tests/native/distributed/kv_connector/
{conftest,utils}.py`` in RBLN-SW/vllm-rbln: a tensor subclass answering ``get_device()``, a stub
``rebel.context_of``, a ``nixl_rbln`` module whose ``register_kv_regions`` returns transfer tables
computed from the tensors' real addresses). Each object below names what it stands in for.

What stays real: the KV tensors are host memory (so every copy and every NIXL transfer in a test
moves real bytes), torch's copy kernels, and NIXL itself. What is faked: the ``rbln`` device
identity, ``rebel``'s allocator and context lookup, the ``nixl_rbln`` adapter (it cannot create an
RBLN NIXL backend: there is none without the hardware), and vllm-rbln's platform class.
"""

from __future__ import annotations

import contextlib
import mmap
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class FakeDevice:
    """What ``tensor.device`` answers for a tensor on ``rbln:N`` once torch-rbln renamed PrivateUse1
    (torch_rbln/__init__.py registers the ``rbln`` backend; plain torch cannot even parse
    ``torch.device("rbln:0")``)."""

    type: str = "rbln"
    index: int = 0

    def __str__(self) -> str:
        return f"{self.type}:{self.index}"


class RblnDeviceTensor(torch.Tensor):
    """A host tensor that reports itself as living on ``rbln:<index>``.

    As vllm-rbln's ``KvGeometry.kv_caches`` does (its ``_OnDevice`` subclass answers ``get_device()``),
    only the device identity is faked: ``data_ptr``, strides and every copy stay torch's own, so a
    staging copy or a NIXL read of this memory moves real bytes.
    """

    _rbln_index = 0

    @property
    def device(self) -> FakeDevice:  # type: ignore[override]
        return FakeDevice("rbln", self._rbln_index)

    def get_device(self) -> int:  # type: ignore[override]
        return self._rbln_index

    @property
    def is_cpu(self) -> bool:  # type: ignore[override]
        return False


def on_rbln(t: torch.Tensor, index: int = 0) -> RblnDeviceTensor:
    out = t.as_subclass(RblnDeviceTensor)
    out._rbln_index = index
    return out


def fake_rbln_kv_caches(
    num_layers: int,
    num_blocks: int,
    num_kv_heads: int,
    block_size: int,
    head_size: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    kv_first: bool = False,
    device_index: int = 0,
) -> dict[str, torch.Tensor]:
    """Per-layer KV caches as vllm-rbln's model runner hands them to a connector.

    Shape from ``vllm_rbln/v1/attention/backends/flash_attention.py``,
    ``RBLNFlashAttentionBackend.get_kv_cache_shape``: ``[2, H, 1, S, D]`` with ``num_blocks`` inserted
    at ``attention_block_axis(use_custom_kernel)`` (``vllm_rbln/v1/attention/kv_cache_bindings.py``):
    axis 0, blocks-first ``[B, 2, H, 1, S, D]``, for the default kernels; axis 1, K/V-first
    ``[2, B, H, 1, S, D]``, for ``rbln_triton_ops``. Layer names follow vLLM's.
    """
    shape = [2, num_kv_heads, 1, block_size, head_size]
    shape.insert(1 if kv_first else 0, num_blocks)
    return {
        f"model.layers.{i}.self_attn.attn": on_rbln(torch.zeros(shape, dtype=dtype), device_index)
        for i in range(num_layers)
    }


# ---- rebel (rebel-compiler) ---------------------------------------------------------------------
def _page_aligned(nbytes: int) -> torch.Tensor:
    buf = mmap.mmap(-1, max(nbytes, 1))  # anonymous mappings start on a page boundary
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes)


def fake_rebel() -> types.ModuleType:
    """``rebel`` with the three names the RBLN KV path calls:

    - ``rebel.kv_cache.aligned_tensor(n)``: a page-aligned float16 host tensor of ``n`` elements
      (vllm-rbln ``rbln_nixl/registration.py``, ``initialize_host_xfer_buffer``: sized in fp16
      elements, then ``view(dtype).view(shape)``);
    - ``rebel.context_of(t).rbln_ctx_ptr`` (``registration.py``, ``_register_kv_caches_impl``; stubbed
      the same way in vllm-rbln's ``conftest.py``);
    - ``rebel.get_npu_name(device_id)`` (``vllm_rbln/platform/__init__.py``, ``get_device_name``;
      ``RBLN-CA25`` is ATOM).
    """
    rebel = types.ModuleType("rebel")
    kv_cache = types.ModuleType("rebel.kv_cache")
    kv_cache.aligned_tensor = lambda n: _page_aligned(2 * int(n)).view(torch.float16)  # type: ignore[attr-defined]
    rebel.kv_cache = kv_cache  # type: ignore[attr-defined]
    rebel.context_of = lambda t: types.SimpleNamespace(rbln_ctx_ptr=0x5EB1)  # type: ignore[attr-defined]
    rebel.get_npu_name = lambda device_id=0: "RBLN-CA25"  # type: ignore[attr-defined]
    return rebel


# ---- nixl_rbln (nixl-rbln) ----------------------------------------------------------------------
@dataclass
class XferTables:
    """What ``nixl_rbln.register_kv_regions`` returns (fields read by vllm-rbln's
    ``registration.py``: ``base_addrs``, ``block_lens``, ``slice_ids``, ``n_shards``, ``slices``,
    ``reg_handle``)."""

    base_addrs: list[int]
    block_lens: list[int]
    slice_ids: list[int]
    n_shards: int
    slices: int
    reg_handle: Any


@dataclass
class FakeNixlRbln:
    """The ``nixl_rbln`` adapter module.

    ``ensure_rbln_backend(wrapper, device_id=0, **extra)`` and ``register_kv_regions(wrapper, regions,
    device_id, mem=..., rbln_ctx_ptr=..., **extra)`` as vllm-rbln calls them (``rbln_nixl/
    registration.py``, ``register_kv_caches`` and ``_register_kv_caches_impl``). ``regions`` are
    ``(entry_tensor, byte_offset, full_block_len)``; the tables split each region into ``areas``
    equal chiplet areas of every block, as vllm-rbln's test ``KvGeometry.xfer_tables`` models them
    (one area per chiplet of the RSD group's NPUs, each a run of ``block_len / areas`` per block).
    Nothing is registered with NIXL: there is no RBLN backend without the hardware.
    """

    areas: int = 1
    #: make ``ensure_rbln_backend`` list NIXL's UCX backend under the name ``RBLN`` (for tests of the
    #: backend choice that still move real bytes; there is no RBLN plugin without the hardware)
    alias_ucx: bool = False
    backend_calls: list[dict[str, Any]] = field(default_factory=list)
    register_calls: list[dict[str, Any]] = field(default_factory=list)

    def ensure_rbln_backend(self, wrapper: Any, device_id: int = 0, **extra: Any) -> None:
        self.backend_calls.append({"wrapper": wrapper, "device_id": device_id, **extra})
        backends = getattr(wrapper, "backends", None)
        if self.alias_ucx and isinstance(backends, dict) and "UCX" in backends:
            backends["RBLN"] = backends["UCX"]

    def register_kv_regions(self, wrapper: Any, regions: Any, device_id: int, **kw: Any) -> XferTables:
        regions = list(regions)
        self.register_calls.append({"wrapper": wrapper, "regions": regions, "device_id": device_id, **kw})
        per_entry: dict[int, int] = {}
        for entry, _, _ in regions:
            per_entry[entry.data_ptr()] = per_entry.get(entry.data_ptr(), 0) + 1
        base_addrs, block_lens, slice_ids = [], [], []
        for entry, offset, _block_len in regions:
            region_bytes = entry.numel() * entry.element_size() // per_entry[entry.data_ptr()]
            num_blocks = region_bytes // _block_len
            area_bytes = region_bytes // self.areas
            for a in range(self.areas):  # area-major: every block's slice of chiplet a, side by side
                base_addrs.append(entry.data_ptr() + offset + a * area_bytes)
                block_lens.append(area_bytes // num_blocks)
                slice_ids.append(a)
        return XferTables(base_addrs, block_lens, slice_ids, self.areas, self.areas, object())

    def module(self) -> types.ModuleType:
        mod = types.ModuleType("nixl_rbln")
        mod.ensure_rbln_backend = self.ensure_rbln_backend  # type: ignore[attr-defined]
        mod.register_kv_regions = self.register_kv_regions  # type: ignore[attr-defined]
        return mod


# ---- vllm_rbln ----------------------------------------------------------------------------------
class RblnPlatform:
    """The class-level facts of ``vllm_rbln.platform.RblnPlatform`` (vllm_rbln/platform/__init__.py)
    that platform detection reads, with ``device_type`` as ``_apply_model_impl`` sets it on the vLLM
    model path with ``VLLM_RBLN_USE_DEVICE_TENSOR=1``."""

    plugin_name = "rbln"
    device_name = "rbln"
    device_type = "rbln"
    dispatch_key = "CPU"
    ray_device_key = "RBLN"
    device_control_env_var = "RBLN_VISIBLE_DEVICES"

    @classmethod
    def get_nixl_memory_type(cls) -> str:
        return "DRAM"

    @classmethod
    def get_device_name(cls, device_id: int = 0) -> str:
        return "RBLN-CA25"


def copy_host_device_kv_blocks(
    src_kv_caches: dict[str, torch.Tensor],
    dst_kv_caches: dict[str, torch.Tensor],
    src_block_ids: list[int],
    dst_block_ids: list[int],
    direction: str,
    *,
    block_axes: dict[str, int],
) -> None:
    """vllm-rbln's host <-> device block copy (``vllm_rbln/v1/worker/utils.py``,
    ``copy_host_device_kv_blocks``), the op its model runner hands connectors through
    ``set_host_xfer_buffer_ops``: same block ids on both sides, ``select`` on each layer's block axis,
    one ``torch._foreach_copy_``."""
    if not src_block_ids:
        return
    if src_block_ids != dst_block_ids:
        raise AssertionError("src and dst block ids must be the same")
    dsts, srcs = [], []
    for name, dst in dst_kv_caches.items():
        axis = block_axes[name]
        for b in src_block_ids:
            dsts.append(dst.select(axis, b))
            srcs.append(src_kv_caches[name].select(axis, b))
    torch._foreach_copy_(dsts, srcs)


@contextlib.contextmanager
def installed(*, rebel: bool = True, nixl_rbln: FakeNixlRbln | None = None) -> Iterator[None]:
    """Put the fake modules in ``sys.modules`` for the duration (restoring what was there)."""
    mods: dict[str, types.ModuleType] = {}
    if rebel:
        r = fake_rebel()
        mods.update({"rebel": r, "rebel.kv_cache": r.kv_cache})  # type: ignore[attr-defined]
    if nixl_rbln is not None:
        mods["nixl_rbln"] = nixl_rbln.module()
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class FakeNixlAgent:
    """A NIXL agent that records calls and moves nothing, for the RBLN d2d path, whose device memory
    no NIXL backend here can register (UCX refuses VRAM without CUDA). Modelled on ``FakeNixlAgent``
    in vllm-rbln's ``tests/native/distributed/kv_connector/utils.py`` (distinct handles, every
    transfer DONE), with the attributes NixlTransport reads (``backends``, ``name``)."""

    def __init__(self, name: str = "fake-agent", config: Any = None) -> None:
        self.name = name
        self.backends: dict[str, int] = {b: i for i, b in enumerate(getattr(config, "backends", None) or ["UCX"])}
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self._next = 0

    def _handle(self, op: str, *a: Any, **k: Any) -> int:
        self.calls.append((op, a, k))
        self._next += 1
        return self._next

    def __getattr__(self, op: str) -> Any:
        if op in (
            "get_reg_descs",
            "register_memory",
            "deregister_memory",
            "get_xfer_descs",
            "prep_xfer_dlist",
            "release_dlist_handle",
            "release_xfer_handle",
            "make_prepped_xfer",
            "initialize_xfer",
            "send_notif",
            "remove_remote_agent",
            "create_backend",
        ):
            return lambda *a, **k: self._handle(op, *a, **k)
        raise AttributeError(op)

    def transfer(self, *a: Any, **k: Any) -> str:
        self._handle("transfer", *a, **k)
        return "DONE"

    def check_xfer_state(self, *a: Any, **k: Any) -> str:
        return "DONE"

    def add_remote_agent(self, metadata: bytes) -> str:
        self._handle("add_remote_agent", metadata)
        return metadata.decode(errors="replace") or "remote-agent"

    def get_agent_metadata(self) -> bytes:
        return self.name.encode()

    def get_new_notifs(self) -> dict[str, list[bytes]]:
        return {}
