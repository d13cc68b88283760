"""What a peer load's copy pushes out of the reader: the price of evicting the fleet's last copy.

A peer load (:mod:`vllm_llmd.pd.peer`) writes the blocks it reads, and the ones the reader then
computes, into the reader's engine cache and DRAM tier (every block computed or loaded with tiers
on is stored in the tier, docs/tiers.md). When the reader has no room for them its LRU drops its
least recently used blocks: vLLM's prefix cache evicts from the head of its free-block queue, and
the DRAM tier's LRU policy from the head of its order, which vLLM 0.32 touches with every key a
request used when the request finishes (``vllm/v1/kv_offload/cpu/policies/base.py``,
``on_request_finished``). A dropped block another pod still holds can be loaded back (a
peer load at the pair's price, 0.001-0.002 of a prefill token as learned on ``longrag``,
bench/RESULTS.md); a dropped block no other pod holds was the fleet's **last copy** and is
prefilled again the next time it is asked for. On ``longrag`` (two pods whose tiers hold 16 of 24
documents each) that is what made loads lose: 10-16 documents a run prefilled again, +55% prefill
tokens, 0.88x the throughput without loads (bench/RESULTS.md "Issue 12 peer loads on long-context
RAG"). The price of a plan that loads onto pod ``p``::

    new(p)   = the prompt's whole blocks p does not hold (loaded or computed: all are stored on p)
    free(p)  = max(0, capacity(p) - held(p))                  # blocks; capacity as estimated-ttft's
    k(p)     = max(0, new(p) - free(p))                       # blocks p's LRU drops for them
    evict(p) = weight * block_size * #{ b in the k(p) least recently used blocks of p : no other pod holds b }

A victim held elsewhere costs nothing here (its reload is priced when a request asks for it).

That price is myopic: it sees only the reader's room *now*. Measured on ``longrag`` (bench/RESULTS.md
"Issue 12 last copies, measured"), loads landed while readers still had room, every document ended
up on both pods, and the fleet's last copies were then pushed out by later *prefills* (a cold
document placed on a pod full of duplicates), which no load price sees: 15-21 documents prefilled
again a run with loads and this price alone. So a load also pays for the duplicate it makes, once
the fleet's duplicates outgrow the room its hot set leaves::

    dup      = sum_q held(q) - distinct                       # blocks held on more than one pod
    budget   = sum_q capacity(q) - hot                        # hot: the fleet's hot set (blocks)
    over     = max(0, dup + loaded - budget)                  # loaded: the blocks the load copies
    dupe(p)  = weight * block_size * min(loaded, over)

``distinct`` from the KV-event index (each block once, whichever pods hold it), ``hot`` the distinct
blocks the router sent anywhere at least twice among the fleet's ``sum_q capacity(q)`` most recently
routed (:meth:`vllm_llmd.router.scheduling.footprint.LastUse.fleet_hot`): a duplicate inside the
budget takes room the hot set does not need, one beyond it will push some hot block's last copy out
somewhere. A load pays ``max(evict(p), dupe(p))`` (both estimate the same loss). The
``estimated-ttft`` scorer (``peer_loads: true``) supplies the inputs: ``held(p)`` from the KV-event
index (the blocks it records on ``p`` in any tier), ``p``'s blocks in least-recently-routed order
(:class:`vllm_llmd.router.scheduling.footprint.LastUse`) and, per block, whether the index shows it
on another pod; ``weight`` is its ``evict_weight`` (1.0: a last copy evicted is prefilled once more).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Eviction", "duplicate_price", "eviction_price"]


@dataclass(frozen=True, slots=True)
class Eviction:
    """What a plan's new blocks push out of the reader: ``tokens`` the price (prefill tokens),
    ``evicted`` the blocks its LRU drops (``k``), ``last_copies`` those no other pod holds,
    ``unseen`` those the order did not name (blocks the router never routed there: priced 0)."""

    tokens: float = 0.0
    evicted: int = 0
    last_copies: int = 0
    unseen: int = 0


NOTHING = Eviction()


def eviction_price(
    new_blocks: int, free_blocks: int, lru_shared: Iterable[bool], block_size: int, weight: float = 1.0
) -> Eviction:
    """``evict(p)`` of the module docstring. ``lru_shared``: the reader's blocks, least recently
    used first, each ``True`` when another pod holds it too; only the first ``k`` are read (a lazy
    iterable costs nothing when the reader has room)."""
    k = new_blocks - max(0, free_blocks)
    if k <= 0 or weight <= 0:
        return NOTHING if k <= 0 else Eviction(0.0, k)
    last = seen = 0
    for shared in lru_shared:
        seen += 1
        if not shared:
            last += 1
        if seen >= k:
            break
    return Eviction(weight * block_size * last, k, last, k - seen)


def duplicate_price(
    loaded_blocks: int, duplicates: int, capacity: int, hot: int, block_size: int, weight: float = 1.0
) -> float:
    """``dupe(p)`` of the module docstring, in prefill tokens: ``loaded_blocks`` the blocks the load
    copies, ``duplicates`` the fleet's blocks held beyond one copy, ``capacity`` the fleet's summed
    capacity and ``hot`` its hot set, all in blocks of ``block_size`` tokens."""
    over = duplicates + loaded_blocks - (capacity - hot)
    if over <= 0 or loaded_blocks <= 0 or weight <= 0:
        return 0.0
    return weight * block_size * min(loaded_blocks, over)
