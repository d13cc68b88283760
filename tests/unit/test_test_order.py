"""Destructive engine tests run after the tests that share their engines, by marker (not file name)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: files whose tests kill or restart the session's shared engines
DESTRUCTIVE_FILES = ("test_events_restart.py", "test_router_failover.py", "test_gateway_failover.py")


def test_destructive_tests_are_ordered_by_their_marker() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/engine"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    assert ids, out.stdout + out.stderr
    session = [i for i, t in enumerate(ids) if t.split("::")[0].endswith(DESTRUCTIVE_FILES)]
    assert session and session == list(range(len(ids) - len(session), len(ids)))  # after everything else
    pd = [i for i, t in enumerate(ids) if "test_pd.py::" in t]
    assert pd == list(range(pd[0], pd[0] + len(pd)))  # the module's tests stay together (one engine pair)
    assert ids[pd[-1]].endswith("test_prefill_engine_killed_after_prefill_leg_decode_prefills_locally")


def test_timing_tests_run_alone_before_the_rest() -> None:
    """scripts/test.sh runs ``-m timing`` over tests/unit and tests/robustness alone, before the
    engine run and the ``-m "not timing"`` run start side by side."""
    decorator = re.compile(r"^\s*(@pytest\.mark\.timing|pytestmark\b.*\btiming\b)", re.M)
    marked = [p for p in (ROOT / "tests").rglob("test_*.py") if decorator.search(p.read_text())]
    assert marked, "no test is marked timing"
    assert all(p.parent.name in ("unit", "robustness") for p in marked), marked
    script = (ROOT / "scripts" / "test.sh").read_text()
    alone = script.index("-m timing tests/unit tests/robustness")
    assert alone < script.index('-m "not timing" tests/unit tests/robustness') < script.index("pytest tests/engine")
