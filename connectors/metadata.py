"""What the scheduler half tells the worker half each step, and the ``kv_transfer_params`` shapes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

#: the key in kv_transfer_params telling which connector produced them
PRODUCER_TAG = "llmd"


class RemotePrefill(msgspec.Struct, frozen=True):
    """``kv_transfer_params`` a decode request carries (as the prefill engine returned them)."""

    do_remote_prefill: bool
    remote_engine_id: str
    remote_request_id: str
    remote_block_ids: list[list[int]]
    remote_host: str
    remote_port: int
    remote_num_tokens: int
    remote_block_size: int
    tp_size: int = 1
    #: wall-clock time (``time.time()``) after which the prefill engine may reuse the blocks;
    #: a consumer must not start (or still be in) a pull by then. ``None``: not advertised.
    lease_expires_at: float | None = None


def parse_remote_prefill(params: dict[str, Any] | None) -> RemotePrefill | None:
    """The remote-prefill part of ``params``; ``None`` when absent; ``ValueError`` when malformed."""
    if not params or not params.get("do_remote_prefill"):
        return None
    fields = {k: params[k] for k in RemotePrefill.__struct_fields__ if k in params}
    try:
        out = msgspec.convert(fields, RemotePrefill)
    except msgspec.ValidationError as exc:
        raise ValueError(f"malformed kv_transfer_params for a remote prefill: {exc}") from exc
    if not 0 < out.remote_port < 65536 or out.remote_block_size <= 0 or out.tp_size != 1:
        raise ValueError("malformed kv_transfer_params for a remote prefill (port, block size or tp_size)")
    return out


@dataclass
class RecvJob:
    """Pull ``remote_block_ids[g][i]`` into ``local_block_ids[g][i]`` for each KV cache group."""

    request_id: str
    remote: RemotePrefill
    local_block_ids: list[list[int]]
    remote_block_ids: list[list[int]]


@dataclass
class LLMDConnectorMetadata(KVConnectorMetadata):
    #: decode side: pulls to start this step (an empty job only tells the prefill side to release)
    recv: list[RecvJob] = field(default_factory=list)
    #: prefill side: request id → lease seconds, for blocks now held for a consumer
    send: dict[str, float] = field(default_factory=dict)
