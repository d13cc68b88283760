"""Benchmark KVBlockIndex: ingest rate (block events/s, one core), match latency (8k-token prompts)
and how long the index lock is held by large mutations.

    .venv/bin/python bench/bench_index.py [--pods 100] [--prompt-tokens 8192] [--block-size 64]
    .venv/bin/python bench/bench_index.py --baseline main       # A/B against another git ref
    .venv/bin/python bench/bench_index.py --lock-holds [--baseline main]

Targets (issue 3): >= 500k block events/s ingested; p99 match <= 200 us for 8k-token prompts with
100 pods' worth of entries. Numbers are printed, never asserted. Both wall-clock and thread CPU time
are printed: on a shared, busy machine the CPU time is the fairer "one core" figure.

``--baseline REF`` loads ``vllm_llmd`` as it is at git ref ``REF`` (``git archive`` into a temporary
directory, imported as ``vllm_llmd_base``) and runs both in the same process, alternating rounds, so
that the machine's load hits both alike; it prints the median of the rounds and the ratio.

``--lock-holds`` measures the index lock (a timing wrapper around ``KVBlockIndex._lock``): the
longest hold while one pod's ``AllBlocksCleared`` is applied after its stream named many distinct
media, and a concurrent ``match``'s longest wait while a 200k-block ``BlockStored`` is applied
(issue 9, case 7).
"""

from __future__ import annotations

import argparse
import importlib
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from vllm_llmd.index import KVBlockIndex
from vllm_llmd.wire import AllBlocksCleared, BlockRemoved, BlockStored, encode_batch, seq_to_bytes

MODEL = "bench-model"
TOPIC = f"kv@10.0.0.1:8000@{MODEL}".encode()


def stored(hashes: list[int], parent: int | None, tokens: list[int], bs: int, medium: str = "GPU") -> BlockStored:
    # as vLLM 0.32 sends it: extra_keys one None per block, group 0, full attention
    return BlockStored(
        hashes,
        parent,
        tokens,
        bs,
        None,
        medium,
        None,
        extra_keys=[None] * len(hashes),
        group_idx=0,
        kv_cache_spec_kind="full_attention",
    )


def ingest_frames(engine_bs: int, blocks_per_event: int, n_blocks: int) -> list[list[bytes]]:
    """A stream like a busy engine's: BlockStored batches (prompt chains) and, once the cache is
    full, a BlockRemoved for every stored block (steady state)."""
    rng = random.Random(0)
    frames: list[list[bytes]] = []
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
        frames.append([TOPIC, seq_to_bytes(seq), encode_batch(events, ts=time.time())])
        seq += 1
    return frames


def run_ingest(index_cls: Any, frames: list[list[bytes]], canon_bs: int) -> tuple[float, float, Any]:
    idx = index_cls(block_size=canon_bs, capacity_blocks=2_000_000)
    t0, c0 = time.perf_counter(), time.thread_time()
    for f in frames:
        idx.ingest("10.0.0.1:8000", f)
    dt, cpu = time.perf_counter() - t0, time.thread_time() - c0
    s = idx.stats()
    assert s.decode_errors == 0 and s.orphans == 0, s
    return cpu, dt, s


def match_index(index_cls: Any, pods: int, prompt_tokens: int, canon_bs: int) -> tuple[Any, list[list[int]]]:
    rng = random.Random(1)
    docs = [[rng.randrange(50_000) for _ in range(prompt_tokens)] for _ in range(20)]
    idx = index_cls(block_size=canon_bs, capacity_blocks=5_000_000)
    engine_bs = 64
    h = 1
    for p in range(pods):
        pod = f"10.0.{p // 250}.{p % 250}:8000"
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
        idx.ingest(pod, [f"kv@{pod}@{MODEL}".encode(), seq_to_bytes(0), encode_batch(events)])
    return idx, docs


def time_calls(fn: Any, n: int) -> tuple[list[float], list[float], int]:
    lat, cpu = [], []
    hits = 0
    for i in range(n):
        c0 = time.thread_time_ns()
        t0 = time.perf_counter_ns()
        r = fn(i)
        lat.append((time.perf_counter_ns() - t0) / 1e3)
        cpu.append((time.thread_time_ns() - c0) / 1e3)
        hits += len(r) if isinstance(r, dict) else 0
    return sorted(lat), sorted(cpu), hits


