"""Quickstart: two real vLLM CPU engines with the vllm-llmd plugin, real requests, a report."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vllm_llmd.testing.engine import EngineProcess, EngineSpec
from vllm_llmd.testing.model import make_test_model


def complete(url: str, prompt: str, max_tokens: int) -> tuple[dict, float]:
    body = json.dumps({"model": "test-model", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    req = urllib.request.Request(
        url + "/v1/completions", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        out = json.loads(r.read())
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", type=Path, default=None, help="where the model and logs go (default: a temp dir)")
    ap.add_argument("--requests", type=int, default=8)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="llmd-quickstart-"))
    print(f"[quickstart] work dir: {work}")
    model = make_test_model(work / "model", shape="tiny")
    print(f"[quickstart] test model written to {model} (random weights, local tokenizer)")
    engines = [
        EngineProcess(EngineSpec(model=model, block_size=64, cpu_core=i), work / f"engine-{i}.log") for i in range(2)
    ]
    try:
        t0 = time.monotonic()
        for e in engines:
            e.start()
        for e in engines:
            e.wait_ready()
        print(f"[quickstart] 2 engines ready in {time.monotonic() - t0:.0f}s: {[e.url for e in engines]}")
        prefixes = ["Kari tone musa lovi " * 40, "Stra ion ent verdor " * 40]
        jobs = [(engines[i % 2].url, prefixes[i % 2] + f" question {i}") for i in range(args.requests)]
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda j: (j[0], *complete(j[0], j[1], 16)), jobs))
        print("\n| # | engine | prompt tokens | completion | latency s |")
        print("|---|---|---|---|---|")
        for i, (url, out, dt) in enumerate(results):
            text = out["choices"][0]["text"].replace("\n", " ")[:40]
            print(f"| {i} | {url} | {out['usage']['prompt_tokens']} | {text!r} | {dt:.2f} |")
    finally:
        for e in engines:
            e.stop()


if __name__ == "__main__":
    main()
