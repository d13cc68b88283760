"""What a loaded but idle KV connector costs an engine: side by side, alternating, pinned (issue 11).

Two engines of the same model run at once, each pinned to its own core as ``serving.py`` pins them
(``VLLM_CPU_OMP_THREADS_BIND``): engine X with the variant under test, engine Y with the baseline
(no ``--kv-transfer-config``). The same workload is sent to X, then to Y, ``--rounds`` times
(alternating, so drift in machine load hits both); then the engines are restarted on swapped cores
and the rounds repeat, so neither variant keeps the faster core. Only one engine is loaded at a
time. Reported: each variant's median throughput over all its runs and the ratio to the baseline;
and, before any load, each engine's CPU use while idle (seconds of CPU per second of wall time,
over ``--idle-seconds``, summed over the engine's processes).

Variants (``--variant``):
  llmd         LLMDConnector, kv_both, no requests ever use it
  llmd-tiers   the same with a DRAM tier (``tiers.dram.capacity`` = ``--dram``) and, with
               ``--disk DIR``, a disk tier
  ENV=VALUE,.. appended to a variant (``llmd:UCX_MEM_EVENTS=no``) sets engine environment
               variables, to bisect where a cost comes from

``--ping SECONDS`` (``--variant llmd --baseline llmd``): during each of the variant's runs a thread sends a
handshake to its side channel every SECONDS, which keeps the side channel's read window, and with it
the worker's UCX progress thread, awake (connectors/read_windows.py): what an open window costs
an engine under load.

``--together``: after each round's runs one engine at a time, the same workloads are sent to both
engines at once, and each engine's throughput is recorded as ``<variant>@together``: what a
second loaded engine on the same host costs the first (the two cores are all the host has, so the
engines' own scheduler processes, API servers and the client compete with the two workers).

Workload: ``--prefixes`` shared prefixes of ``--prefix-len`` tokens, each request a prefix plus
``--suffix-len`` unique tokens, ``--output-len`` tokens out (ignore_eos), ``--requests`` requests at
``--concurrency`` in flight, streamed; ``--prefix-len 0`` makes every prompt unique (no reuse:
``--variant llmd-tiers --baseline llmd`` is then what storing every block in the tiers costs).
Example (the numbers in bench/RESULTS.md):

    flock /tmp/llmd-engine.lock .venv/bin/python bench/bench_idle_connector.py --variant llmd --rounds 3

One placement per engine-lock hold: ``--placements 1 --first-placement 0``, then ``1``, with tags.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tier_load import group_cpu_seconds, load_avg, random_tokens, run
from vllm_llmd.connectors.handshake import fetch_engine_info

from vllm_llmd.testing.engine import EngineProcess, EngineSpec, free_port
from vllm_llmd.testing.model import make_test_model

OUT = Path(__file__).resolve().parent / "out" / "idle_connector"


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name)[:80]


def variant_config(name: str, args: argparse.Namespace) -> tuple[dict[str, Any] | None, dict[str, str]]:
    name = name.partition("#")[0]  # "none#2": a second engine of the same variant
    pinged = name.endswith("+ping")
    base, _, env_part = name.removesuffix("+ping").partition(":")
    env = dict(kv.split("=", 1) for kv in env_part.split(",") if kv)
    if base == "none":
        return None, env
    extra: dict[str, Any] = {}
    if base == "llmd-tiers":
        tiers: dict[str, Any] = {"dram": {"capacity": args.dram}}
        if args.disk:
            tiers["disk"] = {"path": args.disk, "capacity": args.disk_capacity}
        extra["tiers"] = tiers
    elif base != "llmd":
        raise SystemExit(f"unknown variant {name!r}")
    if pinged:
        extra["side_channel_port"] = args.side_channel_port
    cfg: dict[str, Any] = {"kv_connector": "LLMDConnector", "kv_role": "kv_both"}
    if extra:
        cfg["kv_connector_extra_config"] = extra
    return cfg, env


def start(model: Path, variant: str, core: int, args: argparse.Namespace, log: Path) -> EngineProcess:
    cfg, env = variant_config(variant, args)
    spec = EngineSpec(
        model=model,
        block_size=64,
        num_gpu_blocks=args.gpu_blocks,
        max_model_len=4096,
        cpu_core=core,
        events_port=None,
        replay_port=None,
        kv_transfer_config=cfg,
        extra_env=env,
    )
    e = EngineProcess(spec, log)
    e.start_ready()
    return e


def workload(args: argparse.Namespace, seed: int) -> list[tuple[list[int], str]]:
    rng = random.Random(seed)
    prefixes = [random_tokens(args.prefix_len, rng) for _ in range(args.prefixes)]
    return [(prefixes[i % args.prefixes] + random_tokens(args.suffix_len, rng), "") for i in range(args.requests)]


class Pinger:
    """Handshakes with a side channel every ``every_s`` while running (opens its read window)."""

    def __init__(self, port: int, every_s: float) -> None:
        self.port, self.every_s, self.sent = port, every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            fetch_engine_info("127.0.0.1", self.port, 0, 5.0)
            self.sent += 1
            if self._stop.wait(self.every_s):  # the ping period, not synchronisation
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.sent


def run_together(
    engines: dict[str, EngineProcess], names: list[str], args: argparse.Namespace, seed: int
) -> dict[str, dict[str, Any]]:
    """The same workload sent to every engine at once (one thread each); each engine's summary."""
    out: dict[str, dict[str, Any]] = {}

    def one(n: str) -> None:
        out[n] = run(engines[n].url, "test-model", workload(args, seed), args.output_len, args.concurrency).summary()

    threads = [threading.Thread(target=one, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def idle_cpu(engine: EngineProcess, seconds: float) -> float:
    assert engine.proc is not None
    c0, t0 = group_cpu_seconds(engine.proc.pid), time.monotonic()
    time.sleep(seconds)  # measuring an idle interval: the wait is the measurement itself
    return (group_cpu_seconds(engine.proc.pid) - c0) / (time.monotonic() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="llmd")
    ap.add_argument("--baseline", default="none")
    ap.add_argument("--model", default="small", choices=["tiny", "small", "wide"])
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs per variant per core placement")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--prefixes", type=int, default=8)
    ap.add_argument("--prefix-len", type=int, default=1024)
    ap.add_argument("--suffix-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--gpu-blocks", type=int, default=320)
    ap.add_argument("--idle-seconds", type=float, default=20.0)
    ap.add_argument("--dram", default="1GiB")
    ap.add_argument("--disk", default=None)
    ap.add_argument("--disk-capacity", default="4GiB")
    ap.add_argument("--placements", type=int, default=2, choices=[1, 2])
    ap.add_argument(
        "--first-placement",
        type=int,
        default=0,
        choices=[0, 1],
        help="1: start with the variant on core 1 (one placement per engine-lock hold: --placements 1)",
    )
    ap.add_argument("--ping", type=float, default=0.0, help="seconds between handshakes to the variant (0: none)")
    ap.add_argument("--together", action="store_true", help="also load both engines at once each round")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    args.side_channel_port = free_port() if args.ping else 0

    OUT.mkdir(parents=True, exist_ok=True)
    model = make_test_model(OUT.parent / "models" / args.model, shape=args.model, seed=0)
    names = [args.variant + ("+ping" if args.ping else ""), args.baseline]
    if names[1] == names[0]:
        names[1] += "#2"
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    if args.together:
        runs.update({f"{n}@together": [] for n in names})
    idle: dict[str, list[float]] = {n: [] for n in names}
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    loads = [load_avg()]
    for placement in range(args.first_placement, args.first_placement + args.placements):
        cores = {names[0]: placement % 2, names[1]: (placement + 1) % 2}
        engines: dict[str, EngineProcess] = {}
        try:
            for n in names:
                log = OUT / "logs" / f"{args.tag or 'run'}-{slug(n)}-p{placement}.log"
                engines[n] = start(model, n, cores[n], args, log)
            for n in names:  # warm-up, then idle CPU
                run(engines[n].url, "test-model", workload(args, 999)[:4], args.output_len, 2)
            for n in names:
                idle[n].append(idle_cpu(engines[n], args.idle_seconds))
            for r in range(args.rounds):
                for n in names if r % 2 == 0 else names[::-1]:
                    pinger = Pinger(args.side_channel_port, args.ping) if args.ping and n == names[0] else None
                    s = run(
                        engines[n].url,
                        "test-model",
                        workload(args, 100 * placement + r),
                        args.output_len,
                        args.concurrency,
                    )
                    if pinger is not None:
                        pinger.stop()
                    row = {**s.summary(), "core": cores[n], "round": r, "placement": placement, "load": load_avg()}
                    runs[n].append(row)
                    print(
                        f"  {n:>28} core {cores[n]} round {r}: {row['req_s']:.2f} req/s "
                        f"ttft p50 {row['ttft_p50_ms']} ms  load {row['load']}",
                        flush=True,
                    )
                if args.together:
                    both = run_together(engines, names, args, 100 * placement + r)
                    for n in names:
                        row = {**both[n], "core": cores[n], "round": r, "placement": placement, "load": load_avg()}
                        runs[f"{n}@together"].append(row)
                        label = f"{n}@together"
                        print(f"  {label:>28} core {cores[n]} round {r}: {row['req_s']:.2f} req/s", flush=True)
        finally:
            for e in engines.values():
                e.stop()
        loads.append(load_avg())

    med = {n: statistics.median(x["req_s"] for x in v) for n, v in runs.items()}
    result = {
        "started": started,
        "args": vars(args),
        "median_req_s": med,
        "ratio": med[names[0]] / med[names[1]],
        "idle_cpu": {n: [round(x, 4) for x in v] for n, v in idle.items()},
        "runs": runs,
        "load_avg": loads,
    }
    out = OUT / f"{args.tag or 'result'}-{slug(names[0])}.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("median_req_s", "ratio", "idle_cpu", "load_avg")}, indent=2))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
