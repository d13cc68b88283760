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
from dataclasses import dataclass, field

from vllm_llmd.wire.kv_transfer import HOST_PATTERN
from vllm_llmd.wire.tier_metrics import (
    ENDPOINT_INFO,
    PEER_LOAD_BLOCKS,
    PEER_LOAD_SECONDS,
    TIER_LOAD_SECONDS,
    TIER_LOADED_TOKENS,
)

log = logging.getLogger(__name__)

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_USAGE = "vllm:kv_cache_usage_perc"
PREFIX_HITS = "vllm:prefix_cache_hits_total"
PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
CACHE_CONFIG = "vllm:cache_config_info"
#: prefill speed: new KV tokens computed in requests' prefill phases, and those phases' seconds
PREFILL_TOKENS = "vllm:request_prefill_kv_computed_tokens_sum"
PREFILL_SECONDS = "vllm:request_prefill_time_seconds_sum"
#: load-back speed per tier (``LLMDConnector`` tiers, ``vllm_llmd.wire.tier_metrics``), by ``tier`` label
TIER_TOKENS = TIER_LOADED_TOKENS + "_total"
TIER_SECONDS = TIER_LOAD_SECONDS + "_sum"
#: with ``--enable-lora``: one line per label set ever seen, its value the time it was last set
#: (``vllm/v1/metrics/loggers.py``, ``gauge_lora_info...set_to_current_time()``): the newest counts
LORA_INFO = "vllm:lora_requests_info"

_NAMES = (
    WAITING,
    RUNNING,
    KV_USAGE,
    PREFIX_HITS,
    PREFIX_QUERIES,
    CACHE_CONFIG,
    PREFILL_TOKENS,
    PREFILL_SECONDS,
    LORA_INFO,
)
_TIER_NAMES = (TIER_TOKENS, TIER_SECONDS)
#: the DRAM tier's capacity (``LLMDConnector`` tiers, ``connectors/tiers/stats.py``), in the engine's blocks
TIER_CAPACITY = "llmd:kv_tier_capacity_blocks"
PEER_SECONDS = PEER_LOAD_SECONDS + "_total"
PEER_BLOCKS = PEER_LOAD_BLOCKS + "_total"
_PEER_LABEL = re.compile(r'[{,]peer="([A-Za-z0-9._:-]{1,256})"')
_ENDPOINT = re.compile(r'engine_id="([A-Za-z0-9._:-]{1,256})".*side_channel="([^"]{1,300}):(\d{1,5})"')
_HOST = re.compile(HOST_PATTERN)
#: holders a pod's peer-load series are kept for
MAX_PEERS = 64
_TIER_LABEL = re.compile(r'[{,]tier="([a-z]{1,16})"')
_TIER_DRAM = re.compile(r'[{,]tier="dram"')
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
    #: cumulative counters the router learns speeds from (``vllm_llmd.router.tier_prices``)
    prefill_tokens: float = 0.0
    prefill_seconds: float = 0.0
    #: per ``tier`` label: tokens loaded back, and the load jobs' seconds
    tier_tokens: dict[str, float] = field(default_factory=dict)
    tier_seconds: dict[str, float] = field(default_factory=dict)
    #: blocks the pod's DRAM tier holds at most (``None``: no tier reported); every block the engine
    #: computes is stored there, so it keeps this many blocks without recomputing them
    dram_capacity_blocks: int | None = None
    #: peer loads this pod made, per holder engine id: seconds and blocks (``vllm_llmd.router.tier_prices``)
    peer_seconds: dict[str, float] = field(default_factory=dict)
    peer_blocks: dict[str, float] = field(default_factory=dict)
    #: ``(engine id, side-channel host, port)`` when the pod's connector reports it (a peer-load holder)
    kv_endpoint: tuple[str, str, int] | None = None
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
    tiers: dict[str, dict[str, float]] = {TIER_TOKENS: m.tier_tokens, TIER_SECONDS: m.tier_seconds}
    peers: dict[str, dict[str, float]] = {PEER_SECONDS: m.peer_seconds, PEER_BLOCKS: m.peer_blocks}
    lora_at = -1.0
    for line in text.splitlines():
        vllm = line.startswith("vllm:")
        if not vllm and not line.startswith(("llmd:kv_tier_", "llmd:kv_peer_load_", ENDPOINT_INFO)):
            continue
        name_end = line.find("{")
        sp = line.rfind(" ")
        if sp < 0:
            continue
        name = line[: name_end if 0 < name_end < sp else sp]
        if not vllm:
            if name in _TIER_NAMES:
                _tier_value(tiers[name], name, line, sp, name_end)
            elif name in peers:
                _peer_value(peers[name], name, line, sp, name_end)
            elif name == TIER_CAPACITY:
                if name_end > 0 and _TIER_DRAM.search(line, name_end, sp):
                    v = _sample(name, line[sp + 1 :])
                    if v is not None and v <= MAX_BLOCKS:
                        m.dram_capacity_blocks = int(v) or None
            elif name == ENDPOINT_INFO:
                m.kv_endpoint = _endpoint(line[:sp]) or m.kv_endpoint
            continue
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
        v = _sample(name, line[sp + 1 :])
        if v is None:
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
    m.prefill_tokens = vals.get(PREFILL_TOKENS, 0.0)
    m.prefill_seconds = vals.get(PREFILL_SECONDS, 0.0)
    m.updated = time.monotonic() if now is None else now
    return m


def _sample(name: str, raw: str) -> float | None:
    """A sample's value if it is a finite, non-negative number (another number is rejected, logged)."""
    try:
        v = float(raw)
    except ValueError:
        return None
    if not (math.isfinite(v) and v >= 0):
        _reject(name, raw)
        return None
    return v


def _tier_value(into: dict[str, float], name: str, line: str, sp: int, name_end: int) -> None:
    """Add one tier series sample to ``into[tier]`` (summed over the other labels); at most 8 tiers."""
    t = _TIER_LABEL.search(line, name_end, sp) if name_end > 0 else None
    if t is None:
        return
    v = _sample(name, line[sp + 1 :])
    if v is None:
        return
    tier = t.group(1)
    if tier in into or len(into) < 8:
        into[tier] = into.get(tier, 0.0) + v


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


def _peer_value(into: dict[str, float], name: str, line: str, sp: int, name_end: int) -> None:
    p = _PEER_LABEL.search(line, name_end, sp) if name_end > 0 else None
    if p is None:
        return
    try:
        v = float(line[sp + 1 :])
    except ValueError:
        return
    if not (math.isfinite(v) and v >= 0):
        _reject(name, line[sp + 1 :])
        return
    peer = p.group(1)
    if peer in into or len(into) < MAX_PEERS:
        into[peer] = into.get(peer, 0.0) + v


def _endpoint(labels: str) -> tuple[str, str, int] | None:
    """``(engine id, host, port)`` from ``llmd:kv_endpoint_info``'s labels, checked as the engine's
    connector checks ``kv_transfer_params`` (a host that could change a ZMQ endpoint is dropped)."""
    e = _ENDPOINT.search(labels)
    if e is None or not _HOST.match(e.group(2)) or not 0 < int(e.group(3)) <= 65535:
        return None
    return e.group(1), e.group(2), int(e.group(3))
