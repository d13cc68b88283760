"""One huge prompt through the real router (issue 9, case 1): bounded extra memory, and ``/health``
keeps answering while it is tokenized. CI runs ``LLMD_BIG_PROMPT_MIB`` (default 8) MiB with a
generous ``/health`` bound (a shared CI machine stalls any process now and then); the acceptance
figures (16 MiB, 100 ms) come from ``big_prompt.py`` and are reported in bench/RESULTS.md.

Marked ``timing``: ``scripts/test.sh`` runs it alone, before the engine tests start. Run beside them
on 2 cores it failed once in CI (slowest ``/health`` 1,166 ms at 8 MiB, 2026-12-03): engine
start-ups took the router process off the CPU, which no change to the router can prevent."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from big_prompt import measure_big_prompts
from harness import REPORT

MIB = float(os.environ.get("LLMD_BIG_PROMPT_MIB", "8"))


@pytest.mark.timing
def test_a_huge_prompt_costs_bounded_memory_and_never_stalls_health(robustness_model: Path) -> None:
    results = asyncio.run(measure_big_prompts(MIB, robustness_model))
    for name, r in results.items():
        REPORT[f"big prompt ({name}, {r['body_mib']:.1f} MiB)"] = {
            "HTTP": r["status"],
            "seconds": round(r["seconds"], 1),
            "extra RSS MiB": round(r["extra_rss_mib"]),
            "slowest /health ms": round(r["max_health_ms"]),
        }
    for name, r in results.items():
        assert r["status"] == 200, (name, r)
        assert r["extra_rss_mib"] < 200, (name, r)
        assert r["max_health_ms"] < 1000, (name, r)
