"""What two engines agree on in the handshake: move blocks as they are, re-lay them out, or refuse.

Pure: it reads the two engines' handshake facts (``connectors/handshake.py``'s ``EngineInfo``, or
anything with the same attributes) and returns a :class:`Plan` or the fields that forbid one.

1. Always required: the same protocol, model, KV dtype (cache dtype and model dtype) and transport
   family, and a NIXL backend both sides have (the decode side's preference order wins: an NPU pair
   takes ``RBLN``, an NPU with a GPU takes ``UCX``).
2. **direct**: block size, number of layers and regions, region block length, memory kind and
   in-block byte order all equal: region ``r``'s block ``b`` pairs with the peer's region ``r``,
   block ``b'`` (what every same-kind hand-off does).
3. **relayout** otherwise, when both publish a canonical :class:`~.layout.KVLayout` that maps
   (same layers, KV heads, head size, element dtype; the peer's layers inside the memory it
   registered, a bounded number of runs per block), the decode side has a receive pool, and each
   side has one KV cache group (a hybrid model's groups have their own block tables).

A refusal names every field that differs or stands in the way (sorted by name): why blocks cannot
move as they are and why they cannot be re-laid out; the decode side logs it and prefills locally.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm_llmd.connectors.layout import mapping_problems, outside, same_layout

ALWAYS = ("protocol", "model", "kv_dtype", "transport")
DIRECT = ("block_size", "num_layers", "block_len", "memory", "layout")

Problems = dict[str, tuple[object, object]]


@dataclass(frozen=True)
class Plan:
    mode: str  # "direct" | "relayout"
    backends: tuple[str, ...]  # common NIXL backends, the decode side's order
    why: str  # for relayout: what differs (logged once per peer)


def _regions(info: Any) -> int:
    return len(getattr(info, "regions", ()) or ())


def direct_differences(local: Any, remote: Any) -> Problems:
    out: Problems = {f: (getattr(local, f), getattr(remote, f)) for f in DIRECT}
    out = {f: v for f, v in out.items() if v[0] != v[1]}
    if _regions(local) != _regions(remote):
        out["regions"] = (_regions(local), _regions(remote))
    a, b = getattr(local, "kv_layout", None), getattr(remote, "kv_layout", None)
    if a is not None and b is not None and not out and not same_layout(a, b):
        out["kv_layout"] = (a.order(), b.order())
    return out


def negotiate(local: Any, remote: Any, *, can_relayout: bool) -> tuple[Plan | None, Problems]:
    """``(plan, {})`` or ``(None, problems)``: every field that stands in the way, local vs remote."""
    problems: Problems = {f: (getattr(local, f), getattr(remote, f)) for f in ALWAYS}
    problems = {f: v for f, v in problems.items() if v[0] != v[1]}
    ours, theirs = tuple(getattr(local, "backends", ()) or ()), tuple(getattr(remote, "backends", ()) or ())
    common = tuple(b for b in ours if b in theirs)
    if not common:
        problems["backends"] = (list(ours), list(theirs))
    direct = direct_differences(local, remote)
    if problems:
        return None, {**problems, **direct}
    if not direct:
        return Plan("direct", common, ""), {}
    relayout: Problems = {}
    lay_l, lay_r = getattr(local, "kv_layout", None), getattr(remote, "kv_layout", None)
    if lay_l is None:
        relayout["kv_layout (local)"] = ("a canonical KV layout", "none published")
    if lay_r is None:
        relayout["kv_layout (remote)"] = ("a canonical KV layout", "none published")
    if not can_relayout:
        relayout["relayout_buffer_mb"] = ("> 0 on the decode side", 0)
    groups = (getattr(local, "num_kv_groups", 1), getattr(remote, "num_kv_groups", 1))
    if groups != (1, 1):
        relayout["num_kv_groups"] = groups
    if lay_l is not None and lay_r is not None:
        relayout.update(mapping_problems(lay_l, lay_r))
        spans = [(r.base_addr, r.nbytes) for r in getattr(remote, "regions", ()) or ()]
        bad = outside(lay_r, spans) if not relayout else []
        if bad:  # it could only make us read its own other memory, but it is not a layout we can trust
            relayout["kv_layout.layers (remote)"] = ("inside the registered regions", f"layers {bad[:8]} outside")
    if relayout:
        return None, {**direct, **relayout}
    why = ", ".join(f"{k} {rv}->{lv}" for k, (lv, rv) in sorted(direct.items()))
    return Plan("relayout", common, why), {}


def describe_problems(problems: Problems) -> str:
    return ", ".join(f"{k}: local={a!r} remote={b!r}" for k, (a, b) in sorted(problems.items()))
