"""Learned pod speeds on the benchmark's 20-pod, 3-class fleet, in virtual time (issue 13).

Stand-in pods: the fleet simulator's engines (:class:`vllm_llmd.sim.engine.SimEngine`: vLLM's
scheduler with chunked prefill over the simulated KV cache, timed by the cost model of
``bench/sim_profiles/fleet-3class.yaml``), stepped by a discrete-event loop instead of the wall
clock, so the test takes a second and no load on the machine changes its outcome. A stand-in router
feeds :class:`~vllm_llmd.router.speed.SpeedEstimator` exactly what :class:`~vllm_llmd.router.attempt.Attempt`
would: its own uncached tokens, the work queued on the pod when the request was sent (the
router-tracked queue, :func:`vllm_llmd.pd.load.queued_tokens`), the time to the first token (the
engine's plus ``request_s``), the decode events and their duration. It deals new prefixes to the
pods in turn (a speed-blind placement: the slow pods get long queues, the case that misled the
estimator) and keeps a prefix's later requests where it went; the caches are reset between the two
steps, as ``bench/sim_fleet.py`` does.

The truth is the profile's ``speed``: fast 0.8, medium 0.4, slow 0.2, i.e. 2 / 1 / 0.5 relative to
the median (medium) pod. Counting every sample's whole queue as its wait, ``prior_samples: 8`` and
forgetting a pod at every cache reset learned 1.2-1.3 / 1.0 / 0.83-0.92 in the benchmark
(bench/RESULTS.md) and 1.31 / 1.02 / 0.86 here.
"""

from __future__ import annotations

import asyncio
import heapq
import random
from pathlib import Path

import pytest
import yaml

from vllm_llmd.pd.load import DECODE_TOKEN_WEIGHT, queued_tokens
from vllm_llmd.router.config import SpeedConfig
from vllm_llmd.router.speed import AttemptTiming, SpeedEstimator
from vllm_llmd.sim.cost import CostModel
from vllm_llmd.sim.engine import SimEngine, SimRequest, Status
from vllm_llmd.sim.profile import PodProfile

PROFILE = Path(__file__).parents[2] / "bench" / "sim_profiles" / "fleet-3class.yaml"
PREFIX, SUFFIX, OUTPUT = 2048, 64, 32
TRUTH = {"fast": 2.0, "medium": 1.0, "slow": 0.5}


def fleet() -> list[tuple[str, str, SimEngine]]:
    prof = yaml.safe_load(PROFILE.read_text())
    base = CostModel(**prof["defaults"]["cost"])
    pods = []
    for c in prof["classes"]:
        p = PodProfile(
            name=c["name"],
            block_size=c["block_size"],
            num_gpu_blocks=c["num_gpu_blocks"],
            max_num_batched_tokens=prof["defaults"]["max_num_batched_tokens"],
            kv_events=False,
            cost=base.scaled(c["cost"]["speed"]),
        )
        pods += [(f"{c['name']}{i}", c["name"], SimEngine(p, "m", list(range(100, 200)))) for i in range(c["count"])]
    return pods


