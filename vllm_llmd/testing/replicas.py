"""Router replicas as separate processes (``vllm-llmd router --config ...``, as a Deployment runs
them), for the active-active tests and ``bench/replicas.py``: start, time the probes, read the
index size from ``/metrics``, send a completion and see which pod served it (``X-LLMD-Pod``).

Only the standard library on the client side, so tests and benchmarks can drive replicas from
threads without an event loop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vllm_llmd.testing.engine import EngineProcess, file_tail, free_port, stop_process_group


def write_config(path: Path, engines: Sequence[EngineProcess], model_dir: Path, **overrides: Any) -> Path:
    """One YAML for every replica: the engines (HTTP, events, replay), the tokenizer, ``overrides``."""
    pods = [
        {"url": e.url, "events": e.spec.events_endpoint, "replay": e.spec.replay_endpoint}
        for e in engines
        if e.spec.events_endpoint
    ]
    data: dict[str, Any] = {
        "host": "127.0.0.1",
        "models": [engines[0].spec.served_model_name],
        "pods": pods,
        "tokenizer": {"path": str(model_dir)},
        "log_level": "warning",
    }
    data.update(overrides)
    path.write_text(yaml.safe_dump(data))
    return path


@dataclass
class Routed:
    status: int
    pod: str
    predicted_cached_tokens: int
    prompt_tokens: int


class RouterReplica:
    """One ``vllm-llmd router`` process in its own process group."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RouterReplica:
        cmd = [sys.executable, "-m", "vllm_llmd.cli", "router", "--config", str(self.config), "--port", str(self.port)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        return self

    def _status(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(self.base + path, timeout=5) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except (urllib.error.URLError, OSError):
            return None

    def wait_for(self, path: str, timeout: float = 120.0, interval: float = 0.02) -> float:
        """Poll ``path`` until it answers 200; seconds since the process was started."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None and self.proc.poll() is None, f"router exited:\n{self.log_tail()}"
            if self._status(path) == 200:
                return time.monotonic() - self.started_at
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.base}{path} not 200 within {timeout} s:\n{self.log_tail()}")
            time.sleep(interval)

    def get_json(self, path: str) -> Any:
        try:
            with urllib.request.urlopen(self.base + path, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return json.loads(e.read())

    def metric(self, name: str) -> float:
        """The sum of a metric's samples in the router's ``/metrics``."""
        with urllib.request.urlopen(self.base + "/metrics", timeout=10) as r:
            text = r.read().decode()
        return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.split("{")[0].split(" ")[0] == name)

    def index_blocks(self) -> int:
        return int(self.metric("llmd_router_index_blocks"))

    def complete(self, prompt: str, model: str = "test-model", max_tokens: int = 1, timeout: float = 300) -> Routed:
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens}).encode()
        req = urllib.request.Request(
            self.base + "/v1/completions", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out = json.loads(r.read())
            return Routed(
                int(r.status),
                r.headers.get("X-LLMD-Pod", ""),
                int(r.headers.get("X-LLMD-Predicted-Cached-Tokens", "0")),
                int(out["usage"]["prompt_tokens"]),
            )

    def log_tail(self, lines: int = 30) -> str:
        return file_tail(self.log_path, lines)

    def kill(self) -> None:
        """SIGKILL: a replica that dies without shutting down."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, 15)
            self.proc = None

    def __enter__(self) -> RouterReplica:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
