"""Prefill/decode request logic as pure functions (no HTTP, no router state).

The router (or a test, or any proxy) calls these to turn one client request into the two legs of
a disaggregated request; see :mod:`vllm_llmd.pd.requests`.
"""

from __future__ import annotations

from vllm_llmd.pd.requests import (
    KV_TRANSFER_PARAMS,
    PDError,
    build_decode_request,
    build_prefill_request,
    prefill_kv_transfer_params,
    should_disaggregate,
    strip_client_kv_params,
)

__all__ = [
    "KV_TRANSFER_PARAMS",
    "PDError",
    "build_decode_request",
    "build_prefill_request",
    "prefill_kv_transfer_params",
    "should_disaggregate",
    "strip_client_kv_params",
]
