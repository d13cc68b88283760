"""Side-by-side serving benchmark: the same two vLLM CPU engines behind each router in turn.

For every (model, router) row it starts FRESH engines (two vLLM CPU engines pinned one per core,
64-token blocks, 320 blocks each, prefix caching, KV events + replay), starts the router, and drives
vLLM's own benchmark client (``vllm.benchmarks.serve``, ``--dataset-name prefix_repetition``):

* ``saturate``: 160 requests at ``--request-rate inf`` with ``--max-concurrency 8``;
* ``ladder``: Poisson arrivals at each rate of ``--ladder-rates`` with ``--ladder-prompts`` requests
  per step (a new seed, i.e. new prefixes, per step; engines' prefix caches reset between steps).

It records requests/s, output tokens/s, TTFT p50/p90, E2E p50 and the engines' prefix-cache hit
rate (``vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total`` summed over both engines,
counted over the step only), writes one JSON per row to ``bench/out/serving/<model>/<router>.json``
(rows already there are skipped unless ``--force``: the run is resumable per row), then prints
markdown tables per model and mode and saves PNG plots of the ladder.

    .venv/bin/python bench/serving.py --routers rr,cache_aware,kv_aware,oracle,ours --models small,wide
    .venv/bin/python bench/serving.py --report-only          # tables + plots from the saved rows
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from routers import REPO, ROUTERS, RouterKind, RouterProcess, Worker, free_port

from vllm_llmd.testing.engine import EngineProcess, EngineSpec
from vllm_llmd.testing.model import make_test_model

OUT = REPO / "bench" / "out"
CLIENT = (
    "import sys; from vllm.benchmarks.serve import main, add_cli_args; "
    "from vllm.utils.argparse_utils import FlexibleArgumentParser as P; "
    "p = P(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))"
)
QUIET_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1"}


class Interrupted(Exception):
    pass


def _on_signal(signum: int, _frame: object) -> None:
    raise Interrupted(f"signal {signum}")


# ---------------------------------------------------------------------------------------------- engines


#: the KV block size of the benchmark's engines (``_start_engines``)
ENGINE_BLOCK_SIZE = 64
#: ``llmd:kv_peer_loads_total``'s results (docs/peer-loading.md "Metrics"), counted per row as ``peer_<result>``
PEER_RESULTS = ("ok", "refused", "evicted", "unreachable", "timeout", "failed")


def engine_counters(url: str) -> dict[str, float]:
    """Prefix-cache hits/queries and finished requests from one engine's /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    want = {
        "vllm:prefix_cache_hits_total": "hits",
        "vllm:prefix_cache_queries_total": "queries",
        "vllm:request_success_total": "requests",
        # P/D rows: prompt tokens loaded from another engine, KV bytes pulled and pulls, for our
        # LLMDConnector (llmd:*) and vLLM's NixlConnector (vllm:nixl_* histogram)
        "vllm:external_prefix_cache_hits_total": "external_hits",
        "llmd:kv_transfer_bytes_total": "kv_bytes",
        "vllm:nixl_bytes_transferred_sum": "kv_bytes",
        "vllm:nixl_bytes_transferred_count": "kv_pulls",
        # where the time goes: a peer load's seconds against a prefill's, per token
        "llmd:kv_peer_load_seconds_total": "peer_seconds",
        "llmd:kv_peer_load_blocks_total": "peer_blocks",
        "vllm:request_prefill_time_seconds_sum": "prefill_seconds",
        "vllm:request_prefill_kv_computed_tokens_sum": "prefill_tokens",
        # the engines' own view of the requests' time (from arrival at vLLM's API server): what the
        # client measured beyond it was spent in the client, the router and the HTTP between them
        "vllm:e2e_request_latency_seconds_sum": "engine_e2e_s",
    }
    out = dict.fromkeys(want.values(), 0.0)
    out["kv_pulls_failed"] = 0.0
    # peer loads (docs/peer-loading.md), on the reader: loads by result, bytes read
    out.update(peer_loads=0.0, peer_loads_failed=0.0, peer_bytes=0.0, dram_stored=0.0)
    out.update({f"peer_{r}": 0.0 for r in PEER_RESULTS})
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in want:
                out[want[s.name]] += float(s.value)
            elif s.name == "llmd:kv_peer_loads_total":
                out["peer_loads" if s.labels.get("result") == "ok" else "peer_loads_failed"] += float(s.value)
                if s.labels.get("result") in PEER_RESULTS:
                    out[f"peer_{s.labels['result']}"] += float(s.value)
            elif s.name == "llmd:kv_tier_stored_blocks_total" and s.labels.get("tier") == "dram":
                out["dram_stored"] += float(s.value)  # tiers: blocks the DRAM tier stored
            elif s.name == "llmd:kv_peer_load_bytes_total":
                out["peer_bytes"] += float(s.value)
            elif s.name == "llmd:kv_transfers_total":
                out["kv_pulls" if s.labels.get("result") == "ok" else "kv_pulls_failed"] += float(s.value)
            elif s.name == "vllm:nixl_num_failed_transfers_total":
                out["kv_pulls_failed"] += float(s.value)
    return out


