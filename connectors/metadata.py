"""What the scheduler half tells the worker half each step.

The ``kv_transfer_params`` shapes themselves live in :mod:`vllm_llmd.wire.kv_transfer` (shared with
the router).
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from vllm_llmd.wire.kv_transfer import PRODUCER_TAG, PeerLoad, RemotePrefill, parse_remote_prefill

__all__ = ["PRODUCER_TAG", "LLMDConnectorMetadata", "PeerJob", "RecvJob", "RemotePrefill", "parse_remote_prefill"]


@dataclass
class PeerJob:
    """A peer load (connectors/peer_load.py): the holder, and this request's own block hashes for
    the blocks to load (``hashes[i]`` into ``RecvJob.local_block_ids[0][i]``)."""

    load: PeerLoad
    hashes: list[bytes]


@dataclass
class RecvJob:
    """Pull ``remote_block_ids[g][i]`` into ``local_block_ids[g][i]`` for each KV cache group."""

    request_id: str
    remote: RemotePrefill | None
    local_block_ids: list[list[int]]
    remote_block_ids: list[list[int]]
    _: KW_ONLY
    #: the scheduler promised vLLM a load it cannot start (why): the worker reports it failed, so
    #: vLLM prefills locally instead of waiting for blocks that never come
    refused: str | None = None
    #: the request's tokens ``[first_token, end_token)`` to load (``first_token``: this engine's own
    #: prefix hit); a cross-layout pull maps them onto the prefill engine's whole block list
    first_token: int = 0
    end_token: int = 0
    #: a peer load instead of a P/D pull (``remote`` is then ``None``)
    peer: PeerJob | None = None


@dataclass
class LLMDConnectorMetadata(KVConnectorMetadata):
    #: decode side: pulls to start this step (an empty job only tells the prefill side to release)
    recv: list[RecvJob] = field(default_factory=list)
    #: prefill side: request id → lease seconds, for blocks now held for a consumer
    send: dict[str, float] = field(default_factory=dict)
    #: prefill side, host-staging transports (RBLN): request id → blocks whose prompt KV this step
    #: completes; copied to host memory in ``wait_for_save``, before the request's params go out
    stage: dict[str, list[int]] = field(default_factory=dict)
    #: prefill side: a request for a remote decode is being computed; a decode engine may read its
    #: blocks as soon as its params leave, before the lease in ``send`` reaches the worker (the
    #: transport's progress stays awake: connectors/transports/progress.py)
    producing: bool = False
