"""A small load generator for the tier benchmarks: token-id prompts, streamed completions, TTFT.

Shared by ``bench_idle_connector.py`` and ``bench_tiers.py``. Prompts are lists of token ids (no
tokenizer in the loop, so block boundaries are exact); each request streams, so the time to the
first token is measured at the client. ``run`` keeps ``concurrency`` requests in flight.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

VOCAB = 4096  # the generated test models' vocabulary


def random_tokens(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(10, VOCAB - 10) for _ in range(n)]


@dataclass
class Result:
    ttft_s: float
    e2e_s: float
    tokens: int
    tag: str = ""


@dataclass
class RunStats:
    wall_s: float
    results: list[Result] = field(default_factory=list)

    @property
    def req_s(self) -> float:
        return len(self.results) / self.wall_s if self.wall_s else 0.0

    def ttft(self, q: float, tag: str | None = None) -> float | None:
        xs = sorted(r.ttft_s for r in self.results if tag is None or r.tag == tag)
        if not xs:
            return None
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]

    def summary(self) -> dict[str, Any]:
        return {
            "requests": len(self.results),
            "wall_s": round(self.wall_s, 3),
            "req_s": round(self.req_s, 3),
            "ttft_p50_ms": _ms(self.ttft(0.5)),
            "ttft_p90_ms": _ms(self.ttft(0.9)),
            "e2e_mean_ms": _ms(statistics.fmean(r.e2e_s for r in self.results)) if self.results else None,
        }


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 1)


async def _one(
    session: aiohttp.ClientSession, url: str, model: str, prompt: Sequence[int], max_tokens: int, tag: str
) -> Result:
    body = {
        "model": model,
        "prompt": list(prompt),
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    t0 = time.perf_counter()
    ttft = None
    n = 0
    async with session.post(url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for raw in r.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                n += 1
    e2e = time.perf_counter() - t0
    return Result(ttft if ttft is not None else e2e, e2e, n, tag)


async def _run(
    url: str, model: str, prompts: Sequence[tuple[Sequence[int], str]], max_tokens: int, concurrency: int
) -> RunStats:
    queue: asyncio.Queue[tuple[Sequence[int], str]] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[Result] = []
    timeout = aiohttp.ClientTimeout(total=900)

    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def worker() -> None:
            while True:
                try:
                    prompt, tag = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await _one(session, url, model, prompt, max_tokens, tag))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return RunStats(wall, results)


def run(
    url: str, model: str, prompts: Sequence[tuple[Sequence[int], str]], max_tokens: int, concurrency: int
) -> RunStats:
    """Send ``prompts`` (token ids, tag) with ``concurrency`` in flight; streamed; returns timings."""
    return asyncio.run(_run(url, model, prompts, max_tokens, concurrency))


def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url + "/metrics", timeout=60).read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("engine", "model_name")))
            out[(s.name, labels)] = out.get((s.name, labels), 0.0) + s.value
    return out


def metric(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    want = tuple(sorted(labels.items()))
    return sum(v for (n, ls), v in m.items() if n == name and all(x in ls for x in want))


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds (user + system) used so far by every process in a process group."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    try:
        pids = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return float("nan")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return total


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