def post_json(url: str, body: dict[str, Any], timeout: float = 120) -> Any:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


def reset_prefix_cache(url: str, deadline_s: float = 30) -> bool:
    """``POST /reset_prefix_cache?reset_external=true`` (needs VLLM_SERVER_DEV_MODE=1): the engine's
    prefix cache and its KV connector's caches (our DRAM and disk tiers; without ``reset_external``
    a tier kept the previous run's blocks, which the next run's fresh router never heard of: on
    ``longrag`` every run after an invocation's first began with a full DRAM tier, found
    2026-12-04); retried while requests hold blocks."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            req = urllib.request.Request(url + "/reset_prefix_cache?reset_external=true", data=b"", method="POST")
            with urllib.request.urlopen(req, timeout=10) as r:
                if json.loads(r.read() or b"{}").get("success") is True:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def start_engines(
    model_dir: Path, kind: RouterKind, log_dir: Path, n: int, attempts: int = 3, num_gpu_blocks: int = 320
) -> list[EngineProcess]:
    """Start ``n`` engines of ``num_gpu_blocks`` KV blocks each; retried with fresh ports when one
    fails (free ports can be taken by another process between picking and binding, e.g. "ZMQError:
    Address already in use")."""
    for attempt in range(1, attempts + 1):
        try:
            return _start_engines(model_dir, kind, log_dir, n, num_gpu_blocks)
        except Exception as exc:  # EngineStartError and the warm-up request
            if attempt == attempts:
                raise
            print(f"  engine start failed (attempt {attempt}), retrying: {str(exc).splitlines()[0]}", flush=True)
    raise AssertionError("unreachable")


def _start_engines(
    model_dir: Path, kind: RouterKind, log_dir: Path, n: int, num_gpu_blocks: int = 320
) -> list[EngineProcess]:
    cores = os.cpu_count() or 1
    served = str(model_dir) if kind.served_name_is_path else "test-model"
    engines = []
    for i in range(n):
        spec = EngineSpec(
            model=model_dir,
            served_model_name=served,
            block_size=ENGINE_BLOCK_SIZE,
            num_gpu_blocks=num_gpu_blocks,
            max_model_len=4096,
            cpu_core=i if cores >= n else None,
            extra_args=list(kind.engine_args),
            extra_env={**kind.engine_env, **(kind.per_engine_env(i) if kind.per_engine_env else {})},
        )
        engines.append(EngineProcess(spec, log_dir / f"engine{i}.log"))
    try:
        for e in engines:
            e.start()
        for e in engines:
            # a start whose log stays silent for 3 min is a hang (sched_setaffinity on this VM kernel,
            # see vllm_llmd/testing/engine.py): fail it so start_engines retries with fresh engines
            e.wait_ready(timeout=900, quiet_timeout=180)
    except BaseException:
        for e in engines:
            e.stop()
        raise
    # one short request per engine so first-call costs do not land in the measurement; shorter
    # than a block, so it caches nothing and publishes no block events
    try:
        for e in engines:
            post_json(e.url + "/v1/completions", {"model": served, "prompt": "warm up", "max_tokens": 4})
    except BaseException:
        for e in engines:
            e.stop()
        raise
    return engines


# ---------------------------------------------------------------------------------------------- client


def run_client(
    router_url: str,
    served: str,
    model_dir: Path,
    out_file: Path,
    log_path: Path,
    *,
    num_prompts: int,
    request_rate: str,
    max_concurrency: int | None,
    seed: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-c",
        CLIENT,
        "--backend",
        "vllm",
        "--base-url",
        router_url,
        "--endpoint",
        "/v1/completions",
        "--model",
        served,
        "--tokenizer",
        str(model_dir),
        "--dataset-name",
        "prefix_repetition",
        "--prefix-repetition-prefix-len",
        str(args.prefix_len),
        "--prefix-repetition-suffix-len",
        str(args.suffix_len),
        "--prefix-repetition-num-prefixes",
        str(args.num_prefixes),
        "--prefix-repetition-output-len",
        str(args.output_len),
        "--num-prompts",
        str(num_prompts),
        "--request-rate",
        request_rate,
        "--ignore-eos",
        "--seed",
        str(seed),
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,90,99",
        "--disable-tqdm",
        "--save-result",
        "--result-dir",
        str(out_file.parent),
        "--result-filename",
        out_file.name,
    ]
    if max_concurrency:
        cmd += ["--max-concurrency", str(max_concurrency)]
    if getattr(args, "save_detailed", False):  # per-request TTFTs, start times, latencies
        cmd.append("--save-detailed")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.unlink(missing_ok=True)
    env = dict(os.environ)
    env.update(QUIET_ENV)
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(cmd[3:])}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.client_timeout)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    if rc != 0 or not out_file.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"benchmark client failed (rc={rc}):\n{tail}")
    res = json.loads(out_file.read_text())
    return {
        "completed": res.get("completed"),
        "failed": res.get("failed", 0),
        "duration_s": res.get("duration"),
        "req_s": res.get("request_throughput"),
        "out_tok_s": res.get("output_throughput"),
        "ttft_p50_ms": res.get("p50_ttft_ms"),
        "ttft_p90_ms": res.get("p90_ttft_ms"),
        "ttft_p99_ms": res.get("p99_ttft_ms"),
        "e2e_p50_ms": res.get("p50_e2el_ms"),
        "e2e_p90_ms": res.get("p90_e2el_ms"),
        "tpot_p50_ms": res.get("p50_tpot_ms"),
    }


