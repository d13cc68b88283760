"""Cross-layout prefill/decode hand-offs between real vLLM CPU engines whose KV block sizes differ,
through the path a GPU -> NPU hand-off takes: the handshake negotiates "relayout" (block size and
block footprint differ), the decode engine reads the prefill engine's blocks as they are into its
receive pool (one NIXL READ over UCX) and re-lays them out into its own blocks (connectors/xpull.py).

Engines: the session pair (A: block 32, B: block 64; tests/conftest.py) plus one engine with block
128 started here. Greedy output must equal one engine computing the whole request, every prompt
block must come from the prefill engine, and the KV bytes the decode engine reports pulled must be
exactly the prefill engine's blocks covering the prompt.

A peer whose layout cannot be mapped (here: a side channel answering with 4 KV heads for the same
model name) is refused in the handshake with the fields named, and the decode engine prefills
locally with identical output.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families
from vllm_llmd.connectors.handshake import HandshakeServer, fetch_engine_info

from vllm_llmd.pd import build_decode_request, build_prefill_request
from vllm_llmd.testing.engine import EngineProcess, EngineSpec, dtype_bytes, engine_dtype
from vllm_llmd.testing.wait import wait_until

pytestmark = pytest.mark.engine

MODEL = "test-model"
#: the tiny test model (vllm_llmd.testing.model "tiny"): 2 layers, 2 KV heads, head size 64, in the
#: engines' dtype (vllm_llmd.testing.engine.engine_dtype)
LAYERS, KV_HEADS, HEAD_SIZE, ELEM = 2, 2, 64, dtype_bytes(engine_dtype())


def page_bytes(block_size: int) -> int:
    """One layer's block: K and V, every KV head, ``block_size`` tokens."""
    return 2 * KV_HEADS * block_size * HEAD_SIZE * ELEM


@pytest.fixture(scope="module")
def engine128(test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    logs = tmp_path_factory.mktemp("xlayout-logs")
    spec = EngineSpec(
        model=test_model_dir,
        block_size=128,
        served_model_name=MODEL,
        events_port=None,
        replay_port=None,
        kv_transfer_config={"kv_connector": "LLMDConnector", "kv_role": "kv_both"},
        extra_args=["--enforce-eager"],
    )
    engine = EngineProcess(spec, logs / "engine-128.log")
    try:
        engine.start_ready()
        yield engine
    finally:
        engine.stop()


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=180) as r:
        return json.loads(r.read())


def _metric(url: str, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=60).read().decode()
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def _text(out: dict) -> str:
    return out["choices"][0]["text"]


def _prompt(tag: str, i: int) -> str:
    return f"Cross {tag} {i}: " + " ".join(f"ve{i}lo ra{j} dor tix" for j in range(70))


def _hand_off(p: EngineProcess, d: EngineProcess, tag: str, i: int) -> dict[str, float]:
    """One disaggregated request p -> d; asserts identical output and full reuse; returns what moved."""
    body = {"model": MODEL, "prompt": _prompt(tag, i), "max_tokens": 12, "temperature": 0}
    before = {
        "bytes": _metric(d.url, "llmd:kv_transfer_bytes_total"),
        "relayout": _metric(d.url, "llmd:kv_relayout_transfers_total"),
        "ok": _metric(d.url, "llmd:kv_transfers_total", result="ok"),
        "ext": _metric(d.url, "vllm:external_prefix_cache_hits_total"),
    }
    prefill = _post(p.url, build_prefill_request(body))
    params = prefill["kv_transfer_params"]
    assert params["remote_block_size"] == p.spec.block_size
    decoded = _post(d.url, build_decode_request(body, prefill))
    reference = _post(p.url, body)  # one engine computing it all
    assert _text(decoded) == _text(reference), (tag, i)
    n = prefill["usage"]["prompt_tokens"]
    wait_until(
        lambda: _metric(d.url, "llmd:kv_transfers_total", result="ok") > before["ok"],
        30,
        "the decode engine to count the pull",
        interval=0.2,
    )
    moved = _metric(d.url, "llmd:kv_transfer_bytes_total") - before["bytes"]
    blocks = -(-n // p.spec.block_size)  # the prefill engine's blocks covering the prompt
    assert moved == blocks * LAYERS * page_bytes(p.spec.block_size), (moved, n)
    assert _metric(d.url, "llmd:kv_relayout_transfers_total") == before["relayout"] + 1
    loaded = _metric(d.url, "vllm:external_prefix_cache_hits_total") - before["ext"]
    assert loaded >= n - 1, (loaded, n)  # the whole prompt came over (vLLM recomputes at most the last token)
    return {"prompt_tokens": n, "bytes": moved, "blocks": blocks}


def test_prefill_block_32_decode_block_128_is_token_identical(engines, engine128) -> None:
    moved = [_hand_off(engines.a, engine128, "32to128", i) for i in range(3)]
    print(f"\n32 -> 128: {moved}")


def test_prefill_block_128_decode_block_32_is_token_identical(engines, engine128) -> None:
    moved = [_hand_off(engine128, engines.a, "128to32", i) for i in range(2)]
    print(f"\n128 -> 32: {moved}")


def test_the_shared_pair_32_and_64_hands_off_both_ways(engines) -> None:
    print(f"\n32 -> 64: {_hand_off(engines.a, engines.b, '32to64', 0)}")
    print(f"\n64 -> 32: {_hand_off(engines.b, engines.a, '64to32', 0)}")


def test_a_peer_whose_layout_cannot_be_mapped_is_refused_and_the_request_prefilled_locally(engines, engine128) -> None:
    """The decode engine dials a side channel describing the same model with 4 KV heads of size 32:
    neither moving the blocks as they are nor re-laying them out can be right, so the handshake is
    refused naming the fields, nothing is read, and the decode engine computes the prompt itself."""
    p, d = engines.a, engine128
    body = {"model": MODEL, "prompt": _prompt("unmappable", 0), "max_tokens": 8, "temperature": 0}
    prefill = _post(p.url, build_prefill_request(body))
    params = dict(prefill["kv_transfer_params"])
    real = fetch_engine_info(params["remote_host"], params["remote_port"], 0, timeout_s=10)
    assert real.kv_layout is not None
    lay = msgspec.structs.replace(real.kv_layout, num_kv_heads=4, head_size=32)
    # another engine id: the decode engine keeps one handshake per peer engine, and it has one with p
    liar = HandshakeServer(msgspec.structs.replace(real, kv_layout=lay, engine_id="liar"), "127.0.0.1", 0)
    try:
        params["remote_port"] = int(liar.endpoint.rsplit(":", 1)[1])
        params["remote_engine_id"] = "liar"
        failed = _metric(d.url, "llmd:kv_handshakes_total", result="failed")
        ok = _metric(d.url, "llmd:kv_transfers_total", result="ok")
        decoded = _post(d.url, build_decode_request(body, {**prefill, "kv_transfer_params": params}))
        assert _text(decoded) == _text(_post(p.url, body))
        wait_until(
            lambda: _metric(d.url, "llmd:kv_handshakes_total", result="failed") > failed,
            30,
            "the refused handshake to be counted",
            interval=0.2,
        )
        assert _metric(d.url, "llmd:kv_transfers_total", result="ok") == ok  # nothing was read
        log = d.log_path.read_text(errors="replace")
        assert "kv_layout.num_kv_heads: local=2 remote=4" in log
        assert "kv_layout.head_size: local=64 remote=32" in log
        assert liar.served >= 1
    finally:
        liar.close()
