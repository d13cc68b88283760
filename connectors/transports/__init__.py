"""Byte movers behind the connector (see :mod:`.base` for the interface)."""

from __future__ import annotations

from vllm_llmd.connectors.transports.base import KVTransport, MemoryKind, Peer, Region, TransportError, XferState

__all__ = ["KVTransport", "MemoryKind", "Peer", "Region", "TransportError", "XferState", "make_transport"]


def make_transport(name: str, memory: MemoryKind, **options: object) -> KVTransport:
    """Build a transport: ``nixl`` (memory registered as it is) or ``rbln`` (``kv_caches`` on an RBLN
    device, staged through host memory or registered by ``nixl_rbln``; see transports/rbln.py).
    ``connectors/platform.py`` decides which one ``transport: auto`` means."""
    if name == "nixl":
        from vllm_llmd.connectors.transports.nixl import NixlTransport

        return NixlTransport(memory=memory, **options)  # type: ignore[arg-type]
    if name == "rbln":
        from vllm_llmd.connectors.transports.rbln import RblnTransport

        return RblnTransport(**options)  # type: ignore[arg-type]
    raise ValueError(f"unknown KV transport {name!r} (known: 'nixl', 'rbln')")
