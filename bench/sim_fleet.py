"""Routers side by side in front of a simulated heterogeneous fleet (``vllm-llmd sim``).

``ladder`` (default): a 20-pod pool in three classes (``bench/sim_profiles/fleet-3class.yaml``:
4 fast, 8 medium, 8 slow pods with different block sizes, KV capacities and speeds), a
shared-prefix workload (vLLM's benchmark client, ``prefix_repetition``) on a Poisson rate ladder,
for each router: round-robin (vllm-router ``round_robin``), vllm-router ``cache_aware`` and
``kv_aware``, and ours (``vllm-llmd router`` with main's default profile). Per rate: achieved
throughput, TTFT p50/p90, the fleet's prefix-cache hit rate, requests per class, and the router's
CPU seconds per request. The prefix caches are reset before every step (new prefixes each step).
``--warmup-prompts N``: N unmeasured requests (other prefixes) before the ladder, so the first step
meets a router that has served the pods before (ours learns each pod's speed from its answers);
``--save-detailed``: per-request results in the client's JSON (``bench/sim_requests.py`` reads them
with ours' decision and access logs).

``scale``: N pods (``--scale 100,200``, same class proportions), one moderate rate; the router's
CPU per request (also with its idle CPU - health checks, metrics scrapes - subtracted) and, for
ours, the decision latency (``llmd_router_decision_seconds``: tokenize + schedule).

Routers and their command lines come from ``bench/routers.py``; the client and the engine-side
counters from ``bench/serving.py``. One simulator, one router and the client share the machine's
cores: check ``uptime`` first (each row records the load average).

    .venv/bin/python bench/sim_fleet.py                                  # ladder, 4 routers (~30 min)
    .venv/bin/python bench/sim_fleet.py --routers ours,rr --rates 4,8
    .venv/bin/python bench/sim_fleet.py --mode scale --scale 100,200 --routers ours,cache_aware
    .venv/bin/python bench/sim_fleet.py --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families
from routers import REPO, ROUTERS, RouterProcess, Worker, free_port
from serving import cpu_seconds, engine_counters, load_avg, reset_prefix_cache, run_client

from vllm_llmd.testing.model import make_test_model
from vllm_llmd.testing.wait import wait_until

OUT = REPO / "bench" / "out" / "sim_fleet"
PROFILE = REPO / "bench" / "sim_profiles" / "fleet-3class.yaml"
#: what vllm-router's kv_aware needs from the engines (see bench/routers.py): cbor hashes, fixed seed, bytes
KV_AWARE_HASHING = {"hash_algo": "sha256_cbor", "hash_seed": "0", "int_block_hashes": False}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- simulator


class Sim:
    """``vllm-llmd sim`` as a child process in its own process group."""

    def __init__(self, profile: Path, pods: int, processes: int, model: str, tokenizer: Path, d: Path) -> None:
        self.d = d
        self.endpoints = d / "endpoints.json"
        self.out = d / "sim.out"
        self.cmd = [
            str(Path(sys.executable).parent / "vllm-llmd"), "sim", "--profile", str(profile), "--pods", str(pods),
            "--processes", str(processes), "--model", model, "--tokenizer", str(tokenizer),
            "--endpoints", str(self.endpoints),
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.pods: list[dict[str, Any]] = []

    def start(self) -> Sim:
        self.endpoints.unlink(missing_ok=True)
        with open(self.out, "wb") as f:
            self.proc = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: b"ready:" in self.out.read_bytes() or self.proc.poll() is not None, 300, "the simulator")
        if self.proc.poll() is not None:
            raise RuntimeError(f"simulator exited:\n{self.out.read_text()[-3000:]}")
        self.pods = json.loads(self.endpoints.read_text())
        return self

    def stop(self) -> str:
        if self.proc is None:
            return ""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass
        self.proc = None
        lines = [ln for ln in self.out.read_text().splitlines() if ln.startswith("stopped:")]
        return lines[-1] if lines else ""


def fleet_profile(base: Path, kind: str, d: Path) -> Path:
    """The fleet profile, with vLLM's hashing settings for vllm-router's kv_aware where needed."""
    data = yaml.safe_load(base.read_text())
    if kind == "kv_aware":
        data["defaults"] = {**data.get("defaults", {}), **KV_AWARE_HASHING}
    data.pop("tokenizer", None)
    p = d / "profile.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def pod_counters(pods: list[dict[str, Any]]) -> list[dict[str, float]]:
    with ThreadPoolExecutor(16) as ex:
        return list(ex.map(lambda p: engine_counters(p["url"]), pods))


def reset_all(pods: list[dict[str, Any]]) -> bool:
    with ThreadPoolExecutor(16) as ex:
        return all(ex.map(lambda p: reset_prefix_cache(p["url"]), pods))


# ---------------------------------------------------------------------------------------------- router


def router_samples(text: str, name: str) -> list[Any]:
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def decision_latency(text: str | None) -> dict[str, float] | None:
    """Mean and p50/p99 (bucket upper bounds) of ``llmd_router_decision_seconds``."""
    if not text:
        return None
    buckets = sorted(
        (float(s.labels["le"]), s.value) for s in router_samples(text, "llmd_router_decision_seconds_bucket")
    )
    count = sum(s.value for s in router_samples(text, "llmd_router_decision_seconds_count"))
    total = sum(s.value for s in router_samples(text, "llmd_router_decision_seconds_sum"))
    if not count:
        return None

    def q(p: float) -> float:
        return next(le for le, c in buckets if c >= p * count)

    return {"count": count, "mean_ms": total / count * 1000, "p50_le_ms": q(0.5) * 1000, "p99_le_ms": q(0.99) * 1000}


def class_speeds(text: str | None, pods: list[dict[str, Any]]) -> dict[str, dict[str, float]] | None:
    """Mean of ``llmd_router_pod_speed`` (the speeds ours learned) per pod class and kind."""
    if not text:
        return None
    cls = {p["url"].split("://", 1)[1]: p["class"] for p in pods}
    acc: dict[str, dict[str, list[float]]] = {}
    for s in router_samples(text, "llmd_router_pod_speed"):
        c = cls.get(s.labels["pod"])
        if c is not None:
            acc.setdefault(c, {}).setdefault(s.labels["kind"], []).append(s.value)
    return {c: {k: round(sum(v) / len(v), 3) for k, v in kinds.items()} for c, kinds in acc.items()} or None


def start_router(name: str, pods: list[dict[str, Any]], model_dir: Path, served: str, d: Path) -> RouterProcess:
    kind = ROUTERS[name]
    workers = [Worker(p["url"], p["events"], p["replay"], model_dir, served) for p in pods]
    launch = kind.build(workers, free_port())
    router = RouterProcess(kind, launch, d / "router.log").start()
    router.wait_ready(timeout=300)
    return router


# ---------------------------------------------------------------------------------------------- one row


def measure_step(
    router: RouterProcess,
    pods: list[dict[str, Any]],
    served: str,
    model_dir: Path,
    rate: float,
    n: int,
    seed: int,
    d: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    pid = router.proc.pid if router.proc else None
    before = pod_counters(pods)
    cpu0 = cpu_seconds(pid)
    res = run_client(
        router.url, served, model_dir, d / f"client_rate{rate}.json", d / "client.log",
        num_prompts=n, request_rate=str(rate), max_concurrency=None, seed=seed, args=args,
    )  # fmt: skip
    cpu1 = cpu_seconds(pid)
    after = pod_counters(pods)
    hits = sum(a["hits"] - b["hits"] for a, b in zip(after, before, strict=True))
    queries = sum(a["queries"] - b["queries"] for a, b in zip(after, before, strict=True))
    per_class: dict[str, int] = {}
    for p, a, b in zip(pods, after, before, strict=True):
        per_class[p["class"]] = per_class.get(p["class"], 0) + int(a["requests"] - b["requests"])
    res.update(
        rate=rate,
        hit_rate=hits / queries if queries else None,
        requests_per_class=per_class,
        router_cpu_s=None if cpu0 is None or cpu1 is None else round(cpu1 - cpu0, 2),
    )
    if res["router_cpu_s"] is not None and res.get("completed"):
        res["router_cpu_ms_per_req"] = res["router_cpu_s"] / res["completed"] * 1000
    return res


def run_row(name: str, pods_n: int, rates: list[float], args: argparse.Namespace, tag: str) -> dict[str, Any]:
    kind = ROUTERS[name]
    model_dir = make_test_model(REPO / "bench" / "out" / "models" / "small", shape="small")
    d = OUT / tag / name
    d.mkdir(parents=True, exist_ok=True)
    served = str(model_dir) if kind.served_name_is_path else "test-model"
    row: dict[str, Any] = {
        "router": name, "label": kind.label, "pods": pods_n,
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "load_avg_before": load_avg(),
        "command": " ".join(sys.argv), "profile": str(args.profile),
        "workload": {k: getattr(args, k) for k in ("prefix_len", "suffix_len", "num_prefixes", "output_len")},
    }  # fmt: skip
    sim = Sim(fleet_profile(args.profile, name, d), pods_n, args.processes, served, model_dir, d)
    router: RouterProcess | None = None
    try:
        log(f"{tag}/{name}: starting {pods_n} simulated pods ({args.processes} process(es))")
        sim.start()
        log(f"{tag}/{name}: starting the router")
        router = start_router(name, sim.pods, model_dir, served, d)
        row["router_cmd_head"] = " ".join(router.launch.cmd[:8])
        pid = router.proc.pid if router.proc else None
        if args.idle_s > 0:
            cpu0 = cpu_seconds(pid)
            time.sleep(args.idle_s)  # the router's background cost alone: health checks, metrics scrapes
            cpu1 = cpu_seconds(pid)
            if cpu0 is not None and cpu1 is not None:
                row["router_idle_cpu_frac"] = round((cpu1 - cpu0) / args.idle_s, 3)
        if args.warmup_prompts > 0:
            # a router that has served traffic before (its learned speeds): the same for every router,
            # other prefixes (another seed), caches reset afterwards with every step's
            row["warmup"] = {"prompts": args.warmup_prompts, "rate": args.warmup_rate}
            reset_all(sim.pods)
            log(f"{tag}/{name}: warm-up, {args.warmup_prompts} requests at {args.warmup_rate} req/s")
            w = measure_step(router, sim.pods, served, model_dir, args.warmup_rate, args.warmup_prompts, 99, d, args)
            row["warmup"].update(req_s=w["req_s"], ttft_p90_ms=w["ttft_p90_ms"])
        steps = []
        for i, rate in enumerate(rates):
            row.setdefault("reset_ok", []).append(reset_all(sim.pods))
            n = max(args.min_prompts, int(rate * args.step_s))
            log(f"{tag}/{name}: rate {rate} req/s, {n} requests")
            r = measure_step(router, sim.pods, served, model_dir, rate, n, 100 + i, d, args)
            if row.get("router_idle_cpu_frac") is not None and r.get("router_cpu_s") is not None and r.get("completed"):
                busy = r["router_cpu_s"] - row["router_idle_cpu_frac"] * r["duration_s"]
                r["router_cpu_ms_per_req_net"] = busy / r["completed"] * 1000
            if name == "ours":
                text = router.get("/metrics")
                r["decision"] = decision_latency(text)
                r["speeds"] = class_speeds(text, sim.pods)
            steps.append(r)
            log(f"  {brief(r)}")
        row["steps"] = steps
        for p in router.launch.side_ports:  # vllm-router's own Prometheus view, for diagnosis
            text = router.get("/metrics", port=p)
            if text:
                (d / "router_metrics.txt").write_text(text)
        if name == "ours":
            (d / "router_metrics.txt").write_text(router.get("/metrics") or "")
    finally:
        if router is not None:
            router.stop()
        row["sim"] = sim.stop()
    row["load_avg_after"] = load_avg()
    return row


def brief(r: dict[str, Any]) -> str:
    dec = r.get("decision")
    return (
        f"{r['req_s']:.2f} req/s (failed {r['failed']}), TTFT p50 {r['ttft_p50_ms']:.0f} ms "
        f"p90 {r['ttft_p90_ms']:.0f} ms, "
        f"hit rate {r['hit_rate']:.2f}, per class {r['requests_per_class']}, router CPU "
        f"{r.get('router_cpu_ms_per_req', float('nan')):.2f} ms/req"
        + (f", decision mean {dec['mean_ms']:.2f} ms" if dec else "")
        + (f", learned speeds {r['speeds']}" if r.get("speeds") else "")
    )


# ---------------------------------------------------------------------------------------------- report


def _f(x: Any, nd: int = 0) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def report(tag: str) -> str:
    rows = [json.loads(p.read_text()) for p in sorted((OUT / tag).glob("*.json"))]
    order = ["rr", "cache_aware", "kv_aware", "ours"]
    rows.sort(key=lambda r: order.index(r["router"]) if r["router"] in order else 99)
    lines = [
        f"### {tag}",
        "",
        "| router | pods | offered req/s | achieved req/s | TTFT p50 ms | TTFT p90 ms | hit rate "
        "| requests fast/medium/slow | router CPU ms/req (net of idle) | decision mean / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for r in row.get("steps", []):
            pc = r.get("requests_per_class", {})
            dec = r.get("decision")
            p99 = "" if not dec else (f"≤{dec['p99_le_ms']:.2f}" if dec["p99_le_ms"] != float("inf") else ">100")
            dec_s = "-" if not dec else f"{dec['mean_ms']:.2f} / {p99}"
            lines.append(
                f"| {row['label']} | {row['pods']} | {r['rate']} | {_f(r['req_s'], 2)} | {_f(r['ttft_p50_ms'])} "
                f"| {_f(r['ttft_p90_ms'])} | {_f(r['hit_rate'], 2)} "
                f"| {pc.get('fast', 0)}/{pc.get('medium', 0)}/{pc.get('slow', 0)} "
                f"| {_f(r.get('router_cpu_ms_per_req'), 2)} ({_f(r.get('router_cpu_ms_per_req_net'), 2)}) "
                f"| {dec_s} |"
            )
    lines.append("")
    for row in rows:
        lines.append(
            f"- {row['router']}: {row['date_utc']} UTC, load average before {row['load_avg_before']}, after "
            f"{row.get('load_avg_after')}; router idle CPU {row.get('router_idle_cpu_frac')} of a core; "
            f"simulator: {row.get('sim')}"
        )
    text = "\n".join(lines) + "\n"
    (OUT / f"{tag}.md").write_text(text)
    return text


# ---------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="ladder", choices=["ladder", "scale"])
    ap.add_argument("--routers", default="rr,cache_aware,kv_aware,ours")
    ap.add_argument("--profile", type=Path, default=PROFILE)
    ap.add_argument("--pods", type=int, default=20)
    ap.add_argument("--scale", default="100,200", help="pod counts of --mode scale")
    ap.add_argument("--processes", type=int, default=1, help="simulator processes (scale mode: 2)")
    ap.add_argument("--rates", default="4,6,8,10,12,14", help="Poisson rates (req/s) of the ladder")
    ap.add_argument("--scale-rate", type=float, default=8.0)
    ap.add_argument("--step-s", type=float, default=30.0, help="seconds of arrivals per step")
    ap.add_argument("--min-prompts", type=int, default=96)
    ap.add_argument("--idle-s", type=float, default=10.0, help="idle window measuring the router's background CPU")
    ap.add_argument("--prefix-len", type=int, default=2048)
    ap.add_argument("--suffix-len", type=int, default=64)
    ap.add_argument("--num-prefixes", type=int, default=48)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--client-timeout", type=float, default=1800)
    ap.add_argument(
        "--warmup-prompts", type=int, default=0,
        help="requests sent before the ladder (not measured; caches reset after): the router has seen the pods",
    )  # fmt: skip
    ap.add_argument("--warmup-rate", type=float, default=4.0)
    ap.add_argument("--save-detailed", action="store_true", help="per-request TTFTs, start times in the client JSON")
    ap.add_argument("--tag", default="", help="suffix of the run's directory (repeated runs side by side)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    args.routers = [r for r in args.routers.split(",") if r]
    bad = [r for r in args.routers if r not in ROUTERS]
    if bad:
        ap.error(f"unknown routers {bad}")
    args.rates = [float(x) for x in args.rates.split(",") if x]
    args.scale = [int(x) for x in args.scale.split(",") if x]
    return args


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    log(f"{os.cpu_count()} cores, load average {load_avg()}")
    if args.mode == "ladder":
        plan = [(f"ladder-{args.pods}pods{args.tag}", args.pods, args.rates)]
    else:
        plan = [(f"scale-{n}pods{args.tag}", n, [args.scale_rate]) for n in args.scale]
        if args.processes == 1:
            args.processes = 2
    failed = []
    for tag, n, rates in plan:
        if not args.report_only:
            for name in args.routers:
                why = ROUTERS[name].available()
                if why:
                    log(f"{tag}/{name}: skipped: {why}")
                    continue
                try:
                    row = run_row(name, n, rates, args, tag)
                except Exception as e:
                    log(f"{tag}/{name}: FAILED: {e}")
                    failed.append(f"{tag}/{name}")
                    continue
                (OUT / tag / f"{name}.json").write_text(json.dumps(row, indent=1))
        print(report(tag), flush=True)
    if failed:
        print(f"failed rows: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
