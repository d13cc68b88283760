"""``vllm-llmd sim``: profiles, errors, the router config it writes, several processes, clean stops."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from vllm_llmd.cli import main
from vllm_llmd.router.config import load_config
from vllm_llmd.sim.fleet import layout, router_config_yaml
from vllm_llmd.sim.profile import ProfileError, load_profile, parse_profile
from vllm_llmd.testing.wait import wait_until


def test_unknown_profile_key_is_an_error_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "p.yaml"
    p.write_text("classes:\n  - name: a\n    count: 2\n    blok_size: 16\n")
    assert main(["sim", "--profile", str(p), "--tokenizer", str(tmp_path)]) == 2
    assert "blok_size" in capsys.readouterr().err


def test_a_pod_that_cannot_hold_one_request_is_refused() -> None:
    with pytest.raises(ProfileError, match="cannot hold one max_model_len"):
        parse_profile({"classes": [{"block_size": 16, "num_gpu_blocks": 10, "max_model_len": 4096}]})


def test_no_tokenizer_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "--pods", "1"]) == 2
    assert "tokenizer" in capsys.readouterr().err


def test_pods_are_spread_over_classes_and_defaults_merge(tmp_path: Path) -> None:
    p = tmp_path / "f.yaml"
    p.write_text(
        "tokenizer: models/x\ndefaults: {cost: {step_s: 0.5}, block_size: 32}\n"
        "classes:\n  - {name: a, count: 1, cost: {speed: 2}}\n  - {name: b, count: 3}\n"
    )
    prof = load_profile(p)
    assert prof.tokenizer == str((tmp_path / "models" / "x").resolve())
    pods = prof.pods(8)
    assert [x.name for x in pods] == ["a", "a", "b", "b", "b", "b", "b", "b"]
    assert pods[0].cost.step_s == 0.5 and pods[0].cost.speed == 2 and pods[0].block_size == 32
    assert pods[2].cost.speed == 1.0


def test_router_config_is_what_the_router_reads(tmp_path: Path) -> None:
    pods = parse_profile({"classes": [{"name": "a", "count": 2}, {"name": "b", "count": 1, "kv_events": False}]}).pods()
    specs = layout(pods, base_port=30000)
    assert [s.port for s in specs] == [30000, 30003, 30006]
    f = tmp_path / "r.yaml"
    f.write_text(router_config_yaml(specs, "m", "/tok"))
    cfg = load_config(f)
    assert cfg.models == ["m"] and cfg.tokenizer.path == "/tok"
    assert [(p.url, p.events, p.replay) for p in cfg.pods] == [
        ("http://127.0.0.1:30000", "tcp://127.0.0.1:30001", "tcp://127.0.0.1:30002"),
        ("http://127.0.0.1:30003", "tcp://127.0.0.1:30004", "tcp://127.0.0.1:30005"),
        ("http://127.0.0.1:30006", None, None),
    ]
    assert {p.accelerator for p in cfg.pods} == {"cpu"}  # the profile's label, for the accelerator filter


@pytest.mark.parametrize(("processes", "sig"), [(2, signal.SIGTERM), (1, signal.SIGINT)])
def test_fleet_serves_and_stops_cleanly(test_model_dir: Path, tmp_path: Path, processes: int, sig: int) -> None:
    ep, out = tmp_path / "ep.json", tmp_path / "out.txt"
    cmd = [sys.executable, "-m", "vllm_llmd.cli", "sim", "--pods", "4", "--processes", str(processes),
           "--tokenizer", str(test_model_dir), "--endpoints", str(ep)]  # fmt: skip
    with open(out, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: b"ready:" in out.read_bytes() or proc.poll() is not None, 60, "the simulator")
        assert proc.poll() is None, out.read_text()
        pods = json.loads(ep.read_text())
        assert len(pods) == 4 and len({p["url"] for p in pods}) == 4
        for p in pods:
            body = json.dumps({"model": "test-model", "prompt": "ka ri to", "max_tokens": 2}).encode()
            req = urllib.request.Request(p["url"] + "/v1/completions", data=body)
            with urllib.request.urlopen(req, timeout=30) as r:
                assert json.loads(r.read())["usage"]["completion_tokens"] == 2
    finally:
        proc.send_signal(sig)
        rc = proc.wait(timeout=30)
    text = out.read_text()
    assert rc == 0, text
    assert "stopped: 4 pods served 4 requests" in text
    assert f"in {processes} process(es)" in text
