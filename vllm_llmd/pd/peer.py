"""The third price per candidate pod: load the rest of a prefix from a peer pod's DRAM tier.

For a prompt of ``n`` tokens and a candidate pod ``p`` holding ``held_p`` (leading tokens by tier,
:func:`~vllm_llmd.pd.load.prefill_equivalent`'s input, ``c_p = sum(held_p)``), and peers ``X`` that
serve peer loads and hold ``t_X`` leading tokens of the prompt (docs/peer-loading.md), ``p`` can
serve the request

* with what it holds (misses prefilled):  ``here(p) = prefill_equivalent(n, held_p, prices_p)``
* after loading tokens ``[c_p, t_X)`` from ``X``:
  ``via(p, X) = here(p) - (miss - price_p(peer:X)) * max(0, min(t_X, n - 1) - c_p) + overhead_tokens``

and the cost of ``p`` is the lower of ``here(p)`` and the best ``via(p, X)`` (:func:`peer_plan`).
``price_p(peer:X)`` is :meth:`TokenPrices.of` of the key ``"peer:<X>"``: the time ``p`` takes to read
one token's KV from ``X`` over the time it takes to prefill one, learned per pair by the router from
``p``'s ``llmd:kv_peer_load_seconds`` / ``llmd:kv_peer_load_blocks`` (``vllm_llmd.router.tier_prices``),
:data:`~vllm_llmd.pd.load.DEFAULT_PEER_PRICE` (0.15) until it has loaded from ``X``. A peer load
never covers the prompt's last token (the engine computes at least one), and costs
``overhead_tokens`` more (the pin round trip and the lease: :data:`PEER_OVERHEAD_TOKENS`), so a peer
holding only a little more than ``p`` is not used.
The ``estimated-ttft`` scorer and the P/D deciders price candidates with this one function.

A request sent with a load is queued on ``p`` (the router's in-flight count, until its first token)
as what ``p`` will compute plus the load at its price, not as its whole uncached prompt:
``queued = max(0, uncached - saved)`` with ``saved = here(p) - via(p, X)``, the prefill tokens the
load saves (:func:`peer_queued_tokens`). Counting the whole prompt made the reader look busy
for the ~2,600 tokens it did not compute (bench/RESULTS.md "Issue 12 peer loads on long-context RAG").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from vllm_llmd.pd.load import DEFAULT_PEER_PRICE, DEFAULT_PRICES, PEER_PREFIX, TokenPrices, prefill_equivalent

__all__ = [
    "DEFAULT_PEER_PRICE",
    "PEER_OVERHEAD_TOKENS",
    "PEER_PREFIX",
    "PeerPlan",
    "peer_key",
    "peer_plan",
    "peer_price",
    "peer_queued_tokens",
]
#: fixed cost of one peer load, in prefill tokens (pin round trip on the side channel, lease, release)
PEER_OVERHEAD_TOKENS = 32.0


def peer_key(pod: str) -> str:
    return PEER_PREFIX + pod


@dataclass(frozen=True, slots=True)
class PeerPlan:
    """The cheapest way to serve on a pod: ``peer`` ``None`` (what it holds, misses prefilled) or
    the peer to load ``tokens`` more leading tokens from; ``cost`` in prefill tokens, ``saved`` the
    prefill tokens the load saves against serving with what the pod holds (``here - cost``)."""

    cost: float
    peer: str | None = None
    tokens: int = 0
    saved: float = 0.0


def peer_plan(
    prompt_tokens: int,
    held: Mapping[str, int],
    offers: Mapping[str, int],
    prices: TokenPrices = DEFAULT_PRICES,
    overhead_tokens: float = PEER_OVERHEAD_TOKENS,
    block_size: int = 1,
) -> PeerPlan:
    """``min(here, min_X via(X))`` (module docstring); ``offers[X]`` = ``t_X``, the leading prompt
    tokens peer ``X`` holds and would serve (never the pod itself). Loads are whole blocks of
    ``block_size``, so ``min(t_X, n - 1)`` is rounded down to one."""
    here = prefill_equivalent(prompt_tokens, held, prices)
    best = PeerPlan(here)
    have = sum(n for n in held.values() if n > 0)
    bs = max(1, block_size)
    limit = max(0, prompt_tokens - 1)
    for pod, tokens in offers.items():
        gain = min(tokens, limit) // bs * bs - have
        if gain <= 0:
            continue
        cost = here - (prices.miss - prices.of(peer_key(pod))) * gain + overhead_tokens
        if cost < best.cost:
            best = PeerPlan(cost, pod, gain, here - cost)
    return best


def peer_queued_tokens(uncached: int, plan: PeerPlan | None) -> int:
    """The prefill tokens a request served by ``plan`` queues on its pod until its first token:
    ``max(0, uncached - plan.saved)`` rounded up (``uncached`` without a load)."""
    if plan is None or plan.peer is None:
        return uncached
    return max(0, math.ceil(uncached - plan.saved))


def peer_price(
    load_seconds_per_token: float | None, prefill_seconds_per_token: float | None, default: float = DEFAULT_PEER_PRICE
) -> float:
    """A pair's price: ``load_seconds_per_token / prefill_seconds_per_token``, clamped to [0, 1];
    ``default`` while either is unknown."""
    if not load_seconds_per_token or not prefill_seconds_per_token:
        return default
    return min(1.0, max(0.0, load_seconds_per_token / prefill_seconds_per_token))
