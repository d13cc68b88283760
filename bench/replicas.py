"""Active-active router replicas (issue 15): what splitting the traffic over two replicas costs, and
how long a restarted replica takes to rebuild its KV index.

Two fresh vLLM CPU engines (pinned one per core, 64-token blocks, 320 blocks each, prefix caching,
KV events + replay), the tiny test model, and ``vllm-llmd router`` replicas as separate processes
with one config (``vllm_llmd.testing.replicas``; default profile, precise scoring). For each round
the engines' prefix caches are reset, fresh replicas are started (empty routing memory), and one
workload is sent: ``--groups`` prefixes of ``--prefix-words`` words, ``--per-group`` requests each
with distinct suffixes, shuffled, ``--concurrency`` at once, ``--max-tokens`` output tokens:

* ``1 replica``: every request to one replica;
* ``2 replicas``: request *i* to replica *i* mod 2 (a Service balancing round-robin).

Rounds alternate (1, 2, 1, 2, ...) with a new seed per pair. Recorded per round: requests/s, the
engines' prefix-cache hit rate (Δ hits ÷ Δ queries over both engines), affinity (share of requests
sent to the engine that served most of their group), requests per engine, latency p50/p90.

Restart: after the last round the second replica is killed (SIGKILL) and a new one started; the time
to ``/livez`` (process up), to ``/readyz`` (index synced from both engines' replay endpoints) and
until its index has as many blocks as its peer's is recorded, with the replay buffer size.

Synthetic rebuild (``--synthetic-pods N``): N of vLLM's own ``ZmqEventPublisher`` (real, in this
process) each with ``--synthetic-batches`` batches of one 4-block ``BlockStored`` in its replay
buffer; one ``KVEventSubscriber`` + ``KVBlockIndex`` subscribes to all and the time until every pod
is synced is measured (the rebuild a restarted replica does, at a fleet's scale).

    flock /tmp/llmd-engine.lock .venv/bin/python bench/replicas.py --rounds 4
    .venv/bin/python bench/replicas.py --synthetic-only --synthetic-pods 100 --synthetic-batches 2000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from serving import engine_counters, load_avg, post_json, reset_prefix_cache  # noqa: E402

from vllm_llmd.testing.engine import EngineProcess, EngineSpec  # noqa: E402
from vllm_llmd.testing.model import make_test_model  # noqa: E402
from vllm_llmd.testing.replicas import RouterReplica, write_config  # noqa: E402

OUT = BENCH_DIR / "out" / "replicas"
WORDS = "kari tone musa lovi stra ion ent verdor qua pre lum dor ix ar el om un cy".split()


def prose(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) + str(rng.randrange(100)) for _ in range(words))


def start_engines(model_dir: Path, log_dir: Path) -> list[EngineProcess]:
    engines = [
        EngineProcess(
            EngineSpec(
                model=model_dir,
                served_model_name="test-model",
                block_size=64,
                num_gpu_blocks=320,
                max_model_len=4096,
                cpu_core=i if (os.cpu_count() or 1) >= 2 else None,
                extra_env={"VLLM_SERVER_DEV_MODE": "1"},  # POST /reset_prefix_cache between rounds
            ),
            log_dir / f"engine{i}.log",
        )
        for i in range(2)
    ]
    try:
        for e in engines:
            e.start()
        for e in engines:
            e.wait_ready(timeout=900, quiet_timeout=180)
        for e in engines:  # first-call costs out of the measurement; shorter than a block
            post_json(e.url + "/v1/completions", {"model": "test-model", "prompt": "warm up", "max_tokens": 2})
    except BaseException:
        for e in engines:
            e.stop()
        raise
    return engines


def workload(seed: int, args: argparse.Namespace) -> list[tuple[int, str]]:
    rng = random.Random(seed)
    prefixes = [prose(rng, args.prefix_words) for _ in range(args.groups)]
    reqs = [
        (g, prefixes[g] + f" question {j} " + prose(rng, 8)) for g in range(args.groups) for j in range(args.per_group)
    ]
    rng.shuffle(reqs)
    return reqs


def run_round(
    replicas: int, seed: int, engines: list[EngineProcess], cfg: Path, args: argparse.Namespace
) -> dict[str, Any]:
    for e in engines:
        assert reset_prefix_cache(e.url), "POST /reset_prefix_cache failed"
    logs = OUT / "logs"
    reps = [RouterReplica(cfg, logs / f"round{seed}-r{i}.log").start() for i in range(replicas)]
    try:
        for r in reps:
            r.wait_for("/readyz", 120)
        reqs = workload(seed, args)
        before = [engine_counters(e.url) for e in engines]
        load0 = load_avg()

        def send(i: int) -> tuple[int, str, float]:
            g, prompt = reqs[i]
            t = time.monotonic()
            out = reps[i % replicas].complete(prompt, max_tokens=args.max_tokens)
            return g, out.pod, time.monotonic() - t

        t0 = time.monotonic()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(send, range(len(reqs))))
        wall = time.monotonic() - t0
        after = [engine_counters(e.url) for e in engines]
    finally:
        for r in reps:
            r.stop()
    hits = sum(a["hits"] - b["hits"] for a, b in zip(after, before, strict=True))
    queries = sum(a["queries"] - b["queries"] for a, b in zip(after, before, strict=True))
    by_group: dict[int, Counter[str]] = {}
    for g, pod, _ in results:
        by_group.setdefault(g, Counter())[pod] += 1
    affinity = sum(c.most_common(1)[0][1] for c in by_group.values()) / len(results)
    lat = sorted(x[2] for x in results)
    return {
        "replicas": replicas,
        "seed": seed,
        "requests": len(results),
        "req_per_s": round(len(results) / wall, 3),
        "hit_rate": round(hits / queries, 4) if queries else None,
        "affinity": round(affinity, 4),
        "requests_per_engine": [int(a["requests"] - b["requests"]) for a, b in zip(after, before, strict=True)],
        "latency_p50_s": round(statistics.median(lat), 3),
        "latency_p90_s": round(lat[int(0.9 * (len(lat) - 1))], 3),
        "load_avg_before": load0,
        "load_avg_after": load_avg(),
    }


def restart(engines: list[EngineProcess], cfg: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Two replicas after a workload; the second is killed and a new one started."""
    logs = OUT / "logs"
    r1 = RouterReplica(cfg, logs / "restart-r1.log").start()
    r2 = RouterReplica(cfg, logs / "restart-r2.log").start()
    r3 = None
    try:
        for r in (r1, r2):
            r.wait_for("/readyz", 120)
        reqs = workload(999, args)
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(lambda i: (r1, r2)[i % 2].complete(reqs[i][1], max_tokens=1), range(len(reqs))))
        time.sleep(1.0)  # let the last events arrive (a measurement pause, not synchronisation)
        r2.kill()
        peer_blocks = r1.index_blocks()
        load0 = load_avg()
        r3 = RouterReplica(cfg, logs / "restart-r3.log").start()
        live_s = r3.wait_for("/livez", 120, interval=0.01)
        ready_s = r3.wait_for("/readyz", 120, interval=0.01)
        deadline = time.monotonic() + 60
        while r3.index_blocks() != peer_blocks and time.monotonic() < deadline:
            time.sleep(0.01)
        equal_s = time.monotonic() - r3.started_at
        return {
            "index_sync_s": r3.get_json("/readyz")["info"]["index_sync_s"],
            "live_s": round(live_s, 3),
            "ready_s": round(ready_s, 3),
            "index_equal_s": round(equal_s, 3),
            "index_equal": r3.index_blocks() == peer_blocks,
            "peer_index_blocks": peer_blocks,
            "load_avg_before": load0,
        }
    finally:
        for r in (r1, r2, r3):
            if r is not None:
                r.stop()


