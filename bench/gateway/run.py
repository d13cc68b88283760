"""Gateway mode overhead: Envoy + our ext_proc picker, side by side with our proxy and vllm-router,
in front of the trivial nginx backend of ``bench/overhead/run.py``, driven by the same ``wrk``
script (22 KB prompts, 16 shared prefixes x distinct suffixes). Reuses that script's nginx, KV
event feed, wrk runner and table, and ``bench/routers.py``'s router processes.

Rows (``--rows``):

* ``direct``: wrk -> nginx;
* ``envoy``: wrk -> Envoy (the gateway bootstrap without the ext_proc filter, round robin) -> nginx:
  what Envoy alone adds;
* ``gateway_null``: as ``gateway`` below, but the ext_proc servicer runs a picker that does no work
  (``null_picker.py``): the protocol layer's own cost;
* ``gateway``: wrk -> Envoy -> nginx, Envoy asking ``vllm-llmd router --ext-proc`` for each request;
  with ``--pickers N``, N such routers (active-active replicas: each its own index from the same
  events, nothing shared) listed as the endpoints of Envoy's picker cluster, which spreads the
  ext_proc streams over them round robin;
* ``ours``: our proxy (``vllm-llmd router``);
* ``cache_aware``: ``vllm-router --policy cache_aware``.

With ``--pods 100 --index-prefixes 40`` nginx listens on 100 ports and, for ``gateway`` and ``ours``,
each pod publishes KV events (40 prefixes of 2048 tokens) until the router's index holds them all:
precise scoring over 100 pods. Beside wrk's numbers it reports, for the picker: the mean decision
time (``llmd_router_decision_seconds``: tokenize + schedule), and the CPU time per request of the
picker process and of Envoy (``/proc/PID/stat``), with the load average.

    .venv/bin/python bench/gateway/run.py --pods 100 --index-prefixes 40 --duration 10
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "overhead")]  # bench/ (routers.py), bench/overhead/
import run as overhead  # noqa: E402  (bench/overhead/run.py)
from routers import REPO, ROUTERS, Launch, RouterKind, RouterProcess, Worker, free_port  # noqa: E402

from vllm_llmd.gateway.envoy_config import EnvoyOptions, _addr, bootstrap  # noqa: E402
from vllm_llmd.testing.engine import stop_process_group  # noqa: E402
from vllm_llmd.testing.envoy import EnvoyProcess  # noqa: E402
from vllm_llmd.testing.model import make_test_model  # noqa: E402

OUT = REPO / "bench" / "out" / "gateway"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg} (load {' '.join(f'{x:.2f}' for x in os.getloadavg())})", flush=True)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        m = re.search(rb"^" + name.encode() + rb" (\S+)", r.read(), re.M)
    return float(m.group(1)) if m else 0.0


def gateway_kind(ext_proc: str, extra: list[str]) -> RouterKind:
    """``vllm-llmd router --ext-proc``, built like bench/routers.py's ``ours`` row."""
    base = ROUTERS["ours"]

    def build(workers: list[Worker], port: int) -> Launch:
        launch = base.build(workers, port)
        return Launch(cmd=[*launch.cmd, "--ext-proc", ext_proc, *extra], port=port)

    return RouterKind("gateway", "Envoy + vllm-llmd picker (ext_proc)", build, available=base.available)


def envoy_for(ports: list[int], picker: str | list[str], with_ext_proc: bool, concurrency: int) -> EnvoyProcess:
    pickers = [picker] if isinstance(picker, str) else picker
    opts = EnvoyOptions(
        pods=[f"127.0.0.1:{p}" for p in ports], picker=pickers[0], listen_port=free_port(), admin_port=free_port()
    )
    b = bootstrap(opts)
    if len(pickers) > 1:  # replicas: every picker an endpoint of the picker cluster
        (cluster,) = [c for c in b["static_resources"]["clusters"] if c["name"] == "llmd_picker"]
        lb = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        lb[:] = [{"endpoint": {"address": _addr(a)}} for a in pickers]
    if not with_ext_proc:
        b = copy.deepcopy(b)
        hcm = b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"]
    proc = EnvoyProcess(b, OUT / f"envoy_{'gw' if with_ext_proc else 'plain'}.log", concurrency=concurrency)
    proc.listen_url = f"http://127.0.0.1:{opts.listen_port}"  # type: ignore[attr-defined]
    return proc


