"""TTFT of the requests that open a prefix against the rest, per run of ``bench/alternating.py``.

A request that is the first of its prefix (the first ``--key-chars`` characters of its prompt) must
prefill that prefix wherever it is routed, and nothing can be loaded for it yet: no placement and no
peer load changes its cost. On a short run its share sets the TTFT tail (bench/RESULTS.md, "Issue 12
rate ladder"). The prompts are rebuilt from the seeded workload (``bench/workloads.py``), matched to
the per-request records (``detail_*.json``: session id, send time, TTFT, pod) by session id::

    .venv/bin/python bench/first_requests.py --workload hotprefix \
        bench/out/serving/hotprefix/wide/alternating-<UTC time>
"""

from __future__ import annotations

import argparse
import json
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
    ap.add_argument("--workload", required=True)
    ap.add_argument("--model-dir", type=Path, default=Path("bench/out/models/wide"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--key-chars", type=int, default=200, help="prompt characters that name a prefix")
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
