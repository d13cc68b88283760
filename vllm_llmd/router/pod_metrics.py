"""The few numbers the scheduler reads from a vLLM pod's Prometheus ``/metrics`` text.

Only lines starting with the wanted names are parsed (the full exposition is ~100 KB and scraped
every 50 ms), so this stays cheap. Values are summed over label sets (e.g. several engines).

A value out of range (negative, not finite, a block count of more than 13 digits) is dropped with a
warning (at most one a minute per metric): a broken or hostile pod must never crash scoring or the
health task (issue 9: a 4,000-digit ``num_gpu_blocks`` failed every request with ``OverflowError``,
a 5,000-digit one killed the health task).
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_USAGE = "vllm:kv_cache_usage_perc"
PREFIX_HITS = "vllm:prefix_cache_hits_total"
PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
CACHE_CONFIG = "vllm:cache_config_info"
#: with ``--enable-lora``: one line per label set ever seen, its value the time it was last set
#: (``vllm/v1/metrics/loggers.py``, ``gauge_lora_info...set_to_current_time()``): the newest counts
LORA_INFO = "vllm:lora_requests_info"

_NAMES = (WAITING, RUNNING, KV_USAGE, PREFIX_HITS, PREFIX_QUERIES, CACHE_CONFIG, LORA_INFO)
_LORA_LABEL = re.compile(r'(running_lora_adapters|waiting_lora_adapters|max_lora)="([^"]*)"')
#: adapters taken from one label (a pod listing more is cut there)
MAX_LORA_NAMES = 1024
_NUM_BLOCKS = re.compile(r'num_gpu_blocks="(\d+)"')
_BLOCK_SIZE = re.compile(r'block_size="(\d+)"')
#: largest block count / block size taken from a pod (2**40 blocks is far beyond any KV cache)
MAX_BLOCKS = 1 << 40
MAX_BLOCK_SIZE = 1 << 20
_last_warned: dict[str, float] = {}


def _reject(name: str, raw: str) -> None:
    now = time.monotonic()
    if now - _last_warned.get(name, -1e9) >= 60.0:
        _last_warned[name] = now
        log.warning("ignoring %s from a pod's /metrics: %s is out of range", name, raw[:40])


def _bounded_int(m: re.Match[str] | None, name: str, limit: int) -> int | None:
    if m is None:
        return None
    digits = m.group(1)
    if len(digits) > 13 or not 0 < int(digits) <= limit:
        _reject(name, digits)
        return None
    return int(digits)


@dataclass(slots=True)
class PodMetrics:
    waiting: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0
    prefix_hits: float = 0.0
    prefix_queries: float = 0.0
    num_gpu_blocks: int | None = None
    block_size: int | None = None
    #: LoRA adapters in running / waiting requests, and the pod's ``--max-loras`` (``None``: no LoRA)
    lora_running: frozenset[str] = frozenset()
    lora_waiting: frozenset[str] = frozenset()
    max_lora: int | None = None
    #: ``time.monotonic()`` of the last successful scrape; 0: never
    updated: float = 0.0

    def is_fresh(self, stale_after_s: float, now: float | None = None) -> bool:
        return self.updated > 0 and ((time.monotonic() if now is None else now) - self.updated) <= stale_after_s


def parse_metrics(text: str, now: float | None = None) -> PodMetrics:
    vals: dict[str, float] = {}
    m = PodMetrics()
    lora_at = -1.0
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
            nb = _bounded_int(_NUM_BLOCKS.search(line), "num_gpu_blocks", MAX_BLOCKS)
            bs = _bounded_int(_BLOCK_SIZE.search(line), "block_size", MAX_BLOCK_SIZE)
            if nb is not None:
                m.num_gpu_blocks = nb
            if bs is not None:
                m.block_size = bs
            continue
        raw = line[sp + 1 :]
        try:
            v = float(raw)
        except ValueError:
            continue
        if not (math.isfinite(v) and v >= 0):
            _reject(name, raw)
            continue
        if name == LORA_INFO:
            if v > lora_at:
                lora_at = v
                _lora(m, line[:sp])
            continue
        vals[name] = vals.get(name, 0.0) + v
    m.waiting = vals.get(WAITING, 0.0)
    m.running = vals.get(RUNNING, 0.0)
    m.kv_usage = vals.get(KV_USAGE, 0.0)
    m.prefix_hits = vals.get(PREFIX_HITS, 0.0)
    m.prefix_queries = vals.get(PREFIX_QUERIES, 0.0)
    m.updated = time.monotonic() if now is None else now
    return m


def _lora(m: PodMetrics, labels: str) -> None:
    for key, value in _LORA_LABEL.findall(labels):
        if key == "max_lora":
            m.max_lora = int(value) if value.isdigit() and len(value) <= 6 else None
            continue
        names = frozenset(n for n in value.split(",")[:MAX_LORA_NAMES] if n)
        if key == "running_lora_adapters":
            m.lora_running = names
        else:
            m.lora_waiting = names