DEFAULT_WORKLOAD = "prefix_repetition"


def rows_dir(model: str, workload: str) -> Path:
    """Where a (model, workload)'s rows live: the default workload keeps its historical place."""
    if workload == DEFAULT_WORKLOAD:
        return OUT / "serving" / model
    return OUT / "serving" / workload / model


def run_workload(
    router_url: str,
    served: str,
    model_dir: Path,
    engines: list[str],
    args: argparse.Namespace,
    seed: int,
    row_dir: Path,
    tag: str,
) -> dict[str, Any]:
    """One run of a ``bench/workloads.py`` workload (seed ``args.workload_seed + seed``) through
    ``bench/workload_client.py``; per-request records and engine load samples go to a side file."""
    import asyncio

    import workload_client
    import workloads

    wl, tm = workloads.build(args.workload, model_dir, seed=args.workload_seed + seed)
    rate = getattr(args, "rate", None)
    wseed = args.workload_seed + seed
    res = asyncio.run(workload_client.run(wl, router_url, served, engines, args.concurrency, rate=rate, seed=wseed))
    res["rate"] = rate
    detail = {"per_request": res.pop("per_request"), "load_samples": res.pop("load_samples")}
    row_dir.mkdir(parents=True, exist_ok=True)
    (row_dir / f"detail_{tag}.json").write_text(json.dumps(detail))
    res["workload"] = wl.summary(tm.count)
    return res


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of one process (all its threads), from ``/proc/PID/stat``."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(engines: list[EngineProcess], fn: Any, router_pid: int | None = None) -> dict[str, Any]:
    before = [engine_counters(e.url) for e in engines]
    cpu0 = cpu_seconds(router_pid)
    res = fn()
    cpu1 = cpu_seconds(router_pid)
    after = [engine_counters(e.url) for e in engines]
    # the router shares the machine's cores with the engines: what it burns, they lose
    res["router_cpu_s"] = round(cpu1 - cpu0, 2) if cpu0 is not None and cpu1 is not None else None
    hits = sum(a["hits"] - b["hits"] for a, b in zip(after, before, strict=True))
    queries = sum(a["queries"] - b["queries"] for a, b in zip(after, before, strict=True))
    res["hit_rate"] = hits / queries if queries else None
    res["requests_per_engine"] = [int(a["requests"] - b["requests"]) for a, b in zip(after, before, strict=True)]
    moved = ("external_hits", "kv_bytes", "kv_pulls", "kv_pulls_failed")
    moved += ("peer_loads", "peer_loads_failed", "peer_bytes", "peer_seconds", "peer_blocks")
    moved += ("prefill_seconds", "prefill_tokens", "dram_stored", *(f"peer_{r}" for r in PEER_RESULTS))
    moved += ("engine_e2e_s",)
    for key in moved:
        res[key] = sum(a[key] - b[key] for a, b in zip(after, before, strict=True))
    # per request, what the client waited beyond the engines' own e2e (router + client + HTTP)
    n, e2e = res.get("e2e_n", 0), res.get("e2e_sum_s", 0.0)
    if n and n == sum(res["requests_per_engine"]):
        res["path_overhead_ms"] = round(1000 * (e2e - res["engine_e2e_s"]) / n, 1)
    return res


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------------------------------- one row


