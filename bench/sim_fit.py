"""Fit the simulator's cost model to a real vLLM CPU engine, then check the fit against it.

For each test-model shape (``small`` 6 x 384, ``wide`` 8 x 768):

1. start one real engine the way ``bench/serving.py`` does (block size 64, 320 blocks,
   max_model_len 4096, pinned to one core) and measure, with a streaming client:
   * cold TTFT vs prompt length (unique random token ids, one request at a time, max_tokens 1),
   * warm TTFT: a cached prefix of P tokens plus S new ones,
   * inter-token latency vs batch size B (B concurrent requests, 64-token prompts, 64 tokens out),
     and at a long context (1024-token prompts),
   * a mixed run: Poisson arrivals of shared-prefix requests (queueing, chunked prefill and decode
     in the same steps), its TTFT percentiles and duration;
2. fit :class:`vllm_llmd.sim.cost.CostModel` by non-negative least squares on relative error, each
   measurement's predicted time being the sum of the cost model's steps the simulator's scheduler
   would run for it (chunks of ``max_num_batched_tokens``), plus ``request_s`` for TTFTs;
3. write the profile ``bench/sim_profiles/cpu-<shape>.yaml``;
4. run the same measurements against ``vllm-llmd sim`` with that profile and report, per point,
   real vs simulated and the relative error, to ``bench/sim_profiles/fit-<shape>.md`` (+ ``.json``).

    flock /tmp/llmd-engine.lock .venv/bin/python bench/sim_fit.py --models small,wide   # ~10 min

The mixed run is not used in the fit: it is the out-of-sample check.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vllm_llmd.sim.cost import FEATURES, CostModel, StepWork  # noqa: E402
from vllm_llmd.testing.engine import EngineProcess, EngineSpec  # noqa: E402
from vllm_llmd.testing.model import make_test_model  # noqa: E402
from vllm_llmd.testing.wait import wait_until  # noqa: E402

OUT = REPO / "bench" / "sim_profiles"
WORK = REPO / "bench" / "out" / "sim_fit"
ENGINE = {"block_size": 64, "num_gpu_blocks": 320, "max_model_len": 4096}
BATCH = 2048  # vLLM's max_num_batched_tokens on the CPU backend (API server)
VOCAB = 4096
COLD = (64, 256, 512, 1024, 1536, 2048, 3072, 4000)
WARM = ((1024, 64), (1024, 512), (2048, 64), (2048, 512), (3072, 128))
ITL = ((1, 64), (2, 64), (4, 64), (8, 64), (16, 64), (32, 64), (1, 1024), (8, 1024))
OUTPUT_LEN = 64
MIXED = {"prefixes": 8, "prefix_len": 1024, "suffix_len": 64, "output_len": 16, "requests": 96, "rate": 2.0}
M = "test-model"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- client


class Client:
    def __init__(self, url: str, seed: int) -> None:
        self.url = url
        self.rng = random.Random(seed)

    def ids(self, n: int) -> list[int]:
        return [self.rng.randrange(10, VOCAB - 10) for _ in range(n)]

    async def stream(self, s: aiohttp.ClientSession, prompt: list[int], max_tokens: int) -> list[float]:
        """Arrival times (s after sending) of each streamed token chunk."""
        body = {"model": M, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
        t0 = time.perf_counter()
        times = []
        async with s.post(self.url + "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.content:
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    if chunk["choices"]:
                        times.append(time.perf_counter() - t0)
        return times

    async def ttft(self, s: aiohttp.ClientSession, prompt: list[int]) -> float:
        await asyncio.sleep(0.2)  # the engine is idle when the request arrives
        return (await self.stream(s, prompt, 1))[0]


async def measure(url: str, reps: int, seed: int) -> dict[str, Any]:
    """Every point ``reps`` times, interleaved (rep 1 of every point, then rep 2, ...), so a burst of
    load from elsewhere on the machine spreads over the points instead of spoiling one of them."""
    c = Client(url, seed)
    res: dict[str, Any] = {"cold": {}, "warm": {}, "itl": {}, "mixed": {}}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        for _ in range(3):  # warm-up, shorter than a block: nothing cached
            await c.stream(s, c.ids(16), 4)
        for rep in range(reps):
            log(f"  repetition {rep + 1}/{reps}")
            for n in COLD:
                res["cold"].setdefault(str(n), []).append(await c.ttft(s, c.ids(n)))
            for p, q in WARM:
                prefix = c.ids(p)
                await c.ttft(s, prefix)
                res["warm"].setdefault(f"{p}+{q}", []).append(await c.ttft(s, prefix + c.ids(q)))
            for b, plen in ITL:
                runs = await asyncio.gather(*(c.stream(s, c.ids(plen), OUTPUT_LEN) for _ in range(b)))
                gaps = res["itl"].setdefault(f"{b}x{plen}", [])
                for t in runs:
                    gaps.extend(np.diff(t[2:]).tolist())  # steady decode: skip the first token gaps
        res["mixed"] = await mixed(c, s)
    return res


async def mixed(c: Client, s: aiohttp.ClientSession) -> dict[str, Any]:
    """Poisson arrivals of shared-prefix requests; out-of-sample check of queueing dynamics."""
    m = MIXED
    rng = random.Random(1234)
    prefixes = [[rng.randrange(10, VOCAB - 10) for _ in range(m["prefix_len"])] for _ in range(m["prefixes"])]
    order = [i % m["prefixes"] for i in range(m["requests"])]
    rng.shuffle(order)
    t_start = time.perf_counter()
    tasks = []
    for k in order:
        prompt = prefixes[k] + [rng.randrange(10, VOCAB - 10) for _ in range(m["suffix_len"])]
        tasks.append(asyncio.create_task(c.stream(s, prompt, m["output_len"])))
        await asyncio.sleep(rng.expovariate(m["rate"]))
    runs = await asyncio.gather(*tasks)
    ttft = sorted(t[0] for t in runs)
    return {
        "ttft_p50": statistics.median(ttft),
        "ttft_p90": ttft[int(0.9 * (len(ttft) - 1))],
        "ttft_mean": statistics.fmean(ttft),
        "duration": time.perf_counter() - t_start,
    }


# ---------------------------------------------------------------------------------------------- fit


def _prefill_features(tokens: int, context: int) -> list[float]:
    """Summed features of the steps that prefill ``tokens`` after ``context`` cached ones, alone."""
    total = np.zeros(len(FEATURES))
    done = 0
    while done < tokens:
        chunk = min(BATCH, tokens - done)
        w = StepWork()
        w.add_prefill(chunk, context + done)
        total += np.array(w.features())
        done += chunk
    return total.tolist()


def design(res: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Rows: features + request_s indicator; targets: median measured seconds."""
    rows, ys, names = [], [], []
    for n, xs in res["cold"].items():
        # a full-prompt hit is impossible here: all n tokens are computed
        rows.append([*_prefill_features(int(n), 0), 1.0])
        ys.append(statistics.median(xs))
        names.append(f"cold {n}")
    for key, xs in res["warm"].items():
        p, q = (int(v) for v in key.split("+"))
        rows.append([*_prefill_features(q, p), 1.0])
        ys.append(statistics.median(xs))
        names.append(f"warm {key}")
    for key, xs in res["itl"].items():
        b, plen = (int(v) for v in key.split("x"))
        w = StepWork()
        for _ in range(b):
            w.add_decode(plen + OUTPUT_LEN // 2)
        rows.append([*w.features(), 0.0])
        ys.append(statistics.median(xs))
        names.append(f"itl {key}")
    return np.array(rows), np.array(ys), names


def nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares on relative error (drop negative coefficients, refit)."""
    w = 1.0 / y
    aw, yw = a * w[:, None], y * w
    active = list(range(a.shape[1]))
    while True:
        coef = np.zeros(a.shape[1])
        sol, *_ = np.linalg.lstsq(aw[:, active], yw, rcond=None)
        coef[active] = sol
        neg = [i for i in active if coef[i] < 0]
        if not neg:
            return coef
        active.remove(min(neg, key=lambda i: coef[i]))


def fit(res: dict[str, Any]) -> CostModel:
    a, y, _ = design(res)
    coef = nnls(a, y)
    params = dict(zip((*FEATURES, "request_s"), (float(x) for x in coef), strict=True))
    return CostModel(**params)


def predict(cost: CostModel, res: dict[str, Any]) -> dict[str, float]:
    a, _, names = design(res)
    coef = np.array([getattr(cost, f) for f in (*FEATURES, "request_s")])
    return dict(zip(names, (a @ coef).tolist(), strict=True))


# ---------------------------------------------------------------------------------------------- runs


def real_engine(shape: str, model_dir: Path, reps: int) -> dict[str, Any]:
    core = 1 if (os.cpu_count() or 1) >= 2 else None
    spec = EngineSpec(model=model_dir, served_model_name=M, **ENGINE, cpu_core=core)
    eng = EngineProcess(spec, WORK / shape / "engine.log")
    log(f"{shape}: starting the real engine")
    eng.start_ready()
    try:
        log(f"{shape}: measuring the real engine")
        return asyncio.run(measure(eng.url, reps, seed=1))
    finally:
        eng.stop()


def simulated(shape: str, profile: Path, reps: int) -> dict[str, Any]:
    d = WORK / shape
    endpoints, out = d / "sim_endpoints.json", d / "sim.out"
    with open(out, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_llmd.cli", "sim", "--profile", str(profile), "--endpoints", str(endpoints)],
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(lambda: b"ready:" in out.read_bytes() or proc.poll() is not None, 120, "the simulator")
        if proc.poll() is not None:
            raise RuntimeError(out.read_text())
        url = json.loads(endpoints.read_text())[0]["url"]
        log(f"{shape}: measuring the simulator")
        return asyncio.run(measure(url, reps, seed=1))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def write_profile(shape: str, cost: CostModel, model_dir: Path) -> Path:
    path = OUT / f"cpu-{shape}.yaml"
    c = cost.model_dump(exclude={"speed"})
    lines = [
        f"# Fitted by bench/sim_fit.py to one vLLM 0.32 CPU engine ({shape} test model, pinned to one core),",
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; fit report: fit-{shape}.md",
        f"model: {M}",
        f"tokenizer: ../out/models/{shape}   # relative to this file; make_test_model writes it",
        "classes:",
        f"  - name: cpu-{shape}",
        "    count: 1",
        "    accelerator: cpu",
        *(f"    {k}: {v}" for k, v in ENGINE.items()),
        f"    max_num_batched_tokens: {BATCH}",
        "    cost:",
        *(f"      {k}: {v:.6g}" for k, v in c.items()),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def report(shape: str, real: dict[str, Any], sim: dict[str, Any], cost: CostModel, load: list[float]) -> str:
    pred = predict(cost, real)
    rows = []
    errors: dict[str, list[float]] = {"cold": [], "warm": [], "itl": []}
    for kind in ("cold", "warm", "itl"):
        for key in real[kind]:
            r = statistics.median(real[kind][key]) * 1000
            s = statistics.median(sim[kind][key]) * 1000
            p = pred[f"{kind} {key}"] * 1000
            err = (s - r) / r * 100
            errors[kind].append(abs(err))
            rows.append(f"| {kind} | {key} | {r:.1f} | {p:.1f} | {s:.1f} | {err:+.0f}% |")
    mixed = []
    for k in ("ttft_p50", "ttft_p90", "ttft_mean", "duration"):
        r, s = real["mixed"][k] * 1000, sim["mixed"][k] * 1000
        mixed.append(f"| {k} | {r:.0f} | {s:.0f} | {(s - r) / r * 100:+.0f}% |")
    summary = ", ".join(f"{k}: median |err| {statistics.median(v):.0f}%, max {max(v):.0f}%" for k, v in errors.items())
    c = cost.model_dump(exclude={"speed"})
    return "\n".join(
        [
            f"# Cost-model fit: {shape} test model",
            "",
            f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average before/after: "
            f"{load[0]} / {load[1]}. Real engine: vLLM 0.32 CPU, block 64, 320 blocks, max_model_len 4096, "
            "pinned to one core. Times are medians over the repetitions (ITL: over all steady-state gaps).",
            "",
            "Fitted coefficients: " + ", ".join(f"`{k}` = {v:.4g}" for k, v in c.items()),
            "",
            f"Error of the simulator against the real engine ({summary}).",
            "",
            "| kind | point | real ms | model ms | simulator ms | sim vs real |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            f"Out-of-sample mixed run (not fitted): {MIXED}",
            "",
            "| metric | real ms | simulator ms | sim vs real |",
            "|---|---|---|---|",
            *mixed,
            "",
        ]
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="small,wide")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--refit-only", action="store_true", help="fit and check again from the saved real measurements")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for shape in [m for m in args.models.split(",") if m]:
        (WORK / shape).mkdir(parents=True, exist_ok=True)
        model_dir = make_test_model(REPO / "bench" / "out" / "models" / shape, shape=shape)
        load0 = round(os.getloadavg()[0], 2)
        saved = WORK / shape / "real.json"
        if args.refit_only and saved.exists():
            real = json.loads(saved.read_text())
        else:
            real = real_engine(shape, model_dir, args.reps)
            saved.write_text(json.dumps(real))
        cost = fit(real)
        log(f"{shape}: fitted {cost.model_dump(exclude={'speed'})}")
        profile = write_profile(shape, cost, model_dir)
        sim = simulated(shape, profile, args.reps)
        # the simulator's own HTTP path adds to every TTFT what request_s already holds: take it out once
        pred = predict(cost, real)
        extra = statistics.median(
            statistics.median(sim[k][key]) - pred[f"{k} {key}"] for k in ("cold", "warm") for key in real[k]
        )
        if extra > 0.001:
            cost = cost.model_copy(update={"request_s": max(0.0, cost.request_s - extra)})
            log(f"{shape}: simulator overhead {extra * 1000:.1f} ms taken off request_s; measuring again")
            profile = write_profile(shape, cost, model_dir)
            sim = simulated(shape, profile, args.reps)
        load1 = round(os.getloadavg()[0], 2)
        text = report(shape, real, sim, cost, [load0, load1])
        (OUT / f"fit-{shape}.md").write_text(text)
        (OUT / f"fit-{shape}.json").write_text(json.dumps({"real": real, "sim": sim, "cost": cost.model_dump()}))
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
