"""KV tiers benchmark (issue 11): the two-tenant cascade, the no-reuse cost, load-back bandwidth.

Rows, each on the same two engines (restarted per row, pinned one per core as serving.py pins them,
``--block-size 64``, ``--num-gpu-blocks-override`` 320: 20,480 tokens of KV cache per engine) behind
the vllm-llmd router (``bench/routers.py`` row ``ours``):

  a        no tiers: ``LLMDConnector`` without a tiers block (so every row carries the same connector)
  b        tiers: a DRAM tier (``--dram``) and a disk tier (``--disk-capacity``, under bench/out), and a
           tier-blind router (``estimated-ttft`` with ``price_tiers: false``: a block in any tier is
           priced as if in the engine cache)
  c        the same tiers and the tier-aware router (the default profile: each pod's learned
           load-back price per tier, vllm_llmd.pd.load.TokenPrices)
  b-disk, c-disk   as b and c with a DRAM tier too small for tenant A (``--small-dram``): A comes
           back from disk

Cascade workload (per row, fresh engines): tenant A has ``--a-prefixes`` prefixes of ``--a-len``
tokens; (1) A warms: each prefix ``--a-warm`` times with a unique suffix; (2) tenant B floods
``--b-requests`` unique prompts of ``--b-len`` tokens, several times the two engines' KV caches,
at ``--concurrency``; (3) A returns: each prefix ``--a-return`` times. Reported: A's returning
TTFT p50/p90 (streamed, at the client), the row's throughput over all three phases, and where the
returning prompts' tokens came from (engine prefix cache, DRAM, disk; deltas of the engines'
``vllm:prefix_cache_hits_total`` and ``vllm:prompt_tokens_cached_by_source_total``).

No-reuse workload (``--no-reuse``): ``--nr-requests`` unique prompts, rows ``a`` and ``c``: what
storing every block in the tiers costs when nothing is ever reused (target <= 5%).

Copy bandwidth (``--copy``, no engine): ``HostCopyWorker`` loading batches of 1..256 blocks of the
model's KV layout from a DRAM-tier region, against one contiguous ``memcpy`` of the same bytes.

    flock /tmp/llmd-engine.lock .venv/bin/python bench/bench_tiers.py --rows a,b,c --no-reuse --copy
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from routers import ROUTERS, RouterProcess, Worker, free_port
from tier_load import load_avg, metric, metrics, random_tokens, run

from vllm_llmd.testing.engine import EngineProcess, EngineSpec
from vllm_llmd.testing.model import SHAPES, make_test_model

OUT = Path(__file__).resolve().parent / "out" / "tiers"
BLOCK = 64


def kv_block_bytes(shape: str) -> int:
    s = SHAPES[shape]
    return s.num_layers * s.num_kv_heads * BLOCK * 2 * s.head_dim * 2  # bf16, K and V


def row_tiers(row: str, args: argparse.Namespace, disk_dir: Path) -> dict[str, Any] | None:
    if row == "a":
        return None
    dram = args.small_dram if row.endswith("-disk") else args.dram
    disk: dict[str, Any] = {"path": str(disk_dir), "capacity": args.disk_capacity}
    if args.store_threshold is not None:
        disk["store_threshold"] = args.store_threshold
    return {"dram": {"capacity": dram}, "disk": disk}


def start_row(model: Path, row: str, args: argparse.Namespace, logs: Path) -> tuple[list[EngineProcess], RouterProcess]:
    engines = []
    for i in range(2):
        extra: dict[str, Any] = {}
        tiers = row_tiers(row, args, OUT / "disk" / f"engine{i}")
        if tiers:
            extra["tiers"] = tiers
        cfg: dict[str, Any] = {"kv_connector": "LLMDConnector", "kv_role": "kv_both"}
        if extra:
            cfg["kv_connector_extra_config"] = extra
        spec = EngineSpec(
            model=model,
            block_size=BLOCK,
            num_gpu_blocks=args.gpu_blocks,
            max_model_len=4096,
            cpu_core=i,
            kv_transfer_config=cfg,
        )
        engines.append(EngineProcess(spec, logs / f"engine{i}.log"))
    try:
        for e in engines:
            e.start()
        for e in engines:
            e.wait_ready(timeout=900, quiet_timeout=180)
        kind = ROUTERS["ours"]
        workers = [Worker(e.url, e.spec.events_endpoint, e.spec.replay_endpoint, model) for e in engines]
        if row.startswith("b"):  # the tier-blind router
            blind = logs / "router-blind.json"
            blind.parent.mkdir(parents=True, exist_ok=True)
            scorer = {"type": "estimated-ttft", "params": {"price_tiers": False}}
            blind.write_text(json.dumps({"profile": {"scorers": [scorer]}}))
            os.environ["LLMD_BENCH_OURS_CONFIG"] = str(blind)
        else:
            os.environ.pop("LLMD_BENCH_OURS_CONFIG", None)
        router = RouterProcess(kind, kind.build(workers, free_port()), logs / "router.log").start().wait_ready()
    except BaseException:
        for e in engines:
            e.stop()
        raise
    run(router.url, "test-model", [(random_tokens(16, random.Random(1)), "")], 4, 1)  # warm-up (< 1 block)
    return engines, router


def counters(engines: list[EngineProcess]) -> dict[str, float]:
    out: dict[str, float] = {}
    for e in engines:
        m = metrics(e.url)
        for key, (name, labels) in {
            "queries": ("vllm:prefix_cache_queries_total", {}),
            "engine": ("vllm:prefix_cache_hits_total", {}),
            "dram": ("vllm:prompt_tokens_cached_by_source_total", {"source": "host"}),
            "disk": ("vllm:prompt_tokens_cached_by_source_total", {"source": "disk"}),
            "load_s_dram": ("llmd:kv_tier_load_seconds_sum", {"tier": "dram"}),
            "loads_dram": ("llmd:kv_tier_load_seconds_count", {"tier": "dram"}),
            "load_s_disk": ("llmd:kv_tier_load_seconds_sum", {"tier": "disk"}),
            "loads_disk": ("llmd:kv_tier_load_seconds_count", {"tier": "disk"}),
            "dram_evicted": ("llmd:kv_tier_evicted_blocks_total", {"tier": "dram"}),
            "disk_errors": ("llmd:kv_tier_errors_total", {"tier": "disk"}),
        }.items():
            out[key] = out.get(key, 0.0) + metric(m, name, **labels)
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def cascade(url: str, engines: list[EngineProcess], args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    a = [random_tokens(args.a_len, rng) for _ in range(args.a_prefixes)]

    def a_requests(times: int) -> list[tuple[list[int], str]]:
        reqs = [(p + random_tokens(args.suffix_len, rng), "A") for _ in range(times) for p in a]
        rng.shuffle(reqs)
        return reqs

    t0 = time.perf_counter()
    warm = run(url, "test-model", a_requests(args.a_warm), args.output_len, args.a_concurrency)
    flood = [(random_tokens(args.b_len, rng), "B") for _ in range(args.b_requests)]
    b = run(url, "test-model", flood, args.output_len, args.concurrency)
    before = counters(engines)
    back = run(url, "test-model", a_requests(args.a_return), args.output_len, args.a_concurrency)
    d = delta(counters(engines), before)
    wall = time.perf_counter() - t0
    n = len(warm.results) + len(b.results) + len(back.results)
    q = d["queries"] or 1
    return {
        "a_return": back.summary(),
        "a_return_ttft_p50_ms": back.summary()["ttft_p50_ms"],
        "a_return_ttft_p90_ms": back.summary()["ttft_p90_ms"],
        "a_warm": warm.summary(),
        "b_flood": b.summary(),
        "throughput_req_s": round(n / wall, 3),
        "return_hit_rate": {k: round(d[k] / q, 3) for k in ("engine", "dram", "disk")},
        "return_load_ms_per_job": {
            t: round(1000 * d[f"load_s_{t}"] / d[f"loads_{t}"], 3) if d[f"loads_{t}"] else None
            for t in ("dram", "disk")
        },
        "return_deltas": d,
        # the whole row's disk writes and the store threshold's skips, both engines
        "disk_totals": {
            what: sum(metric(metrics(e.url), f"llmd:kv_tier_{what}_blocks_total", tier="disk") for e in engines)
            for what in ("stored", "skipped")
        },
        # what the router had learned (row c; in row b it does not price tiers, so nothing)
        "router_tier_prices": {
            ",".join(f"{k}={v}" for k, v in labels): round(value, 4)
            for (name, labels), value in metrics(url).items()
            if name == "llmd_router_tier_price"
        },
    }


def no_reuse(url: str, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed + 7)
    reqs = [(random_tokens(args.nr_len, rng), "") for _ in range(args.nr_requests)]
    return run(url, "test-model", reqs, args.output_len, args.concurrency).summary()


def copy_bandwidth(shape: str) -> list[dict[str, Any]]:
    """HostCopyWorker loads (DRAM tier -> engine KV) vs a contiguous memcpy of the same bytes."""
    import numpy as np
    import torch
    from vllm.v1.kv_offload.base import CanonicalKVCacheRef, CanonicalKVCaches, CanonicalKVCacheTensor, GPULoadStoreSpec
    from vllm.v1.kv_offload.cpu.common import CPULoadStoreSpec
    from vllm_llmd.connectors.tiers.host_copy import HostCopyWorker

    s = SHAPES[shape]
    page = s.num_kv_heads * BLOCK * 2 * s.head_dim * 2  # one layer of one block (LBHNC: a contiguous page)
    blocks, chunks = 2048, 1024
    layers = [torch.zeros((blocks, page), dtype=torch.int8) for _ in range(s.num_layers)]
    row = page * s.num_layers
    region = torch.zeros(chunks * row, dtype=torch.int8)
    views = [torch.as_strided(region, (chunks, page), (row, 1), i * page) for i in range(s.num_layers)]
    caches = CanonicalKVCaches(
        [CanonicalKVCacheTensor(t, page) for t in layers], [[CanonicalKVCacheRef(i, page) for i in range(s.num_layers)]]
    )
    w = HostCopyWorker(caches, views)
    rng = np.random.default_rng(0)
    out = []
    for n in (1, 4, 16, 64, 256):
        times, mem = [], []
        a = region[: n * row].numpy()
        b = np.ones_like(a)  # allocated and touched once: the copy below measures bandwidth, not page faults
        for rep in range(12):
            dst = rng.choice(blocks, n, replace=False).tolist()  # engine blocks are scattered
            src = rng.choice(chunks, n, replace=False).tolist()
            t0 = time.perf_counter()
            w.submit_load(rep, CPULoadStoreSpec(src), GPULoadStoreSpec(dst, [n], [0]))
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            np.copyto(b, a)
            mem.append(time.perf_counter() - t0)
        w.get_finished()
        nbytes = n * row
        t, m = statistics.median(times[2:]), statistics.median(mem[2:])
        out.append(
            {
                "blocks": n,
                "bytes": nbytes,
                "load_ms": round(1000 * t, 3),
                "load_GBps": round(nbytes / t / 1e9, 2),
                "memcpy_GBps": round(nbytes / m / 1e9, 2),
                "ratio": round(m / t, 2),
            }
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="a,b,c")
    ap.add_argument("--model", default="small", choices=list(SHAPES))
    ap.add_argument("--gpu-blocks", type=int, default=320)
    ap.add_argument("--dram", default="1GiB")
    ap.add_argument("--small-dram", default="32MiB")
    ap.add_argument("--disk-capacity", default="8GiB")
    ap.add_argument("--store-threshold", type=int, default=None, help="disk.store_threshold (default: the tier's own)")
    ap.add_argument("--a-prefixes", type=int, default=4)
    ap.add_argument("--a-len", type=int, default=2048)
    ap.add_argument("--a-warm", type=int, default=2)
    ap.add_argument("--a-return", type=int, default=4)
    ap.add_argument("--a-concurrency", type=int, default=4)
    ap.add_argument("--b-requests", type=int, default=64)
    ap.add_argument("--b-len", type=int, default=2048)
    ap.add_argument("--suffix-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--no-reuse", action="store_true")
    ap.add_argument("--nr-requests", type=int, default=64)
    ap.add_argument("--nr-len", type=int, default=1024)
    ap.add_argument("--copy", action="store_true", help="also measure HostCopyWorker bandwidth (no engine)")
    ap.add_argument("--copy-only", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    OUT.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args), "rows": {}}
    if args.copy or args.copy_only:
        result["copy"] = copy_bandwidth(args.model)
        print(json.dumps(result["copy"], indent=1), flush=True)
    if not args.copy_only:
        model = make_test_model(OUT.parent / "models" / args.model, shape=args.model, seed=0)
        for row in args.rows.split(","):
            logs = OUT / "logs" / f"{args.tag or 'run'}-{row}"
            for d in (OUT / "disk" / "engine0", OUT / "disk" / "engine1"):
                d.mkdir(parents=True, exist_ok=True)
            load0 = load_avg()
            engines, router = start_row(model, row, args, logs)
            try:
                r: dict[str, Any] = {"load_before": load0}
                r["cascade"] = cascade(router.url, engines, args)
                if args.no_reuse and row in ("a", "c"):
                    r["no_reuse"] = no_reuse(router.url, args)
                r["load_after"] = load_avg()
            finally:
                router.stop()
                for e in engines:
                    e.stop()
            result["rows"][row] = r
            c = r["cascade"]
            print(
                f"row {row}: A returning TTFT p50 {c['a_return_ttft_p50_ms']} ms p90 {c['a_return_ttft_p90_ms']} ms, "
                f"{c['throughput_req_s']} req/s, hit {c['return_hit_rate']}, "
                f"no-reuse {r.get('no_reuse', {}).get('req_s')} req/s, load {r['load_before']} -> {r['load_after']}",
                flush=True,
            )
    out = OUT / f"{args.tag or 'result'}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
