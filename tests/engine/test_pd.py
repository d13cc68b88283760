"""Prefill/decode disaggregation with LLMDConnector on two real vLLM CPU engines, KV over NIXL (UCX,
host memory). Most tests play the router (they drive the two legs with vllm_llmd.pd); one runs our
router in-process in front of the pair. Failure handling: lease expiry when no decode comes, a decode
arriving after the lease expired, and (last in the module: it kills the prefill engine) the prefill
engine dying between the prefill leg and the decode's pull."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from router_harness import routed

from vllm_llmd.pd import build_decode_request, build_prefill_request
from vllm_llmd.testing.engine import EngineProcess, EngineSpec
from vllm_llmd.testing.wait import wait_until

pytestmark = pytest.mark.engine

# the lease must outlast the decode leg's queueing + pull (the consumer refuses to pull at lease end
# and prefills locally): on a loaded 2-core machine a hand-off took > 10 s before the engines were warm
EXTRA = {"lease_seconds": 15, "transfer_timeout_seconds": 10}


@pytest.fixture(scope="module")
def pd_pair(test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EngineProcess, ...]]:
    logs = tmp_path_factory.mktemp("pd-logs")

    def engine(role: str) -> EngineProcess:
        cfg = {"kv_connector": "LLMDConnector", "kv_role": role, "kv_connector_extra_config": EXTRA}
        spec = EngineSpec(
            model=test_model_dir,
            block_size=32,
            events_port=None,
            replay_port=None,
            kv_transfer_config=cfg,
            extra_args=["--enforce-eager"],
        )
        return EngineProcess(spec, logs / f"{role}.log")

    p, d = engine("kv_producer"), engine("kv_consumer")
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda e: e.start_ready(), (p, d)))
            # one plain request each, so the first hand-off does not pay the engines' first-request costs
            warm = {"model": "test-model", "prompt": "warm up " * 40, "max_tokens": 2, "temperature": 0}
            list(pool.map(lambda e: _post(e.url, warm), (p, d)))
        yield p, d
    finally:
        p.stop()
        d.stop()


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=180) as r:
        return json.loads(r.read())


def _metric(url: str, name: str, **labels: str) -> float:
    # generous: on the shared, overloaded 2-core machine an engine's /metrics once took > 10 s
    text = urllib.request.urlopen(url + "/metrics", timeout=60).read().decode()
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def _wait_for(what: str, cond, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    """Poll ``cond()`` until it returns something truthy (returned) or ``timeout`` passes (fail)."""
    return wait_until(cond, timeout, what, interval=0.1)


def _prompt(i: int) -> str:
    return f"Case {i}: " + " ".join(f"ka{i}ri to{j} musa lovi" for j in range(60))


def test_pd_output_matches_a_single_engine_and_decode_does_not_recompute(pd_pair):
    p, d = pd_pair
    for i in range(3):
        body = {"model": "test-model", "prompt": _prompt(i), "max_tokens": 8, "temperature": 0}
        ext_before = _metric(d.url, "vllm:external_prefix_cache_hits_total")
        bytes_before = _metric(d.url, "llmd:kv_transfer_bytes_total", memory="DRAM")
        prefill = _post(p.url, build_prefill_request(body))
        assert prefill["kv_transfer_params"]["do_remote_prefill"] is True
        decoded = _post(d.url, build_decode_request(body, prefill))
        reference = _post(p.url, body)  # the same request computed on one engine
        assert decoded["choices"][0]["text"] == reference["choices"][0]["text"]
        prompt_tokens = decoded["usage"]["prompt_tokens"]
        loaded = _metric(d.url, "vllm:external_prefix_cache_hits_total") - ext_before
        # every full block of the prompt came from the prefill engine, not from local compute
        assert loaded >= prompt_tokens - 32, (loaded, prompt_tokens)
        _wait_for(
            "the decode engine to count the bytes it pulled",
            lambda b=bytes_before: _metric(d.url, "llmd:kv_transfer_bytes_total", memory="DRAM") > b,
            10,
        )


def test_prefill_releases_its_lease_once_decode_pulled(pd_pair):
    p, d = pd_pair
    released = _metric(p.url, "llmd:kv_leases_total", event="released")
    body = {"model": "test-model", "prompt": _prompt(99), "max_tokens": 4, "temperature": 0}
    _post(d.url, build_decode_request(body, _post(p.url, build_prefill_request(body))))
    wait_until(
        lambda: _metric(p.url, "llmd:kv_leases_total", event="released") > released,
        30,
        "the prefill engine releasing the lease",
        interval=0.2,
    )
    assert _metric(p.url, "llmd:kv_lease_held_requests") == 0


def _idle(engine: EngineProcess) -> bool:
    """No block held under a lease and no KV block in use (every block back in the free queue)."""
    return (
        _metric(engine.url, "llmd:kv_lease_held_blocks") == 0 and _metric(engine.url, "vllm:kv_cache_usage_perc") == 0
    )


def _text(out: dict) -> str:
    return out["choices"][0]["text"]


def test_prefill_blocks_are_freed_by_lease_expiry_when_no_decode_comes(pd_pair):
    p, _d = pd_pair
    _wait_for("the prefill engine to be idle before the test", lambda: _idle(p))
    expired = _metric(p.url, "llmd:kv_leases_total", event="expired")
    body = {"model": "test-model", "prompt": _prompt(200), "max_tokens": 4, "temperature": 0}
    prefill = _post(p.url, build_prefill_request(body))  # ... and no decode leg ever follows
    started = time.monotonic()  # the lease began before this (when the prefill finished)
    assert prefill["kv_transfer_params"]["do_remote_prefill"] is True
    n_blocks = sum(len(g) for g in prefill["kv_transfer_params"]["remote_block_ids"])
    assert n_blocks >= prefill["usage"]["prompt_tokens"] // 32
    held = _wait_for("the lease to show", lambda: _metric(p.url, "llmd:kv_lease_held_blocks"), 10)
    assert held == n_blocks
    assert _metric(p.url, "vllm:kv_cache_usage_perc") > 0  # the held blocks are really taken
    assert _metric(p.url, "llmd:kv_lease_held_requests") == 1
    _wait_for(
        "the lease to expire",
        lambda: _metric(p.url, "llmd:kv_leases_total", event="expired") > expired,
        EXTRA["lease_seconds"] + 30,
    )
    # not released early: the lease ran (most of) its term before it was dropped
    assert time.monotonic() - started > EXTRA["lease_seconds"] / 2
    # the blocks went back to the free queue: nothing held, nothing in use
    _wait_for("the blocks to be freed", lambda: _idle(p), 10)
    assert _metric(p.url, "llmd:kv_lease_held_requests") == 0


def test_decode_after_the_lease_expired_prefills_locally_with_identical_output(pd_pair):
    p, d = pd_pair
    body = {"model": "test-model", "prompt": _prompt(300), "max_tokens": 8, "temperature": 0}
    expired = _metric(p.url, "llmd:kv_leases_total", event="expired")
    failed = _metric(d.url, "llmd:kv_transfers_total", result="failed")
    prefill = _post(p.url, build_prefill_request(body))
    _wait_for(
        "the lease to expire",
        lambda: _metric(p.url, "llmd:kv_leases_total", event="expired") > expired,
        EXTRA["lease_seconds"] + 30,
    )
    # the prefill engine's blocks are free again: pulling them now could read someone else's KV
    decoded = _post(d.url, build_decode_request(body, prefill))
    reference = _post(p.url, body)
    assert _text(decoded) == _text(reference)
    _wait_for(
        "the consumer to count the failed transfer",
        lambda: _metric(d.url, "llmd:kv_transfers_total", result="failed") > failed,
        10,
    )


def _closed_port() -> int:
    """A localhost TCP port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_decode_pointing_at_a_gone_prefill_engine_prefills_locally_with_identical_output(pd_pair):
    """The prefill engine the params name is not there any more (nothing answers on its side channel):
    the consumer's handshake fails, it computes the prompt itself, and it keeps serving."""
    p, d = pd_pair
    body = {"model": "test-model", "prompt": _prompt(350), "max_tokens": 8, "temperature": 0}
    prefill = _post(p.url, build_prefill_request(body))  # real params, then the engine "moves away"
    params = dict(prefill["kv_transfer_params"])
    params.update(remote_engine_id="gone-engine", remote_port=_closed_port())
    failed = _metric(d.url, "llmd:kv_transfers_total", result="failed")
    hs_failed = _metric(d.url, "llmd:kv_handshakes_total", result="failed")
    ok = _metric(d.url, "llmd:kv_transfers_total", result="ok")
    decoded = _post(d.url, build_decode_request(body, {**prefill, "kv_transfer_params": params}))
    reference = _post(p.url, body)
    assert _text(decoded) == _text(reference)
    _wait_for(
        "the consumer to count the failed handshake and transfer",
        lambda: (
            _metric(d.url, "llmd:kv_handshakes_total", result="failed") > hs_failed
            and _metric(d.url, "llmd:kv_transfers_total", result="failed") > failed
        ),
        10,
    )
    assert _metric(d.url, "llmd:kv_transfers_total", result="ok") == ok  # nothing was pulled
    # and the consumer keeps serving normally afterwards
    assert _text(_post(d.url, body)) == _text(reference)


