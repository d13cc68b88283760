"""Quickstart: two real vLLM CPU engines with the vllm-llmd plugin, the vllm-llmd router in front,
real shared-prefix traffic, and a report of where each request went and what the cache saved."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vllm_llmd.testing.engine import EngineProcess, EngineSpec, free_port
from vllm_llmd.testing.model import make_test_model

WORDS = "kari tone musa lovi stra ion ent verdor qua pre lum dor ix ar el om".split()


def prefix_text(k: int, words: int = 500) -> str:
    return " ".join(WORDS[(k * 5 + i * (k + 3)) % len(WORDS)] + str((k + i) % 89) for i in range(words))


def stream_completion(base: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion through the router: TTFT, pod, predicted and engine-reported cache hits."""
    body = {
        "model": "test-model",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    req = urllib.request.Request(
        base + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    ttft = None
    usage: dict = {}
    text: list[str] = []
    with urllib.request.urlopen(req, timeout=300) as r:
        pod = r.headers.get("X-LLMD-Pod", "?")
        predicted = int(r.headers.get("X-LLMD-Predicted-Cached-Tokens", "0"))
        for raw in r:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk.get("choices"):
                ttft = time.perf_counter() - t0
            text.extend(c.get("text", "") for c in chunk.get("choices") or [])
            usage = chunk.get("usage") or usage
    details = usage.get("prompt_tokens_details") or {}
    return {
        "pod": pod,
        "ttft_ms": 1000 * (ttft or 0.0),
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "predicted": predicted,
        "reported": details.get("cached_tokens", 0) or 0,
        "text": "".join(text),
    }


def wait_healthy(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become healthy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", type=Path, default=None, help="where the model and logs go (default: a temp dir)")
    ap.add_argument("--prefixes", type=int, default=4, help="distinct shared prefixes (~1000 tokens each)")
    ap.add_argument("--per-prefix", type=int, default=4, help="requests per prefix")
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="llmd-quickstart-"))
    print(f"[quickstart] work dir: {work}")
    model = make_test_model(work / "model", shape="tiny")
    print(f"[quickstart] test model written to {model} (random weights, local tokenizer)")
    engines = [
        EngineProcess(
            EngineSpec(model=model, block_size=64, extra_args=["--enable-prompt-tokens-details"]),
            work / f"engine-{i}.log",
        )
        for i in range(2)
    ]
    router: subprocess.Popen[bytes] | None = None
    try:
        t0 = time.monotonic()
        with ThreadPoolExecutor(2) as pool:  # a start that hangs is retried (EngineProcess.start_ready)
            list(pool.map(lambda e: e.start_ready(), engines))
        print(f"[quickstart] 2 engines ready in {time.monotonic() - t0:.0f}s: {[e.url for e in engines]}")
        port = free_port()
        cmd = [sys.executable, "-m", "vllm_llmd.cli", "router", "--port", str(port), "--tokenizer", str(model)]
        cmd += ["--model", "test-model"]
        for e in engines:
            cmd += ["--worker", f"{e.url}={e.spec.events_endpoint},{e.spec.replay_endpoint}"]
        print("[quickstart] router:", " ".join(cmd[2:]))
        with open(work / "router.log", "wb") as log:
            router = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base)
        # round by round: every prefix once, then again... (the first round is cold everywhere)
        prompts = [
            (k, prefix_text(k) + f" question {r} about item {k}")
            for r in range(args.per_prefix)
            for k in range(args.prefixes)
        ]
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(lambda kp: (kp[0], stream_completion(base, kp[1], 16)), prompts))
        print(
            "\n| # | prefix | pod | prompt tokens | TTFT ms | predicted cached | engine-reported cached | completion |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for i, (k, r) in enumerate(results):
            print(
                f"| {i} | {k} | {r['pod']} | {r['prompt_tokens']} | {r['ttft_ms']:.0f} "
                f"| {r['predicted']} | {r['reported']} | {r['text'][:28]!r} |"
            )
        pods_per_prefix = {k: sorted({r["pod"] for kk, r in results if kk == k}) for k in range(args.prefixes)}
        pred = sum(r["predicted"] for _, r in results)
        rep = sum(r["reported"] for _, r in results)
        total = sum(r["prompt_tokens"] for _, r in results)
        print(f"\n[quickstart] pods per prefix: {pods_per_prefix}")
        print(f"[quickstart] prompt tokens {total}: predicted cached {pred}, engine-reported cached {rep}")
        cold = [r["ttft_ms"] for _, r in results[: args.prefixes]]
        warm = [r["ttft_ms"] for _, r in results[args.prefixes :]]
        if warm:
            print(f"[quickstart] mean TTFT cold {sum(cold) / len(cold):.0f} ms, warm {sum(warm) / len(warm):.0f} ms")
        print(f"[quickstart] router metrics: {base}/metrics (logs in {work})")
    finally:
        if router is not None:
            router.terminate()
            router.wait(10)
        for e in engines:
            e.stop()


if __name__ == "__main__":
    main()
