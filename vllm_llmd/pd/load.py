"""The work queued on a pod, in prefill-token equivalents: the one load formula of the router.

    queued(p) = queued_prefill(p) + decode_token_weight * queued_decode(p)

``queued_prefill`` is the uncached prompt tokens of requests sent to the pod that have produced no
token yet, ``queued_decode`` their remaining ``max_tokens``. One decode token is counted as
:data:`DECODE_TOKEN_WEIGHT` prefill tokens: a decode step of a batched request costs the engine a
small fraction of what prefilling one token does (the ``estimated-ttft`` scorer's measured default,
docs/plugins/estimated-ttft.md). The scheduling plugins that read the load (``estimated-ttft``,
``inflight-load``, the ``max-score`` picker's tie-break) and the selective P/D decider all use this
function and this default; the decider takes the weight the profile's cost scorer is configured
with.

With per-pod speeds (configured, or learned from the pod's answers: ``vllm_llmd.router.speed``) the
same work takes the pod, in seconds of a speed-1 pod:

    queued_time(p) = queued_prefill(p) / prefill_speed(p)
                     + decode_token_weight * queued_decode(p) / decode_speed(p)
"""

from __future__ import annotations

#: one queued decode token counted as this many prefill tokens
DECODE_TOKEN_WEIGHT = 0.05


def queued_tokens(prefill_tokens: float, decode_tokens: float, decode_token_weight: float) -> float:
    """``prefill_tokens + decode_token_weight * decode_tokens``."""
    return prefill_tokens + decode_token_weight * decode_tokens


def queued_time(
    prefill_tokens: float, decode_tokens: float, decode_token_weight: float, prefill_speed: float, decode_speed: float
) -> float:
    """``prefill_tokens / prefill_speed + decode_token_weight * decode_tokens / decode_speed``."""
    return prefill_tokens / prefill_speed + decode_token_weight * decode_tokens / decode_speed
