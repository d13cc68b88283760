"""Byte movers behind the connector (see :mod:`.base` for the interface)."""

from __future__ import annotations

from vllm_llmd.connectors.transports.base import (
    KVTransport,
    MemoryKind,
    Peer,
    Region,
    TransportError,
    XferState,
)

__all__ = ["KVTransport", "MemoryKind", "Peer", "Region", "TransportError", "XferState", "make_transport"]


def make_transport(name: str, memory: MemoryKind, **options: object) -> KVTransport:
    """Build the transport named in the connector config ("nixl"; "rbln" comes later)."""
    if name == "nixl":
        from vllm_llmd.connectors.transports.nixl import NixlTransport

        return NixlTransport(memory=memory, **options)  # type: ignore[arg-type]
    raise ValueError(f"unknown KV transport {name!r} (known: 'nixl')")
