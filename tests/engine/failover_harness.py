"""Streams and the kill moment for the failover tests (router and gateway), shared so both tests pick
their victim the same way.

The victim is whichever engine is streaming when the moment comes, not a fixed one: after the
gateway's failover test restarted engine ``a`` (cold cache) the router's test sent all 36 requests,
whose 4 prefixes engine ``b`` had cached, to ``b``, and a fixed victim ``a`` never streamed (CI,
2026-12-03: 120 s waited). Which pod the router prefers is its business; the test is about the kill.

The victim must still be generating when the kill lands, and what the client has received says
little about that: the client lags the engine (through the gateway every chunk of a stream passes
the picker, ``STREAMED`` response mode), and in CI (2026-12-05) a 96-token stream caught with at
most 48 received had already ended on the engine when it was killed, so nothing broke. So two
*anchor* streams of ``ANCHOR_TOKENS`` run beside the short ones and the victim is a pod with an
anchor caught at most half through: hundreds of tokens (seconds) are left on the engine, eight
times the lag that was enough to miss the kill."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from router_harness import pod_id, prose

from vllm_llmd.testing.engine import EngineProcess
from vllm_llmd.testing.wait import wait_until_async

MAX_TOKENS = 96  # the short streams
#: the router's pool settings in both failover tests. A dead pod refuses at once, so two checks 0.2 s
#: apart take it out; the long timeout is for the live one: once (2026-12-05, right after a CI run on
#: this 2-core host) the survivor failed two 2 s checks too (why was not logged then; the router's
#: warning says it now), and a request found no pod
POOL = {"health_interval_s": 0.2, "failure_threshold": 2, "health_timeout_s": 10}
ANCHOR_TOKENS = 768  # the anchor streams: seconds of generation left when one is caught half through


@dataclass
class Outcome:
    i: int
    started: bool = False  # see stream_one's started_on_headers
    ok: bool = False  # the stream ended with [DONE]
    max_tokens: int = MAX_TOKENS
    finished: bool = False  # the client is done with it (answered, broken or refused)
    events: int = 0  # SSE events received (of max_tokens + 1)
    pod: str = ""
    error: str = ""


async def stream_one(
    s: aiohttp.ClientSession,
    base: str,
    i: int,
    *,
    prefix_seed: int | None = None,
    live: list[Outcome] | None = None,
    started_on_headers: bool = False,
    max_tokens: int = MAX_TOKENS,
) -> Outcome:
    """One streamed completion. ``started`` means the first body byte reached the client, or with
    ``started_on_headers`` (Envoy forwards a pod's headers at admission) a 200 status line."""
    o = Outcome(i, max_tokens=max_tokens)
    if live is not None:
        live.append(o)
    body = {
        "model": "test-model",
        "prompt": prose(i % 4 if prefix_seed is None else prefix_seed, 200) + f" request {i}",
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
    }
    try:
        async with s.post(base + "/v1/completions", json=body) as r:
            o.pod = r.headers.get("x-llmd-pod", "")
            if r.status != 200:
                o.error = f"HTTP {r.status}: {await r.text()}"
                return o
            o.started = started_on_headers
            data = b""
            async for chunk in r.content.iter_any():
                o.started = True
                data += chunk
                o.events += chunk.count(b"data: ")
            o.ok = data.rstrip().endswith(b"data: [DONE]")
    except (TimeoutError, aiohttp.ClientError) as e:
        o.error = f"{type(e).__name__}: {e}"
    finally:
        o.finished = True
    return o


def streaming_engine(live: list[Outcome], engines: tuple[EngineProcess, ...]) -> EngineProcess | None:
    """The engine to kill now, if any: it has served a request and streams an anchor with at most half
    its tokens received. Killed between its streams, the health checks could take it out
    before any request met it (CI, 2026-12-03); a short stream can end on the engine before the kill
    lands (module docstring)."""
    for engine in engines:
        mine = [o for o in live if o.pod == pod_id(engine)]
        caught = [o for o in mine if o.max_tokens == ANCHOR_TOKENS and not o.finished]
        if any(o.ok for o in mine) and any(0 < o.events <= ANCHOR_TOKENS // 2 for o in caught):
            return engine
    return None


def spread(live: list[Outcome]) -> str:
    """Where the requests went so far, for a failure message."""
    return ", ".join(f"{pod or '-'}: {n}" for pod, n in Counter(o.pod for o in live).items()) or "nothing sent"


# one streamed request: (request number, prefix seed or None, the list it registers itself in, max_tokens)
Send = Callable[[int, int | None, list[Outcome] | None, int], Awaitable[Outcome]]


@dataclass
class KilledRun:
    victim: EngineProcess
    survivor: EngineProcess
    killed_after: int  # requests finished when the kill came
    results: list[Outcome]


async def kill_one_mid_stream(send: Send, engines: tuple[EngineProcess, EngineProcess]) -> KilledRun:
    """36 short streams, 6 at a time, over 4 prefixes, and two anchor streams beside them; kill the
    engine caught mid-anchor; wait for all 38. On an error after the kill the victim is restarted
    before the error propagates."""
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(6)
    done: list[Outcome] = []
    live: list[Outcome] = []

    async def run(i: int) -> Outcome:
        async with sem:
            o = await send(i, None, live, MAX_TOKENS)
            done.append(o)
            return o

    async def anchor(i: int) -> Outcome:
        o = await send(i, None, live, ANCHOR_TOKENS)
        done.append(o)
        return o

    tasks = [asyncio.create_task(anchor(i)) for i in (36, 37)] + [asyncio.create_task(run(i)) for i in range(36)]
    victim = await wait_until_async(
        lambda: streaming_engine(live, engines) or all(t.done() for t in tasks),
        120,
        "an engine served a request and streams an anchor",
        interval=0.005,
    )
    assert not isinstance(victim, bool), f"no engine was caught mid-stream; requests went to {spread(live)}"
    survivor = engines[1] if victim is engines[0] else engines[0]
    print(f"failover: killing {pod_id(victim)} after requests went to {spread(live)}")
    killed_after = len(done)
    try:
        await loop.run_in_executor(None, victim.kill)
        results = await asyncio.gather(*tasks)
    except BaseException:
        await loop.run_in_executor(None, victim.start_ready)
        raise
    return KilledRun(victim, survivor, killed_after, results)


async def restarted_engine_gets_traffic(send: Send, victim: EngineProcess, timeout: float = 60) -> bool:
    """Bursts of 6 new prefixes (cold on both engines) until one lands on the restarted ``victim``.
    One request at a time on an idle pool always goes to the pod the cost prefers when nothing else
    differs (CI, 2026-12-03: 60 s of single requests all went to the survivor, whose cached candidate
    kept a stale slow speed for the restarted pod: fixed in vllm_llmd.router.candidates, unit test in
    tests/unit/test_router_speed.py); with a burst the survivor's queue counts, as with traffic."""
    deadline = time.monotonic() + timeout
    i = 1000
    while time.monotonic() < deadline:
        burst = await asyncio.gather(*(send(i + k, i + k, None, MAX_TOKENS) for k in range(6)))
        assert all(o.ok for o in burst), burst
        if any(o.pod == pod_id(victim) for o in burst):
            return True
        i += 6
    return False
