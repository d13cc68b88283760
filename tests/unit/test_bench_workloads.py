"""bench/workloads.py (seeded generators) and bench/workload_client.py (closed loop per session,
bounded concurrency, engine-load statistics) against a real aiohttp server streaming SSE."""

from __future__ import annotations

import asyncio
import itertools
import sys
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import workload_client
import workloads


@pytest.fixture(scope="module")
def tm(test_model_dir: Path) -> workloads.TextMaker:
    return workloads.TextMaker(test_model_dir / "tokenizer.json")


def test_text_has_the_exact_token_count_and_is_seeded(tm: workloads.TextMaker) -> None:
    import random

    a = tm.text(random.Random(7), 100)
    assert tm.count(a) in range(98, 103)  # decode/re-encode may merge a token at the cut
    assert a == tm.text(random.Random(7), 100)
    assert a != tm.text(random.Random(8), 100)


def test_multiturn_turns_extend_their_history_and_interleave(tm: workloads.TextMaker) -> None:
    wl = workloads.multiturn(tm, seed=3, conversations=6, turns=4, system_tokens=32, opening_tokens=48)
    assert len(wl.turns) == 24 and len({t.session for t in wl.turns}) == 6
    by: dict[str, list[str]] = {}
    for t in wl.turns:
        by.setdefault(t.session, []).append(t.prompt)
    for prompts in by.values():
        for earlier, later in itertools.pairwise(prompts):
            assert later.startswith(earlier) and len(later) > len(earlier)
    # interleaved: the sessions do not come one after another
    firsts = [t.session for t in wl.turns[:6]]
    assert len(set(firsts)) > 1
    again = workloads.multiturn(tm, seed=3, conversations=6, turns=4, system_tokens=32, opening_tokens=48)
    assert [t.prompt for t in again.turns] == [t.prompt for t in wl.turns]


def test_hotprefix_sends_half_the_traffic_to_one_prefix(tm: workloads.TextMaker) -> None:
    wl = workloads.hotprefix(tm, seed=1, prefixes=8, prefix_tokens=64, suffix_tokens=16, requests=400)
    heads: dict[str, int] = {}
    for t in wl.turns:
        head = t.prompt.split("\n")[0]
        heads[head] = heads.get(head, 0) + 1
    top = max(heads.values())
    assert 0.42 < top / 400 < 0.58
    assert len(heads) == 8


def test_hotlong_is_hotprefix_with_long_suffixes(tm: workloads.TextMaker, test_model_dir: Path) -> None:
    wl = workloads.hotlong(tm, seed=2)
    assert wl.name == "hotlong" and len(wl.turns) == 128
    assert wl.params["suffix_tokens"] == 1024 and wl.params["requests"] == 128
    prefix, suffix = wl.turns[0].prompt.split("\n", 1)
    assert tm.count(suffix) in range(1020, 1029) and tm.count(prefix) in range(2040, 2057)
    built, _ = workloads.build("hotlong", test_model_dir)
    assert built.turns[0].prompt == workloads.hotlong(tm, seed=0).turns[0].prompt


def test_the_oracle_spreads_only_its_hot_prefix_by_requests_in_flight() -> None:
    import oracle_router

    o = oracle_router.Oracle(["a", "b"], prefix_chars=4, spread_hot=0.25)
    cold = [o.pick(f"c{k:02d}.") for k in range(16)]  # 16 prefixes once each: k mod 2, nothing hot
    assert cold == [k % 2 for k in range(16)]
    o.inflight = [3, 0]
    hot = [o.pick("HOT!") for _ in range(8)]  # prefix 16 -> worker 0 statically
    assert hot[:2] == [0, 0]  # 1 and 2 of 17-18 requests: not yet over a quarter
    assert set(hot[-3:]) == {1}  # over a quarter: to the worker with fewer in flight
    o.inflight = [0, 3]
    assert o.pick("HOT!") == 0 and o.pick("c03.") == 1  # a cold prefix keeps its worker
    static = oracle_router.Oracle(["a", "b"], prefix_chars=4)
    static.inflight = [3, 0]
    assert {static.pick("HOT!") for _ in range(40)} == {0}


