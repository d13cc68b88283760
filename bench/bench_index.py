"""Benchmark KVBlockIndex: ingest rate (block events/s, one core) and match latency (8k-token prompts).

    .venv/bin/python bench/bench_index.py [--pods 100] [--prompt-tokens 8192] [--block-size 64]

Targets (issue 3): >= 500k block events/s ingested; p99 match <= 200 us for 8k-token prompts with
100 pods' worth of entries. Numbers are printed, never asserted. Both wall-clock and thread CPU time
are printed: on a shared, busy machine the CPU time is the fairer "one core" figure.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from vllm_llmd.index import KVBlockIndex
from vllm_llmd.wire import BlockRemoved, BlockStored, encode_batch, seq_to_bytes

MODEL = "bench-model"


def stored(hashes: list[int], parent: int | None, tokens: list[int], bs: int) -> BlockStored:
    # as vLLM 0.32 sends it: extra_keys one None per block, group 0, full attention
    return BlockStored(
        hashes,
        parent,
        tokens,
        bs,
        None,
        "GPU",
        None,
        extra_keys=[None] * len(hashes),
        group_idx=0,
        kv_cache_spec_kind="full_attention",
    )


def ingest_bench(engine_bs: int, canon_bs: int, blocks_per_event: int, n_blocks: int) -> None:
    """A stream like a busy engine's: BlockStored batches (prompt chains) and, once the cache is
    full, a BlockRemoved for every stored block (steady state)."""
    rng = random.Random(0)
    frames: list[list[bytes]] = []
    topic = f"kv@10.0.0.1:8000@{MODEL}".encode()
    live: list[int] = []
    cache_blocks = 50_000
    seq = 0
    h = 1
    total = 0
    while total < n_blocks:
        parent = None
        events: list = []
        for _ in range(4):  # 4 events per batch, each a chain continuation
            toks = [rng.randrange(50_000) for _ in range(engine_bs * blocks_per_event)]
            hashes = list(range(h, h + blocks_per_event))
            h += blocks_per_event
            events.append(stored(hashes, parent, toks, engine_bs))
            parent = hashes[-1]
            live.extend(hashes)
            total += blocks_per_event
        if len(live) > cache_blocks:
            drop, live = live[: len(live) - cache_blocks], live[len(live) - cache_blocks :]
            events.append(BlockRemoved(drop, "GPU"))
            total += len(drop)
        frames.append([topic, seq_to_bytes(seq), encode_batch(events, ts=time.time())])
        seq += 1
    idx = KVBlockIndex(block_size=canon_bs, capacity_blocks=2_000_000)
    t0, c0 = time.perf_counter(), time.thread_time()
    for f in frames:
        idx.ingest("10.0.0.1:8000", f)
    dt, cpu = time.perf_counter() - t0, time.thread_time() - c0
    s = idx.stats()
    assert s.decode_errors == 0 and s.orphans == 0, s
    print(
        f"ingest  engine block {engine_bs:>3} -> index block {canon_bs}: "
        f"{s.block_events / cpu / 1e3:6.0f}k block events per CPU-second ({s.block_events / dt / 1e3:.0f}k/s wall)"
        f"  ({s.block_events} block events, {len(frames)} batches; {s.blocks} index blocks)"
    )


def match_bench(pods: int, prompt_tokens: int, canon_bs: int, queries: int) -> None:
    rng = random.Random(1)
    docs = [[rng.randrange(50_000) for _ in range(prompt_tokens)] for _ in range(20)]
    idx = KVBlockIndex(block_size=canon_bs, capacity_blocks=5_000_000)
    engine_bs = 64
    h = 1
    for p in range(pods):
        pod = f"10.0.{p // 250}.{p % 250}:8000"
        topic = f"kv@{pod}@{MODEL}".encode()
        events = []
        # each pod holds a prefix of 5 of the shared documents, plus its own private prompts
        for d in rng.sample(range(len(docs)), 5):
            n = rng.randrange(1, prompt_tokens // engine_bs + 1)
            hashes = list(range(h, h + n))
            h += n
            events.append(stored(hashes, None, docs[d][: n * engine_bs], engine_bs))
        for _ in range(5):
            toks = [rng.randrange(50_000) for _ in range(prompt_tokens)]
            n = prompt_tokens // engine_bs
            events.append(stored(list(range(h, h + n)), None, toks, engine_bs))
            h += n
        idx.ingest(pod, [topic, seq_to_bytes(0), encode_batch(events)])
    s = idx.stats()
    prompts = [docs[rng.randrange(len(docs))] for _ in range(queries)]
    keys = [idx.block_keys(MODEL, p) for p in prompts]
    for label, fn in (
        ("match(model, token_ids)", lambda i: idx.match(MODEL, prompts[i])),
        ("block_keys(...) only   ", lambda i: idx.block_keys(MODEL, prompts[i])),
        ("match_keys(keys)       ", lambda i: idx.match_keys(keys[i])),
    ):
        lat, cpu = [], []
        hits = 0
        for i in range(queries):
            c0 = time.thread_time_ns()
            t0 = time.perf_counter_ns()
            r = fn(i)
            lat.append((time.perf_counter_ns() - t0) / 1e3)
            cpu.append((time.thread_time_ns() - c0) / 1e3)
            hits += len(r) if isinstance(r, dict) else 0
        lat.sort()
        cpu.sort()
        p99 = int(len(lat) * 0.99) - 1
        print(
            f"{label} {prompt_tokens} tokens, {pods} pods, {s.blocks} index blocks: "
            f"CPU p50 {statistics.median(cpu):6.1f} us p99 {cpu[p99]:6.1f} us | "
            f"wall p50 {statistics.median(lat):6.1f} us p99 {lat[p99]:6.1f} us"
            + (f"  (avg {hits / queries:.1f} pods matched)" if hits else "")
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=100)
    ap.add_argument("--prompt-tokens", type=int, default=8192)
    ap.add_argument("--block-size", type=int, default=64, help="the index's canonical block size")
    ap.add_argument("--ingest-blocks", type=int, default=300_000)
    ap.add_argument("--queries", type=int, default=2000)
    a = ap.parse_args()
    for engine_bs, per_event in ((64, 16), (16, 16), (256, 4)):
        ingest_bench(engine_bs, a.block_size, per_event, a.ingest_blocks)
    match_bench(a.pods, a.prompt_tokens, a.block_size, a.queries)


if __name__ == "__main__":
    main()
