"""The benchmark client for ``bench/workloads.py``: sends a :class:`~workloads.Workload` through a
router and measures it, while sampling every engine's queue.

* Turns are offered in the workload's order with at most ``concurrency`` in flight; a turn whose
  session still has a turn in flight waits for it (closed loop per conversation / agent) while the
  next turns of other sessions go ahead (independent users do not wait for each other).
* With ``rate`` (req/s) the turns *arrive* open-loop instead: turn ``i`` is offered at the ``i``-th
  arrival of a seeded Poisson process (``random.Random(seed).expovariate(rate)`` gaps), the same
  times for every router; ``concurrency`` still caps what is in flight (pass a large one to measure
  queueing at the pods rather than at the client). Rate ladders (issue 12) use this.
* Each request is ``POST /v1/completions`` with ``stream: true``, ``max_tokens`` and ``ignore_eos``;
  TTFT is the time to the first SSE chunk carrying text, E2E the time to ``[DONE]``. The pod a request
  went to is read from ``X-LLMD-Pod`` where the router sets it (ours), else left empty.
* Engine load over time: every ``sample_s`` (0.25 s) each engine's ``/metrics`` gives
  ``vllm:num_requests_running`` and ``vllm:num_requests_waiting``. From the samples: the mean
  requests per engine, the mean absolute difference between the two busiest engines, and the
  *idle-while-queued* fraction: samples where some engine had nothing to do (0 running) while another
  had requests waiting or ran at least ``concurrency / engines + 1`` -- work a better placement would
  have moved.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from workloads import Workload


@dataclass
class Result:
    session: str
    start: float
    ttft: float | None
    e2e: float | None
    output_tokens: int
    pod: str
    error: str | None = None


async def _one(http: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int, t0: float) -> Result:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "temperature": 0.0,
    }
    start = time.perf_counter()
    ttft = None
    n = 0
    try:
        async with http.post(url + "/v1/completions", json=body) as r:
            pod = r.headers.get("X-LLMD-Pod", "")
            if r.status != 200:
                return Result("", start - t0, None, None, 0, pod, f"HTTP {r.status}: {(await r.text())[:200]}")
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                for c in chunk.get("choices") or []:
                    # the first token's chunk, even when its text is empty: the detokenizer holds back
                    # text that is not whole yet, and a few of the small test model's greedy answers
                    # (hotprefix r75, r102, r174) stream only empty texts; counting text chunks alone
                    # dropped them from every router's completed requests (189 of 192) until 2026-12-04
                    if ttft is None:
                        ttft = time.perf_counter() - start
                    if c.get("text"):
                        n += 1
        return Result("", start - t0, ttft, time.perf_counter() - start, n, pod)
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
        return Result("", start - t0, None, None, 0, "", f"{type(exc).__name__}: {exc}")


async def _sample(
    http: aiohttp.ClientSession, engines: list[str], period: float, out: list[list[tuple[float, float]]]
) -> None:
    async def one(url: str) -> tuple[float, float]:
        try:
            async with http.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=2)) as r:
                text = await r.text()
        except (aiohttp.ClientError, TimeoutError):
            return (-1.0, -1.0)
        run = wait = 0.0
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "vllm:num_requests_running":
                    run += s.value
                elif s.name == "vllm:num_requests_waiting":
                    wait += s.value
        return (run, wait)

    while True:
        out.append(list(await asyncio.gather(*(one(u) for u in engines))))
        await asyncio.sleep(period)


def load_stats(samples: list[list[tuple[float, float]]], concurrency: int) -> dict[str, Any]:
    ok = [s for s in samples if all(r >= 0 for r, _ in s)]
    if not ok or len(ok[0]) < 2:
        return {"samples": len(ok)}
    n_eng = len(ok[0])
    busy = concurrency / n_eng + 1
    idle_q = 0
    diffs = []
    for s in ok:
        tot = sorted((r + w for r, w in s), reverse=True)
        diffs.append(tot[0] - tot[1])
        if any(r + w == 0 for r, w in s) and any(w > 0 or r >= busy for r, w in s):
            idle_q += 1
    per = [round(statistics.fmean(s[i][0] + s[i][1] for s in ok), 2) for i in range(n_eng)]
    return {
        "samples": len(ok),
        "mean_requests_per_engine": per,
        "mean_abs_diff": round(statistics.fmean(diffs), 2),
        "idle_while_queued": round(idle_q / len(ok), 3),
    }


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    return float(np.percentile(xs, q))  # as vLLM's benchmark client computes its percentiles


async def run(
    workload: Workload,
    router_url: str,
    model: str,
    engines: list[str],
    concurrency: int,
    sample_s: float = 0.25,
    timeout_s: float = 1800,
    rate: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    conn = aiohttp.TCPConnector(limit=concurrency + 2 * len(engines) + 4)
    tmo = aiohttp.ClientTimeout(total=timeout_s)
    results: list[Result] = []
    samples: list[list[tuple[float, float]]] = []
    async with aiohttp.ClientSession(connector=conn, timeout=tmo) as http:
        busy: set[str] = set()
        changed = asyncio.Event()
        inflight = 0
        t0 = time.perf_counter()
        sampler = asyncio.create_task(_sample(http, engines, sample_s, samples))

        async def go(turn: Any) -> None:
            nonlocal inflight
            try:
                r = await _one(http, router_url, model, turn.prompt, turn.max_tokens, t0)
                r.session = turn.session
                results.append(r)
            finally:
                inflight -= 1
                busy.discard(turn.session)
                changed.set()

        # open loop: turn i may start at arrivals[i] (seconds after t0); closed loop: at once
        arrivals: list[float] = []
        if rate:
            rng, t = random.Random(seed), 0.0
            for _ in workload.turns:
                t += rng.expovariate(rate)
                arrivals.append(t)
        pending = list(enumerate(workload.turns))
        tasks = []
        while pending:
            # the earliest offered (arrived) turn whose session has nothing in flight (a user or
            # agent sends its next turn after the previous answer; other sessions' turns go ahead)
            now = time.perf_counter() - t0
            nxt = (
                next(
                    (
                        i
                        for i, (k, t) in enumerate(pending)
                        if t.session not in busy and (not arrivals or arrivals[k] <= now)
                    ),
                    None,
                )
                if inflight < concurrency
                else None
            )
            if nxt is None:
                changed.clear()
                wait_s = None
                if arrivals and inflight < concurrency:
                    due = [arrivals[k] - now for k, _ in pending if arrivals[k] > now]
                    wait_s = min(due) if due else None
                try:
                    await asyncio.wait_for(changed.wait(), wait_s)
                except TimeoutError:
                    pass
                continue
            _, turn = pending.pop(nxt)
            busy.add(turn.session)
            inflight += 1
            tasks.append(asyncio.create_task(go(turn)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        sampler.cancel()
        try:
            await sampler
        except asyncio.CancelledError:
            pass
    good = [r for r in results if r.error is None and r.ttft is not None]
    ttft = [r.ttft * 1000 for r in good if r.ttft is not None]
    e2e = [r.e2e * 1000 for r in good if r.e2e is not None]
    pods: dict[str, int] = {}
    for r in good:
        if r.pod:
            pods[r.pod] = pods.get(r.pod, 0) + 1
    return {
        "completed": len(good),
        "failed": len(results) - len(good),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": round(duration, 2),
        "req_s": len(good) / duration,
        "out_tok_s": sum(r.output_tokens for r in good) / duration,
        "ttft_p50_ms": _pct(ttft, 50),
        "ttft_p90_ms": _pct(ttft, 90),
        "ttft_p99_ms": _pct(ttft, 99),
        "e2e_p50_ms": _pct(e2e, 50),
        "e2e_p90_ms": _pct(e2e, 90),
        "requests_per_pod_router": pods,
        # every answered request's e2e (streamed text or not), against the engines' own e2e
        "e2e_n": sum(r.e2e is not None for r in results),
        "e2e_sum_s": sum(r.e2e for r in results if r.e2e is not None),
        "engine_load": load_stats(samples, concurrency),
        "per_request": [
            {
                "s": r.session,
                "t": round(r.start, 3),
                "ttft": r.ttft and round(r.ttft, 4),
                "e2e": r.e2e and round(r.e2e, 4),
                "pod": r.pod,
            }
            for r in sorted(results, key=lambda r: r.start)
        ],
        "load_samples": samples,
    }
