"""TTFT of the requests that open a prefix against the rest, per run of ``bench/alternating.py``.

A request that is the first of its prefix (the first ``--key-chars`` characters of its prompt) must
prefill that prefix wherever it is routed, and nothing can be loaded for it yet: no placement and no
peer load changes its cost. On a short run its share sets the TTFT tail (bench/RESULTS.md, "Issue 12
rate ladder"). The prompts are rebuilt from the seeded workload (``bench/workloads.py``), matched to
the per-request records (``detail_*.json``: session id, send time, TTFT, pod) by session id::

    .venv/bin/python bench/first_requests.py --workload hotprefix \
        bench/out/serving/hotprefix/wide/alternating-<UTC time>

``--serving ROUTER,...``: rows of ``bench/serving.py --save-detailed`` instead (``runs`` is
``bench/out/serving/<model>``; each router's ``client_saturate.json`` holds vLLM's client start times
and TTFTs in dataset order, which is also its send order). The prefix of each request is read from
the first router's debug log (``LLMD_BENCH_ROUTER_LOG_LEVEL=debug``, ours: one ``route ...
first_key=`` line per request, after the one of the client's initial test prompt), so the rows must
come from the same seed::

    .venv/bin/python bench/first_requests.py --serving ours,oracle bench/out/serving/wide
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload_client import _pct
from workloads import build


def quantile(xs: list[float], q: float) -> float:
    """As the benchmark client's own percentiles (``workload_client._pct``), ``q`` in 0..1."""
    v = _pct(xs, q * 100)
    return float("nan") if v is None else v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, help="an alternating-<UTC time> directory")
    ap.add_argument("--workload", help="the alternating.py workload (not with --serving)")
    ap.add_argument("--model-dir", type=Path, default=Path("bench/out/models/wide"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--key-chars", type=int, default=200, help="prompt characters that name a prefix")
    ap.add_argument("--serving", help="routers whose bench/serving.py rows to read (the first: ours, debug log)")
    args = ap.parse_args()
    if args.serving:
        serving_rows(args.runs, args.serving.split(","))
        return
    if not args.workload:
        ap.error("--workload is needed for bench/alternating.py runs")
    wl, _ = build(args.workload, args.model_dir, args.seed)
    prefix_of = {t.session: t.prompt[: args.key_chars] for t in wl.turns}
    for f in sorted(args.runs.glob("detail_*.json")):
        every = json.loads(f.read_text())["per_request"]
        # a request with no TTFT streamed no text (or failed): the client's row counts it as failed
        recs = sorted((r for r in every if r["ttft"] is not None), key=lambda r: r["t"])
        seen: set[str] = set()
        first: list[float] = []
        rest: list[float] = []
        for r in recs:
            key = prefix_of[r["s"]]
            (rest if key in seen else first).append(r["ttft"])
            seen.add(key)
        p90 = quantile([r["ttft"] for r in recs], 0.9)
        above = sum(r["ttft"] > p90 for r in recs)
        print(
            f"{f.name}: {len(first)} first requests, median TTFT {quantile(first, 0.5):.2f} s; "
            f"the other {len(rest)}: p90 {quantile(rest, 0.9):.2f} s; all: p90 {p90:.2f} s, "
            f"{sum(x > p90 for x in first)} of the {above} above it are first requests"
            + (f" ({len(every) - len(recs)} without a TTFT left out)" if len(every) > len(recs) else "")
        )


def serving_rows(model_dir: Path, routers: list[str]) -> None:
    """The same split for ``bench/serving.py --save-detailed`` rows (module docstring)."""
    log = (model_dir / routers[0] / "logs" / "router.log").read_text().split("\n=== ")[-1]
    keys = re.findall(r"route prompt=\d+ tokens first_key=(\w+)", log)
    seen = set(keys[:1])  # the client's initial test prompt: its prefix is cached before the run
    first: set[int] = set()
    for i, key in enumerate(keys[1:]):
        if key not in seen:
            first.add(i)
            seen.add(key)
    for r in routers:
        ttft = json.loads((model_dir / r / "client_saturate.json").read_text())["ttfts"]
        if len(ttft) != len(keys) - 1:
            raise SystemExit(
                f"{r}: {len(ttft)} requests, {len(keys) - 1} routed by {routers[0]}: not the same run shape"
            )
        f = [ttft[i] for i in first]
        rest = [t for i, t in enumerate(ttft) if i not in first]
        p90 = quantile(ttft, 0.9)
        above = [i for i, t in enumerate(ttft) if t > p90]
        print(
            f"{r}: {len(f)} first requests, median TTFT {quantile(f, 0.5):.2f} s; the other {len(rest)}: "
            f"p90 {quantile(rest, 0.9):.2f} s; all: p90 {p90:.2f} s, "
            f"{sum(i in first for i in above)} of the {len(above)} above it are first requests"
        )


if __name__ == "__main__":
    main()