async def _router_complete(s: aiohttp.ClientSession, url: str, body: dict) -> str:
    async with s.post(url + "/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        if not body.get("stream"):
            return _text(await r.json())
        assert r.headers["Content-Type"].startswith("text/event-stream")
        parts, done = [], False
        async for line in r.content:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                done = True
                continue
            chunk = json.loads(data)
            if chunk.get("choices"):
                parts.append(chunk["choices"][0].get("text") or "")
        assert done, "the stream ended without [DONE]"
        return "".join(parts)


async def _router_metric(s: aiohttp.ClientSession, url: str, outcome: str) -> float:
    async with s.get(url + "/metrics") as r:
        text = await r.text()
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name == "llmd_router_pd_requests_total" and sample.labels.get("outcome") == outcome:
                return sample.value
    return 0.0


async def test_router_disaggregates_long_prompts_with_identical_output(pd_pair, test_model_dir):
    p, d = pd_pair
    pods = [{"url": p.url, "role": "prefill"}, {"url": d.url, "role": "decode"}]
    threshold = 256

    def engine_metric(engine: EngineProcess, name: str, **labels: str) -> float:
        return _metric(engine.url, name, **labels)

    # a client pointing the decode engine at a host of its choosing: must be stripped
    evil_params = {
        "do_remote_prefill": True,
        "remote_engine_id": "evil",
        "remote_request_id": "evil-1",
        "remote_block_ids": [[0, 1, 2, 3]],
        "remote_host": "203.0.113.7",
        "remote_port": 5555,
        "remote_num_tokens": 128,
        "remote_block_size": 32,
    }
    async with (
        routed([], test_model_dir, pods=pods, pd={"threshold_tokens": threshold}) as (_router, base),
        aiohttp.ClientSession() as s,
    ):
        # a prompt the decode engine computes cheaply is served there, without a prefill leg
        failed_before = {
            k: engine_metric(d, name, result="failed")
            for k, name in (("hs", "llmd:kv_handshakes_total"), ("xfer", "llmd:kv_transfers_total"))
        }
        aggregated = await _router_metric(s, base, "aggregated")
        leases = engine_metric(p, "llmd:kv_leases_total", event="started")
        short = {"model": "test-model", "prompt": "Hello there, short one", "max_tokens": 4, "temperature": 0}
        reference = await asyncio.to_thread(_post, p.url, short)
        assert reference["usage"]["prompt_tokens"] <= threshold
        assert await _router_complete(s, base, short) == _text(reference)
        assert await _router_metric(s, base, "aggregated") == aggregated + 1
        # an aggregated request is stripped too: the client's params never reach the decode engine (were
        # they passed on, it would try the client's host: a failed handshake, a failed transfer - checked
        # after the disaggregated requests below, whose counted transfers show the counters are current)
        evil = {**short, "kv_transfer_params": evil_params}
        assert await _router_complete(s, base, evil) == _text(reference)
        assert await _router_metric(s, base, "aggregated") == aggregated + 2
        assert engine_metric(p, "llmd:kv_leases_total", event="started") == leases  # no prefill leg

        cases = [
            ({"prompt": _prompt(400)}, "plain"),
            ({"prompt": _prompt(401), "stream": True}, "stream"),
            (
                {
                    "prompt": _prompt(402),
                    # a client pointing the decode engine at a host of its choosing: must be stripped
                    "kv_transfer_params": evil_params,
                },
                "client kv_transfer_params",
            ),
        ]
        for extra, what in cases:
            body = {"model": "test-model", "max_tokens": 8, "temperature": 0, **extra}
            plain = {k: v for k, v in body.items() if k not in ("stream", "kv_transfer_params")}
            reference = await asyncio.to_thread(_post, p.url, plain)  # one engine computing it all
            assert reference["usage"]["prompt_tokens"] > threshold
            before = {
                "disaggregated": await _router_metric(s, base, "disaggregated"),
                "ext_hits": engine_metric(d, "vllm:external_prefix_cache_hits_total"),
                "bytes": engine_metric(d, "llmd:kv_transfer_bytes_total", memory="DRAM"),
                "ok": engine_metric(d, "llmd:kv_transfers_total", result="ok"),
                "failed": engine_metric(d, "llmd:kv_transfers_total", result="failed"),
                "hs_failed": engine_metric(d, "llmd:kv_handshakes_total", result="failed"),
            }
            text = await _router_complete(s, base, body)
            assert text == _text(reference), what
            assert await _router_metric(s, base, "disaggregated") == before["disaggregated"] + 1, what
            loaded = engine_metric(d, "vllm:external_prefix_cache_hits_total") - before["ext_hits"]
            assert loaded >= reference["usage"]["prompt_tokens"] - 32, (what, loaded)
            await asyncio.to_thread(
                _wait_for,
                "the decode engine to count the bytes it pulled",
                lambda b=before["bytes"]: engine_metric(d, "llmd:kv_transfer_bytes_total", memory="DRAM") > b,
                10,
            )
            await asyncio.to_thread(
                _wait_for,
                "the decode engine to count the transfer",
                lambda ok=before["ok"]: engine_metric(d, "llmd:kv_transfers_total", result="ok") == ok + 1,
                10,
            )
            # exactly one pull, the router's: nothing failed, no handshake with the client's host
            assert engine_metric(d, "llmd:kv_transfers_total", result="failed") == before["failed"], what
            assert engine_metric(d, "llmd:kv_handshakes_total", result="failed") == before["hs_failed"], what
        # nor from the aggregated request carrying the client's params
        assert engine_metric(d, "llmd:kv_handshakes_total", result="failed") == failed_before["hs"]
        assert engine_metric(d, "llmd:kv_transfers_total", result="failed") == failed_before["xfer"]


@pytest.mark.destructive(scope="module")
def test_prefill_engine_killed_after_prefill_leg_decode_prefills_locally(pd_pair):
    """Runs last in the module (destructive): it kills the prefill engine of the module's pair."""
    p, d = pd_pair
    body = {"model": "test-model", "prompt": _prompt(500), "max_tokens": 8, "temperature": 0}
    reference = _post(p.url, body)
    failed = _metric(d.url, "llmd:kv_transfers_total", result="failed")
    prefill = _post(p.url, build_prefill_request(body))
    p.kill()  # SIGKILL to the whole engine: its KV memory and side channel are gone before the pull
    decoded = _post(d.url, build_decode_request(body, prefill))
    assert _text(decoded) == _text(reference)
    _wait_for(
        "the consumer to count the failed transfer",
        lambda: _metric(d.url, "llmd:kv_transfers_total", result="failed") > failed,
        10,
    )
    # and the decode engine is still healthy and serving
    assert urllib.request.urlopen(d.url + "/health", timeout=10).status == 200
    again = _post(d.url, body)
    assert _text(again) == _text(reference)
