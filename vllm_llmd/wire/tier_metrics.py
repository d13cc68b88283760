"""The tier series an engine with ``LLMDConnector`` tiers exports and the router reads (docs/tiers.md).

The engine side (``connectors/tiers/stats.py``) registers them; the router
(``vllm_llmd.router.pod_metrics``, ``vllm_llmd.router.tier_prices``) learns each pod's load-back speed
from them. Imports nothing of ``vllm_llmd``.
"""

from __future__ import annotations

from vllm_llmd.wire.kv_events import MEDIUM_CPU, MEDIUM_STORAGE

#: counter: prompt tokens loaded into the engine's KV cache, label ``tier`` = where they were found
TIER_LOADED_TOKENS = "llmd:kv_tier_loaded_tokens"
#: histogram: one load-back job, label ``tier``: ``dram`` = DRAM -> engine copy (every load, a disk
#: hit's too, after its promotion); ``disk`` = disk -> DRAM read and check
TIER_LOAD_SECONDS = "llmd:kv_tier_load_seconds"
#: the ``tier`` label values of the tier series, and the KV-event medium each tier's blocks carry
TIER_DRAM, TIER_DISK = "dram", "disk"
TIER_MEDIUM = {TIER_DRAM: MEDIUM_CPU, TIER_DISK: MEDIUM_STORAGE}

#: peer loads (docs/peer-loading.md), on the reader, label ``peer`` = the holder's engine id:
#: counters of completed loads' seconds and blocks (the router learns each pair's speed from them)
PEER_LOAD_SECONDS = "llmd:kv_peer_load_seconds"
PEER_LOAD_BLOCKS = "llmd:kv_peer_load_blocks"
#: gauge (1) with labels ``engine_id`` and ``side_channel`` (``host:port``): how to name a holder
ENDPOINT_INFO = "llmd:kv_endpoint_info"