def measure_pids(url: str, args: argparse.Namespace, env: dict[str, str], tag: str, pids: dict[str, int]) -> dict:
    """wrk's saturated and 1-connection runs, with each process's CPU seconds per request."""
    overhead.run_wrk(url, args.connections, args.threads, args.warmup, env, f"{tag}_warmup")
    out: dict[str, Any] = {}
    for mode, conns, threads in (("saturated", args.connections, args.threads), ("single", 1, 1)):
        before = {k: cpu_seconds(p) for k, p in pids.items()}
        r = overhead.run_wrk(url, conns, threads, args.duration, env, f"{tag}_c{conns}")
        n = max(1, r["requests"] or 1)
        r["cpu_us_per_req"] = {k: round(1e6 * (cpu_seconds(p) - before[k]) / n, 1) for k, p in pids.items()}
        r["load_avg"] = [round(x, 2) for x in os.getloadavg()]
        out[mode] = r
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="direct,envoy,gateway_null,gateway,ours,cache_aware")
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--warmup", type=float, default=2)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--prefix-words", type=int, default=4150)
    ap.add_argument("--pods", type=int, default=2)
    ap.add_argument("--index-prefixes", type=int, default=0)
    ap.add_argument("--envoy-concurrency", type=int, default=1, help="Envoy worker threads")
    ap.add_argument("--picker-args", default="", help="extra flags for the gateway row's router (space separated)")
    ap.add_argument("--pickers", type=int, default=1, help="gateway row: picker processes (replicas) behind Envoy")
    ap.add_argument("--tag", default="", help="suffix for the output files")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    OUT.mkdir(parents=True, exist_ok=True)
    overhead.OUT = OUT  # wrk outputs and nginx's prefix go under bench/out/gateway/
    model_dir = make_test_model(REPO / "bench" / "out" / "models" / "small", shape="small")
    env = {"BENCH_PREFIX_WORDS": str(args.prefix_words), "BENCH_MODEL": "test-model"}
    ports: list[int] = []
    while len(ports) < args.pods:
        p = free_port()
        if p not in ports:
            ports.append(p)
    meta = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "load_avg_before": [round(x, 2) for x in os.getloadavg()],
        "cores": os.cpu_count(),
        "command": " ".join(sys.argv),
        "pods": args.pods,
        "index_prefixes_per_pod": args.index_prefixes,
        "envoy_concurrency": args.envoy_concurrency,
        "pickers": args.pickers,
    }
    rows: list[dict[str, Any]] = []
    rows_wanted = [r for r in args.rows.split(",") if r]
    nginx = overhead.Nginx(ports).start()
    plain = [Worker(f"http://127.0.0.1:{p}", model_dir=model_dir, served_name="test-model") for p in ports]
    try:
        for name in rows_wanted:
            log(f"row {name}")
            if name == "direct":
                rows.append(
                    {"router": "direct", "label": "direct to backend (nginx)"}
                    | measure_pids(f"http://127.0.0.1:{ports[0]}", args, env, "direct", {})
                )
                continue
            if name == "gateway_null":
                addr = f"127.0.0.1:{free_port()}"
                cmd = [sys.executable, str(HERE / "null_picker.py"), addr, f"127.0.0.1:{ports[0]}"]
                null = subprocess.Popen(cmd, stdout=subprocess.PIPE, start_new_session=True)
                envoy = None
                try:
                    assert null.stdout is not None and null.stdout.readline().strip() == b"ready"
                    envoy = envoy_for(ports, addr, True, args.envoy_concurrency).start_ready()
                    url = envoy.listen_url  # type: ignore[attr-defined]
                    pids = {"picker": null.pid, "envoy": envoy.proc.pid}  # type: ignore[union-attr]
                    label = "Envoy + null picker (ext_proc protocol only)"
                    rows.append({"router": name, "label": label} | measure_pids(url, args, env, name, pids))
                finally:
                    if envoy is not None:
                        envoy.stop()
                    stop_process_group(null)
                continue
            if name == "envoy":
                envoy = envoy_for(ports, "127.0.0.1:1", False, args.envoy_concurrency).start_ready()
                try:
                    url = envoy.listen_url  # type: ignore[attr-defined]
                    pids = {"envoy": envoy.proc.pid}  # type: ignore[union-attr]
                    rows.append(
                        {"router": "envoy", "label": "Envoy alone (round robin)"}
                        | measure_pids(url, args, env, name, pids)
                    )
                finally:
                    envoy.stop()
                continue
            feed = None
            workers = plain
            if args.index_prefixes and name in ("ours", "gateway"):
                feed = overhead.EventFeed([f"127.0.0.1:{p}" for p in ports], args.index_prefixes)
                workers = [
                    Worker(w.url, events=ep, model_dir=model_dir, served_name="test-model")
                    for w, ep in zip(plain, feed.endpoints, strict=True)
                ]
            n_procs = args.pickers if name == "gateway" else 1
            picker_addrs = [f"127.0.0.1:{free_port()}" for _ in range(n_procs)]
            kinds = [
                gateway_kind(a, args.picker_args.split()) if name == "gateway" else ROUTERS[name] for a in picker_addrs
            ]
            why = kinds[0].available()
            if why:
                log(f"{name}: skipped: {why}")
                continue
            routers = [
                RouterProcess(k, k.build(workers, free_port()), OUT / f"router_{name}{i or ''}.log")
                for i, k in enumerate(kinds)
            ]
            envoy = None
            try:
                for router in routers:
                    router.start()
                for router in routers:
                    router.wait_ready(timeout=120)
                    assert router.proc is not None
                row: dict[str, Any] = {"router": name, "label": kinds[0].label}
                if n_procs > 1:
                    row["label"] += f" x{n_procs} replicas"
                if feed is not None:
                    for router in routers:
                        row["index_blocks"] = feed.fill(router.url)
                    row["label"] += f" ({row['index_blocks']} index blocks)"
                    log(f"{name}: index holds {row['index_blocks']} blocks")
                pids = {f"router{i or ''}": r.proc.pid for i, r in enumerate(routers)}  # type: ignore[union-attr]
                url = routers[0].url
                if name == "gateway":
                    envoy = envoy_for(ports, picker_addrs, True, args.envoy_concurrency).start_ready()
                    assert envoy.proc is not None
                    pids["envoy"] = envoy.proc.pid
                    url = envoy.listen_url  # type: ignore[attr-defined]
                row |= measure_pids(url, args, env, name, pids)
                if name in ("ours", "gateway"):
                    n = sum(metric(r.url, "llmd_router_decision_seconds_count") for r in routers)
                    total = sum(metric(r.url, "llmd_router_decision_seconds_sum") for r in routers)
                    row["decision_ms_mean"] = round(1e3 * total / max(n, 1), 3)
                rows.append(row)
                log(f"{name}: {row['saturated']['req_s']} req/s; 1 conn p99 {row['single']['p99_ms']} ms")
            except Exception as exc:  # one failed row must not lose the others
                print(f"{name}: FAILED: {exc}", file=sys.stderr, flush=True)
            finally:
                if envoy is not None:
                    envoy.stop()
                for router in routers:
                    router.stop()
                if feed is not None:
                    feed.close()
    finally:
        nginx.stop()
    meta["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    if not any(r["router"] == "direct" for r in rows):
        raise SystemExit("the direct row is the baseline: include it in --rows")
    lines = [
        overhead.table(rows, args.connections),
        "",
        "| path | decision ms (mean) | CPU µs/request (saturated) |",
        "|---|---|---|",
    ]
    for r in rows:
        cpu = ", ".join(f"{k} {v}" for k, v in r["saturated"].get("cpu_us_per_req", {}).items()) or "-"
        lines.append(f"| {r['label']} | {r.get('decision_ms_mean', '-')} | {cpu} |")
    summary = (
        "\n".join(lines) + f"\n\n{args.pods} pods, {args.index_prefixes} indexed prefixes per pod;"
        f" wrk -t{args.threads} -c{args.connections} -d{args.duration}s and -c1;"
        f" Envoy --concurrency {args.envoy_concurrency}, {args.pickers} picker process(es);"
        f" {meta['date_utc']} UTC on"
        f" {meta['cores']} cores, load average before {meta['load_avg_before']}, after {meta['load_avg_after']}\n"
    )
    (OUT / f"results{args.tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (OUT / f"results{args.tag}.md").write_text(summary)
    print()
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
