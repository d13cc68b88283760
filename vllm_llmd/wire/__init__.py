"""Wire types (msgspec): vLLM's KV-cache event stream and LLMDConnector's ``kv_transfer_params``.
Imports nothing of ``vllm_llmd``."""

from vllm_llmd.wire.kv_events import (
    END_OF_REPLAY_SEQ,
    MEDIUM_CPU,
    MEDIUM_GPU,
    MEDIUM_STORAGE,
    POSITIONAL_FIELDS,
    TAG_FIELD,
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
from vllm_llmd.wire.kv_transfer import (
    PRODUCER_TAG,
    REMOTE_DECODE_REQUEST,
    KVParamsError,
    PeerLoad,
    RemoteDecode,
    RemotePrefill,
    parse_kv_transfer_params,
    parse_remote_prefill,
)
from vllm_llmd.wire.topic import make_topic, parse_topic

__all__ = [
    "END_OF_REPLAY_SEQ",
    "MEDIUM_CPU",
    "MEDIUM_GPU",
    "MEDIUM_STORAGE",
    "POSITIONAL_FIELDS",
    "PRODUCER_TAG",
    "REMOTE_DECODE_REQUEST",
    "TAG_FIELD",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "ExternalBlockHash",
    "KVEventBatch",
    "KVParamsError",
    "PeerLoad",
    "RemoteDecode",
    "RemotePrefill",
    "encode_batch",
    "encode_positional_batch",
    "make_topic",
    "parse_kv_transfer_params",
    "parse_remote_prefill",
    "parse_topic",
    "seq_from_bytes",
    "seq_to_bytes",
]