def run_row(model: str, kind: RouterKind, args: argparse.Namespace) -> dict[str, Any]:
    model_dir = make_test_model(OUT / "models" / model, shape=model)
    row_dir = rows_dir(model, args.workload) / kind.name
    log_dir = row_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    served = str(model_dir) if kind.served_name_is_path else "test-model"
    result: dict[str, Any] = {
        "router": kind.name,
        "label": kind.label,
        "model": model,
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "load_avg_before": load_avg(),
        "engine_env": kind.engine_env,
        "engine_args": kind.engine_args,
        "workload": {
            "name": args.workload,
            "prefix_len": args.prefix_len,
            "suffix_len": args.suffix_len,
            "num_prefixes": args.num_prefixes,
            "output_len": args.output_len,
            "num_prompts": args.num_prompts,
            "max_concurrency": args.concurrency,
            "ladder_rates": args.ladder_rates,
            "ladder_prompts": args.ladder_prompts,
        },
        "command": " ".join(sys.argv),
    }
    print(f"[{time.strftime('%H:%M:%S')}] {model}/{kind.name}: starting engines", flush=True)
    t0 = time.monotonic()
    engines = start_engines(model_dir, kind, log_dir, args.engines)
    router: RouterProcess | None = None
    try:
        result["engine_start_s"] = round(time.monotonic() - t0, 1)
        workers = [Worker(e.url, e.spec.events_endpoint, e.spec.replay_endpoint, model_dir, served) for e in engines]
        launch = kind.build(workers, free_port())
        router = RouterProcess(kind, launch, log_dir / "router.log").start()
        router.wait_ready(timeout=180)
        router_pid = router.proc.pid if router.proc is not None else None
        result["router_cmd"] = " ".join(launch.cmd)
        print(f"[{time.strftime('%H:%M:%S')}] {model}/{kind.name}: router up at {router.url}", flush=True)

        def client(n: int, rate: str, conc: int | None, seed: int, tag: str) -> dict[str, Any]:
            if args.workload != DEFAULT_WORKLOAD:  # bench/workloads.py, through our own client
                return run_workload(router.url, served, model_dir, [e.url for e in engines], args, seed, row_dir, tag)
            return run_client(
                router.url,
                served,
                model_dir,
                row_dir / f"client_{tag}.json",
                log_dir / "client.log",
                num_prompts=n,
                request_rate=rate,
                max_concurrency=conc,
                seed=seed,
                args=args,
            )

        if "saturate" in args.modes:
            r = measured(engines, lambda: client(args.num_prompts, "inf", args.concurrency, 0, "saturate"), router_pid)
            result["saturate"] = r
            print(f"  saturate: {fmt_brief(r)}", flush=True)
        if "ladder" in args.modes:
            steps = []
            for i, rate in enumerate(args.ladder_rates):
                result.setdefault("reset_ok", []).append(all(reset_prefix_cache(e.url) for e in engines))
                r = measured(
                    engines,
                    lambda rate=rate, i=i: client(args.ladder_prompts, str(rate), None, 100 + i, f"rate{rate}"),
                    router_pid,
                )
                r["rate"] = rate
                steps.append(r)
                print(f"  rate {rate}: {fmt_brief(r)}", flush=True)
            result["ladder"] = steps
        for p in launch.side_ports:  # vllm-router's Prometheus listener: keep its view for diagnosis
            text = router.get("/metrics", port=p)
            if text:
                (log_dir / "router_metrics.txt").write_text(text)
        if kind.name in ("ours", "oracle") or (kind.pd and kind.name.startswith("pd_ours")):
            text = router.get("/health" if kind.name == "oracle" else "/metrics")
            if text:
                (log_dir / "router_metrics.txt").write_text(text)
                if kind.pd and result.get("saturate"):
                    # the router is fresh for every row and the warm-up went to the engines directly:
                    # its P/D counters are the saturating run's
                    result["saturate"]["pd_outcomes"] = pd_outcomes(text)
    finally:
        if router is not None:
            router.stop()
        for e in engines:
            e.stop()
    result["load_avg_after"] = load_avg()
    return result


