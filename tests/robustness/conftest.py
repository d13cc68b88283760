"""The standing robustness suite of the router's HTTP front (issue 9): property-based fuzzing
against the real aiohttp router with stand-in backends, a bounded soak, and one huge prompt.

Each test adds its counts to ``harness.REPORT``; they are printed at the end of the run (inputs
tried, crashes, requests lost, RSS and fd growth), whatever pytest captures.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

# the stand-in backends are the router unit tests' own (tests/unit/router_fakes.py)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import REPORT


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not REPORT:
        return
    terminalreporter.section("router robustness")
    for name, counts in REPORT.items():
        terminalreporter.write_line(f"{name}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


@pytest.fixture(scope="session")
def robustness_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vllm_llmd.testing.model import make_test_model

    return make_test_model(tmp_path_factory.mktemp("robustness") / "tiny", shape="tiny")
