"""The disk tier's store threshold: vLLM's ``store_threshold`` rule, in front of the disk.

vLLM 0.32 admits a block into its CPU tier only once the block has been offered for storing
``store_threshold`` times (vllm/v1/kv_offload/cpu/spec.py ``CPUOffloadingSpec.get_manager``: the
``store_threshold`` and ``max_tracker_size`` keys of ``kv_connector_extra_config``;
vllm/v1/kv_offload/cpu/manager.py ``CPUOffloadingManager``: ``counts``, ``_record_accesses``, the
filter in ``prepare_store`` and the ``STORES_SKIPPED`` counter of ``get_stats``). The rule, as
there:

- every offer of a block counts once, whether or not the block is written (a block already held
  is counted too, so one dropped from the tier later is written again on its next offer);
- a threshold below 2 counts nothing and admits every block (vLLM: "a threshold of 1 equals no
  filter");
- the counts live in an ``OrderedDict`` of at most ``max_tracker_size`` blocks (vLLM's default
  64,000), the least recently offered forgotten first, but never a block of the offer being counted
  (an offer larger than the whole table leaves its extra new blocks uncounted);
- what the threshold turned away is counted (here ``llmd:kv_tier_skipped_blocks_total``).

Here it guards the disk tier, not the DRAM tier: on a workload with no reuse the DRAM tier costs
nothing measurable and the disk tier ~12% throughput on this project's VM, all of it the virtual
disk's writes (bench/RESULTS.md "KV tiers: issue 11's two open items"). A block offered once and
never again is pure I/O cost on the slow tier; the threshold writes only blocks that came back.

What an "offer" is for the disk: vLLM cascades a block to its secondary tiers only when the block is
newly stored in DRAM. A block reused while still in the engine or in DRAM would never be offered
again, so with a threshold of 2 or more the disk tier asks for vLLM's request-level policy
(``OffloadPolicy.REQUEST_LEVEL``, vllm/v1/kv_offload/base.py): ``TieringOffloadingManager``
(vllm/v1/kv_offload/tiering/manager.py ``prepare_store``) then also hands the disk tier every block
of a request that DRAM already holds. So each request that computes, hits or loads a block offers
it to the disk once, as each request offers it to vLLM's CPU tier.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Hashable


class StoreThreshold:
    """Offer counts and the admission rule (see the module docstring)."""

    def __init__(self, store_threshold: int, max_tracker_size: int) -> None:
        if store_threshold < 1:
            raise ValueError(f"store_threshold must be at least 1, got {store_threshold}")
        if max_tracker_size < 1:
            raise ValueError(f"max_tracker_size must be at least 1, got {max_tracker_size}")
        self.store_threshold = store_threshold
        self.max_tracker_size = max_tracker_size
        #: block -> offers seen, least recently offered first; ``None``: no filter (threshold 1)
        self.counts: OrderedDict[Hashable, int] | None = OrderedDict() if store_threshold >= 2 else None

    @property
    def active(self) -> bool:
        return self.counts is not None

    def offer(self, keys: Collection[Hashable]) -> None:
        """Count one offer of each of ``keys`` (call once per offer, before :meth:`admits`)."""
        counts = self.counts
        if counts is None:
            return
        seen: set[Hashable] = set()
        for key in keys:
            if key in counts and key not in seen:
                counts[key] += 1
                counts.move_to_end(key)
                seen.add(key)
        evictable = len(counts) - len(seen)  # entries that are not part of this offer
        for key in keys:
            if key in counts:
                continue
            if len(counts) >= self.max_tracker_size:
                if evictable <= 0:
                    continue  # the table holds only this offer's blocks: leave this one uncounted
                counts.popitem(last=False)
                evictable -= 1
            counts[key] = 1

    def admits(self, key: Hashable) -> bool:
        """Whether ``key`` has been offered often enough to be written."""
        return self.counts is None or self.counts.get(key, 0) >= self.store_threshold
