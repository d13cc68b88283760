"""A simulated pod answers like a real vLLM 0.32 engine.

``sim_golden.json`` holds a real CPU engine's responses to a fixed request sequence (recorded by
``bench/sim_golden.py``: tiny test model, block size 32, 24 blocks, max_model_len 512,
``--enable-prompt-tokens-details``). The same sequence goes to a simulated pod with the same
settings; bodies must match key for key and value for value, except what differs between any two
runs of vLLM (ids, timestamps, fingerprints, generated text). Prefix-cache outcomes
(``cached_tokens``), ``/metrics`` counters and the KV event payloads must be identical too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import zmq
import zmq.asyncio
from prometheus_client.parser import text_string_to_metric_families

from vllm_llmd.router.tokenize import PromptTokenizer
from vllm_llmd.sim.profile import PodProfile
from vllm_llmd.sim.server import PodEndpoints, SimPod, Vocabulary
from vllm_llmd.testing.engine import free_port
from vllm_llmd.testing.wait import wait_until_async

GOLDEN = json.loads((Path(__file__).parent / "sim_golden.json").read_text())
ID = re.compile(r"^(cmpl|chatcmpl|modelperm)-[0-9a-f]{16}$")
FP = re.compile(r"^vllm-0\.32\.0-[0-9a-f]{8}$")


def _norm(obj: Any, key: str = "") -> Any:
    """Blank what differs between two runs of the same engine."""
    if isinstance(obj, dict):
        out = {k: _norm(v, k) for k, v in obj.items()}
        if "delta" in out and "role" not in obj["delta"] and "content" in obj["delta"]:
            out["delta"] = {**out["delta"], "content": "<text>"}
        return out
    if isinstance(obj, list):
        return [_norm(v) for v in obj]
    if key == "id" and isinstance(obj, str) and ID.match(obj):
        return "<id>"
    if key == "system_fingerprint" and isinstance(obj, str):
        assert FP.match(obj), obj
        return "<fp>"
    if key in ("created", "root"):
        return "<x>"
    if key in ("text", "content") and isinstance(obj, str):
        return "<text>"
    return obj


def _same(a: Any, _: Any) -> str:
    """JSON text of the normalized value: equal texts mean equal values AND the same key order."""
    return json.dumps(_norm(a))


def _sse(body: str) -> list[Any]:
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), body
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[6:]) for e in events[:-1]]


@pytest.fixture
async def pod(test_model_dir: Path):  # type: ignore[no-untyped-def]
    eng = GOLDEN["engine"]
    profile = PodProfile(
        block_size=eng["block_size"],
        num_gpu_blocks=eng["num_gpu_blocks"],
        max_model_len=eng["max_model_len"],
        enable_prompt_tokens_details=True,
    )
    zctx = zmq.asyncio.Context()
    ep = PodEndpoints(0, "127.0.0.1", free_port(), free_port(), free_port())
    p = SimPod(ep, profile, GOLDEN["served_model_name"], PromptTokenizer(test_model_dir),
               Vocabulary(test_model_dir), zctx, root=str(test_model_dir))  # fmt: skip
    await p.start()
    try:
        yield p
    finally:
        await p.stop()
        zctx.term()


async def _replay_frames(p: SimPod, start: int) -> list[list[bytes]]:
    """What the pod's replay endpoint answers for ``start``: every message, the end marker last."""
    dealer = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    dealer.connect(p.ep.replay or "")
    await dealer.send_multipart([b"", start.to_bytes(8, "big")])
    frames = []
    while True:
        assert await dealer.poll(5000), "replay did not answer"
        msg = await dealer.recv_multipart()
        frames.append(msg)
        if msg[1] == b"":
            break
    dealer.close(0)
    return frames


