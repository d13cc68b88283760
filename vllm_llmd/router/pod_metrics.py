"""The few numbers the scheduler reads from a vLLM pod's Prometheus ``/metrics`` text.

Only lines starting with the wanted names are parsed (the full exposition is ~100 KB and scraped
every 50 ms), so this stays cheap. Values are summed over label sets (e.g. several engines).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_USAGE = "vllm:kv_cache_usage_perc"
PREFIX_HITS = "vllm:prefix_cache_hits_total"
PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
CACHE_CONFIG = "vllm:cache_config_info"

_NAMES = (WAITING, RUNNING, KV_USAGE, PREFIX_HITS, PREFIX_QUERIES, CACHE_CONFIG)
_NUM_BLOCKS = re.compile(r'num_gpu_blocks="(\d+)"')
_BLOCK_SIZE = re.compile(r'block_size="(\d+)"')


@dataclass(slots=True)
class PodMetrics:
    waiting: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0
    prefix_hits: float = 0.0
    prefix_queries: float = 0.0
    num_gpu_blocks: int | None = None
    block_size: int | None = None
    #: ``time.monotonic()`` of the last successful scrape; 0: never
    updated: float = 0.0

    def is_fresh(self, stale_after_s: float, now: float | None = None) -> bool:
        return self.updated > 0 and ((time.monotonic() if now is None else now) - self.updated) <= stale_after_s


def parse_metrics(text: str, now: float | None = None) -> PodMetrics:
    vals: dict[str, float] = {}
    m = PodMetrics()
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name_end = line.find("{")
        sp = line.rfind(" ")
        if sp < 0:
            continue
        name = line[: name_end if 0 < name_end < sp else sp]
        if name not in _NAMES:
            continue
        if name == CACHE_CONFIG:
            nb = _NUM_BLOCKS.search(line)
            bs = _BLOCK_SIZE.search(line)
            if nb:
                m.num_gpu_blocks = int(nb.group(1))
            if bs:
                m.block_size = int(bs.group(1))
            continue
        try:
            v = float(line[sp + 1 :])
        except ValueError:
            continue
        vals[name] = vals.get(name, 0.0) + v
    m.waiting = vals.get(WAITING, 0.0)
    m.running = vals.get(RUNNING, 0.0)
    m.kv_usage = vals.get(KV_USAGE, 0.0)
    m.prefix_hits = vals.get(PREFIX_HITS, 0.0)
    m.prefix_queries = vals.get(PREFIX_QUERIES, 0.0)
    m.updated = time.monotonic() if now is None else now
    return m
