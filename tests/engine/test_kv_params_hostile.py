"""A client that reaches an engine directly (not through the router) and hands it malformed
``kv_transfer_params`` (issue 9, case 2). A value that is not an object (possible through
``vllm_xargs``) is answered 400 (before the plugin: 500 from vLLM's own code); a malformed object is
refused by the connector with one log line and the request is served as a plain one. The engine
keeps serving. Runs on the shared engine pair (``kv_both`` connectors)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from vllm_llmd.testing.engine import EngineProcess
from vllm_llmd.testing.wait import wait_until

pytestmark = pytest.mark.engine

MODEL = "test-model"
PROMPT = "Kari tone musa lovi " * 30

VALID = {
    "do_remote_prefill": True,
    "remote_engine_id": "engine-x",
    "remote_request_id": "cmpl-x",
    "remote_block_ids": [[1, 2, 3]],
    "remote_host": "127.0.0.1",
    "remote_port": 5600,
    "remote_num_tokens": 90,
    "remote_block_size": 32,
}

#: not an object: only vllm_xargs can carry these (its values may be strings, numbers, lists)
NOT_OBJECTS: dict[str, Any] = {"string": "anything", "number": 7, "list": ["do_remote_prefill", 1]}
#: what a client can put in a request body; each would reach Request.kv_transfer_params unchecked
HOSTILE: dict[str, dict[str, Any]] = {
    "flag not a bool": {"kv_transfer_params": {"do_remote_prefill": "yes"}},
    "wrong field types": {"kv_transfer_params": {**VALID, "remote_port": "5600", "remote_block_ids": "1,2"}},
    "negative ids": {"kv_transfer_params": {**VALID, "remote_block_ids": [[-1, -2, -3]]}},
    "huge list": {"kv_transfer_params": {**VALID, "remote_block_ids": [list(range(200_000))]}},
    "unspecified host": {"kv_transfer_params": {**VALID, "remote_host": "0.0.0.0"}},
}


def _send(engine: EngineProcess, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        engine.url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=180) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _post(engine: EngineProcess, body: dict[str, Any]) -> dict[str, Any]:
    status, out = _send(engine, body)
    assert status == 200, out
    return out


def _refused(engine: EngineProcess) -> float:
    text = urllib.request.urlopen(engine.url + "/metrics", timeout=60).read().decode()
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "llmd:kv_params_refused_total"
    )


def test_hostile_kv_transfer_params_are_refused_and_served_locally(engines) -> None:
    engine = engines.a
    plain = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    reference = _post(engine, plain)["choices"][0]["text"]
    log_before = engine.log_path.read_text(errors="replace").count("refused kv_transfer_params")
    refused_before = _refused(engine)
    for what, value in NOT_OBJECTS.items():
        status, out = _send(engine, {**plain, "vllm_xargs": {"kv_transfer_params": value}})
        assert status == 400, (what, status, out)
        assert "kv_transfer_params must be a JSON object" in json.dumps(out), out
    for what, extra in HOSTILE.items():
        out = _post(engine, {**plain, **extra})
        assert out["choices"][0]["text"] == reference, what  # computed locally, same greedy answer
    assert urllib.request.urlopen(engine.url + "/health", timeout=10).status == 200
    assert _post(engine, plain)["choices"][0]["text"] == reference
    wait_until(lambda: _refused(engine) >= refused_before + len(HOSTILE), 30, "the refusals counted", interval=0.2)
    log = engine.log_path.read_text(errors="replace")
    lines = [line for line in log.splitlines() if "refused kv_transfer_params" in line]
    assert len(lines) - log_before == len(HOSTILE), lines[-len(HOSTILE) :]
    assert all("serving it locally" in line for line in lines)
