"""Keep the README honest: its headline figures come from bench/RESULTS.md, and it starts with the
two set-up-free commands, the second of which is what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _headline() -> str:
    text = (REPO / "README.md").read_text()
    start, end = text.index("Measured on"), text.index("The problem it solves")
    return re.sub(r"\[?bench/RESULTS\.md\]?(\(bench/RESULTS\.md\))?", "", text[start:end])


def test_every_headline_number_is_in_the_results_file() -> None:
    results = (REPO / "bench" / "RESULTS.md").read_text()
    numbers = re.findall(r"(?<![\w.])\d+(?:\.\d+)?", _headline())
    assert len(numbers) >= 10, "the headline lost its figures: update this test with it"
    missing = [n for n in numbers if not re.search(r"(?<![\d.])" + re.escape(n) + r"(?!\d)", results)]
    assert not missing, f"README headline numbers not found in bench/RESULTS.md: {missing}"


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second() -> None:
    lines = (REPO / "README.md").read_text().splitlines()
    fence = lines.index("```bash")
    commands = lines[fence + 1 : lines.index("```", fence + 1)]
    assert len(commands) == 2, commands
    assert all(not ln.startswith("#") for ln in lines[1:fence] if ln.strip()), "nothing may precede the commands"
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert f"exec {commands[1]}" in ci, "the CI script must run the README's test command"


def test_the_readme_plot_is_drawn_from_the_results_file() -> None:
    """The README shows docs/img/headline.png, which bench/plot_headline.py draws from the table it
    reads in bench/RESULTS.md: the table must still parse, and hold every headline router."""
    import importlib.util

    assert "(docs/img/headline.png)" in (REPO / "README.md").read_text()
    assert (REPO / "docs" / "img" / "headline.png").stat().st_size > 10_000
    spec = importlib.util.spec_from_file_location("plot_headline", REPO / "bench" / "plot_headline.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.headline_rows((REPO / "bench" / "RESULTS.md").read_text())
    assert {r["model"] for r in rows} == {"small", "wide"}
    ours = {r["model"]: r["rps"] for r in rows if r["router"] == "vllm-llmd router"}
    assert ours == {"small": 9.60, "wide": 4.80}
