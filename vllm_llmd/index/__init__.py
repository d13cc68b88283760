"""The global KV block index (router side) and the subscriber that feeds it from every pod.

>>> from vllm_llmd.index import KVBlockIndex, PrefixMatch, KVEventSubscriber
"""

from vllm_llmd.index.block_index import DEFAULT_TIERS, IndexStats, KVBlockIndex, PrefixMatch, parse_topic
from vllm_llmd.index.subscriber import KVEventSubscriber, PodStats

__all__ = ["DEFAULT_TIERS", "IndexStats", "KVBlockIndex", "KVEventSubscriber", "PodStats", "PrefixMatch", "parse_topic"]
