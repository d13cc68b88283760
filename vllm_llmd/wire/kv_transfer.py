"""``kv_transfer_params`` of ``LLMDConnector``: the one shape, and the one check of it.

A disaggregated request carries them twice: the router asks the prefill engine for a remote decode
(``{"do_remote_decode": true, ...}``), and the prefill engine's connector answers with a
:class:`RemotePrefill`, which the router hands, unchanged, to the decode engine. The decode
engine's connector (``connectors/scheduler.py``) and the router (``pd/requests.py``) both check
what they receive with :func:`parse_kv_transfer_params`; the prefill side builds its answer from
:class:`RemotePrefill` too.

Hostile input: vLLM copies ``kv_transfer_params`` from the request body **or from
``vllm_xargs``** into ``Request.kv_transfer_params`` without looking at it (vLLM 0.32,
``vllm/v1/request.py``: ``sampling_params.extra_args.get("kv_transfer_params")``), so an engine
reached directly can receive any JSON value there (a string, a list, a dict of anything). This
parser never raises anything but :class:`KVParamsError` on such input, bounds every list and
string, and leaves checks that need the engine's own numbers to :meth:`RemotePrefill.misfit`.

**Peer loads** (docs/peer-loading.md): the router alone may ask an engine to load a prefix's KV
from a *holder* pod's DRAM tier (:class:`PeerLoad`, ``do_peer_load``). The params name the holder
and how many leading prompt tokens it holds; the block hashes are the loading engine's own (computed
from its prompt), so no params can make an engine load KV for other tokens. A client cannot send
these: the router strips client ``kv_transfer_params``, and on an engine reached directly the
holder still pins only blocks whose hashes match the prompt, and answers only over its side channel
(CURVE and ``allowed_peers`` apply).

Imports nothing of ``vllm_llmd``.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import msgspec

#: the value of ``connector`` in the params our connector produces
PRODUCER_TAG = "llmd"
#: generic bounds; the engine's own (block size, KV groups, max model length) come on top
MAX_KV_GROUPS = 16
MAX_BLOCKS_PER_GROUP = 1 << 20
MAX_BLOCK_ID = (1 << 31) - 1
MAX_TOKENS = 1 << 31
MAX_KEYS = 64
#: an IP literal (IPv6 in brackets, as ZMQ endpoints want it) or a DNS name: nothing that could
#: change the meaning of ``tcp://<host>:<port>``
HOST_PATTERN = r"^(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9][A-Za-z0-9._-]{0,252})$"

BlockId = Annotated[int, msgspec.Meta(ge=0, le=MAX_BLOCK_ID)]
BlockIds = Annotated[list[BlockId], msgspec.Meta(max_length=MAX_BLOCKS_PER_GROUP)]


class KVParamsError(ValueError):
    """``kv_transfer_params`` that no engine should act on (the request is served locally)."""


class RemotePrefill(msgspec.Struct, frozen=True):
    """What a prefill engine answers and a decode engine receives: where to pull which blocks."""

    do_remote_prefill: bool
    remote_engine_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    remote_request_id: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
    #: per KV cache group, the prefill engine's block ids holding the prompt
    remote_block_ids: Annotated[list[BlockIds], msgspec.Meta(min_length=1, max_length=MAX_KV_GROUPS)]
    remote_host: Annotated[str, msgspec.Meta(pattern=HOST_PATTERN)]
    remote_port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    remote_num_tokens: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS)]
    remote_block_size: Annotated[int, msgspec.Meta(ge=1, le=1 << 16)]
    do_remote_decode: bool = False
    tp_size: Annotated[int, msgspec.Meta(ge=1, le=1)] = 1
    lease_seconds: Annotated[float, msgspec.Meta(gt=0)] | None = None
    #: wall-clock time (``time.time()``) after which the prefill engine may reuse the blocks;
    #: a consumer must not start (or still be in) a pull by then. ``None``: not advertised.
    lease_expires_at: Annotated[float, msgspec.Meta(ge=0)] | None = None
    connector: Annotated[str, msgspec.Meta(max_length=64)] | None = None

    def misfit(self, *, num_groups: int, max_tokens: int, block_size: int | None = None) -> str | None:
        """Why these params cannot feed an engine with this many KV cache groups and this max model
        length, and, when ``block_size`` is given, this block size (``None``: they can). An engine
        that re-lays out blocks of another size on receive passes no ``block_size``: whether it can
        for this peer is agreed in the connectors' handshake."""
        if block_size is not None and self.remote_block_size != block_size:
            return f"the prefill engine's block size {self.remote_block_size} is not ours ({block_size})"
        if len(self.remote_block_ids) > num_groups:
            return f"{len(self.remote_block_ids)} KV cache groups, this engine has {num_groups}"
        if self.remote_num_tokens > max_tokens:
            return f"remote_num_tokens {self.remote_num_tokens} exceeds the max model length {max_tokens}"
        # blocks of the prompt, plus the one the prefill's sampled token may have opened
        most = -(-self.remote_num_tokens // self.remote_block_size) + 1
        longest = max(len(g) for g in self.remote_block_ids)
        if longest > most:
            return f"{longest} remote blocks for {self.remote_num_tokens} tokens (at most {most})"
        return None

    def as_params(self) -> dict[str, Any]:
        """The JSON object the prefill engine returns."""
        return msgspec.to_builtins(self)


class PeerLoad(msgspec.Struct, frozen=True):
    """What the router sends an engine to load a prefix from a peer pod's DRAM tier (router-built
    only: :func:`vllm_llmd.pd.requests.strip_client_kv_params` drops what clients send)."""

    do_peer_load: bool
    peer_engine_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    peer_host: Annotated[str, msgspec.Meta(pattern=HOST_PATTERN)]
    peer_port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    #: leading prompt tokens the holder holds (whole blocks of ``peer_block_size``)
    peer_num_tokens: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS)]
    peer_block_size: Annotated[int, msgspec.Meta(ge=1, le=1 << 16)]
    connector: Annotated[str, msgspec.Meta(max_length=64)] | None = None

    def misfit(self, *, block_size: int, max_tokens: int) -> str | None:
        """Why this engine cannot load from the holder (``None``: it may try): peer loads copy whole
        blocks as they are, so the block sizes must match."""
        if self.peer_block_size != block_size:
            return f"the holder's block size {self.peer_block_size} is not ours ({block_size})"
        if self.peer_num_tokens > max_tokens:
            return f"peer_num_tokens {self.peer_num_tokens} exceeds the max model length {max_tokens}"
        return None

    def as_params(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)


