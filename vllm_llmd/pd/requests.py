"""Build the two legs of a disaggregated request, and decide whether to disaggregate at all.

All functions take and return plain JSON-like dicts and never mutate their arguments.

Security: ``kv_transfer_params`` decide which host an engine pulls KV from. A client must never
set them, so :func:`strip_client_kv_params` removes them from every incoming body, and the decode
leg only ever carries the params returned by the *prefill engine's* response. vLLM 0.32 builds
``Request.kv_transfer_params`` from ``SamplingParams.extra_args["kv_transfer_params"]``
(``vllm/v1/request.py``), and the OpenAI completion and chat requests fill ``extra_args`` from
``vllm_xargs`` and then from the top-level ``kv_transfer_params`` field
(``vllm/entrypoints/openai/{completion,chat_completion}/protocol.py``, ``to_sampling_params``); the
encoder-cache twin ``ec_transfer_params`` travels the same two ways. So all of
:data:`CLIENT_TRANSFER_KEYS` are removed at the top level, in ``vllm_xargs``, and in
``extra_body`` (which the OpenAI SDK merges into the top level).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from vllm_llmd.wire.kv_transfer import (
    REMOTE_DECODE_REQUEST,
    KVParamsError,
    PeerLoad,
    RemotePrefill,
    parse_kv_transfer_params,
)

KV_TRANSFER_PARAMS = "kv_transfer_params"
#: request fields that steer a KV (or encoder-cache) transfer: never taken from a client
CLIENT_TRANSFER_KEYS = (KV_TRANSFER_PARAMS, "ec_transfer_params")
#: objects of a request body whose keys vLLM (``vllm_xargs``) or the OpenAI SDK (``extra_body``) lift
_NESTED = ("vllm_xargs", "extra_body")

#: body keys that only make sense on the decode leg (the prefill leg answers with one token, non-streamed)
_DECODE_ONLY = ("stream", "stream_options", "n", "best_of", "logprobs", "top_logprobs", "echo")


class PDError(ValueError):
    """A prefill response that cannot feed a decode leg."""


def has_client_kv_params(body: Mapping[str, Any]) -> bool:
    """Whether a client body carries any of :data:`CLIENT_TRANSFER_KEYS` (top level, ``vllm_xargs``
    or ``extra_body``)."""
    for where in (body, *(body.get(k) for k in _NESTED)):
        if isinstance(where, Mapping) and any(k in where for k in CLIENT_TRANSFER_KEYS):
            return True
    return False


def strip_client_kv_params(body: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a client body without :data:`CLIENT_TRANSFER_KEYS` (top level, ``vllm_xargs`` or
    ``extra_body``). Only the top level and those two objects are copied, never deeply (a body may
    nest deeply and be large)."""
    out = {k: v for k, v in body.items() if k not in CLIENT_TRANSFER_KEYS}
    for name in _NESTED:
        inner = out.get(name)
        if isinstance(inner, Mapping):
            out[name] = {k: v for k, v in inner.items() if k not in CLIENT_TRANSFER_KEYS}
    return out


def build_prefill_request(body: Mapping[str, Any], chat: bool | None = None) -> dict[str, Any]:
    """The prefill leg: the client's request computing one token, non-streamed, asking the engine
    to hold the KV for a remote decode. ``chat`` defaults to "has ``messages``"."""
    out = strip_client_kv_params(body)
    if chat is None:
        chat = "messages" in out
    for key in _DECODE_ONLY:
        out.pop(key, None)
    out["max_tokens"] = 1
    if chat:
        out["max_completion_tokens"] = 1
    else:
        out.pop("max_completion_tokens", None)
    out["stream"] = False
    out[KV_TRANSFER_PARAMS] = dict(REMOTE_DECODE_REQUEST)
    return out


def prefill_kv_transfer_params(response: Mapping[str, Any]) -> dict[str, Any]:
    """The ``kv_transfer_params`` of a prefill engine's response, checked exactly as the decode
    engine's connector will check them (:func:`vllm_llmd.wire.parse_kv_transfer_params`)."""
    params = response.get(KV_TRANSFER_PARAMS)
    if not isinstance(params, dict):
        raise PDError("the prefill response carries no kv_transfer_params (is the engine's connector a producer?)")
    try:
        remote = parse_kv_transfer_params(params)
    except KVParamsError as exc:
        raise PDError(f"the prefill response's {exc}") from exc
    if not isinstance(remote, RemotePrefill):
        raise PDError("the prefill response's kv_transfer_params do not offer a remote prefill")
    return copy.deepcopy(params)


def build_decode_request(body: Mapping[str, Any], prefill_response: Mapping[str, Any]) -> dict[str, Any]:
    """The decode leg: the client's request (minus any client ``kv_transfer_params``) plus the
    prefill engine's ``kv_transfer_params``."""
    out = strip_client_kv_params(body)
    out[KV_TRANSFER_PARAMS] = prefill_kv_transfer_params(prefill_response)
    return out


def build_peer_load_request(
    body: Mapping[str, Any], holder_engine_id: str, host: str, port: int, block_size: int, held_tokens: int
) -> dict[str, Any]:
    """The request for a pod that loads a prefix from a peer's DRAM tier (docs/peer-loading.md): the
    client's request (minus any client ``kv_transfer_params``) plus router-built
    :class:`~vllm_llmd.wire.PeerLoad` params naming the holder (checked here as the engine will)."""
    out = strip_client_kv_params(body)
    params = PeerLoad(True, holder_engine_id, host, port, held_tokens, block_size).as_params()
    try:
        parse_kv_transfer_params(params)
    except KVParamsError as exc:
        raise PDError(f"peer load params: {exc}") from exc
    out[KV_TRANSFER_PARAMS] = params
    return out


def should_disaggregate(prompt_tokens: int, cached_tokens_on_decode: int, threshold: int) -> bool:
    """Selective P/D: send the prompt to a prefill engine only when the decode engine would have to
    compute more than ``threshold`` tokens itself (its prefix cache covers the rest)."""
    if prompt_tokens < 0 or cached_tokens_on_decode < 0 or threshold < 0:
        raise ValueError("token counts and threshold must be non-negative")
    uncached = prompt_tokens - min(cached_tokens_on_decode, prompt_tokens)
    return uncached > threshold