def test_zipf_and_rag_are_skewed(tm: workloads.TextMaker) -> None:
    wl = workloads.zipf(tm, seed=0, prompts=16, prompt_tokens=32, user_tokens=8, requests=300)
    counts = sorted(
        (sum(1 for t in wl.turns if t.prompt.startswith(p)) for p in {t.prompt.split("\nUser:")[0] for t in wl.turns}),
        reverse=True,
    )
    assert counts[0] > 3 * counts[-1]
    rag = workloads.rag(tm, seed=0, documents=6, document_tokens=32, instruction_tokens=16, question_tokens=8)
    assert all(t.prompt.startswith(rag.turns[0].prompt.split("\n")[0]) for t in rag.turns)


def test_longrag_puts_zipf_popular_documents_first(tm: workloads.TextMaker) -> None:
    kw = dict(documents=8, document_tokens=48, question_tokens=8, requests=400, output_tokens=16)
    wl = workloads.longrag(tm, seed=2, **kw)
    assert len(wl.turns) == 400 and all(t.max_tokens == 16 for t in wl.turns)
    docs: dict[str, int] = {}
    for t in wl.turns:
        assert t.prompt.startswith("Document: ") and t.prompt.endswith("\nAnswer:")
        doc = t.prompt.split("\nQuestion:")[0]
        docs[doc] = docs.get(doc, 0) + 1
    counts = sorted(docs.values(), reverse=True)
    assert len(counts) == 8 and counts[0] > 3 * counts[-1]  # Zipf s=1 over 8: ~37% vs ~5%
    assert [t.prompt for t in workloads.longrag(tm, seed=2, **kw).turns] == [t.prompt for t in wl.turns]


def test_agentic_loops_share_a_manifest(tm: workloads.TextMaker) -> None:
    wl = workloads.agentic(tm, seed=0, agents=4, steps=3, manifest_tokens=32, task_tokens=16, call_tokens=8)
    assert len(wl.turns) == 12
    manifests = {t.prompt.split("\nTask:")[0] for t in wl.turns}
    assert len(manifests) == 2


