"""Router decision cost (tokenize + hash + index lookup + schedule) per request, in-process, with
N pods' worth of KV event index entries; no HTTP. Prints CPU ms per request and wall p50/p99.

    .venv/bin/python bench/bench_router_decision.py --pods 100 --prefixes-per-pod 40
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

from vllm_llmd.router.config import RouterConfig
from vllm_llmd.router.request import COMPLETIONS, ClientRequest
from vllm_llmd.router.server import build_router
from vllm_llmd.testing.model import make_test_model
from vllm_llmd.wire.kv_events import BlockStored, encode_batch, seq_to_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pods", type=int, default=100)
    ap.add_argument("--prefixes-per-pod", type=int, default=40)
    ap.add_argument("--prefix-tokens", type=int, default=2048)
    ap.add_argument("--suffix-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--chunk-chars", type=int, default=None, help="tokenizer.prefix_cache_chunk_chars")
    args = ap.parse_args()
    model = make_test_model(Path(tempfile.mkdtemp(prefix="llmd-decision-")) / "small", shape="small")
    pods = [{"url": f"http://10.0.{i // 250}.{i % 250}:8000", "events": "tcp://127.0.0.1:1"} for i in range(args.pods)]
    tok_cfg: dict[str, object] = {"path": str(model)}
    if args.chunk_chars is not None:
        tok_cfg["prefix_cache_chunk_chars"] = args.chunk_chars
    router = build_router(RouterConfig.model_validate({"pods": pods, "tokenizer": tok_cfg}))
    assert router.tokenizer is not None and router.index is not None
    tok = router.tokenizer._tok
    rng = random.Random(0)
    pool = [[rng.randrange(10, 4000) for _ in range(args.prefix_tokens)] for _ in range(400)]
    t0 = time.perf_counter()
    for i, pod in enumerate(router.pool.pods):
        for j in range(args.prefixes_per_pod):
            toks = pool[(i * 7 + j) % len(pool)]
            ev = BlockStored(
                block_hashes=list(range(j * 1000, j * 1000 + len(toks) // 64)),
                parent_block_hash=None,
                token_ids=toks,
                block_size=64,
                lora_id=None,
                medium="GPU",
                lora_name=None,
            )
            router.index.ingest(pod.id, [f"kv@{pod.id}@test-model".encode(), seq_to_bytes(j + 1), encode_batch([ev])])
    print(f"indexed {router.index.stats().blocks} blocks for {args.pods} pods in {time.perf_counter() - t0:.1f}s")
    texts = [tok.decode(p) for p in pool[:16]]
    prompts = [
        texts[i % 16] + tok.decode([rng.randrange(10, 4000) for _ in range(args.suffix_tokens)])
        for i in range(args.requests)
    ]
    print(f"prompt ~{len(prompts[0])} characters")
    cands = router.pool.pods

    split = [0.0, 0.0]  # CPU seconds in stage 2 (tokens, keys) and stage 3 (candidates, schedule)

    async def one(p: str) -> None:
        # stages 2 and 3 of the request path (vllm_llmd/router/proxy.py): tokens and keys, then scheduling
        t0 = time.process_time()
        creq = ClientRequest(COMPLETIONS, {"prompt": p}, b"", "test-model", 16, None, prompt_text=p)
        req = await router.prompts.build(creq, len(p))
        t1 = time.process_time()
        router.scheduler.schedule(req, router.candidates.of(cands))
        split[0] += t1 - t0
        split[1] += time.process_time() - t1

    async def run() -> tuple[list[float], float]:
        for p in prompts[:100]:
            await one(p)
        lat = []
        split[:] = [0.0, 0.0]
        c0 = time.process_time()
        for p in prompts[100:]:
            t = time.perf_counter()
            await one(p)
            lat.append(time.perf_counter() - t)
        return lat, time.process_time() - c0

    lat, cpu = asyncio.run(run())
    lat.sort()
    n = len(lat)
    print(
        f"decision over {args.pods} pods: CPU {1e3 * cpu / n:.3f} ms/request (~{n / cpu:.0f} decisions/s/core), "
        f"wall p50 {1e3 * lat[n // 2]:.3f} ms, p99 {1e3 * lat[int(n * 0.99)]:.3f} ms"
    )
    tk = router.tokenizer
    print(
        f"  CPU: tokens+keys {1e6 * split[0] / n:.0f} us + schedule {1e6 * split[1] / n:.0f} us; wall mean "
        f"{1e6 * sum(lat) / n:.0f} us; "
        f"tokenizer prefix cache {tk.cache_hits} hits, {tk.cache_misses} misses"
    )


if __name__ == "__main__":
    main()