def match_bench(pods: int, prompt_tokens: int, canon_bs: int, queries: int) -> None:
    idx, docs = match_index(KVBlockIndex, pods, prompt_tokens, canon_bs)
    s = idx.stats()
    rng = random.Random(2)
    prompts = [docs[rng.randrange(len(docs))] for _ in range(queries)]
    keys = [idx.block_keys(MODEL, p) for p in prompts]
    for label, fn in (
        ("match(model, token_ids)", lambda i: idx.match(MODEL, prompts[i])),
        ("block_keys(...) only   ", lambda i: idx.block_keys(MODEL, prompts[i])),
        ("match_keys(keys)       ", lambda i: idx.match_keys(keys[i])),
    ):
        lat, cpu, hits = time_calls(fn, queries)
        p99 = int(len(lat) * 0.99) - 1
        print(
            f"{label} {prompt_tokens} tokens, {pods} pods, {s.blocks} index blocks: "
            f"CPU p50 {statistics.median(cpu):6.1f} us p99 {cpu[p99]:6.1f} us | "
            f"wall p50 {statistics.median(lat):6.1f} us p99 {lat[p99]:6.1f} us"
            + (f"  (avg {hits / queries:.1f} pods matched)" if hits else ""),
            flush=True,
        )


# ---- A/B against another git ref ------------------------------------------------------------------
def load_baseline(ref: str) -> Any:
    """``vllm_llmd`` at git ref ``ref``, importable as ``vllm_llmd_base``; returns its KVBlockIndex."""
    root = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix="llmd-bench-base-"))
    tar = subprocess.run(["git", "-C", str(root), "archive", ref, "vllm_llmd"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=tar.stdout, check=True)
    pkg = tmp / "vllm_llmd_base"
    (tmp / "vllm_llmd").rename(pkg)
    for f in pkg.rglob("*.py"):
        f.write_text(re.sub(r"\bvllm_llmd\b", "vllm_llmd_base", f.read_text()))
    sys.path.insert(0, str(tmp))
    return importlib.import_module("vllm_llmd_base.index").KVBlockIndex


def ab_bench(base_cls: Any, args: argparse.Namespace) -> None:
    impls = {"base": base_cls, "new": KVBlockIndex}
    for engine_bs, per_event in ((64, 16), (16, 16), (256, 4)):
        frames = ingest_frames(engine_bs, per_event, args.ingest_blocks // 3)
        rates: dict[str, list[float]] = {k: [] for k in impls}
        for r in range(args.rounds):
            for name in list(impls)[:: 1 if r % 2 == 0 else -1]:  # alternate who goes first
                cpu, _dt, s = run_ingest(impls[name], frames, args.block_size)
                rates[name].append(s.block_events / cpu / 1e3)
        b, n = statistics.median(rates["base"]), statistics.median(rates["new"])
        print(
            f"ingest engine block {engine_bs:>3}: base {b:6.0f}k  new {n:6.0f}k block events/CPU-s  "
            f"new/base {n / b:5.2f}  (median of {args.rounds} rounds each)",
            flush=True,
        )
    built = {name: match_index(cls, args.pods, args.prompt_tokens, args.block_size) for name, cls in impls.items()}
    rng = random.Random(2)
    docs = built["new"][1]
    prompts = [docs[rng.randrange(len(docs))] for _ in range(args.queries)]
    for label, by_keys in (("match(model, token_ids)", False), ("match_keys(keys)       ", True)):
        p50s: dict[str, list[float]] = {k: [] for k in impls}
        p99s: dict[str, list[float]] = {k: [] for k in impls}
        for r in range(args.rounds):
            for name in list(impls)[:: 1 if r % 2 == 0 else -1]:
                idx = built[name][0]
                if by_keys:
                    keys = [idx.block_keys(MODEL, p) for p in prompts]
                    fn = lambda i, idx=idx, keys=keys: idx.match_keys(keys[i])  # noqa: E731
                else:
                    fn = lambda i, idx=idx: idx.match(MODEL, prompts[i])  # noqa: E731
                _lat, cpu, _hits = time_calls(fn, args.queries)
                p50s[name].append(statistics.median(cpu))
                p99s[name].append(cpu[int(len(cpu) * 0.99) - 1])
        b50, n50 = statistics.median(p50s["base"]), statistics.median(p50s["new"])
        b99, n99 = statistics.median(p99s["base"]), statistics.median(p99s["new"])
        print(
            f"{label} CPU p50 base {b50:6.1f} us new {n50:6.1f} us (new/base {n50 / b50:4.2f}) | "
            f"p99 base {b99:6.1f} us new {n99:6.1f} us (new/base {n99 / b99:4.2f})",
            flush=True,
        )


# ---- lock holds --------------------------------------------------------------------------------------
class TimedLock:
    """``threading.Lock`` that records how long each hold lasted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._t = 0.0
        self.holds: list[float] = []

    def acquire(self, *a: Any) -> bool:
        ok = self._lock.acquire(*a)
        self._t = time.perf_counter()
        return ok

    def release(self) -> None:
        self.holds.append(time.perf_counter() - self._t)
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holds(name: str, index_cls: Any, media: int, big_blocks: int) -> None:
    # one pod whose stream named `media` distinct media, then AllBlocksCleared
    idx = index_cls(block_size=16)
    rng = random.Random(3)
    frames = []
    for i in range(media):
        toks = [rng.randrange(50_000) for _ in range(16)]
        frames.append([TOPIC, seq_to_bytes(i), encode_batch([stored([i + 1], None, toks, 16, medium=f"M{i}")])])
    for f in frames:
        idx.ingest("10.0.0.1:8000", f)
    idx._lock = lock = TimedLock()
    t0 = time.perf_counter()
    idx.ingest("10.0.0.1:8000", [TOPIC, seq_to_bytes(media), encode_batch([AllBlocksCleared()])])
    print(
        f"{name}: AllBlocksCleared after {media} distinct media: longest lock hold {max(lock.holds) * 1e3:8.1f} ms "
        f"(apply {(time.perf_counter() - t0) * 1e3:.1f} ms)",
        flush=True,
    )
    # a 200k-block BlockStored while another thread matches
    idx = index_cls(block_size=16, capacity_blocks=4_000_000)
    probe = [rng.randrange(50_000) for _ in range(1024)]
    idx.ingest("10.0.0.1:8000", [TOPIC, seq_to_bytes(0), encode_batch([stored(list(range(1, 65)), None, probe, 16)])])
    toks = [rng.randrange(50_000) for _ in range(16 * big_blocks)]
    big = [TOPIC, seq_to_bytes(1), encode_batch([stored(list(range(1000, 1000 + big_blocks)), None, toks, 16)])]
    idx._lock = lock = TimedLock()
    keys = idx.block_keys(MODEL, probe)
    waits: list[float] = []
    done = threading.Event()

    def matcher() -> None:
        while not done.is_set():
            t = time.perf_counter()
            idx.match_keys(keys)
            waits.append(time.perf_counter() - t)

    th = threading.Thread(target=matcher)
    th.start()
    t0 = time.perf_counter()
    idx.ingest("10.0.0.1:8000", big)
    apply_s = time.perf_counter() - t0
    done.set()
    th.join()
    holds = sorted(lock.holds)
    waits.sort()
    slow = sum(1 for w in waits if w > 0.010)
    print(
        f"{name}: {big_blocks}-block BlockStored applied in {apply_s * 1e3:.0f} ms: lock holds p50 "
        f"{holds[len(holds) // 2] * 1e3:.2f} ms, longest {holds[-1] * 1e3:.1f} ms; concurrent match: "
        f"{len(waits)} calls, p99 {waits[int(len(waits) * 0.99) - 1] * 1e3:.2f} ms, {slow} over 10 ms, "
        f"longest {waits[-1] * 1e3:.1f} ms (with gc: a full collection or a dict resize stalls every "
        "thread, lock or not)",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=100)
    ap.add_argument("--prompt-tokens", type=int, default=8192)
    ap.add_argument("--block-size", type=int, default=64, help="the index's canonical block size")
    ap.add_argument("--ingest-blocks", type=int, default=300_000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--baseline", metavar="REF", help="also run vllm_llmd at this git ref, alternating rounds")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per implementation with --baseline")
    ap.add_argument("--lock-holds", action="store_true", help="measure lock hold times of large mutations")
    ap.add_argument("--media", type=int, default=5000, help="--lock-holds: distinct media before the clear")
    ap.add_argument("--big-blocks", type=int, default=200_000, help="--lock-holds: blocks in the large batch")
    a = ap.parse_args()
    base = load_baseline(a.baseline) if a.baseline else None
    if a.lock_holds:
        if base is not None:
            lock_holds("base", base, a.media, a.big_blocks)
        lock_holds("new ", KVBlockIndex, a.media, a.big_blocks)
        return
    if base is not None:
        ab_bench(base, a)
        return
    for engine_bs, per_event in ((64, 16), (16, 16), (256, 4)):
        cpu, dt, s = run_ingest(KVBlockIndex, ingest_frames(engine_bs, per_event, a.ingest_blocks), a.block_size)
        print(
            f"ingest  engine block {engine_bs:>3} -> index block {a.block_size}: "
            f"{s.block_events / cpu / 1e3:6.0f}k block events per CPU-second ({s.block_events / dt / 1e3:.0f}k/s wall)"
            f"  ({s.block_events} block events; {s.blocks} index blocks)",
            flush=True,
        )
    match_bench(a.pods, a.prompt_tokens, a.block_size, a.queries)


if __name__ == "__main__":
    main()
