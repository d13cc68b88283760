"""Wire types of vLLM's KV-cache event stream (msgspec). Imports nothing of ``vllm_llmd``."""

from vllm_llmd.wire.kv_events import (
    END_OF_REPLAY_SEQ,
    MEDIUM_CPU,
    MEDIUM_GPU,
    MEDIUM_STORAGE,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    ExternalBlockHash,
    KVEventBatch,
    encode_batch,
    encode_positional_batch,
    seq_from_bytes,
    seq_to_bytes,
)

__all__ = [
    "END_OF_REPLAY_SEQ",
    "MEDIUM_CPU",
    "MEDIUM_GPU",
    "MEDIUM_STORAGE",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "ExternalBlockHash",
    "KVEventBatch",
    "encode_batch",
    "encode_positional_batch",
    "seq_from_bytes",
    "seq_to_bytes",
]