async def _replay_golden(p: SimPod) -> tuple[dict[str, dict[str, Any]], list[tuple[int, bytes]]]:
    assert p.publisher is not None
    ctx = zmq.asyncio.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.connect(p.ep.events or "")
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    # ZMQ's slow joiner: a subscription reaches the PUB socket some time after connect(), and a
    # batch published before it did is never delivered. Probe through the pod's own PUB socket (a
    # topic no pod uses, no seq consumed) until one arrives: from then on every batch is live.
    # Batches the pod published before (none today) are asked from the replay endpoint below.
    probe = (b"probe", b"", b"")
    for _ in range(200):  # 10 s
        p.publisher._pub.send_multipart(probe)  # the test's handle on the pod's socket
        if await sub.poll(50) and await sub.recv_multipart() == list(probe):
            break
    else:
        raise AssertionError("the subscription never reached the pod's PUB socket")
    got: dict[str, dict[str, Any]] = {}
    async with aiohttp.ClientSession() as s:
        for name, case in GOLDEN["cases"].items():
            data = None if case["request"] is None else json.dumps(case["request"])
            async with s.request(case["method"], p.ep.url + case["path"], data=data) as r:
                got[name] = {"status": r.status, "content_type": r.headers.get("Content-Type"), "body": await r.text()}
    sent = p.publisher.batches  # a step publishes before it answers: every batch is out by now
    live: list[tuple[int, bytes]] = []
    while sent and (not live or live[-1][0] < sent - 1):
        assert await sub.poll(5000), f"the live stream stopped at {[q for q, _ in live]} of {sent} batches"
        topic, seq, payload = await sub.recv_multipart()
        if topic == probe[0]:
            continue  # a probe still queued behind the one that arrived
        assert topic == f"kv@127.0.0.1:{p.ep.port}@test-model".encode()
        live.append((int.from_bytes(seq, "big"), payload))
    sub.close(0)
    first = live[0][0] if live else sent
    missed = [(int.from_bytes(f[2], "big"), f[3]) for f in (await _replay_frames(p, 0))[:-1]] if first else []
    return got, [b for b in missed if b[0] < first] + live


async def test_responses_match_a_real_engine(pod: SimPod) -> None:
    got, _ = await _replay_golden(pod)
    for name, want in GOLDEN["cases"].items():
        have = got[name]
        assert have["status"] == want["status"], (name, have["body"])
        if name == "metrics":
            continue
        if want["content_type"] is None:  # /health: empty body
            assert have["body"] == want["body"] == ""
            continue
        assert have["content_type"] == want["content_type"], name
        if want["content_type"].startswith("text/event-stream"):
            assert [_same(c, 0) for c in _sse(have["body"])] == [_same(c, 0) for c in _sse(want["body"])], name
        else:
            assert _same(json.loads(have["body"]), 0) == _same(json.loads(want["body"]), 0), name


async def test_metrics_families_labels_and_counters_match(pod: SimPod) -> None:
    got, _ = await _replay_golden(pod)
    assert got["metrics"]["content_type"] == GOLDEN["cases"]["metrics"]["content_type"]

    def families(text: str) -> dict[str, Any]:
        return {f.name: f for f in text_string_to_metric_families(text)}

    real = families(GOLDEN["cases"]["metrics"]["body"])
    sim = families(got["metrics"]["body"])
    for name, fam in sim.items():
        assert name in real, f"{name}: not a vLLM 0.32 metric"
        assert fam.type == real[name].type, name
        real_keys = {s.name: set(s.labels) for s in real[name].samples}
        for s in fam.samples:
            if name == "vllm:cache_config_info":
                assert set(s.labels) <= real_keys[s.name], set(s.labels) - real_keys[s.name]
            else:
                assert set(s.labels) == real_keys[s.name], s.name
    # what routers read is there
    for needed in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                   "vllm:prefix_cache_hits", "vllm:prefix_cache_queries", "vllm:cache_config_info",
                   "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds"):  # fmt: skip
        assert needed in sim, needed

    def value(fams: dict[str, Any], sample: str, **labels: str) -> float:
        for f in fams.values():
            for s in f.samples:
                if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        raise KeyError(sample)

    counters = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:prompt_tokens_total",
                "vllm:generation_tokens_total", "vllm:num_requests_running", "vllm:time_to_first_token_seconds_count",
                "vllm:inter_token_latency_seconds_count")  # fmt: skip
    for sample in counters:
        assert value(sim, sample) == value(real, sample), sample
    assert value(sim, "vllm:request_success_total", finished_reason="length") == value(
        real, "vllm:request_success_total", finished_reason="length"
    )
    for label in ("block_size", "num_gpu_blocks", "prefix_caching_hash_algo", "enable_prefix_caching"):
        want = next(s.labels[label] for s in real["vllm:cache_config_info"].samples)
        assert next(s.labels[label] for s in sim["vllm:cache_config_info"].samples) == want, label


