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

The same module prices the prompt itself (:func:`prefill_equivalent`): a token the pod holds in its
engine cache is free, one it must compute costs one prefill token, and one in a lower KV tier (DRAM,
disk: docs/tiers.md) costs what loading it back costs on that pod, relative to prefilling it
(:class:`TokenPrices`, learned per pod and per tier by the router from the engines' metrics:
``vllm_llmd.router.tier_prices``). The ``estimated-ttft`` scorer, the ``precise-prefix-cache``
scorer and the P/D deciders price prompts with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from vllm_llmd.wire.kv_events import MEDIUM_CPU, MEDIUM_GPU, MEDIUM_STORAGE

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


# ---- what a prompt token costs where the pod finds it ----------------------------------------------
#: the engine's own KV cache (HBM on a GPU; vLLM's KV events name it ``GPU`` on every platform)
HBM = MEDIUM_GPU

#: price of one prompt token found in a lower tier, as a fraction of prefilling it, until the pod's
#: own metrics say otherwise (:class:`TokenPrices`, learned by ``vllm_llmd.router.tier_prices``).
#: DRAM (``CPU``): a load-back is a memory copy, far cheaper than the prefill it saves (the copy
#: worker moves a 2048-token prefix of the small test model in a few ms, bench/RESULTS.md "KV
#: tiers"); 0.1 leaves room for a GPU's PCIe copy, dearer relative to its prefill. Disk
#: (``STORAGE``): a file read, a checksum and the DRAM copy. A medium not listed here (another
#: connector's) is priced as :data:`DEFAULT_OTHER_TIER_PRICE`.
DEFAULT_TIER_PRICES: dict[str, float] = {MEDIUM_CPU: 0.1, MEDIUM_STORAGE: 0.4}
DEFAULT_OTHER_TIER_PRICE = 0.5
#: key prefix of a peer pod's price (``"peer:<pod>"``: loading from that pod's DRAM tier,
#: :mod:`vllm_llmd.pd.peer`) and its price until the pair has been measured: above the DRAM tier's
#: own 0.1 (a NIXL read over the network plus a pin round trip), far below a prefill (a 2,048-token
#: prefix of the small test model is ~20 MB: a few ms at the 1-8 GB/s NIXL measured here, against
#: tens to hundreds of ms of prefill; /work/shared/README.md "NIXL on the CPU")
PEER_PREFIX = "peer:"
DEFAULT_PEER_PRICE = 0.15


@dataclass(frozen=True, slots=True)
class TokenPrices:
    """What one prompt token costs a pod, in prefill tokens, by where the pod finds it: its engine
    cache (``hit``, 0), a lower tier (``tiers[medium]``, a load-back), nowhere (``miss``, 1: it is
    prefilled). A new kind of source (say, a peer pod's cache) is one more key of ``tiers``."""

    tiers: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_TIER_PRICES))
    hit: float = 0.0
    miss: float = 1.0

    def of(self, where: str) -> float:
        if where == HBM:
            return self.hit
        p = self.tiers.get(where)
        if p is None:
            if where.startswith(PEER_PREFIX):
                return DEFAULT_PEER_PRICE
            p = DEFAULT_TIER_PRICES.get(where, DEFAULT_OTHER_TIER_PRICE)
        return p


#: the prices of a pod nothing has been learned about
DEFAULT_PRICES = TokenPrices()


def prefill_equivalent(prompt_tokens: int, held: Mapping[str, int], prices: TokenPrices = DEFAULT_PRICES) -> float:
    """The prefill work a prompt costs a pod, in prefill tokens:

    ``miss * (prompt_tokens - sum_w held[w]) + sum_w prices.of(w) * held[w]``

    ``held[w]``: leading prompt tokens the pod holds in ``w`` (``GPU``: its engine cache; ``CPU``,
    ``STORAGE``: its DRAM and disk tiers), each token counted once, in its best tier."""
    total = 0.0
    cached = 0
    for where, n in held.items():
        if n > 0:
            cached += n
            total += prices.of(where) * n
    return total + prices.miss * max(0, prompt_tokens - cached)


def tier_price(load_seconds_per_token: float | None, prefill_seconds_per_token: float | None, default: float) -> float:
    """A lower tier's price on a pod: ``load_seconds_per_token / prefill_seconds_per_token``,
    clamped to [0, 1] (a load-back slower than prefilling is never chosen over it by the engine
    anyway); ``default`` while either speed is unknown."""
    if not load_seconds_per_token or not prefill_seconds_per_token:
        return default
    return min(1.0, max(0.0, load_seconds_per_token / prefill_seconds_per_token))