def test_unknown_workload_is_a_clear_error(test_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown workload 'nope'"):
        workloads.build("nope", test_model_dir)


def test_load_stats_counts_idle_while_queued() -> None:
    samples = [[(4.0, 0.0), (4.0, 0.0)], [(6.0, 1.0), (0.0, 0.0)], [(3.0, 0.0), (0.0, 0.0)]]
    st = workload_client.load_stats(samples, concurrency=8)
    assert st["idle_while_queued"] == pytest.approx(1 / 3, abs=1e-3)  # only the sample with a queue
    assert st["mean_abs_diff"] == pytest.approx((0 + 7 + 3) / 3, abs=0.01)


def test_client_keeps_sessions_closed_loop_and_concurrency_bounded(tm: workloads.TextMaker) -> None:
    wl = workloads.multiturn(tm, seed=0, conversations=5, turns=3, system_tokens=16, opening_tokens=16)

    async def main() -> tuple[dict, list[str], int]:
        inflight: dict[str, int] = {}
        peak = 0
        violations: list[str] = []

        async def completions(request: web.Request) -> web.StreamResponse:
            nonlocal peak
            body = await request.json()
            s = body["prompt"].split("\n")[1][:40]  # the opening message names the session
            if inflight.get(s):
                violations.append(s)
            inflight[s] = inflight.get(s, 0) + 1
            peak = max(peak, sum(inflight.values()))
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-LLMD-Pod": "p1"})
            await resp.prepare(request)
            for _ in range(body["max_tokens"]):
                await asyncio.sleep(0.001)  # pacing: a backend that streams its tokens over time
                await resp.write(b'data: {"choices": [{"text": "x"}]}\n\n')
            await resp.write(b"data: [DONE]\n\n")
            inflight[s] -= 1
            return resp

        async def metrics(_r: web.Request) -> web.Response:
            return web.Response(text="vllm:num_requests_running 1.0\nvllm:num_requests_waiting 0.0\n")

        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        app.router.add_get("/metrics", metrics)
        async with TestServer(app, host="127.0.0.1") as server:
            url = str(server.make_url("")).rstrip("/")
            res = await workload_client.run(wl, url, "m", [url, url], concurrency=3, sample_s=0.01)
        return res, violations, peak

    res, violations, peak = asyncio.run(main())
    assert res["completed"] == 15 and res["failed"] == 0
    assert violations == []
    assert peak <= 3
    assert res["requests_per_pod_router"] == {"p1": 15}
    assert res["out_tok_s"] > 0 and res["ttft_p90_ms"] is not None
    assert res["engine_load"]["samples"] > 0


def _run_streaming(wl: workloads.Workload, text: str, **run_kw) -> dict:
    """``workload_client.run`` against a real aiohttp server streaming ``max_tokens`` SSE chunks of
    ``text`` per request (and idle engine metrics)."""
    chunk = b'data: {"choices": [{"text": "%s"}]}\n\n' % text.encode()

    async def main() -> dict:
        async def completions(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-LLMD-Pod": "p1"})
            await resp.prepare(request)
            for _ in range(body["max_tokens"]):
                await resp.write(chunk)
            await resp.write(b"data: [DONE]\n\n")
            return resp

        async def metrics(_r: web.Request) -> web.Response:
            return web.Response(text="vllm:num_requests_running 0.0\nvllm:num_requests_waiting 0.0\n")

        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        app.router.add_get("/metrics", metrics)
        async with TestServer(app, host="127.0.0.1") as server:
            url = str(server.make_url("")).rstrip("/")
            return await workload_client.run(wl, url, "m", [url], sample_s=0.01, **run_kw)

    return asyncio.run(main())


def test_client_open_loop_starts_no_turn_before_its_seeded_arrival(tm: workloads.TextMaker) -> None:
    """``rate``: turn i is sent no earlier than the i-th arrival of the seeded Poisson process (the
    same times for every router); every turn is sent."""
    import random

    wl = workloads.hotprefix(tm, seed=0, prefixes=2, prefix_tokens=16, suffix_tokens=4, requests=12, output_tokens=2)
    rate, seed = 60.0, 3
    rng, t, due = random.Random(seed), 0.0, {}
    for turn in wl.turns:
        t += rng.expovariate(rate)
        due[turn.session] = t

    res = _run_streaming(wl, "x", concurrency=64, rate=rate, seed=seed)
    assert res["completed"] == 12 and res["failed"] == 0
    starts = {r["s"]: r["t"] for r in res["per_request"]}
    assert set(starts) == set(due)
    # recorded starts are rounded to ms
    assert all(starts[s] >= due[s] - 0.001 for s in due), {s: (starts[s], due[s]) for s in due}


def test_client_counts_an_answer_whose_chunks_carry_no_text(tm: workloads.TextMaker) -> None:
    """A streamed answer whose token chunks all have empty text (the detokenizer held it back, as for
    three of the small test model's greedy hotprefix answers) is completed, with its TTFT at the first
    chunk, and adds no output tokens."""
    wl = workloads.hotprefix(tm, seed=0, prefixes=2, prefix_tokens=16, suffix_tokens=4, requests=4, output_tokens=3)

    res = _run_streaming(wl, "", concurrency=2)
    assert res["completed"] == 4 and res["failed"] == 0
    assert all(r["ttft"] is not None for r in res["per_request"])
    assert res["out_tok_s"] == 0


def test_every_row_runs_on_the_engines_kv_aware_needs_when_it_is_among_them() -> None:
    """``bench/alternating.py`` runs all rows of an invocation on one engine pair: with vllm-router's
    ``kv_aware`` among them, every row gets its hashing flags and served name on top of its own
    settings (a tiered row keeps its KV connector); without it, nothing changes."""
    import alternating
    from routers import ROUTERS

    names = ["rr", "kv_aware", "ours", "ours_tiers"]
    kinds = alternating.shared_engines([ROUTERS[n] for n in names])
    kv = ROUTERS["kv_aware"]
    for k in kinds:
        assert k.engine_args[: len(kv.engine_args)] == kv.engine_args, k.name
        assert k.engine_env == kv.engine_env and k.served_name_is_path, k.name
    tiers = kinds[names.index("ours_tiers")]
    assert tiers.engine_args[len(kv.engine_args) :] == ROUTERS["ours_tiers"].engine_args
    assert len({(tuple(k.engine_args), k.served_name_is_path) for k in kinds[:3]}) == 1
    plain = [ROUTERS[n] for n in ("rr", "ours")]
    assert alternating.shared_engines(plain) == plain
