"""Cost of the re-layout on receive (connectors/relayout.py ``relayout_into``) against a memcpy.

A cross-layout hand-off reads the prefill engine's blocks as they are into a receive slot (one NIXL
READ; bench_kv_transfer.py measures that part) and then copies the slot into the decode engine's own
blocks, converting byte order and block size. This times that copy, on host memory, for:

- ``cpu32->cpu128``: the engine test's pair (tiny model: 2 layers, 2 KV heads, head size 64, bf16),
  packed as vLLM's CPU kernel packs it on this machine (AMX tiles on a Xeon with AMX);
- ``gpu16->npu1024``: a Llama-3-8B-like geometry (32 layers, 8 KV heads, head size 128, bf16) from a
  FlashAttention cache (``[B, H, S, 2D]``, 16-token blocks) into vllm-rbln's ``[B, 2, H, 1, S, D]``
  (1024-token blocks): the GPU -> NPU hand-off (on an NPU the destination is device memory; here it
  is host memory, so this is the host side of that copy only);
- ``npu1024->gpu16``: the reverse.

"memcpy" is ``torch.Tensor.copy_`` of a contiguous buffer of the same size (best of N); "relayout"
is best and median of N. Block ids are scattered on both sides. Prints the load average: numbers
taken while other work runs on the machine are noisy; repeat before quoting them.

    .venv/bin/python bench/bench_relayout.py --tokens 2048 --reps 5
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time

import numpy as np
import torch
from vllm_llmd.connectors.cpu_probe import amx_packing, vec_packing
from vllm_llmd.connectors.layout import plan_tokens, read_descriptors, slot_bytes
from vllm_llmd.connectors.relayout import RecvPool, describe, kv_views, relayout_into

from vllm_llmd.testing.fakes.rbln import fake_rbln_kv_caches

CASES = {
    # name: (layers, kv heads, head size, (src kind, src block), (dst kind, dst block))
    "cpu32->cpu128": (2, 2, 64, ("cpu", 32), ("cpu", 128)),
    "gpu16->npu1024": (32, 8, 128, ("cuda", 16), ("rbln", 1024)),
    "npu1024->gpu16": (32, 8, 128, ("rbln", 1024), ("cuda", 16)),
}


def cache(kind: str, layers: int, blocks: int, heads: int, bs: int, d: int) -> tuple[str, list[torch.Tensor]]:
    if kind == "rbln":
        caches = fake_rbln_kv_caches(layers, blocks, heads, bs, d)
    else:
        caches = {f"l{i}": torch.zeros(blocks, heads, bs, 2 * d, dtype=torch.bfloat16) for i in range(layers)}
    shape = {"num_blocks": blocks, "num_kv_heads": heads, "head_size": d, "block_size": bs}
    packing = (amx_packing if torch.cpu._is_amx_tile_supported() else vec_packing)(bs, d)
    return kv_views(caches, **shape, device_kind=kind, cpu_packing=packing)


def run(name: str, tokens: int, reps: int) -> dict[str, float]:
    layers, heads, d, (sk, sbs), (dk, dbs) = CASES[name]
    rng = np.random.default_rng(0)
    n_src, n_dst = -(-tokens // sbs), -(-tokens // dbs)
    skind, src = cache(sk, layers, n_src + 2, heads, sbs, d)
    for pair in src:
        for half in pair:
            half.normal_()
    remote = describe(src, skind)
    _, dst = cache(dk, layers, n_dst + 2, heads, dbs, d)
    plan = plan_tokens(
        rng.permutation(n_src + 2)[:n_src].tolist(), sbs, rng.permutation(n_dst + 2)[:n_dst].tolist(), dbs, 0, tokens
    )
    need = slot_bytes(remote, len(plan.remote_blocks))
    pool = RecvPool(torch.empty(need, dtype=torch.uint8))
    local, runs = read_descriptors(remote, plan.remote_blocks, pool.base)
    slot = pool.view(0, need)
    # fill the slot as the READ would (not timed)
    for (la, n), (ra, _) in zip(local.tolist(), runs.tolist(), strict=True):
        ctypes.memmove(la, ra, n)
    plain_dst = torch.empty_like(slot)
    memcpy, relay = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        plain_dst.copy_(slot)
        memcpy.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        relayout_into(slot, remote, plan, dst)
        relay.append(time.perf_counter() - t0)
    gb = need / 1e9
    return {
        "MiB": need / 2**20,
        "descs": len(runs),
        "memcpy GB/s": gb / min(memcpy),
        "relayout best GB/s": gb / min(relay),
        "relayout median GB/s": gb / statistics.median(relay),
        "relayout best ms": 1e3 * min(relay),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()}, torch threads 1, {args.tokens} tokens, best/median of {args.reps}")
    print("| case | MiB | read descs | memcpy GB/s | relayout best GB/s | relayout median GB/s | relayout best ms |")
    print("|---|---|---|---|---|---|---|")
    for name in args.cases:
        r = run(name, args.tokens, args.reps)
        print(
            f"| {name} | {r['MiB']:.1f} | {r['descs']} | {r['memcpy GB/s']:.2f} | {r['relayout best GB/s']:.2f} "
            f"| {r['relayout median GB/s']:.2f} | {r['relayout best ms']:.1f} |"
        )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