def pd_outcomes(router_metrics: str) -> dict[str, int]:
    """``llmd_router_pd_requests_total`` by outcome (disaggregated, aggregated, fallback)."""
    out: dict[str, int] = {}
    for fam in text_string_to_metric_families(router_metrics):
        for s in fam.samples:
            if s.name == "llmd_router_pd_requests_total":
                out[s.labels.get("outcome", "?")] = int(s.value)
    return out


def disaggregated_fraction(r: dict[str, Any]) -> float | None:
    """Our router counts its decisions; vllm-router's P/D mode has none (every request takes the
    prefill leg), so there the engines' pulls per completed request tell."""
    oc = r.get("pd_outcomes")
    if oc:
        total = sum(oc.values())
        return oc.get("disaggregated", 0) / total if total else None
    if r.get("completed") and r.get("kv_pulls") is not None:
        return r["kv_pulls"] / r["completed"]
    return None


def fmt_brief(r: dict[str, Any]) -> str:
    return (
        f"{r['req_s']:.2f} req/s, TTFT p50 {r['ttft_p50_ms']:.0f} ms p90 {r['ttft_p90_ms']:.0f} ms, "
        f"hit rate {r['hit_rate']:.2f}, per engine {r['requests_per_engine']}, failed {r['failed']}, "
        f"router CPU {r.get('router_cpu_s')} s"
        + (f", path overhead {r['path_overhead_ms']} ms/request" if r.get("path_overhead_ms") is not None else "")
    )


# ---------------------------------------------------------------------------------------------- report


def _f(x: Any, nd: int = 0) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def saturate_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| router | req/s | output tok/s | TTFT p50 ms | TTFT p90 ms | E2E p50 ms | engine prefix hit rate "
        "| requests per engine | failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        r = row.get("saturate")
        if not r:
            continue
        lines.append(
            f"| {row['label']} | {_f(r['req_s'], 2)} | {_f(r['out_tok_s'], 1)} | {_f(r['ttft_p50_ms'])} "
            f"| {_f(r['ttft_p90_ms'])} | {_f(r['e2e_p50_ms'])} | {_f(r['hit_rate'], 2)} "
            f"| {'/'.join(map(str, r['requests_per_engine']))} | {r['failed']} |"
        )
    return "\n".join(lines)


