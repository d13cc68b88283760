"""The engine plugin, proven on real vLLM CPU engines."""

from __future__ import annotations

import json
import urllib.request

import pytest

pytestmark = pytest.mark.engine


def _complete(url: str, prompt: str, max_tokens: int = 4) -> dict:
    body = json.dumps({"model": "test-model", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    req = urllib.request.Request(
        url + "/v1/completions", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_register_ran_in_api_server_engine_core_and_worker(engines):
    for engine in engines:
        records = engines.plugin_roles(engine)
        roles = {r["role"] for r in records}
        assert {"api_server", "engine_core", "worker"} <= roles, records
        # the API server is the process we started; the others are its children
        assert {"role": "api_server", "pid": engine.pid} in records
        # idempotent: one registration per process
        pids = [r["pid"] for r in records]
        assert len(pids) == len(set(pids))


def test_connector_resolves_by_registered_name(engines):
    # Both engines were started with {"kv_connector": "LLMDConnector"} and no module path: vLLM
    # resolved the name through the registry the plugin filled, and built both halves.
    for engine in engines:
        log = engine.log_path.read_text(errors="replace")
        assert "kv_connector_module_path=None" in log
        assert log.count("Creating v1 connector with name: LLMDConnector") >= 2  # scheduler + worker
        out = _complete(engine.url, "Kari tone musa lovi " * 20)
        assert out["choices"][0]["text"]
        assert out["usage"]["completion_tokens"] == 4
