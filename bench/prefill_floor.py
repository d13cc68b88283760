"""The fewest prompt tokens any router can have the engines prefill for a workload, and how far each
measured run was above it.

The floor: one engine with an unbounded prefix cache, serving the workload's requests in the order
they are offered. A request's prompt is cached up to the longest prefix it shares with an earlier
request, cut to whole blocks and to at most ``len - 1`` tokens (vLLM 0.32
``vllm/v1/core/kv_cache_manager.py`` ``get_computed_blocks``: a full hit still computes the last
token, and only full blocks are cached), and the rest is prefilled. More pods cannot go below it
(a prefix must be computed once somewhere; a peer load or a DRAM load moves KV, it computes nothing),
nor can another order of the same requests by more than the partial blocks: a session's turns come
in order, and a shared prefix is computed once whichever request brings it first. Prompts are
tokenized as the engines do for ``/v1/completions`` (the generated test model adds no BOS:
``vllm_llmd/testing/model.py``).

The measured figure is the engines' ``vllm:request_prefill_kv_computed_tokens_sum`` over the run
(``bench/serving.py``), which counts neither engine-cache hits nor tokens loaded by a connector.

    .venv/bin/python bench/prefill_floor.py --workload zipf --results bench/out/zipf-tiers4.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from serving import ENGINE_BLOCK_SIZE
from workloads import GENERATORS, build

from vllm_llmd.testing.model import make_test_model


class _Trie:
    """Token-id trie of every prompt seen; ``longest`` is the longest common prefix with any of them."""

    def __init__(self) -> None:
        self.root: dict[int, dict] = {}

    def longest(self, ids: list[int]) -> int:
        node, n = self.root, 0
        for t in ids:
            nxt = node.get(t)
            if nxt is None:
                break
            node, n = nxt, n + 1
        return n

    def add(self, ids: list[int]) -> None:
        node = self.root
        for t in ids:
            node = node.setdefault(t, {})


def floor_tokens(prompts: list[list[int]], block: int) -> int:
    """Sum over requests of ``len - cached``, ``cached = min(lcp, len - 1) // block * block``."""
    trie, total = _Trie(), 0
    for ids in prompts:
        cached = min(trie.longest(ids), len(ids) - 1) // block * block
        total += len(ids) - cached
        trie.add(ids)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", required=True, choices=sorted(GENERATORS))
    ap.add_argument("--model", default="wide", choices=("small", "wide"))
    ap.add_argument("--block", type=int, default=ENGINE_BLOCK_SIZE, help="the engines' KV block size")
    ap.add_argument("--results", type=Path, help="an alternating.py results file of this workload")
    args = ap.parse_args()
    out = Path(__file__).resolve().parent / "out" / "models" / args.model
    wl, tm = build(args.workload, make_test_model(out, shape=args.model))
    prompts = [tm.tok.encode(t.prompt).ids for t in wl.turns]
    total = sum(len(p) for p in prompts)
    floor = floor_tokens(prompts, args.block)
    head = f"{args.workload} ({args.model} tokenizer, block {args.block})"
    print(f"{head}: {len(prompts)} requests, {total:,} prompt tokens")
    share = floor / total
    print(f"  floor: {floor:,} tokens prefilled ({share:.3f} of the prompt tokens; hit rate <= {1 - share:.3f})")
    if args.results:
        data = json.loads(args.results.read_text())
        if data.get("workload") != args.workload:
            raise SystemExit(f"{args.results} holds workload {data.get('workload')!r}, not {args.workload!r}")
        for r in data["runs"]:
            if "prefill_tokens" in r:
                p = r["prefill_tokens"]
                print(f"  {r['router']:<20} {p:>9,.0f} prefilled ({p / floor:.3f}x the floor), {r['req_s']:.2f} req/s")


if __name__ == "__main__":
    main()