def pd_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| router | req/s | output tok/s | TTFT p50 ms | TTFT p90 ms | E2E p50 ms | engine prefix hit rate "
        "| disaggregated | KV pulled (MiB, pulls) | tokens loaded remotely | requests per engine | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        r = row.get("saturate")
        if not r:
            continue
        frac = disaggregated_fraction(r) if ROUTERS[row["router"]].pd else None
        moved = "-"
        if ROUTERS[row["router"]].pd and r.get("kv_bytes") is not None:
            moved = f"{r['kv_bytes'] / 2**20:.0f} ({int(r.get('kv_pulls') or 0)}"
            moved += f", {int(r['kv_pulls_failed'])} failed)" if r.get("kv_pulls_failed") else ")"
        ext = r.get("external_hits")
        lines.append(
            f"| {row['label']} | {_f(r['req_s'], 2)} | {_f(r['out_tok_s'], 1)} | {_f(r['ttft_p50_ms'])} "
            f"| {_f(r['ttft_p90_ms'])} | {_f(r['e2e_p50_ms'])} | {_f(r['hit_rate'], 2)} "
            f"| {'-' if frac is None else f'{frac:.2f}'} | {moved} | {'-' if ext is None else int(ext)} "
            f"| {'/'.join(map(str, r['requests_per_engine']))} | {r['failed']} |"
        )
    return "\n".join(lines)


def ladder_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| router | offered req/s | achieved req/s | output tok/s | TTFT p50 ms | TTFT p90 ms | E2E p50 ms "
        "| hit rate | per engine |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for r in row.get("ladder") or []:
            lines.append(
                f"| {row['label']} | {r['rate']} | {_f(r['req_s'], 2)} | {_f(r['out_tok_s'], 1)} "
                f"| {_f(r['ttft_p50_ms'])} | {_f(r['ttft_p90_ms'])} | {_f(r['e2e_p50_ms'])} "
                f"| {_f(r['hit_rate'], 2)} | {'/'.join(map(str, r['requests_per_engine']))} |"
            )
    return "\n".join(lines)


