"""Descriptor arithmetic of the NIXL transport (connectors/transports/nixl.py): pure functions from
our region tables and block pairs to the arrays NIXL takes, with the bounds checks that keep a peer
from steering a transfer outside registered memory. No NIXL import, so it reads and tests alone.

NIXL's ``nixl_agent.get_xfer_descs`` (``nixl_cu12/_api.py`` of nixl 1.5) takes an ``N x 3`` numpy
array, one ``(address, length, device id)`` row per descriptor; ``make_prepped_xfer`` takes index
arrays into a list prepared from such rows (``prep_xfer_dlist``). A region table becomes one row per
block, region-major (:func:`block_descs`); ``(region, block)`` pairs become indices into it
(:func:`block_offsets`, :func:`block_indices`); ``(addr, len)`` runs of a cross-layout read are
checked against registered spans (:func:`locate_runs`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from vllm_llmd.connectors.transports.base import MemoryKind, Region, TransportError


def block_descs(regions: Sequence[Region]) -> np.ndarray:
    """One ``(addr, len, dev)`` row per block of every region, region-major."""
    rows = []
    for r in regions:
        addrs = r.base_addr + np.arange(r.num_blocks, dtype=np.uint64) * np.uint64(r.block_len)
        block = np.empty((r.num_blocks, 3), dtype=np.uint64)
        block[:, 0] = addrs
        block[:, 1] = r.block_len
        block[:, 2] = r.device_id
        rows.append(block)
    return np.concatenate(rows) if rows else np.empty((0, 3), dtype=np.uint64)


def block_offsets(regions: Sequence[Region]) -> list[int]:
    """Where each region's first block stands in :func:`block_descs`' rows."""
    out, acc = [], 0
    for r in regions:
        out.append(acc)
        acc += r.num_blocks
    return out


def block_indices(regions: Sequence[Region], offsets: list[int], pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """The descriptor row of every ``(region, block)`` pair (``TransportError`` for one outside the
    regions: nothing moves)."""
    idx = np.empty(len(pairs), dtype=np.int32)
    for i, (region, block) in enumerate(pairs):
        if not 0 <= region < len(regions) or not 0 <= block < regions[region].num_blocks:
            raise TransportError(f"block ({region}, {block}) is outside the registered regions")
        idx[i] = offsets[region] + block
    return idx


def locate_runs(
    spans: Sequence[tuple[int, int, int, MemoryKind]], runs: np.ndarray, whose: str
) -> tuple[MemoryKind, np.ndarray]:
    """The memory kind and device id of every ``(addr, len)`` run; each must lie inside one span of
    registered memory, all of one kind (``TransportError`` otherwise: nothing is read)."""
    if len(runs) == 0:
        raise TransportError("nothing to read")
    order = sorted(spans)  # registered spans do not overlap; a run must sit in one (NIXL checks it too)
    bases = np.array([s[0] for s in order], dtype=np.int64)
    ends = bases + np.array([s[1] for s in order], dtype=np.int64)
    addr, n = runs[:, 0].astype(np.int64), runs[:, 1].astype(np.int64)
    idx = np.searchsorted(bases, addr, side="right") - 1
    ok = (idx >= 0) & (n > 0)
    ok &= addr + n <= ends[np.clip(idx, 0, None)]
    if not ok.all():
        bad = int(np.argmin(ok))
        raise TransportError(f"run ({int(addr[bad]):#x}, {int(n[bad])}) is outside {whose} registered memory")
    kinds = {order[i][3] for i in np.unique(idx).tolist()}
    if len(kinds) > 1:
        raise TransportError(f"runs span {whose} memory of several kinds {sorted(kinds)}")
    devs = np.array([s[2] for s in order], dtype=np.int64)[idx]
    return kinds.pop(), devs
