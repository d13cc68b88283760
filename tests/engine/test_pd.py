"""Prefill/decode disaggregation with LLMDConnector on two real vLLM CPU engines, KV over NIXL (UCX,
host memory). The test plays the router: it drives the two legs with vllm_llmd.pd."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from vllm_llmd.pd import build_decode_request, build_prefill_request
from vllm_llmd.testing.engine import EngineProcess, EngineSpec

pytestmark = pytest.mark.engine

EXTRA = {"lease_seconds": 5, "transfer_timeout_seconds": 10}


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
        )
        return EngineProcess(spec, logs / f"{role}.log")

    p, d = engine("kv_producer"), engine("kv_consumer")
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda e: e.start_ready(), (p, d)))
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
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


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
        assert _metric(d.url, "llmd:kv_transfer_bytes_total", memory="DRAM") > bytes_before


def test_prefill_releases_its_lease_once_decode_pulled(pd_pair):
    p, d = pd_pair
    released = _metric(p.url, "llmd:kv_leases_total", event="released")
    body = {"model": "test-model", "prompt": _prompt(99), "max_tokens": 4, "temperature": 0}
    _post(d.url, build_decode_request(body, _post(p.url, build_prefill_request(body))))
    deadline = time.monotonic() + 30
    while _metric(p.url, "llmd:kv_leases_total", event="released") <= released:
        assert time.monotonic() < deadline, "the prefill engine never released the lease"
        time.sleep(0.2)
    assert _metric(p.url, "llmd:kv_lease_held_requests") == 0