def plot_ladder(model: str, rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (bench/setup.sh installs it): no plots", file=sys.stderr)
        return []
    paths = []
    for key, ylabel, fname in (
        ("ttft_p90_ms", "TTFT p90 (ms)", "ttft_p90"),
        ("out_tok_s", "output tokens/s", "throughput"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        any_line = False
        for row in rows:
            steps = row.get("ladder") or []
            if not steps:
                continue
            ax.plot([s["rate"] for s in steps], [s[key] for s in steps], marker="o", label=row["label"])
            any_line = True
        if not any_line:
            plt.close(fig)
            continue
        ax.set_xlabel("offered request rate (Poisson, req/s)")
        ax.set_ylabel(ylabel)
        if key == "ttft_p90_ms":
            ax.set_yscale("log")
        ax.set_title(f"{model} model: {ylabel} vs request rate")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out_dir / f"{model}_ladder_{fname}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def acceptance(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's targets for our router, computed from whatever rows exist."""
    notes = []
    ours = rows.get("ours", {}).get("saturate")
    oracle = rows.get("oracle", {}).get("saturate")
    peers = [rows[k]["saturate"] for k in ("rr", "cache_aware", "kv_aware") if rows.get(k, {}).get("saturate")]
    if ours and oracle:
        ratio = ours["req_s"] / oracle["req_s"]
        notes.append(f"throughput ours/oracle = {ratio:.2f} (target >= 0.95): {'PASS' if ratio >= 0.95 else 'MISS'}")
    if ours and peers:
        best = min(p["ttft_p90_ms"] for p in peers)
        ratio = ours["ttft_p90_ms"] / best
        notes.append(
            f"TTFT p90 ours/best vllm-router = {ratio:.2f} (target <= 0.8): {'PASS' if ratio <= 0.8 else 'MISS'}"
        )
    sel = rows.get("pd_ours_selective", {}).get("saturate")
    vpd = rows.get("pd_vllm_router", {}).get("saturate")
    if sel and vpd:
        ratio = sel["req_s"] / vpd["req_s"]
        notes.append(
            f"P/D throughput selective/vllm-router P/D = {ratio:.2f} (issue 5 target >= 2): "
            f"{'PASS' if ratio >= 2 else 'MISS'}; TTFT p90 {sel['ttft_p90_ms']:.0f} vs {vpd['ttft_p90_ms']:.0f} ms "
            f"(target lower): {'PASS' if sel['ttft_p90_ms'] < vpd['ttft_p90_ms'] else 'MISS'}"
        )
    if sel and ours:
        ratio = sel["req_s"] / ours["req_s"]
        notes.append(
            f"P/D throughput selective/colocated ours = {ratio:.2f} (issue 5 target >= 0.9): "
            f"{'PASS' if ratio >= 0.9 else 'MISS'}"
        )
    rr_l = rows.get("rr", {}).get("ladder")
    ours_l = rows.get("ours", {}).get("ladder")
    if rr_l:
        sat = next((s for s in rr_l if s["req_s"] < 0.9 * s["rate"]), None)
        if sat is None:
            notes.append("round-robin did not saturate on this ladder (achieved >= 90% of offered at every rate)")
        else:
            notes.append(f"round-robin saturates at {sat['rate']} req/s (TTFT p90 {sat['ttft_p90_ms']:.0f} ms)")
            o = next((s for s in ours_l or [] if s["rate"] == sat["rate"]), None)
            if o:
                ratio = sat["ttft_p90_ms"] / o["ttft_p90_ms"]
                notes.append(
                    f"  there rr/ours TTFT p90 = {ratio:.1f}x (target >= 5x): {'PASS' if ratio >= 5 else 'MISS'}"
                )
    return notes


def report(models: list[str], order: list[str], workload: str = DEFAULT_WORKLOAD) -> str:
    parts = []
    summary: dict[str, Any] = {}
    for model in models:
        rows = {}
        for name in order:
            p = rows_dir(model, workload) / f"{name}.json"
            if p.exists():
                rows[name] = json.loads(p.read_text())
        if not rows:
            continue
        ordered = [rows[n] for n in order if n in rows]
        summary[model] = rows
        dates = sorted({r["date_utc"] for r in ordered})
        loads = [f"{r['router']}: {r['load_avg_before']}" for r in ordered]
        what = "" if workload == DEFAULT_WORKLOAD else f", workload `{workload}`"
        parts.append(f"### {model} model{what}: saturating run\n\n{saturate_table(ordered)}\n")
        pd_rows = [r for r in ordered if ROUTERS[r["router"]].pd]
        if pd_rows:
            ref = [rows[n] for n in ("ours", "rr") if n in rows]
            parts.append(f"### {model} model: P/D vs colocated (saturating run)\n\n{pd_table(pd_rows + ref)}\n")
        if any(r.get("ladder") for r in ordered):
            parts.append(f"### {model} model: Poisson rate ladder\n\n{ladder_table(ordered)}\n")
            for p in plot_ladder(model, ordered, OUT / "serving"):
                parts.append(f"plot: {p.relative_to(REPO)}")
        parts.append(f"measured {dates[0]} .. {dates[-1]} UTC; 1-min load average before each row: {'; '.join(loads)}")
        notes = acceptance(rows)
        if notes:
            parts.append("acceptance (issues 4 and 5):\n" + "\n".join(f"- {n}" for n in notes))
        parts.append("")
    text = "\n".join(parts)
    base = OUT / "serving" if workload == DEFAULT_WORKLOAD else OUT / "serving" / workload
    base.mkdir(parents=True, exist_ok=True)
    (base / "tables.md").write_text(text)
    (base / "summary.json").write_text(json.dumps(summary, indent=1))
    return text


# ---------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--routers", default="rr,cache_aware,kv_aware,oracle,ours", help=f"of {','.join(ROUTERS)}")
    ap.add_argument("--models", default="small,wide", help="test model shapes (small = 6x384, wide = 8x768)")
    ap.add_argument("--modes", default="saturate,ladder", help="saturate and/or ladder")
    ap.add_argument("--force", action="store_true", help="re-run rows that already have results")
    ap.add_argument("--report-only", action="store_true", help="print tables and plots from saved rows")
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--num-prompts", type=int, default=160)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--prefix-len", type=int, default=2048)
    ap.add_argument("--suffix-len", type=int, default=64)
    ap.add_argument("--num-prefixes", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--ladder-rates", default="1,2,3,4,6", help="comma-separated Poisson rates (req/s)")
    ap.add_argument("--ladder-prompts", type=int, default=48, help="requests per ladder step")
    ap.add_argument("--client-timeout", type=float, default=1800)
    ap.add_argument(
        "--workload",
        default=DEFAULT_WORKLOAD,
        help=f"{DEFAULT_WORKLOAD} (vLLM's client) or one of bench/workloads.py: "
        "multiturn, zipf, rag, agentic, hotprefix (saturate mode only)",
    )
    ap.add_argument("--workload-seed", type=int, default=0)
    ap.add_argument(
        "--save-detailed",
        action="store_true",
        help="keep vLLM's client per-request start times and TTFTs in each row's JSON",
    )
    args = ap.parse_args()
    args.routers = [r for r in args.routers.split(",") if r]
    args.models = [m for m in args.models.split(",") if m]
    args.modes = [m for m in args.modes.split(",") if m]
    args.ladder_rates = [float(x) if "." in x else int(x) for x in args.ladder_rates.split(",") if x]
    unknown = [r for r in args.routers if r not in ROUTERS]
    if unknown:
        ap.error(f"unknown routers {unknown}; known: {list(ROUTERS)}")
    if bad := [m for m in args.modes if m not in ("saturate", "ladder")]:
        ap.error(f"unknown modes {bad}")
    if args.workload != DEFAULT_WORKLOAD:
        from workloads import GENERATORS

        if args.workload not in GENERATORS:
            ap.error(f"unknown workload {args.workload!r}; known: {DEFAULT_WORKLOAD}, {', '.join(GENERATORS)}")
        if "ladder" in args.modes:
            args.modes = [m for m in args.modes if m != "ladder"]
    return args


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    print(f"host: {platform.node()}, {os.cpu_count()} cores, load average {load_avg()}", flush=True)
    failures = []
    if not args.report_only:
        for model in args.models:
            for name in args.routers:
                kind = ROUTERS[name]
                dest = rows_dir(model, args.workload) / f"{name}.json"
                if dest.exists() and not args.force:
                    prev = json.loads(dest.read_text())
                    if all(prev.get(m) for m in args.modes):
                        print(f"{model}/{name}: already measured ({dest.relative_to(REPO)}), skipping", flush=True)
                        continue
                why = kind.available()
                if why:
                    print(f"{model}/{name}: skipped: {why}", flush=True)
                    continue
                try:
                    result = run_row(model, kind, args)
                except Interrupted:
                    print("interrupted: processes stopped", file=sys.stderr)
                    return 130
                except Exception as exc:
                    print(f"{model}/{name}: FAILED: {exc}", file=sys.stderr, flush=True)
                    failures.append(f"{model}/{name}")
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                if dest.exists():  # keep the modes this run did not measure (e.g. the ladder of a saturate re-run)
                    prev = json.loads(dest.read_text())
                    for m in ("saturate", "ladder"):
                        if m not in result and prev.get(m):
                            result[m] = prev[m]
                            result.setdefault("kept_from_earlier_run", {})[m] = prev.get("date_utc")
                dest.write_text(json.dumps(result, indent=1))
    print()
    print(report(args.models, list(ROUTERS), args.workload))
    if failures:
        print(f"failed rows: {failures}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
