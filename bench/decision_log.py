"""Read our router's decision log (``LLMD_BENCH_ROUTER_LOG_LEVEL=debug``: one ``route prompt=N tokens
first_key=K -> POD predicted_cached=C cached={pod: tokens} ...`` line per request) into placement
statistics: decisions per pod, *spills* (the chosen pod held fewer cached tokens than another pod,
so the request paid a prefill the other pod would have skipped), the prompt tokens those spills
recomputed, and *re-prefills*: decisions for a prefix (its first block key) the run had already
sent somewhere when neither the KV-event index nor the router's speculative entries showed any pod
holding any of it (the fleet had lost its last copy; on ``longrag`` a document prefilled again).

    .venv/bin/python bench/decision_log.py bench/out/serving/multiturn/small/alternating-*/router-0-ours.log

``--assign`` prints the log's placement instead, for ``bench/oracle_router.py --assign``: per
distinct prefix in the order it first arrived, the index (in the router's ``--worker`` order) of
the pod its first request went to.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from typing import Any

_LINE = re.compile(r"route prompt=(\d+) tokens first_key=(\w+) -> (\S+) predicted_cached=(\d+) cached=(\{[^}]*\})")


def placement(log: Path) -> dict[str, Any]:
    per_pod: dict[str, int] = {}
    spills = 0
    spilled_tokens = 0
    decisions = 0
    seen: set[str] = set()
    reprefills = 0
    for line in log.read_text(errors="replace").splitlines():
        m = _LINE.search(line)
        if not m:
            continue
        decisions += 1
        pod = m.group(3)
        per_pod[pod] = per_pod.get(pod, 0) + 1
        cached: dict[str, int] = ast.literal_eval(m.group(5))
        best = max(cached.values(), default=0)
        first = m.group(2)
        if first != "0":
            if first in seen and best == 0:
                reprefills += 1
            seen.add(first)
        mine = cached.get(pod, 0)
        if best > mine:
            spills += 1
            spilled_tokens += best - mine
    return {
        "decisions": decisions,
        "per_pod": dict(sorted(per_pod.items())),
        "spills": spills,
        "spilled_tokens": spilled_tokens,
        "reprefills": reprefills,
    }


_WORKER = re.compile(r"--worker (?:https?://)?([^=\s]+)")


def assignment(log: Path) -> list[int]:
    """Worker index of each distinct prefix's first request, in arrival order (see the docstring)."""
    text = log.read_text(errors="replace")
    order = [w.rstrip("/") for w in _WORKER.findall(text)]
    seen: set[str] = set()
    out = []
    for m in _LINE.finditer(text):
        first = m.group(2)
        if first not in seen:
            seen.add(first)
            out.append(order.index(m.group(3)))
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["--assign"]:
        print(",".join(str(i) for i in assignment(Path(sys.argv[2]))))
    else:
        for arg in sys.argv[1:]:
            print(arg, placement(Path(arg)))
