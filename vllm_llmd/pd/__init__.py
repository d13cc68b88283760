"""Prefill/decode request logic as pure functions (no HTTP, no router state).

The router (or a test, or any proxy) calls these to turn one client request into the two legs of
a disaggregated request (:mod:`vllm_llmd.pd.requests`), and to decide whether a colocated peer
should produce a prompt's KV instead of the decode pod computing it (:mod:`vllm_llmd.pd.selective`);
:mod:`vllm_llmd.pd.load` is the load formula that decision and the router's scheduler share.
"""

from __future__ import annotations

from vllm_llmd.pd.load import DECODE_TOKEN_WEIGHT, queued_tokens
from vllm_llmd.pd.requests import (
    CLIENT_TRANSFER_KEYS,
    KV_TRANSFER_PARAMS,
    PDError,
    build_decode_request,
    build_prefill_request,
    has_client_kv_params,
    prefill_kv_transfer_params,
    should_disaggregate,
    strip_client_kv_params,
)
from vllm_llmd.pd.selective import KVSource, PodCost, SelectiveParams, choose_kv_source

__all__ = [
    "CLIENT_TRANSFER_KEYS",
    "DECODE_TOKEN_WEIGHT",
    "KV_TRANSFER_PARAMS",
    "KVSource",
    "PDError",
    "PodCost",
    "SelectiveParams",
    "build_decode_request",
    "build_prefill_request",
    "choose_kv_source",
    "has_client_kv_params",
    "prefill_kv_transfer_params",
    "queued_tokens",
    "should_disaggregate",
    "strip_client_kv_params",
]
