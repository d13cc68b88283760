"""The routers the benchmarks compare, started as child processes and stopped by their own handles.

Each router row is a :class:`RouterKind`: a name, how to build its command line for a list of
workers, and (for vllm-router's ``kv_aware``) the engine settings it needs. :class:`RouterProcess`
starts one in its own process group and stops exactly that group, so nothing else on the machine
is touched. Shared by ``bench/serving.py`` (real engines) and ``bench/overhead/run.py`` (a trivial
backend).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vllm_llmd.testing.engine import file_tail, stop_process_group

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
BENCH_DIR = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:port (lingering closed connections on it do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) != 0


@dataclass
class Worker:
    """One backend as a router sees it."""

    url: str
    events: str | None = None  # tcp://host:port of the KV event publisher
    replay: str | None = None  # tcp://host:port of the replay endpoint
    model_dir: Path | None = None
    served_name: str = "test-model"


@dataclass
class Launch:
    cmd: list[str]
    port: int
    #: extra ports the router opens (e.g. vllm-router's Prometheus listener) that must be free again after stop
    side_ports: list[int] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class RouterKind:
    name: str
    label: str
    build: Callable[[list[Worker], int], Launch]
    #: environment and extra vLLM flags the engines need for this router (applied to this row only)
    engine_env: dict[str, str] = field(default_factory=dict)
    engine_args: list[str] = field(default_factory=list)
    #: serve the model under its directory path instead of the short name (a router that loads the
    #: tokenizer from the model identity needs a path it can open)
    served_name_is_path: bool = False
    available: Callable[[], str | None] = lambda: None  # None = available, else why not
    #: per-engine environment (engine index -> variables), e.g. a distinct NIXL side-channel port
    per_engine_env: Callable[[int], dict[str, str]] | None = None
    #: a prefill/decode row (the P/D table adds disaggregated fraction and KV bytes moved)
    pd: bool = False


def _vllm_router_bin() -> str | None:
    cand = VENV_BIN / "vllm-router"
    if cand.exists():
        return str(cand)
    peers = BENCH_DIR / ".venv-peers" / "bin" / "vllm-router"
    if peers.exists():
        return str(peers)
    return shutil.which("vllm-router")


def _vllm_router_missing() -> str | None:
    return None if _vllm_router_bin() else "vllm-router not installed (run bench/setup.sh)"


def _vllm_router(policy: str) -> Callable[[list[Worker], int], Launch]:
    def build(workers: list[Worker], port: int) -> Launch:
        prom = free_port()
        cmd = [
            str(_vllm_router_bin()),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--policy",
            policy,
            "--worker-urls",
            *[w.url for w in workers],
            "--prometheus-port",
            str(prom),
            "--prometheus-host",
            "127.0.0.1",
            "--worker-startup-check-interval",
            "1",
            "--log-level",
            "warning",
        ]
        if policy == "kv_aware":
            for w in workers:
                if w.events:
                    cmd += ["--kv-event-source", f"{w.url}={w.events}"]
                if w.replay:
                    cmd += ["--kv-event-replay-source", f"{w.url}={w.replay}"]
            cmd += ["--kv-event-block-size", "64", "--kv-event-model", workers[0].served_name]
        return Launch(cmd=cmd, port=port, side_ports=[prom])

    return build


def _oracle(workers: list[Worker], port: int) -> Launch:
    cmd = [sys.executable, str(BENCH_DIR / "oracle_router.py"), "--port", str(port)]
    for w in workers:
        cmd += ["--worker", w.url]
    return Launch(cmd=cmd, port=port)


def _oracle_spread(workers: list[Worker], port: int) -> Launch:
    """The oracle proxy with its hot prefix spread by in-flight count (oracle_router.py --spread-hot 0.25)."""
    launch = _oracle(workers, port)
    return dataclasses.replace(launch, cmd=[*launch.cmd, "--spread-hot", "0.25"])


def _oracle_assigned(workers: list[Worker], port: int) -> Launch:
    """The oracle proxy with the placement in ``LLMD_BENCH_ORACLE_ASSIGN`` (oracle_router.py --assign)."""
    launch = _oracle(workers, port)
    assign = os.environ.get("LLMD_BENCH_ORACLE_ASSIGN", "")
    return dataclasses.replace(launch, cmd=[*launch.cmd, "--assign", assign]) if assign else launch


def _ours(workers: list[Worker], port: int, config: Path | None = None) -> Launch:
    cmd = [str(VENV_BIN / "vllm-llmd"), "router", "--host", "127.0.0.1", "--port", str(port)]
    if config is not None:
        cmd += ["--config", str(config)]
    for w in workers:
        spec = w.url
        if w.events:
            spec += "=" + w.events + ("," + w.replay if w.replay else "")
        cmd += ["--worker", spec]
    if workers and workers[0].model_dir is not None:
        cmd += ["--tokenizer", str(workers[0].model_dir)]
    if workers:
        cmd += ["--model", workers[0].served_name]
    # experiments: a scheduling profile to try instead of the default, and decision logs
    # (``route ... -> pod`` lines at debug level, in the row's logs/router.log)
    if config is None and os.environ.get("LLMD_BENCH_OURS_CONFIG"):
        cmd += ["--config", os.environ["LLMD_BENCH_OURS_CONFIG"]]
    cmd += ["--log-level", os.environ.get("LLMD_BENCH_ROUTER_LOG_LEVEL", "warning")]
    return Launch(cmd=cmd, port=port)


def _ours_scored(
    name: str, ttft_params: dict[str, object], extra: dict[str, object] | None = None
) -> Callable[[list[Worker], int], Launch]:
    """Our router with the default profile's one scorer, ``estimated-ttft``, given ``ttft_params``
    (e.g. ``peer_loads``) and the other config sections in ``extra``: a config file holding just
    that, the pods from ``--worker``."""

    def build(workers: list[Worker], port: int) -> Launch:
        cfg = {"profile": {"scorers": [{"type": "estimated-ttft", "params": ttft_params}]}, **(extra or {})}
        cfg_dir = BENCH_DIR / "out" / "ours_configs"
        cfg_dir.mkdir(parents=True, exist_ok=True)
        path = cfg_dir / f"{name}.json"  # JSON is YAML
        path.write_text(json.dumps(cfg, indent=1))
        return _ours(workers, port, path)

    return build


def _vllm_router_pd(workers: list[Worker], port: int) -> Launch:
    """vLLM's own P/D stack: ``vllm-router --vllm-pd-disaggregation --kv-connector nixl``, engine 0
    prefills, engine 1 decodes (both engines run vLLM's NixlConnector)."""
    if len(workers) != 2:
        raise ValueError("the P/D rows need exactly two engines (one prefill, one decode)")
    prom = free_port()
    cmd = [
        str(_vllm_router_bin()),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--vllm-pd-disaggregation",
        "--kv-connector",
        "nixl",
        "--policy",
        "round_robin",
        "--prefill",
        workers[0].url,
        "--decode",
        workers[1].url,
        "--prometheus-port",
        str(prom),
        "--prometheus-host",
        "127.0.0.1",
        "--worker-startup-check-interval",
        "1",
        "--log-level",
        "warning",
    ]
    return Launch(cmd=cmd, port=port, side_ports=[prom])


def _ours_pd(peers: bool, prefill_weight: float | None = None) -> Callable[[list[Worker], int], Launch]:
    """Our router with P/D: dedicated roles (engine 0 prefill, engine 1 decode) or, with ``peers``,
    both engines ``role: both`` and the selective peer decider (``pd.peers``); ``prefill_weight``
    overrides the ``estimated-ttft`` scorer's (default 2.0)."""

    def build(workers: list[Worker], port: int) -> Launch:
        if len(workers) != 2:
            raise ValueError("the P/D rows need exactly two engines")
        roles = ["both", "both"] if peers else ["prefill", "decode"]
        pods = []
        for w, role in zip(workers, roles, strict=True):
            pod: dict[str, object] = {"url": w.url, "role": role}
            if w.events:
                pod["events"] = w.events
            if w.replay:
                pod["replay"] = w.replay
            pods.append(pod)
        cfg: dict[str, object] = {"pods": pods, "pd": {"threshold_tokens": 256, "peers": peers}}
        if prefill_weight is not None:
            scorer = {"type": "estimated-ttft", "params": {"prefill_weight": prefill_weight}}
            cfg["profile"] = {"scorers": [scorer]}
        cfg_dir = BENCH_DIR / "out" / "pd_configs"
        cfg_dir.mkdir(parents=True, exist_ok=True)
        cfg_path = cfg_dir / f"{'peers' if peers else 'roles'}-{port}.json"  # JSON is YAML
        cfg_path.write_text(json.dumps(cfg, indent=1))
        cmd = [str(VENV_BIN / "vllm-llmd"), "router", "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--config", str(cfg_path), "--log-level", "warning"]
        if workers[0].model_dir is not None:
            cmd += ["--tokenizer", str(workers[0].model_dir)]
        cmd += ["--model", workers[0].served_name]
        return Launch(cmd=cmd, port=port)

    return build


#: engine settings of the P/D rows (both engines ``kv_both``: either may produce or consume)
NIXL_KV = {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"}
LLMD_KV = {"kv_connector": "LLMDConnector", "kv_role": "kv_both"}
#: the peer-load rows: every engine with a DRAM tier (what a peer reads from; docs/peer-loading.md),
#: 512 MiB = 2,730 blocks of the small model (1,024 of the wide), more than a workload's prompts
LLMD_DRAM_KV = {**LLMD_KV, "kv_connector_extra_config": {"tiers": {"dram": {"capacity": "512MiB"}}}}


def _nixl_side_channel(_i: int) -> dict[str, str]:
    # vLLM's NixlConnector listens on VLLM_NIXL_SIDE_CHANNEL_PORT (default 5600 for every engine)
    return {"VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port()), "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1"}


def _ours_missing() -> str | None:
    exe = VENV_BIN / "vllm-llmd"
    if not exe.exists():
        return "vllm-llmd console script not installed"
    r = subprocess.run([str(exe), "router", "--help"], capture_output=True, timeout=60)
    return None if r.returncode == 0 else "`vllm-llmd router` CLI not available yet"


def _tiered(
    name: str, description: str, ttft_params: dict[str, object], extra: dict[str, object] | None = None
) -> RouterKind:
    """Our router with ``estimated-ttft`` given ``ttft_params``, on engines with DRAM tiers (issue
    12's peer-load rows: every arm on the same engines, ``LLMD_DRAM_KV``)."""
    return RouterKind(
        name,
        description,
        _ours_scored(name, ttft_params, extra),
        engine_args=["--kv-transfer-config", json.dumps(LLMD_DRAM_KV)],
        available=_ours_missing,
    )


def _scored(
    name: str, description: str, ttft_params: dict[str, object], extra: dict[str, object] | None = None
) -> RouterKind:
    """Our router with ``estimated-ttft`` given ``ttft_params``, on the rows' default engines (the
    untiered variants of ``ours``: one parameter changed per row)."""
    return RouterKind(name, description, _ours_scored(name, ttft_params, extra), available=_ours_missing)


def _pd_ours(name: str, description: str, peers: bool, prefill_weight: float | None = None) -> RouterKind:
    """Our router's P/D rows (``_ours_pd``), on engines with ``LLMDConnector``."""
    return RouterKind(
        name,
        description,
        _ours_pd(peers, prefill_weight),
        engine_args=["--kv-transfer-config", json.dumps(LLMD_KV)],
        available=_ours_missing,
        pd=True,
    )


ROUTERS: dict[str, RouterKind] = {
    k.name: k
    for k in (
        RouterKind(
            "rr",
            "round-robin (vllm-router round_robin)",
            _vllm_router("round_robin"),
            available=_vllm_router_missing,
        ),
        RouterKind(
            "cache_aware",
            "vllm-router cache_aware",
            _vllm_router("cache_aware"),
            available=_vllm_router_missing,
        ),
        RouterKind(
            "kv_aware",
            "vllm-router kv_aware (engine events)",
            _vllm_router("kv_aware"),
            # What vllm-router's kv_aware needs from the engines (its docs/kv_aware.md): vLLM's
            # sha256_cbor block hashes with a fixed hash seed, sent as full bytes.
            engine_env={"PYTHONHASHSEED": "0", "VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES": "0"},
            engine_args=["--prefix-caching-hash-algo", "sha256_cbor"],
            served_name_is_path=True,
            available=_vllm_router_missing,
        ),
        RouterKind("oracle", "static oracle (prefix k -> engine k mod N)", _oracle),
        RouterKind(
            "oracle_spread",
            "static oracle, but a prefix with over a quarter of the requests goes to the worker with fewest in flight",
            _oracle_spread,
        ),
        RouterKind(
            "oracle_assigned",
            "the static oracle's proxy, prefix k -> the engine LLMD_BENCH_ORACLE_ASSIGN names (a replayed placement)",
            _oracle_assigned,
        ),
        RouterKind("ours", "vllm-llmd router (ours)", _ours, available=_ours_missing),
        _scored(
            "ours_pw4",
            "vllm-llmd router (ours), estimated-ttft prefill_weight 4 (the default since 2026-12-04)",
            {"prefill_weight": 4},
        ),
        _scored(
            "ours_pw2",
            "vllm-llmd router (ours), estimated-ttft prefill_weight 2 (the default until 2026-12-04)",
            {"prefill_weight": 2},
        ),
        _scored(
            "ours_dt1",
            "vllm-llmd router (ours), decode_time_weight 1 (a request's own decode time on the pod is priced)",
            {"decode_time_weight": 1.0},
        ),
        _scored(
            "ours_dt1_dage10",
            "as ours_dt1 with speed.decode_max_age_s 10 (decode speeds back at the prior in 10 s, prefill kept)",
            {"decode_time_weight": 1.0},
            {"speed": {"decode_max_age_s": 10.0}},
        ),
        _scored(
            "ours_dw4",
            "vllm-llmd router (ours), decode_token_weight 4 (a queued decode token as 4 prefill tokens, not 0.05)",
            {"decode_token_weight": 4.0},
        ),
        _scored(
            "ours_rw600",
            "vllm-llmd router (ours), request_weight 600 (a request in flight on a pod as 600 prefill tokens)",
            {"request_weight": 600.0},
        ),
        _scored(
            "ours_rw1200",
            "vllm-llmd router (ours), request_weight 1200 (a request in flight on a pod as 1,200 prefill tokens)",
            {"request_weight": 1200.0},
        ),
        _scored(
            "ours_nolearn",
            "vllm-llmd router (ours), pod speeds not learned (speed.learn false: every pod at its prior)",
            {},
            {"speed": {"learn": False}},
        ),
        # issue 12's peer loads, on and off, on the same engines (LLMDConnector with a DRAM tier)
        _tiered("ours_tiers", "vllm-llmd router (ours), engines with DRAM tiers, no peer loads", {}),
        _tiered(
            "ours_tiers_pw4",
            "as ours_tiers with prefill_weight 4 (the default since 2026-12-04)",
            {"prefill_weight": 4},
        ),
        _tiered(
            "ours_tiers_bw0",
            "as ours_tiers with balance_weight 0 (new KV placed by queued work only, no footprint balance)",
            {"balance_weight": 0},
        ),
        _tiered(
            "ours_tiers_bw2",
            "as ours_tiers with balance_weight 2 (a pod's footprint excess costs at most 3x its prefill)",
            {"balance_weight": 2},
        ),
        _tiered(
            "ours_tiers_dw1",
            "as ours_tiers with decode_token_weight 1 (a queued decode token costs one prefill token; default 0.05)",
            {"decode_token_weight": 1.0},
        ),
        _tiered(
            "ours_tiers_dw4",
            "as ours_tiers with decode_token_weight 4 (a queued decode token costs four prefill tokens)",
            {"decode_token_weight": 4.0},
        ),
        _tiered(
            "ours_tiers_dt1",
            "as ours_tiers with decode_time_weight 1 (a request's own decode time on the pod is priced)",
            {"decode_time_weight": 1.0},
        ),
        _tiered(
            "ours_peers_dt1",
            "as ours_peers with decode_time_weight 1 (a request's own decode time on the pod is priced)",
            {"peer_loads": True, "decode_time_weight": 1.0},
        ),
        _tiered(
            "ours_peers_dt1_age10",
            "as ours_peers_dt1 with speed.max_age_s 10 (a pod starved of work is back at its prior in 10 s)",
            {"peer_loads": True, "decode_time_weight": 1.0},
            {"speed": {"max_age_s": 10.0}},
        ),
        _tiered(
            "ours_peers_dt1_dage10",
            "as ours_peers_dt1 with speed.decode_max_age_s 10 (decode speeds back at the prior in 10 s, prefill kept)",
            {"peer_loads": True, "decode_time_weight": 1.0},
            {"speed": {"decode_max_age_s": 10.0}},
        ),
        _tiered(
            "ours_peers",
            "vllm-llmd router (ours), engines with DRAM tiers, peer loads (estimated-ttft peer_loads)",
            {"peer_loads": True},
        ),
        _tiered(
            "ours_peers_rw600",
            "as ours_peers with request_weight 600 (a session moves off a crowded pod by a peer load)",
            {"peer_loads": True, "request_weight": 600.0},
        ),
        _tiered(
            "ours_peers_ev0",
            "as ours_peers with evict_weight 0 (loads pay the capacity term, not the last copies they evict)",
            {"peer_loads": True, "evict_weight": 0},
        ),
        _tiered(
            "ours_peers_ev4",
            "as ours_peers with evict_weight 4 (an evicted last copy or an over-budget duplicate priced 4x its tokens)",
            {"peer_loads": True, "evict_weight": 4},
        ),
        RouterKind(
            "pd_vllm_router",
            "P/D: vllm-router --vllm-pd-disaggregation + NixlConnector (1 prefill, 1 decode)",
            _vllm_router_pd,
            engine_args=["--kv-transfer-config", json.dumps(NIXL_KV)],
            per_engine_env=_nixl_side_channel,
            available=_vllm_router_missing,
            pd=True,
        ),
        _pd_ours("pd_ours", "P/D: vllm-llmd router + LLMDConnector (1 prefill, 1 decode, threshold 256)", peers=False),
        _pd_ours(
            "pd_ours_selective",
            "P/D: vllm-llmd router + LLMDConnector, selective among 2 colocated pods (pd.peers)",
            peers=True,
        ),
        _pd_ours(
            "pd_ours_selective_pw05",
            "P/D: as pd_ours_selective, estimated-ttft prefill_weight 0.5 (spills more: the decider fires)",
            peers=True,
            prefill_weight=0.5,
        ),
    )
}


class RouterStartError(RuntimeError):
    pass


class RouterProcess:
    """A router child process in its own process group; ``stop()`` ends exactly that group."""

    def __init__(self, kind: RouterKind, launch: Launch, log_path: Path) -> None:
        self.kind = kind
        self.launch = launch
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.launch.port}"

    def start(self) -> RouterProcess:
        for p in [self.launch.port, *self.launch.side_ports]:
            if not port_is_free(p):
                raise RouterStartError(f"port {p} is busy before starting {self.kind.name}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(self.launch.env)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(self.launch.cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.launch.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = 120.0, path: str = "/v1/models") -> RouterProcess:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RouterStartError(f"{self.kind.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        raise RouterStartError(f"{self.kind.name} not ready in {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return file_tail(self.log_path, lines)

    def get(self, path: str, port: int | None = None) -> str | None:
        url = f"http://127.0.0.1:{port or self.launch.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read().decode(errors="replace")
        except (urllib.error.URLError, OSError):
            return None

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        stop_process_group(self.proc, timeout)
        self.proc = None
        # the listener ports (incl. vllm-router's Prometheus one) must be free again for the next row
        deadline = time.monotonic() + 15
        ports = [self.launch.port, *self.launch.side_ports]
        while time.monotonic() < deadline and not all(port_is_free(p) for p in ports):
            time.sleep(0.2)
        busy = [p for p in ports if not port_is_free(p)]
        if busy:
            print(f"warning: ports {busy} still busy after stopping {self.kind.name}", file=sys.stderr)
