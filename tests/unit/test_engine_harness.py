"""The engine harness's hang detection (vllm_llmd.testing.engine), with a real silent child process
standing in for an engine that hangs at start-up (no vLLM needed to show the harness's own logic)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from vllm_llmd.testing.engine import EngineProcess, EngineSpec, EngineStartError


class _SilentSpec(EngineSpec):
    """Starts a Python process that prints one line and then sleeps: a start that hangs."""

    def command(self) -> list[str]:
        hang = "import time; print('booting', flush=True); time.sleep(600)"  # pacing: a start that hangs on purpose
        return [sys.executable, "-c", hang]


def test_a_silent_start_is_detected_retried_and_its_stacks_logged(tmp_path: Path) -> None:
    spec = _SilentSpec(model=tmp_path, events_port=None, replay_port=None)
    engine = EngineProcess(spec, tmp_path / "engine.log")
    with pytest.raises(EngineStartError, match=r"silent for 2\.0s"):
        engine.start_ready(quiet_timeout=2.0, timeout=60.0, attempts=2)
    log = (tmp_path / "engine.log").read_text()
    assert len(re.findall(r"^=== start \d\d:", log, re.M)) == 2, "the hung start was retried once"
    assert log.count("=== start attempt") == 2
    assert "time.sleep" in log or "<module>" in log, f"no Python stack in the log:\n{log[-2000:]}"
    assert engine.proc is None, "the hung process group was stopped"


def test_a_child_that_exits_fails_at_once_with_its_log(tmp_path: Path) -> None:
    class _Crashing(EngineSpec):
        def command(self) -> list[str]:
            return [sys.executable, "-c", "import sys; print('bad flag --foo'); sys.exit(2)"]

    engine = EngineProcess(_Crashing(model=tmp_path, events_port=None, replay_port=None), tmp_path / "e.log")
    with pytest.raises(EngineStartError, match=r"exited with 2(.|\n)*bad flag --foo"):
        engine.start_ready(quiet_timeout=30.0, timeout=60.0, attempts=1)
    assert os.path.exists(tmp_path / "e.log")


def test_an_engine_can_run_under_another_venvs_python(tmp_path: Path) -> None:
    spec = EngineSpec(model=tmp_path, events_port=None, replay_port=None)
    assert spec.command()[0] == sys.executable
    other = EngineSpec(model=tmp_path, events_port=None, replay_port=None, python="/opt/venv-030/bin/python")
    assert other.command()[:3] == ["/opt/venv-030/bin/python", "-m", "vllm.entrypoints.openai.api_server"]


def test_the_engine_dtype_is_the_hosts_choice_unless_overridden(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import vllm_llmd.testing.engine as harness

    monkeypatch.delenv(harness.DTYPE_ENV, raising=False)
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    monkeypatch.setattr(harness, "cpu_flags", lambda: {"avx2", "fma"})
    assert harness.engine_dtype() == "float32"  # no oneDNN bf16 GEMM on an AVX2-only x86 host
    monkeypatch.setattr(harness, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert harness.engine_dtype() == "bfloat16"
    monkeypatch.setenv(harness.DTYPE_ENV, "float16")
    assert harness.engine_dtype() == "float16"
    cmd = EngineSpec(model=tmp_path, events_port=None, replay_port=None).command()
    assert cmd[cmd.index("--dtype") + 1] == "float16"
    assert [harness.dtype_bytes(d) for d in ("bfloat16", "float32")] == [2, 4]


def test_a_port_answering_garbage_is_not_healthy(tmp_path: Path) -> None:
    """A non-HTTP answer on the engine's port (a real TCP server writing binary bytes) reads as "not
    healthy", not as an exception out of the readiness poll."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]

    def answer() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(1024)
            conn.sendall(b"\xff\x00\x00\x00\x00\x00\x00\x00\x01\x7f@\x00\x00@\r\n\r\n")

    th = threading.Thread(target=answer, daemon=True)
    th.start()
    spec = _SilentSpec(model=tmp_path, port=port, events_port=None, replay_port=None)
    try:
        assert EngineProcess(spec, tmp_path / "engine.log").is_healthy() is False
    finally:
        th.join(timeout=10)
        srv.close()