class RemoteDecode(msgspec.Struct, frozen=True):
    """What the router sends a prefill engine: compute the prompt, hold its KV for a decode engine."""

    do_remote_decode: bool = True
    do_remote_prefill: bool = False


#: the params of the router's prefill leg (every other key ``None``, as vLLM's NIXL proxy sends them)
REMOTE_DECODE_REQUEST: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def _flag(params: dict[Any, Any], key: str) -> bool:
    value = params.get(key)
    if value is None:
        return False
    if type(value) is not bool:
        raise KVParamsError(f"kv_transfer_params.{key} is {type(value).__name__}, not a boolean")
    return value


def parse_kv_transfer_params(params: object) -> RemotePrefill | RemoteDecode | PeerLoad | None:
    """Classify a request's ``kv_transfer_params``: ``None`` (nothing to do: absent, empty, or every
    flag off), :class:`RemoteDecode` (hold the KV for a decode engine), :class:`RemotePrefill` (pull
    the prompt's KV), :class:`PeerLoad` (load a prefix from a peer's DRAM tier). Anything else raises
    :class:`KVParamsError` naming what is wrong."""
    if params is None:
        return None
    if not isinstance(params, dict):
        raise KVParamsError(f"kv_transfer_params is {type(params).__name__}, not an object")
    if not params:
        return None
    if len(params) > MAX_KEYS:
        raise KVParamsError(f"kv_transfer_params has {len(params)} keys (at most {MAX_KEYS})")
    prefill, decode = _flag(params, "do_remote_prefill"), _flag(params, "do_remote_decode")
    if prefill and decode:
        raise KVParamsError("kv_transfer_params ask for a remote prefill and a remote decode at once")
    peer = _flag(params, "do_peer_load")
    if peer and (prefill or decode):
        raise KVParamsError("kv_transfer_params ask for a peer load together with a P/D transfer")
    if decode:
        return RemoteDecode()
    if peer:
        try:
            return msgspec.convert(params, PeerLoad)
        except (msgspec.ValidationError, TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise KVParamsError(f"malformed kv_transfer_params for a peer load: {exc}") from exc
    if not prefill:
        return None
    try:
        out = msgspec.convert(params, RemotePrefill)
    except (msgspec.ValidationError, TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise KVParamsError(f"malformed kv_transfer_params for a remote prefill: {exc}") from exc
    if out.lease_expires_at is not None and not math.isfinite(out.lease_expires_at):
        raise KVParamsError("malformed kv_transfer_params for a remote prefill: lease_expires_at is not finite")
    return out


def parse_remote_prefill(params: object) -> RemotePrefill | None:
    """The remote-prefill part of ``params`` (``None`` when they ask for none); :class:`KVParamsError`
    when malformed."""
    parsed = parse_kv_transfer_params(params)
    return parsed if isinstance(parsed, RemotePrefill) else None
