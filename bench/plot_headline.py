"""The README's headline plot, drawn from the numbers in ``bench/RESULTS.md`` (their one owner).

Reads the table under the heading ``### Against the issue-4 targets`` (throughput and TTFT p90 per
model and router, means over repeated saturating runs of ``bench/serving.py``) and draws two bar
panels into ``docs/img/headline.png``. Needs matplotlib (``pip install -e .[bench]``).

    .venv/bin/python bench/plot_headline.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEADING = "### Against the issue-4 targets"


def headline_rows(results: str) -> list[dict[str, str | float]]:
    """(model, router, req/s, TTFT p90 ms) from the headline table; a cell like ``2.38 / 2.28 / 2.29``
    (several vllm-router policies in one row) gives its best (first) figure."""
    section = results.rsplit(HEADING, 1)[1]  # the latest such section
    rows: list[dict[str, str | float]] = []
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not re.match(r"\*{0,2}[\d.]", cells[3]):
            continue
        model, router, _runs, rps, p90 = cells
        router = re.sub(r"\s*\(.*\)", "", router.replace("*", "")).strip()
        if "/" in router:  # several policies in one row: the first is the best of them
            router = router.split("/")[0].strip() + " (best)"
        rows.append(
            {
                "model": model,
                "router": router,
                "rps": float(re.findall(r"[\d.]+", rps)[0]),
                "p90": float(re.findall(r"[\d.]+", p90)[0]),
            }
        )
    if not rows:
        raise SystemExit(f"no rows under {HEADING!r} in bench/RESULTS.md")
    return rows


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = headline_rows((REPO / "bench" / "RESULTS.md").read_text())
    models = list(dict.fromkeys(str(r["model"]) for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, key, label in (
        (axes[0], "rps", "throughput, req/s (higher is better)"),
        (axes[1], "p90", "TTFT p90, ms (lower is better)"),
    ):
        xs, names = [], []
        for i, model in enumerate(models):
            mine = [r for r in rows if r["model"] == model]
            for j, r in enumerate(mine):
                x = i * (len(mine) + 1) + j
                ours = "vllm-llmd" in str(r["router"])
                ax.bar(x, float(r[key]), color="tab:green" if ours else "tab:gray")
                ax.text(x, float(r[key]), f"{r[key]:g}", ha="center", va="bottom", fontsize=7)
                xs.append(x)
                names.append(f"{model}: " + str(r["router"]).replace(" router", "").replace("vllm-router ", ""))
        ax.set_xticks(xs, names, rotation=35, ha="right", fontsize=7)
        ax.set_title(label, fontsize=10)
    fig.suptitle("Two vLLM CPU engines, 16 shared 2048-token prefixes, saturating (bench/RESULTS.md)", fontsize=10)
    fig.tight_layout()
    out = REPO / "docs" / "img" / "headline.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(out.relative_to(REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