async def test_kv_event_payloads_match_byte_for_byte_but_the_timestamp(pod: SimPod) -> None:
    _, batches = await _replay_golden(pod)
    real = [(e["seq"], bytes.fromhex(e["payload"])) for e in GOLDEN["events"]]
    assert [s for s, _ in batches] == [s for s, _ in real]
    dec = msgspec.msgpack.Decoder()
    for (_, mine), (_, theirs) in zip(batches, real, strict=True):
        a, b = dec.decode(mine), dec.decode(theirs)
        assert a[1:] == b[1:]  # events and data_parallel_rank
        # the same encoding too: only the float timestamp's bytes may differ
        assert len(mine) == len(theirs) and mine[10:] == theirs[10:]


async def test_replay_returns_buffered_batches_then_the_end_marker(pod: SimPod) -> None:
    _, batches = await _replay_golden(pod)
    frames = await _replay_frames(pod, 1)
    assert frames[-1] == [b"", b"", b"\xff" * 8, b""]
    replayed = [(int.from_bytes(f[2], "big"), f[3]) for f in frames[:-1]]
    assert [f[1] for f in frames[:-1]] == [f"kv@127.0.0.1:{pod.ep.port}@test-model".encode()] * len(replayed)
    assert replayed == [b for b in batches if b[0] >= 1]


async def test_bad_requests_get_clear_errors_and_leave_the_pod_working(pod: SimPod) -> None:
    async with aiohttp.ClientSession() as s:
        cases = [
            (b"{not json", 400, "body"),
            (json.dumps({"model": "test-model", "prompt": "x", "n": 2}).encode(), 400, "n"),
            (json.dumps({"model": "test-model", "prompt": "x", "echo": True}).encode(), 400, "echo"),
            (json.dumps({"model": "test-model", "prompt": ["a", "b"]}).encode(), 400, "prompt"),
            (json.dumps({"model": "test-model", "prompt": "x", "max_tokens": -1}).encode(), 400, "max_tokens"),
            (
                json.dumps({"model": "test-model", "prompt": "x", "stream_options": {"include_usage": True}}).encode(),
                400,
                "stream_options",
            ),
        ]
        for body, status, param in cases:
            async with s.post(pod.ep.url + "/v1/completions", data=body) as r:
                assert r.status == status
                err = (await r.json())["error"]
                assert err["param"] == param and err["message"]
        async with s.post(pod.ep.url + "/v1/chat/completions", json={"model": "test-model", "messages": "hi"}) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "messages"
        async with s.post(
            pod.ep.url + "/v1/completions", json={"model": "test-model", "prompt": "ok", "max_tokens": 2}
        ) as r:
            assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 2
    assert pod.engine.metrics.running == 0 and pod.engine.pool.num_free_blocks() == 23


async def test_client_disconnect_aborts_and_frees_blocks(pod: SimPod) -> None:
    pod.engine.cost = pod.engine.cost.model_copy(update={"step_s": 0.05})  # slow decode: still running at cancel
    async with aiohttp.ClientSession() as s:
        r = await s.post(
            pod.ep.url + "/v1/completions",
            json={"model": "test-model", "prompt": "Ka ri to ne mu " * 20, "max_tokens": 200, "stream": True},
        )
        await r.content.readline()
        assert pod.engine.metrics.running == 1
        r.close()
    await wait_until_async(lambda: pod.engine.metrics.running == 0, 10, "the aborted request to leave the engine")
    assert pod.engine.metrics.running == 0 and pod.engine.metrics.success["abort"] == 1
    assert pod.engine.pool.num_free_blocks() == 23