async def run_fleet(est: SpeedEstimator, rate: float, requests: int, steps: int, seed: int) -> dict[str, int]:
    """Poisson arrivals over 48 prefixes, ``steps`` steps with the caches reset in between; returns
    requests per class; new prefixes are dealt to the pods in turn."""
    rng = random.Random(seed)
    pods = fleet()
    engines = {pid: eng for pid, _, eng in pods}
    cls = {pid: c for pid, c, _ in pods}
    est.set_pods(dict.fromkeys(engines, 1.0))
    queue: list[tuple[float, int, str, object]] = []
    seq = 0

    def at(t: float, kind: str, what: object) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(queue, (t, seq, kind, what))

    prefill = dict.fromkeys(engines, 0.0)  # the router's in-flight record (vllm_llmd.router.inflight)
    decode = dict.fromkeys(engines, 0.0)
    stepping: dict[str, object] = {}
    track: dict[str, dict] = {}
    served = dict.fromkeys(TRUTH, 0)
    request_s = next(iter(engines.values())).cost.request_s
    order = list(engines)
    random.Random(seed).shuffle(order)

    def step(pid: str, now: float) -> None:
        st = engines[pid].schedule()
        if st.scheduled:
            stepping[pid] = st
            at(now + engines[pid].cost.step_time(st.work), "step", pid)

    t = 0.0
    for s in range(steps):
        prefixes = [[rng.randrange(1000, 30000) for _ in range(PREFIX)] for _ in range(48)]
        owner: dict[int, str] = {}
        for eng in engines.values():
            assert eng.kv.reset_prefix_cache()
        for k in range(requests):
            t += rng.expovariate(rate)
            at(t, "send", (f"{s}-{k}", rng.randrange(len(prefixes))))
        while queue:
            now, _, kind, what = heapq.heappop(queue)
            if kind == "send":
                rid, pi = what  # type: ignore[misc]
                if pi in owner:
                    pid, own = owner[pi], SUFFIX
                else:
                    own = PREFIX + SUFFIX
                    pid = order[len(owner) % len(order)]
                    owner[pi] = pid
                work = own + queued_tokens(prefill[pid], decode[pid], DECODE_TOKEN_WEIGHT)
                prefill[pid] += own
                decode[pid] += OUTPUT
                prompt = prefixes[pi] + [rng.randrange(1000, 30000) for _ in range(SUFFIX)]
                track[rid] = {"pod": pid, "sent": now, "work": work, "own": own, "first": None, "last": None}
                at(now + request_s, "arrive", (pid, SimRequest(rid, prompt, OUTPUT)))
            elif kind == "arrive":
                pid, req = what  # type: ignore[misc]
                eng = engines[pid]
                req.arrival = now
                eng.hasher.extend(req.block_hashes, req.all_token_ids, req.cache_salt)
                eng.waiting.append(req)
                if pid not in stepping:
                    step(pid, now)
            else:
                pid = what  # type: ignore[assignment]
                st = stepping.pop(pid)
                engines[pid].finish_step(st, now)  # type: ignore[arg-type]
                for req, _ in st.scheduled:  # type: ignore[attr-defined]
                    tr = track[req.req_id]
                    if req.num_output_tokens and tr["first"] is None:
                        tr["first"] = now
                        prefill[pid] -= tr["own"]
                    tr["last"] = now
                    if req.status is Status.FINISHED and "done" not in tr:
                        tr["done"] = True
                        decode[pid] -= OUTPUT
                        served[cls[pid]] += 1
                        # the streamed answer: OUTPUT - 1 tokens after the first, then usage and [DONE]
                        timing = AttemptTiming(
                            pid, tr["work"], tr["first"] - tr["sent"], OUTPUT + 1, now - tr["first"], tr["own"]
                        )
                        est.observe(timing, now=now)
                if engines[pid].waiting or engines[pid].running:
                    step(pid, now)
    est.refresh(t + 60)
    return served


def by_class(speeds: dict[str, float]) -> dict[str, float]:
    out: dict[str, list[float]] = {}
    for pid, v in speeds.items():
        out.setdefault(pid.rstrip("0123456789"), []).append(v)
    return {c: sum(v) / len(v) for c, v in out.items()}


@pytest.mark.parametrize("seed", [1, 2])
def test_the_three_classes_are_learned_close_to_the_truth(seed: int) -> None:
    est = SpeedEstimator(SpeedConfig(refresh_s=0))
    served = asyncio.run(run_fleet(est, rate=10.0, requests=300, steps=2, seed=seed))
    prefill, decode = by_class(est.prefill), by_class(est.decode)
    assert len(est.prefill) == 20, est.prefill  # every pod learned (none forgotten at the cache reset)
    for c, truth in TRUTH.items():
        assert prefill[c] == pytest.approx(truth, rel=0.25), (c, prefill)
    # decode rates include the batch the pod runs, and this placement loads the slow pods most: their
    # decode is slower than 0.5 here, as a new request there would find it
    assert decode["fast"] == pytest.approx(2.0, rel=0.25) and decode["medium"] == pytest.approx(1.0, rel=0.1)
    assert 0.25 < decode["slow"] < 0.6, decode
    assert sum(served.values()) == 600
