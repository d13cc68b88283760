"""The simulated engine core: vLLM's scheduling (chunked prefill, continuous batching, FCFS
admission, preemption) and step timing from the cost model."""

from __future__ import annotations

import asyncio

from vllm_llmd.sim.cost import CostModel, StepWork
from vllm_llmd.sim.engine import SimEngine, SimRequest, Status
from vllm_llmd.sim.profile import PodProfile

TOKENS = list(range(100, 400))


def _engine(**kw: object) -> SimEngine:
    prof = PodProfile(**{"block_size": 16, "num_gpu_blocks": 400, "max_model_len": 6000, **kw})  # type: ignore[arg-type]
    return SimEngine(prof, "m", TOKENS, max_lag_s=1e9)


def _req(rid: str, n: int, max_tokens: int = 4, base: int = 0) -> SimRequest:
    return SimRequest(rid, [(base + i) % 4000 + 5 for i in range(n)], max_tokens)


def _steps(e: SimEngine, k: int) -> list[list[tuple[str, int]]]:
    out = []
    for _ in range(k):
        step = e.schedule()
        out.append([(r.req_id, n) for r, n in step.scheduled])
        e.finish_step(step, 0.0)
    return out


async def test_long_prompt_is_prefilled_in_budget_sized_chunks_then_decoded() -> None:
    e = _engine()
    r = _req("a", 5000, max_tokens=2)
    e.add_request(r)
    assert _steps(e, 3) == [[("a", 2048)], [("a", 2048)], [("a", 904)]]
    assert r.outputs.qsize() == 1  # the first token comes with the last chunk
    assert _steps(e, 1) == [[("a", 1)]]
    assert r.status is Status.FINISHED and r.outputs.qsize() == 2
    assert e.pool.num_free_blocks() == 399 and not e.running


async def test_decodes_and_a_new_prefill_share_a_step_within_the_budget() -> None:
    e = _engine()
    a, b = _req("a", 100, max_tokens=10), _req("b", 3000, base=777)
    e.add_request(a)
    _steps(e, 1)
    e.add_request(b)
    step = e.schedule()
    assert [(r.req_id, n) for r, n in step.scheduled] == [("a", 1), ("b", 2047)]
    assert step.work.decode_seqs == 1 and step.work.prefill_tokens == 2047
    assert step.work.decode_ctx == 100


async def test_prefix_hit_skips_cached_blocks_and_counts_in_metrics() -> None:
    e = _engine()
    e.add_request(_req("a", 500, max_tokens=1))
    _steps(e, 1)
    r = _req("b", 520, max_tokens=1)  # same first 500 tokens
    e.add_request(r)
    assert _steps(e, 1) == [[("b", 520 - 496)]]  # 31 blocks of 16 hit
    assert r.cached_tokens == 496
    assert (e.metrics.prefix_queries, e.metrics.prefix_hits) == (1020, 496)


async def test_admission_waits_for_room_and_max_num_seqs() -> None:
    e = _engine(num_gpu_blocks=40, max_num_seqs=2, max_model_len=600)  # 39 blocks of 16 = 624 tokens
    reqs = [_req(f"r{i}", 200, max_tokens=3, base=1000 * i) for i in range(4)]
    for r in reqs:
        e.add_request(r)
    first = _steps(e, 1)[0]
    assert [rid for rid, _ in first] == ["r0", "r1"]  # max_num_seqs
    while e.running or e.waiting:
        _steps(e, 1)
    assert all(r.status is Status.FINISHED and r.num_output_tokens == 3 for r in reqs)


async def test_running_out_of_blocks_preempts_the_newest_and_it_recomputes() -> None:
    e = _engine(num_gpu_blocks=12, max_model_len=176)  # 11 blocks = 176 tokens
    a, b = _req("a", 64, max_tokens=60), _req("b", 64, max_tokens=60, base=500)
    e.add_request(a)
    e.add_request(b)
    for _ in range(500):
        if not (e.running or e.waiting):
            break
        _steps(e, 1)
    assert e.metrics.preemptions >= 1 and b.num_preemptions >= 1 and a.num_preemptions == 0
    assert a.num_output_tokens == b.num_output_tokens == 60
    assert e.pool.num_free_blocks() == 11


async def test_request_timing_follows_the_cost_model() -> None:
    cost = CostModel(step_s=0.01, prefill_token_s=1e-5, decode_seq_s=0.0, request_s=0.0)
    e = _engine(cost=cost)
    e.start()
    try:
        r = _req("a", 3000, max_tokens=5)
        e.add_request(r)
        for _ in range(5):
            await asyncio.wait_for(r.outputs.get(), 10)
    finally:
        await e.stop()
    assert r.first_token_at is not None and r.last_token_at is not None
    # two chunks: 0.01 + 2048e-5 and 0.01 + 952e-5; then 4 decode steps of 0.01
    expected_ttft = 0.02 + 3000e-5
    assert abs((r.first_token_at - r.arrival) - expected_ttft) < 1e-9
    assert abs((r.last_token_at - r.first_token_at) - 0.04) < 1e-9
    assert e.metrics.hist["inter_token_latency_seconds"].count == 4


def test_step_time_formula() -> None:
    c = CostModel(step_s=1, prefill_token_s=2, prefill_attn_s=3, decode_seq_s=4, decode_ctx_s=5, speed=2)
    w = StepWork()
    w.add_prefill(10, 4)  # attention work 10 * (4 + 5) = 90
    w.add_decode(7)
    w.add_decode(3)
    assert c.step_time(w) == (1 + 2 * 10 + 3 * 90 + 4 * 2 + 5 * 10) / 2
    assert c.scaled(0.5).step_time(w) == c.step_time(w) * 2
