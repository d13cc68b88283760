"""Run a simulated fleet: N pods over a few processes (asyncio, many pods per process).

Port layout: pod ``i`` listens for HTTP on ``base_port + 3 i``, publishes KV events on
``base_port + 3 i + 1`` and serves replay on ``base_port + 3 i + 2`` (``base_port`` 0: free ports
picked at start). Pods are dealt to processes round-robin so every process gets a mix of classes.
The parent prints one line per pod, optionally writes a router config (``--router-config``, the
YAML ``vllm-llmd router --config`` reads) and a JSON listing (``--endpoints``), prints ``ready``,
and on SIGINT/SIGTERM stops every pod (and its child processes) cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from vllm_llmd.sim.profile import PodProfile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PodSpec:
    index: int
    host: str
    port: int
    events_port: int | None
    replay_port: int | None
    profile: PodProfile

    def listing(self, model: str) -> dict[str, Any]:
        out = {
            "index": self.index,
            "class": self.profile.name,
            "accelerator": self.profile.accelerator,
            "url": f"http://{self.host}:{self.port}",
            "events": None if self.events_port is None else f"tcp://{self.host}:{self.events_port}",
            "replay": None if self.replay_port is None else f"tcp://{self.host}:{self.replay_port}",
            "topic": f"kv@{self.host}:{self.port}@{model}",
            "block_size": self.profile.block_size,
            "num_gpu_blocks": self.profile.num_gpu_blocks,
        }
        return out


def _free_ports(n: int, host: str) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def layout(profiles: list[PodProfile], host: str = "127.0.0.1", base_port: int = 0) -> list[PodSpec]:
    n = len(profiles)
    if base_port:
        if base_port + 3 * n - 1 > 65535:
            raise ValueError(f"{n} pods need ports {base_port}..{base_port + 3 * n - 1}: beyond 65535")
        ports = [base_port + k for k in range(3 * n)]
    else:
        ports = _free_ports(3 * n, host)
    specs = []
    for i, p in enumerate(profiles):
        ev = ports[3 * i + 1] if p.kv_events else None
        rp = ports[3 * i + 2] if p.kv_events else None
        specs.append(PodSpec(i, host, ports[3 * i], ev, rp, p))
    return specs


def router_config_yaml(specs: list[PodSpec], model: str, tokenizer: str | None) -> str:
    """A ``vllm-llmd router --config`` file listing the pods (today's defaults for everything else)."""
    lines = ["# written by `vllm-llmd sim`: one entry per simulated pod", f"models: [{json.dumps(model)}]"]
    if tokenizer:
        lines.append(f"tokenizer: {{path: {json.dumps(tokenizer)}}}")
    lines.append("pods:")
    for s in specs:
        d = s.listing(model)
        lines.append(
            f"  # pod {s.index}: class {d['class']}, block_size {d['block_size']}, {d['num_gpu_blocks']} blocks"
        )
        lines.append(f"  - url: {d['url']}")
        lines.append(f"    accelerator: {d['accelerator']}")
        if d["events"]:
            lines.append(f"    events: {d['events']}")
        if d["replay"]:
            lines.append(f"    replay: {d['replay']}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- a shard


async def serve_pods(
    specs: list[PodSpec],
    model: str,
    tokenizer_dir: str,
    stop: asyncio.Event,
    on_ready: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Serve ``specs`` until ``stop`` is set; returns each pod's final stats."""
    import zmq.asyncio

    from vllm_llmd.router.tokenize import PromptTokenizer
    from vllm_llmd.sim.server import PodEndpoints, SimPod, Vocabulary, close_quietly

    tok = PromptTokenizer(tokenizer_dir)
    vocab = Vocabulary(tokenizer_dir)
    zctx = zmq.asyncio.Context()
    pods: list[SimPod] = []
    try:
        for s in specs:
            ep = PodEndpoints(s.index, s.host, s.port, s.events_port, s.replay_port)
            pod = SimPod(ep, s.profile, model, tok, vocab, zctx, root=tokenizer_dir)
            pods.append(pod)
            await pod.start()
        if on_ready is not None:
            on_ready()
        await stop.wait()
        return [{"index": p.ep.index, "requests": p.requests, **p.engine.stats()} for p in pods]
    finally:
        await close_quietly(pods)
        zctx.term()


def _install_loop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()


def _shard_main(payload: str, conn: Connection) -> None:
    """Entry point of a child process: serve its pods until SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and tells us
    data = json.loads(payload)
    specs = [PodSpec(**{**s, "profile": PodProfile.model_validate(s["profile"])}) for s in data["specs"]]
    _install_loop()

    async def main() -> list[dict[str, Any]]:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        return await serve_pods(specs, data["model"], data["tokenizer"], stop, lambda: conn.send({"ready": True}))

    try:
        stats = asyncio.run(main())
        conn.send({"stats": stats})
    except BaseException as e:  # report start-up failures (a port in use) to the parent
        with contextlib.suppress(Exception):
            conn.send({"error": f"{type(e).__name__}: {e}"})
        raise


# ---------------------------------------------------------------------------------------------- the fleet


def run_fleet(
    specs: list[PodSpec],
    model: str,
    tokenizer_dir: str,
    processes: int = 1,
    router_config: str | None = None,
    endpoints_file: str | None = None,
    out: Any = sys.stdout,
) -> int:
    """Serve the fleet until SIGINT/SIGTERM. Returns a process exit code."""
    processes = max(1, min(processes, len(specs)))
    shards = [specs[k::processes] for k in range(processes)]
    stop_requested = False

    def announce() -> None:
        for s in specs:
            d = s.listing(model)
            print(
                f"pod {d['index']} {d['class']} {d['url']} events={d['events']} replay={d['replay']} "
                f"block_size={d['block_size']} blocks={d['num_gpu_blocks']}",
                file=out,
            )
        if router_config:
            Path(router_config).write_text(router_config_yaml(specs, model, tokenizer_dir))
            print(f"router config: {router_config}", file=out)
        if endpoints_file:
            Path(endpoints_file).write_text(json.dumps([s.listing(model) for s in specs], indent=1))
        print(f"ready: {len(specs)} pods in {processes} process(es), pid {os.getpid()}", file=out, flush=True)

    if processes == 1:
        _install_loop()

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            stats = await serve_pods(specs, model, tokenizer_dir, stop, announce)
            _print_stats(stats, out)

        asyncio.run(main())
        return 0

    ctx = mp.get_context("spawn")
    children: list[tuple[mp.process.BaseProcess, Connection]] = []

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for shard in shards:
            parent_end, child_end = ctx.Pipe()
            payload = json.dumps(
                {
                    "model": model,
                    "tokenizer": tokenizer_dir,
                    "specs": [{**asdict(s), "profile": s.profile.model_dump()} for s in shard],
                }
            )
            proc = ctx.Process(target=_shard_main, args=(payload, child_end), daemon=False)
            proc.start()
            children.append((proc, parent_end))
        for proc, conn in children:
            while not conn.poll(0.2):
                if stop_requested or not proc.is_alive():
                    raise RuntimeError(f"simulator process {proc.pid} exited during start-up")
            msg = conn.recv()
            if "error" in msg:
                raise RuntimeError(f"simulator process {proc.pid}: {msg['error']}")
        announce()
        while not stop_requested:
            dead = [p for p, _ in children if not p.is_alive()]
            if dead:
                print(f"simulator process {dead[0].pid} died (exit {dead[0].exitcode}); stopping", file=sys.stderr)
                return 1
            time.sleep(0.5)
        return 0
    except RuntimeError as e:
        print(f"vllm-llmd sim: {e}", file=sys.stderr)
        return 1
    finally:
        stats: list[dict[str, Any]] = []
        for proc, _ in children:
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        for proc, conn in children:
            proc.join(timeout=15)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
            with contextlib.suppress(EOFError, OSError):
                while conn.poll(0):
                    msg = conn.recv()
                    stats.extend(msg.get("stats", []))
        for sig, handler in old.items():
            signal.signal(sig, handler)
        _print_stats(sorted(stats, key=lambda s: s["index"]), out)


def _print_stats(stats: list[dict[str, Any]], out: Any) -> None:
    if not stats:
        return
    reqs = sum(s["requests"] for s in stats)
    lag = max((s["max_lag_s"] for s in stats), default=0.0)
    print(
        f"stopped: {len(stats)} pods served {reqs} requests; worst step lag {lag * 1000:.1f} ms", file=out, flush=True
    )
