"""Routers side by side on ONE pair of engines, in alternating order, repeated: the runner for the
``bench/workloads.py`` workloads (issue 12).

``serving.py`` starts fresh engines for every row (2-3 minutes each on this machine). Here the two
engines start once per model; before every run their prefix caches are reset
(``POST /reset_prefix_cache``) and a fresh router is started, so each run begins from empty caches
and an empty index. Round ``r`` runs the routers in the given order when ``r`` is even and reversed
when odd (ABBA), which takes drift and order out of the comparison; every run records the 1-minute
load average before it. All routers of one invocation run with the same engine settings: where
``kv_aware`` (whose engines need other hashing flags) is among them, every row runs on its engines
(``shared_engines``); the P/D rows run through ``serving.py``.

    .venv/bin/python bench/alternating.py --workload multiturn --models wide \\
        --routers rr,cache_aware,oracle,ours --repeat 2

On a shared machine hold the engine lock briefly: one router per invocation, the runs appended to one
file (each invocation starts its own engines), then the summary::

    for r in rr ours ours rr; do flock /tmp/llmd-engine.lock .venv/bin/python bench/alternating.py \\
        --workload multiturn --models small --routers $r --repeat 1 --results bench/out/mt-small.json; done
    .venv/bin/python bench/alternating.py --workload multiturn --results bench/out/mt-small.json --report-only

``--sim bench/sim_profiles/cpu-wide.yaml`` runs the same on simulated pods (``vllm-llmd sim``, no
engine lock); ``--endpoints FILE`` on pods already running.

Output: ``bench/out/serving/<workload>/<model>/alternating-<UTC time>.json`` (every run; per-request
records and engine-load samples beside it) and a table with the mean (sd) per router and the issue-12
targets for ``ours`` (>= 1.5x round-robin's throughput, >= 1.3x the best vllm-router policy's, TTFT
p90 no worse than the best of them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import decision_log
import serving
from routers import LLMD_DRAM_KV, ROUTERS, VENV_BIN, RouterKind, RouterProcess, Worker, free_port
from serving import OUT, Interrupted, load_avg, measured, reset_prefix_cache, rows_dir, run_workload, start_engines

from vllm_llmd.testing.engine import stop_process_group
from vllm_llmd.testing.model import make_test_model

VLLM_ROUTER_ROWS = ("rr", "cache_aware", "kv_aware")


@dataclass
class External:
    """A pod this script did not start (``--endpoints``): never stopped here."""

    url: str
    events: str | None
    replay: str | None

    def stop(self) -> None:
        pass


def external(path: str) -> list[External]:
    """Pods from a JSON list of ``{"url", "events", "replay"}`` (the simulator's ``--endpoints`` file,
    docs/simulator.md, has this shape): runs against an already running fleet, no engine lock needed."""
    return [External(d["url"], d.get("events"), d.get("replay")) for d in json.loads(Path(path).read_text())]


class SimFleet:
    """``vllm-llmd sim`` pods (docs/simulator.md) in a child process group, started and stopped here:
    the runs need no engine lock (the simulator plans steps on simulated time, so host load moves its
    numbers far less than a real engine's)."""

    def __init__(self, profile: str, model_dir: Path, pods: int, log_dir: Path) -> None:
        self.endpoints = log_dir / "sim-endpoints.json"
        self.log = log_dir / "sim.log"
        cmd = [str(VENV_BIN / "vllm-llmd"), "sim", "--profile", profile, "--tokenizer", str(model_dir)]
        cmd += ["--pods", str(pods), "--processes", "1", "--endpoints", str(self.endpoints)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while not (self.log.exists() and "ready:" in self.log.read_text(errors="replace")):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"simulator did not start:\n{self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)

    def pods(self) -> list[External]:
        return external(str(self.endpoints))

    def stop(self) -> None:
        stop_process_group(self.proc, 15)


def engine_knobs(kind: RouterKind, args: argparse.Namespace) -> RouterKind:
    """``kind`` with the engine knobs of this invocation: ``--max-num-seqs`` (vLLM's per-engine batch
    bound) and ``--dram`` (the DRAM tier's capacity; a row whose engines have no KV connector, e.g.
    the static oracle or vllm-router's, gets the tiered rows' ``LLMDConnector`` with that tier, so
    every row runs on the same engines)."""
    extra = ["--max-num-seqs", str(args.max_num_seqs)] if args.max_num_seqs else []
    eargs = list(kind.engine_args)
    if args.dram:
        if "--kv-transfer-config" not in eargs:
            eargs += ["--kv-transfer-config", json.dumps(LLMD_DRAM_KV)]
        i = eargs.index("--kv-transfer-config") + 1
        cfg = json.loads(eargs[i])
        if not cfg.get("kv_connector_extra_config", {}).get("tiers"):
            raise SystemExit(f"--dram: {kind.name}'s engines have a KV connector without a DRAM tier")
        cfg["kv_connector_extra_config"]["tiers"]["dram"]["capacity"] = args.dram
        eargs[i] = json.dumps(cfg)
    return dataclasses.replace(kind, engine_args=eargs + extra)


def shared_engines(kinds: list[RouterKind]) -> list[RouterKind]:
    """Every row on the engines ``kv_aware`` needs, where it is among them: vLLM's ``sha256_cbor``
    block hashes with a fixed seed and the model served under its path (bench/routers.py), added to
    each row's own engine settings. Our router keys its index by token ids, not by the engines'
    hashes (vllm_llmd/index/chain.py); the other vllm-router policies and the oracle proxy never see
    a hash. So the comparison stays on one engine pair."""
    kv = next((k for k in kinds if k.name == "kv_aware"), None)
    if kv is None:
        return kinds
    return [
        k
        if k is kv
        else dataclasses.replace(
            k,
            engine_args=list(kv.engine_args) + list(k.engine_args),
            engine_env={**kv.engine_env, **k.engine_env},
            served_name_is_path=True,
        )
        for k in kinds
    ]


def run_model(model: str, names: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    kinds = [engine_knobs(k, args) for k in shared_engines([ROUTERS[n] for n in names])]
    ref = kinds[0]
    for k in kinds[1:]:
        if (k.engine_args, k.engine_env, k.served_name_is_path, k.per_engine_env) != (
            ref.engine_args,
            ref.engine_env,
            ref.served_name_is_path,
            ref.per_engine_env,
        ):
            raise SystemExit(f"{k.name} needs other engine settings than {ref.name}: run it through serving.py")
    model_dir = make_test_model(OUT / "models" / model, shape=model)
    out_dir = rows_dir(model, args.workload)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    log_dir = out_dir / f"alternating-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    served = str(model_dir) if ref.served_name_is_path else "test-model"
    print(f"[{time.strftime('%H:%M:%S')}] {model}: starting engines (load average {load_avg()})", flush=True)
    sim = SimFleet(args.sim, model_dir, args.engines, log_dir) if args.sim else None
    if sim is not None:
        engines: list[Any] = sim.pods()
    else:
        engines = (
            external(args.endpoints)
            if args.endpoints
            else start_engines(model_dir, ref, log_dir, args.engines, num_gpu_blocks=args.num_gpu_blocks)
        )
    runs: list[dict[str, Any]] = []
    try:
        workers = [
            Worker(e.url, e.events, e.replay, model_dir, served)
            if isinstance(e, External)
            else Worker(e.url, e.spec.events_endpoint, e.spec.replay_endpoint, model_dir, served)
            for e in engines
        ]
        for rnd in range(args.repeat):
            order = kinds if rnd % 2 == 0 else kinds[::-1]
            for kind in order:
                i = len(runs)
                ok = all(reset_prefix_cache(e.url) for e in engines)
                launch = kind.build(workers, free_port())
                router = RouterProcess(kind, launch, log_dir / f"router-{i}-{kind.name}.log").start()
                try:
                    router.wait_ready(timeout=180)
                    pid = router.proc.pid if router.proc is not None else None
                    la = load_avg()
                    tag = f"{i}-{kind.name}"

                    def work(url: str = router.url, tag: str = tag) -> dict[str, Any]:
                        return run_workload(url, served, model_dir, [e.url for e in engines], args, 0, log_dir, tag)

                    r = measured(engines, work, pid)
                    if kind.name.startswith("ours"):
                        text = router.get("/metrics")
                        if text:
                            (log_dir / f"router-{i}-metrics.txt").write_text(text)
                finally:
                    router.stop()
                if kind.name.startswith("ours"):  # spills and per-pod decisions, when the decision log is on
                    r["placement"] = decision_log.placement(router.log_path)
                r.update(
                    router=kind.name,
                    round=rnd,
                    index=i,
                    reset_ok=ok,
                    load_avg_before=la,
                    date_utc=time.strftime("%H:%M:%S", time.gmtime()),
                )
                runs.append(r)
                peers = f"peer loads {r['peer_loads']:.0f}, {r['peer_bytes'] / 1e6:.1f} MB" if r["peer_loads"] else ""
                print(
                    f"  [{r['date_utc']}] {kind.name:12s} {serving.fmt_brief(r)} | load {la} | "
                    f"engines {r['engine_load']} {peers}",
                    flush=True,
                )
    finally:
        for e in engines:
            e.stop()
        if sim is not None:
            sim.stop()
    dest = Path(args.results) if args.results else out_dir / f"alternating-{stamp}.json"
    saved = json.loads(dest.read_text()) if dest.exists() else {"model": model, "workload": args.workload, "runs": []}
    if (saved["model"], saved["workload"]) != (model, args.workload):
        raise SystemExit(f"{dest} holds {saved['workload']} on {saved['model']}, not {args.workload} on {model}")
    for r in runs:
        r["command"] = " ".join(sys.argv)
    saved["runs"] += runs
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(saved, indent=1))
    print(f"saved {dest} ({len(saved['runs'])} runs)", flush=True)
    return saved["runs"]


def summarize(model: str, runs: list[dict[str, Any]]) -> str:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["router"], []).append(r)

    def mean(name: str, key: str) -> float:
        return statistics.fmean(x[key] for x in by[name])

    def sd(name: str, key: str) -> float:
        xs = [x[key] for x in by[name]]
        return statistics.stdev(xs) if len(xs) > 1 else 0.0

    lines = [
        f"{model}: mean (sd) over runs",
        "| router | runs | req/s | TTFT p50 ms | TTFT p90 ms | E2E p50 ms | hit rate | idle-while-queued "
        "| peer-loaded | peer MB | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rs in by.items():
        iwq = [x["engine_load"].get("idle_while_queued") for x in rs if x.get("engine_load")]
        iwq_s = f"{statistics.fmean(v for v in iwq if v is not None):.2f}" if any(v is not None for v in iwq) else "-"
        loads = "/".join(f"{x['load_avg_before'][0]:.1f}" for x in rs)
        # share of requests an engine served after loading their prefix from a peer, and bytes read
        peer = statistics.fmean(x.get("peer_loads", 0) / max(1, sum(x["requests_per_engine"])) for x in rs)
        peer_mb = statistics.fmean(x.get("peer_bytes", 0) / 1e6 for x in rs)
        lines.append(
            f"| {name} | {len(rs)} | {mean(name, 'req_s'):.2f} ({sd(name, 'req_s'):.2f}) "
            f"| {mean(name, 'ttft_p50_ms'):.0f} "
            f"| {mean(name, 'ttft_p90_ms'):.0f} ({sd(name, 'ttft_p90_ms'):.0f}) | {mean(name, 'e2e_p50_ms'):.0f} "
            f"| {statistics.fmean((x['hit_rate'] or 0) for x in rs):.2f} | {iwq_s} | {peer:.3f} | {peer_mb:.0f} "
            f"| {loads} |"
        )
    if "ours_peers" in by and "ours_tiers" in by:
        ratio = mean("ours_peers", "req_s") / mean("ours_tiers", "req_s")
        p90 = mean("ours_peers", "ttft_p90_ms") / mean("ours_tiers", "ttft_p90_ms")
        lines.append(
            f"- peer loads on/off: throughput {ratio:.2f}x (target >= 1.3): {'PASS' if ratio >= 1.3 else 'MISS'}; "
            f"TTFT p90 {p90:.2f}x"
        )
    if "ours" in by:
        ours_t, ours_p90 = mean("ours", "req_s"), mean("ours", "ttft_p90_ms")
        if "rr" in by:
            ratio = ours_t / mean("rr", "req_s")
            lines.append(
                f"- throughput ours/round-robin = {ratio:.2f} (target >= 1.5): {'PASS' if ratio >= 1.5 else 'MISS'}"
            )
        peers = [n for n in VLLM_ROUTER_ROWS if n in by]
        if peers:
            best = max(peers, key=lambda n: mean(n, "req_s"))
            ratio = ours_t / mean(best, "req_s")
            lines.append(
                f"- throughput ours/best vllm-router ({best}) = {ratio:.2f} (target >= 1.3): "
                f"{'PASS' if ratio >= 1.3 else 'MISS'}"
            )
            best_p90 = min(mean(n, "ttft_p90_ms") for n in peers)
            lines.append(
                f"- TTFT p90 ours {ours_p90:.0f} ms vs best vllm-router {best_p90:.0f} ms (target <=): "
                f"{'PASS' if ours_p90 <= best_p90 else 'MISS'}"
            )
        if "oracle" in by:
            lines.append(
                f"- vs static oracle: throughput {ours_t / mean('oracle', 'req_s'):.2f}x, "
                f"TTFT p90 {ours_p90 / mean('oracle', 'ttft_p90_ms'):.2f}x"
            )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", required=True, help="multiturn, zipf, rag, agentic, hotprefix, hotlong or longrag")
    ap.add_argument("--routers", default="rr,cache_aware,oracle,ours")
    ap.add_argument("--models", default="wide")
    ap.add_argument("--repeat", type=int, default=2, help="rounds; odd rounds run the routers in reverse order")
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--num-gpu-blocks", type=int, default=320, help="each engine's KV blocks (64 tokens each)")
    ap.add_argument("--max-num-seqs", type=int, help="each engine's batch bound (vLLM --max-num-seqs)")
    ap.add_argument("--dram", help="DRAM tier capacity of the tiered rows' engines (e.g. 320MiB; default 512MiB)")
    ap.add_argument(
        "--rate",
        type=float,
        help="open loop: Poisson arrivals at this rate (req/s), seeded by --workload-seed, at most "
        "--concurrency in flight (raise it); default closed loop",
    )
    ap.add_argument("--workload-seed", type=int, default=0)
    ap.add_argument("--client-timeout", type=float, default=1800)
    ap.add_argument(
        "--results",
        help="JSON file the runs are appended to (one model): ABBA across invocations, each holding the "
        "engine lock briefly; default a new alternating-<UTC>.json",
    )
    ap.add_argument("--report-only", action="store_true", help="summarize --results without running")
    ap.add_argument("--endpoints", help="JSON list of running pods {url, events, replay} to use instead of engines")
    ap.add_argument(
        "--sim",
        metavar="PROFILE",
        help="run on `vllm-llmd sim` pods of this profile (e.g. bench/sim_profiles/cpu-wide.yaml) instead of engines",
    )
    args = ap.parse_args()
    if args.report_only:
        if not args.results:
            ap.error("--report-only needs --results")
        saved = json.loads(Path(args.results).read_text())
        print(summarize(saved["model"], saved["runs"]))
        return 0
    from workloads import GENERATORS

    if args.workload not in GENERATORS:
        ap.error(f"unknown workload {args.workload!r}; known: {', '.join(GENERATORS)}")
    names = [n for n in args.routers.split(",") if n]
    if bad := [n for n in names if n not in ROUTERS]:
        ap.error(f"unknown routers {bad}")
    if why := [f"{n}: {w}" for n in names if (w := ROUTERS[n].available())]:
        ap.error("; ".join(why))
    signal.signal(signal.SIGTERM, serving._on_signal)
    signal.signal(signal.SIGHUP, serving._on_signal)
    print(f"{os.cpu_count()} cores, load average {load_avg()}", flush=True)
    try:
        for model in [m for m in args.models.split(",") if m]:
            runs = run_model(model, names, args)
            print(summarize(model, runs), flush=True)
    except Interrupted:
        print("interrupted: processes stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
