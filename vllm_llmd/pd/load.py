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
"""

from __future__ import annotations

#: one queued decode token counted as this many prefill tokens
DECODE_TOKEN_WEIGHT = 0.05


def queued_tokens(prefill_tokens: float, decode_tokens: float, decode_token_weight: float) -> float:
    """``prefill_tokens + decode_token_weight * decode_tokens``."""
    return prefill_tokens + decode_token_weight * decode_tokens
