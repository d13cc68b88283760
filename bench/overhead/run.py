"""Router overhead: each router in front of a trivial local backend, driven by ``wrk``.

The backend is nginx (Debian package) answering a fixed completion JSON to ``POST /v1/completions``
on two ports (two "pods"), so the only real work in the path is the router's. ``wrk`` posts
~22 KB prompts (``post.lua``: 16 shared prefixes x distinct suffixes). For the backend alone and
for each router it runs:

* ``--connections`` (16) connections, closed loop: the requests/s one router process sustains and
  its latency at saturation;
* 1 connection: latency with no queueing, i.e. what the router adds per request.

Everything binds 127.0.0.1. wrk, the router and nginx share the machine's cores (2 here), so the
router's figures include that contention; the direct row is measured the same way.

    .venv/bin/python bench/overhead/run.py --routers rr,cache_aware,ours --duration 10

With ``--pods 100 --index-prefixes 40`` nginx listens on 100 ports (100 "pods" for every router) and,
for our router, this script publishes KV events for each pod on its own ZMQ PUB socket (vLLM's wire
format: ``vllm_llmd.wire.kv_events``): ``index-prefixes`` random 2048-token prefixes per pod, until
the router's ``llmd_router_index_blocks`` shows them all. Then every decision scores 100 pods against
a populated index (the wrk prompts themselves miss it; ``bench/bench_router_decision.py`` measures
the hit path in-process).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ (routers.py)
from routers import REPO, ROUTERS, RouterProcess, Worker, free_port, port_is_free

from vllm_llmd.testing.model import make_test_model
from vllm_llmd.wire.kv_events import BlockStored, encode_batch, seq_to_bytes

HERE = Path(__file__).resolve().parent
OUT = REPO / "bench" / "out" / "overhead"

COMPLETION = (
    '{"id":"cmpl-bench","object":"text_completion","created":0,"model":"test-model",'
    '"choices":[{"index":0,"text":" ok","logprobs":null,"finish_reason":"length"}],'
    '"usage":{"prompt_tokens":4000,"completion_tokens":16,"total_tokens":4016}}'
)
MODELS = '{"object":"list","data":[{"id":"test-model","object":"model","owned_by":"bench"}]}'
# enough of vLLM's /metrics for routers that scrape load (all idle)
METRICS = "vllm:num_requests_running 0\\nvllm:num_requests_waiting 0\\nvllm:kv_cache_usage_perc 0\\n"


def nginx_conf(prefix: Path, ports: list[int]) -> str:
    listens = "\n".join(f"    listen 127.0.0.1:{p} backlog=4096;" for p in ports)
    return f"""
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
  client_body_buffer_size 128k;
  client_max_body_size 16m;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  default_type application/json;
  server {{
{listens}
    location = /v1/completions {{ return 200 '{COMPLETION}'; }}
    location = /v1/chat/completions {{ return 200 '{COMPLETION}'; }}
    location = /metrics {{ default_type text/plain; return 200 "{METRICS}"; }}
    location = /health {{ return 200 ''; }}
    location / {{ return 200 '{MODELS}'; }}
  }}
}}
"""


class Nginx:
    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.prefix = OUT / "nginx"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Nginx:
        exe = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(exe).exists():
            raise SystemExit("nginx not installed: run bench/setup.sh (apt-get install -y nginx wrk)")
        self.prefix.mkdir(parents=True, exist_ok=True)
        for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.prefix / d).mkdir(exist_ok=True)
        conf = self.prefix / "nginx.conf"
        conf.write_text(nginx_conf(self.prefix, self.ports))
        self.proc = subprocess.Popen(
            [exe, "-p", str(self.prefix), "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.prefix / "stderr.log", "ab"),  # noqa: SIM115 - the child owns it
            start_new_session=True,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"nginx exited: {(self.prefix / 'stderr.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[0]}/health", timeout=1):
                    return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        raise SystemExit("nginx did not come up")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


class EventFeed:
    """One ZMQ PUB socket per pod, publishing ``prefixes`` random prefixes per pod as BlockStored
    batches; :meth:`fill` repeats rounds (new seqs: the router may join late) until the router's
    index holds them all."""

    def __init__(self, pods: list[str], prefixes: int, prefix_tokens: int = 2048, block: int = 64) -> None:
        import random

        import zmq

        self.ctx = zmq.Context()
        self.socks = []
        self.endpoints = []
        self.pods = pods
        for _ in pods:
            sock = self.ctx.socket(zmq.PUB)
            port = sock.bind_to_random_port("tcp://127.0.0.1")
            self.socks.append(sock)
            self.endpoints.append(f"tcp://127.0.0.1:{port}")
        rng = random.Random(0)
        self.batches: list[list[bytes]] = []
        for i in range(len(pods)):
            per_pod = []
            for j in range(prefixes):
                toks = [rng.randrange(10, 4000) for _ in range(prefix_tokens)]
                ev = BlockStored(
                    block_hashes=[(i << 32) | (j << 16) | b for b in range(prefix_tokens // block)],
                    parent_block_hash=None,
                    token_ids=toks,
                    block_size=block,
                    lora_id=None,
                    medium="GPU",
                    lora_name=None,
                )
                per_pod.append(encode_batch([ev]))
            self.batches.append(per_pod)
        self.expected_blocks = len(pods) * prefixes * (prefix_tokens // block)
        self.seq = 0

    def fill(self, router_url: str, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        blocks = 0
        while time.monotonic() < deadline:
            self.seq += 1
            for pod, sock, per_pod in zip(self.pods, self.socks, self.batches, strict=True):
                for b in per_pod:
                    sock.send_multipart([f"kv@{pod}@test-model".encode(), seq_to_bytes(self.seq), b])
                    self.seq += 1
            time.sleep(0.5)  # a round is published; give the router's subscriber time to apply it
            with urllib.request.urlopen(router_url + "/metrics", timeout=5) as r:
                m = re.search(rb"^llmd_router_index_blocks (\S+)", r.read(), re.M)
            blocks = int(float(m.group(1))) if m else 0
            if blocks >= self.expected_blocks:
                return blocks
        raise RuntimeError(f"router index holds {blocks} of {self.expected_blocks} blocks after {timeout}s")

    def close(self) -> None:
        for sock in self.socks:
            sock.close(linger=0)
        self.ctx.term()


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not m:
        raise ValueError(f"bad wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_wrk(url: str, connections: int, threads: int, duration: float, env: dict[str, str], tag: str) -> dict[str, Any]:
    exe = shutil.which("wrk")
    if exe is None:
        raise SystemExit("wrk not installed: run bench/setup.sh (apt-get install -y nginx wrk)")
    cmd = [
        exe,
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(HERE / "post.lua"),
        url + "/v1/completions",
    ]
    full_env = dict(os.environ)
    full_env.update(env)
    r = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=duration + 120)
    (OUT / f"wrk_{tag}.txt").write_text(" ".join(cmd) + "\n" + r.stdout + r.stderr)
    if r.returncode != 0:
        raise RuntimeError(f"wrk failed: {r.stderr[-500:]}")
    out: dict[str, Any] = {"connections": connections}
    m = re.search(r"Requests/sec:\s+([\d.]+)", r.stdout)
    out["req_s"] = float(m.group(1)) if m else None
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", r.stdout, re.M)
        out[f"p{pct}_ms"] = _ms(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", r.stdout)
    out["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors:(.*)", r.stdout)
    out["socket_errors"] = m.group(1).strip() if m else ""
    m = re.search(r"(\d+) requests in", r.stdout)
    out["requests"] = int(m.group(1)) if m else None
    m = re.search(r"BODY_BYTES (\d+)", r.stdout)
    out["body_bytes"] = int(m.group(1)) if m else None
    return out


def measure(url: str, args: argparse.Namespace, env: dict[str, str], tag: str) -> dict[str, Any]:
    run_wrk(url, args.connections, args.threads, args.warmup, env, f"{tag}_warmup")
    return {
        "saturated": run_wrk(url, args.connections, args.threads, args.duration, env, f"{tag}_c{args.connections}"),
        "single": run_wrk(url, 1, 1, args.duration, env, f"{tag}_c1"),
    }


def table(rows: list[dict[str, Any]], conns: int) -> str:
    direct = next(r for r in rows if r["router"] == "direct")
    lines = [
        f"| path | max req/s ({conns} conns) | p50 ms | p99 ms | 1 conn p50 ms | 1 conn p99 ms "
        "| added p50 ms (1 conn) | added p99 ms (1 conn) | non-2xx / socket errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, one = r["saturated"], r["single"]
        add50 = one["p50_ms"] - direct["single"]["p50_ms"]
        add99 = one["p99_ms"] - direct["single"]["p99_ms"]
        added = ("-", "-") if r["router"] == "direct" else (f"{add50:.3f}", f"{add99:.3f}")
        errs = f"{s['non_2xx'] + one['non_2xx']} / {s['socket_errors'] or '0'}"
        lines.append(
            f"| {r['label']} | {s['req_s']:.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {one['p50_ms']:.3f} "
            f"| {one['p99_ms']:.3f} | {added[0]} | {added[1]} | {errs} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--routers", default="rr,cache_aware,ours")
    ap.add_argument("--duration", type=float, default=10, help="seconds per wrk run")
    ap.add_argument("--warmup", type=float, default=2, help="seconds of discarded wrk warm-up per path")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--prefix-words", type=int, default=4150, help="~5.3 bytes per word: 4150 -> ~22 KB bodies")
    ap.add_argument("--pods", type=int, default=2, help="backend ports (pods) every router gets")
    ap.add_argument("--index-prefixes", type=int, default=0, help="per pod: prefixes published as KV events (ours)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))

    OUT.mkdir(parents=True, exist_ok=True)
    model_dir = make_test_model(REPO / "bench" / "out" / "models" / "small", shape="small")
    env = {"BENCH_PREFIX_WORDS": str(args.prefix_words), "BENCH_MODEL": "test-model"}
    ports: list[int] = []
    while len(ports) < args.pods:  # free_port() may hand out a port twice: keep distinct ones
        p = free_port()
        if p not in ports:
            ports.append(p)
    meta = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "load_avg_before": [round(x, 2) for x in os.getloadavg()],
        "cores": os.cpu_count(),
        "command": " ".join(sys.argv),
        "backend": "nginx (worker_processes 1) returning a fixed completion JSON",
        "pods": args.pods,
        "index_prefixes_per_pod": args.index_prefixes,
    }
    rows: list[dict[str, Any]] = []
    nginx = Nginx(ports).start()
    try:
        print(f"[{time.strftime('%H:%M:%S')}] direct to nginx", flush=True)
        rows.append(
            {"router": "direct", "label": "direct to backend (nginx)"}
            | measure(f"http://127.0.0.1:{ports[0]}", args, env, "direct")
        )
        plain = [Worker(f"http://127.0.0.1:{p}", model_dir=model_dir, served_name="test-model") for p in ports]
        for name in [r for r in args.routers.split(",") if r]:
            workers = plain
            feed = None
            if args.index_prefixes and name == "ours":
                feed = EventFeed([f"127.0.0.1:{p}" for p in ports], args.index_prefixes)
                workers = [
                    Worker(w.url, events=ep, model_dir=model_dir, served_name="test-model")
                    for w, ep in zip(plain, feed.endpoints, strict=True)
                ]
            kind = ROUTERS[name]
            why = kind.available()
            if why:
                print(f"{name}: skipped: {why}", flush=True)
                continue
            launch = kind.build(workers, free_port())
            router = RouterProcess(kind, launch, OUT / f"router_{name}.log")
            try:
                router.start().wait_ready(timeout=120)
                row = {"router": name, "label": kind.label, "router_cmd": " ".join(launch.cmd)}
                if feed is not None:
                    row["index_blocks"] = feed.fill(router.url)
                    row["label"] += f" ({row['index_blocks']} index blocks)"
                print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
                rows.append(row | measure(router.url, args, env, name))
            except Exception as exc:
                print(f"{name}: FAILED: {exc}", file=sys.stderr, flush=True)
            finally:
                router.stop()
                if feed is not None:
                    feed.close()
    finally:
        nginx.stop()
    meta["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    for p in ports:
        if not port_is_free(p):
            print(f"warning: backend port {p} still busy", file=sys.stderr)
    md = table(rows, args.connections)
    body = rows[0]["saturated"].get("body_bytes")
    summary = (
        f"{md}\n\n{args.pods} pods; body {body} bytes; "
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s and -c1; "
        f"measured {meta['date_utc']} UTC on {meta['cores']} cores, load average before {meta['load_avg_before']}, "
        f"after {meta['load_avg_after']}\n"
    )
    (OUT / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (OUT / "results.md").write_text(summary)
    print()
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