def synthetic(pods: int, batches: int) -> dict[str, Any]:
    """Rebuild time of one subscriber from ``pods`` real vLLM publishers' full replay buffers."""
    from vllm.distributed.kv_events import BlockStored, KVEventBatch, ZmqEventPublisher

    from vllm_llmd.index import KVBlockIndex, KVEventSubscriber
    from vllm_llmd.testing.engine import free_port

    bs = 16
    pubs, eps = [], []
    for p in range(pods):
        port, rport = free_port(), free_port()
        pub = ZmqEventPublisher(
            data_parallel_rank=0,
            endpoint=f"tcp://*:{port}",
            replay_endpoint=f"tcp://*:{rport}",
            buffer_steps=max(batches, 10_000),
            topic=f"kv@10.0.0.{p}:8000@m",
        )
        pubs.append(pub)
        eps.append((f"10.0.0.{p}:8000", f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{rport}"))
    try:
        rng = random.Random(0)
        h = 1
        for pub in pubs:
            for _ in range(batches):
                toks = [rng.randrange(1, 30_000) for _ in range(4 * bs)]
                ev = BlockStored(
                    block_hashes=list(range(h, h + 4)),
                    parent_block_hash=None,
                    token_ids=toks,
                    block_size=bs,
                    lora_id=None,
                    medium="GPU",
                    lora_name=None,
                )
                h += 4
                pub.publish(KVEventBatch(ts=time.time(), events=[ev]))
        deadline = time.monotonic() + 120
        while any(len(p._buffer) < batches for p in pubs) and time.monotonic() < deadline:
            time.sleep(0.05)  # the publishers' threads fill their buffers
        index = KVBlockIndex(block_size=bs)
        sub = KVEventSubscriber(index, replay_timeout_s=10.0)
        load0 = load_avg()
        t0 = time.monotonic()
        sub.start()
        for pod, ep, rep in eps:
            sub.add_pod(pod, ep, rep)
        while time.monotonic() - t0 < 300:
            st = sub.stats()
            if len(st) == pods and all(s.synced for s in st.values()):
                break
            time.sleep(0.005)
        took = time.monotonic() - t0
        blocks = index.stats().blocks
        sub.stop()
        return {
            "pods": pods,
            "batches_per_pod": batches,
            "blocks": blocks,
            "rebuild_s": round(took, 3),
            "batches_per_s": round(pods * batches / took),
            "load_avg_before": load0,
        }
    finally:
        for pub in pubs:
            pub.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4, help="rounds, alternating 1 and 2 replicas")
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--per-group", type=int, default=6)
    ap.add_argument("--prefix-words", type=int, default=600)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--synthetic-pods", type=int, default=0)
    ap.add_argument("--synthetic-batches", type=int, default=2000)
    ap.add_argument("--synthetic-only", action="store_true")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"args": vars(args), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    if not args.synthetic_only:
        model_dir = make_test_model(BENCH_DIR / "out" / "models" / "tiny", shape="tiny")
        engines = start_engines(model_dir, OUT / "logs")
        try:
            cfg = write_config(OUT / "router.yaml", engines, model_dir)
            rounds = []
            for i in range(args.rounds):
                row = run_round(1 if i % 2 == 0 else 2, 100 + i // 2, engines, cfg, args)
                print(json.dumps(row), flush=True)
                rounds.append(row)
            out["rounds"] = rounds
            out["restart"] = restart(engines, cfg, args)
            print(json.dumps(out["restart"]), flush=True)
        finally:
            for e in engines:
                e.stop()
    if args.synthetic_pods:
        out["synthetic"] = synthetic(args.synthetic_pods, args.synthetic_batches)
        print(json.dumps(out["synthetic"]), flush=True)
    path = OUT / f"replicas-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
