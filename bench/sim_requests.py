"""Per-request view of one ``bench/sim_fleet.py`` row of ours: where each request went and what its
TTFT was, cold (its prefix's first request in the step) or warm, per pod class; which requests make
the TTFT p90; and what sets the step's duration (achieved req/s = completed / duration).

The row must have been run with the router's decision lines and access log on, and the client's
per-request results:

    LLMD_BENCH_ROUTER_LOG_LEVEL=debug LLMD_BENCH_OURS_CONFIG=access-json.yaml \\
      .venv/bin/python bench/sim_fleet.py --routers ours --rates 10,14 --save-detailed --idle-s 0 --tag=-diag
    .venv/bin/python bench/sim_requests.py bench/out/sim_fleet/ladder-20pods-diag/ours

(``access-json.yaml``: ``server: {access_log: json}``.) A decision line (``route ... -> pod``) and
an access-log line are matched per pod in time order; steps are split at gaps of over 3 s.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

ROUTE = re.compile(
    r"^(\S+ \S+) DEBUG vllm_llmd\.router\.proxy: route prompt=(\d+) tokens first_key=(\w+) -> (\S+) "
    r"predicted_cached=(\d+) "
)
CLASSES = ("fast", "medium", "slow")


def load(d: Path) -> list[dict[str, Any]]:
    cls = {p["url"].split("://", 1)[1]: p["class"] for p in json.loads((d / "endpoints.json").read_text())}
    routes: dict[str, list[dict[str, Any]]] = defaultdict(list)
    done: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for ln in (d / "router.log").read_text().splitlines():
        if m := ROUTE.match(ln):
            t = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            routes[m[4]].append({"t": t, "key": m[3], "pod": m[4], "cls": cls[m[4]], "predicted": int(m[5])})
        elif "router.access: " in ln:
            a = json.loads(ln.split("router.access: ", 1)[1])
            if a.get("pod"):  # routed: /tokenize too (the client's first call), dropped below
                a["start"] = a["ts"] - a["duration_ms"] / 1e3
                done[a["pod"]].append(a)
    rows = []
    for pod, rs in routes.items():
        acc = sorted(done[pod], key=lambda a: a["start"])
        for r, a in zip(sorted(rs, key=lambda r: r["t"]), acc, strict=False):
            if a["path"] == "/v1/completions" and a["ttft_ms"] is not None:
                r.update(ttft=a["ttft_ms"], e2e=a["duration_ms"], end=a["ts"])
                rows.append(r)
    rows.sort(key=lambda r: r["t"])
    return rows


def steps(rows: list[dict[str, Any]], gap_s: float = 3.0, min_n: int = 50) -> list[list[dict[str, Any]]]:
    out: list[list[dict[str, Any]]] = [[]]
    for r in rows:
        if out[-1] and r["t"] - out[-1][-1]["t"] > gap_s:
            out.append([])
        out[-1].append(r)
    return [s for s in out if len(s) >= min_n]


def describe(s: list[dict[str, Any]]) -> str:
    t0 = s[0]["t"]
    first: dict[str, dict[str, Any]] = {}
    for r in s:
        r["cold"] = r["key"] not in first
        first.setdefault(r["key"], r)
    n = len(s)
    ttfts = sorted(r["ttft"] for r in s)
    p90 = ttfts[int(0.9 * n)]
    lines = [f"{n} requests, arrivals over {s[-1]['t'] - t0:.1f} s; TTFT p50 {ttfts[n // 2]:.0f} ms, p90 {p90:.0f} ms"]
    lines.append("| | class | requests | TTFT p50 ms | TTFT max ms | at or over the p90 |")
    lines.append("|---|---|---|---|---|---|")
    for kind in ("cold", "warm"):
        for c in CLASSES:
            x = [r["ttft"] for r in s if r["cold"] == (kind == "cold") and r["cls"] == c]
            if x:
                over = sum(v >= p90 for v in x)
                lines.append(f"| {kind} | {c} | {len(x)} | {statistics.median(x):.0f} | {max(x):.0f} | {over} |")
    cold = [r for r in s if r["cold"]]
    lines.append(
        "cold prefixes in arrival order (s after the step's first request: class initial): "
        + " ".join(f"{r['t'] - t0:.1f}{r['cls'][0]}" for r in cold)
    )
    end = max(r["end"] for r in s)
    tail = sorted(s, key=lambda r: r["end"])[-5:]
    lines.append(
        f"last arrival {s[-1]['t'] - t0:.1f} s, last end {end - t0:.1f} s; the last five to end (class, e2e s): "
        + ", ".join(f"{r['cls']} {r['e2e'] / 1e3:.1f}" for r in tail)
    )
    per_class_e2e = {
        c: statistics.median([r["e2e"] / 1e3 for r in s if r["cls"] == c and not r["cold"]] or [0.0]) for c in CLASSES
    }
    lines.append("warm e2e median s per class: " + ", ".join(f"{c} {v:.2f}" for c, v in per_class_e2e.items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("row_dir", type=Path, help="bench/out/sim_fleet/<tag>/ours")
    args = ap.parse_args()
    for i, s in enumerate(steps(load(args.row_dir))):
        print(f"### step {i + 1}\n{describe(s)}\n")


if __name__ == "__main__":
    main()
