"""Where an engine's time goes with and without KV tiers, on a workload with no reuse (issue 11).

One engine of the small model (pinned as ``serving.py`` pins it, ``VLLM_CPU_OMP_THREADS_BIND``),
``LLMDConnector`` kv_both with the tiers of ``--variant``:

  llmd     no tiers
  dram     a DRAM tier (``--dram``)
  disk     a DRAM tier and a disk tier under ``--disk-dir`` (``--disk-capacity``)

After a warm-up, ``--runs`` runs of ``--requests`` unique ``--prompt-len``-token prompts (nothing is
ever reused, so every block is stored in the tiers and never read), ``--output-len`` tokens out, at
``--concurrency``, straight to the engine. Reported: each run's throughput; the CPU seconds each
thread of the engine's processes used over the runs (``/proc/<pid>/task/<tid>/stat``, user and
system), so the disk tier's writer thread, the scheduler and the model worker are seen apart; the
machine's ``/proc/stat`` deltas (user, system, iowait, softirq, steal); and, with ``--py-spy``, a
``py-spy record --subprocesses --threads`` sample of every thread (raw folded stacks, 100 Hz) for
``bench/profile_tiers.py --fold FILE``.

    flock /tmp/llmd-engine.lock .venv/bin/python bench/profile_tiers.py --variant disk --tag disk1 --py-spy
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tier_load import load_avg, random_tokens, run

OUT = Path(__file__).resolve().parent / "out" / "profile_tiers"
STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def thread_cpu(pgid: int) -> dict[str, tuple[float, float]]:
    """``"pid/tid name"`` -> (user, system) CPU seconds, for every thread of the process group."""
    tick = 100.0
    out: dict[str, tuple[float, float]] = {}
    pids = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True, timeout=10).stdout.split()
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for t in tasks:
            try:
                comm = (t / "comm").read_text().strip()
                f = (t / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[f"{pid}/{t.name} {comm}"] = (int(f[11]) / tick, int(f[12]) / tick)
    return out


def machine_stat() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1 : 1 + len(STAT_FIELDS)]]


def fold(path: Path, top: int = 25) -> None:
    """Print a py-spy raw file's samples per thread, then per marker of interest."""
    per_thread: collections.Counter[str] = collections.Counter()
    marks: collections.Counter[str] = collections.Counter()
    markers = (
        "sched_yield",
        "connectors/",
        "tiers/disk.py",
        "tiers/diskio.py",
        "tiering/manager.py",
        "offloading/scheduler.py",
        "host_copy.py",
        "Scheduler.schedule",
        "LlamaForCausalLM.forward",
    )
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        procs = [f for f in frames if f.startswith("process ")]
        threads = [f for f in frames if f.startswith("thread (")]
        who = f"{procs[-1][:40] if procs else ''} {threads[0][:40] if threads else ''}"
        per_thread[who] += int(n)
        for m in markers:
            if m in stack:
                marks[f"{who} | {m}"] += int(n)
    for who, n in per_thread.most_common(top):
        print(f"{n:7d}  {who}")
    print("--- samples with a marker in the stack")
    for what, n in sorted(marks.items()):
        print(f"{n:7d}  {what}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=["llmd", "dram", "disk"], default="disk")
    ap.add_argument("--dram", default="1GiB")
    ap.add_argument("--disk-dir", default=str(OUT / "disk"))
    ap.add_argument("--disk-capacity", default="8GiB")
    ap.add_argument("--store-threshold", type=int, default=None, help="disk.store_threshold (default: the tier's own)")
    ap.add_argument("--core", type=int, default=0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--py-spy", action="store_true", help="record every thread with py-spy (it must be on PATH)")
    ap.add_argument("--fold", type=Path, default=None, help="only summarise a py-spy raw file")
    ap.add_argument("--tag", default="run")
    args = ap.parse_args()
    if args.fold:
        fold(args.fold)
        return 0

    from vllm_llmd.testing.engine import EngineProcess, EngineSpec
    from vllm_llmd.testing.model import make_test_model

    OUT.mkdir(parents=True, exist_ok=True)
    model = make_test_model(OUT.parent / "models" / "small", shape="small", seed=0)
    cfg: dict[str, Any] = {"kv_connector": "LLMDConnector", "kv_role": "kv_both"}
    disk_dir = Path(args.disk_dir) / args.tag
    if args.variant != "llmd":
        tiers: dict[str, Any] = {"dram": {"capacity": args.dram}}
        if args.variant == "disk":
            tiers["disk"] = {"path": str(disk_dir), "capacity": args.disk_capacity}
            if args.store_threshold is not None:
                tiers["disk"]["store_threshold"] = args.store_threshold
        cfg["kv_connector_extra_config"] = {"tiers": tiers}
    spec = EngineSpec(
        model=model,
        block_size=64,
        num_gpu_blocks=320,
        max_model_len=4096,
        cpu_core=args.core,
        events_port=None,
        replay_port=None,
        kv_transfer_config=cfg,
    )
    engine = EngineProcess(spec, OUT / f"{args.tag}.log")
    engine.start_ready()
    spy: subprocess.Popen[bytes] | None = None
    try:
        assert engine.proc is not None
        pgid = engine.proc.pid

        def prompts(seed: int) -> list[tuple[list[int], str]]:
            rng = random.Random(seed)
            return [(random_tokens(args.prompt_len, rng), "") for _ in range(args.requests)]

        run(engine.url, "test-model", prompts(999)[:4], args.output_len, 2)
        if args.py_spy:
            spy = subprocess.Popen(
                [
                    "py-spy",
                    "record",
                    "-p",
                    str(pgid),
                    "--subprocesses",
                    "--threads",
                    "--nonblocking",
                    "-r",
                    "100",
                    "-f",
                    "raw",
                    "-o",
                    str(OUT / f"{args.tag}.raw"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        cpu0, stat0, t0 = thread_cpu(pgid), machine_stat(), time.monotonic()
        rates, loads = [], []
        for r in range(args.runs):
            s = run(engine.url, "test-model", prompts(r), args.output_len, args.concurrency)
            rates.append(s.summary()["req_s"])
            loads.append(load_avg())
            print(f"{args.variant} run {r}: {rates[-1]:.2f} req/s  load {loads[-1]}", flush=True)
        wall = time.monotonic() - t0
        cpu1, stat1 = thread_cpu(pgid), machine_stat()
    finally:
        if spy is not None:
            spy.send_signal(2)
            spy.wait(60)
        engine.stop()
        disk_files = sum(1 for _ in disk_dir.rglob("*.bin")) if args.variant == "disk" else None
        shutil.rmtree(disk_dir, ignore_errors=True)
    deltas = []
    for k, (u1, s1) in cpu1.items():
        u0, s0 = cpu0.get(k, (0.0, 0.0))
        deltas.append((round(u1 - u0, 2), round(s1 - s0, 2), k))
    threads = sorted(deltas, key=lambda x: -(x[0] + x[1]))
    ticks = dict(zip(STAT_FIELDS, (b - a for a, b in zip(stat0, stat1, strict=True)), strict=True))
    result = {
        "variant": args.variant,
        "store_threshold": args.store_threshold,
        "req_s": rates,
        "load": loads,
        "wall_s": round(wall, 2),
        "threads_user_sys_s": threads[:12],
        "machine_ticks": ticks,
        "requests": args.runs * args.requests,
        "disk_block_files": disk_files,  # block files the disk tier held at the end (store_threshold: few)
    }
    (OUT / f"{args.tag}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "threads_user_sys_s"}))
    for u, s, k in threads[:8]:
        print(f"  user {u:7.2f}  sys {s:6.2f}  {k}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
