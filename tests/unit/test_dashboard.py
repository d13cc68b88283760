"""Every query of the Grafana dashboards in examples/grafana names metrics the code really exports.

Our metrics are collected from the real registries: the router's ``RouterMetrics`` and the engine
connector's ``CombinedPromMetrics`` (what ``LLMDConnector.build_prom_metrics`` returns), built with a
private registry; the exposition names follow Prometheus' rules (a counter ``x`` is ``x_total``, a
histogram ``x`` is ``x_bucket`` / ``x_sum`` / ``x_count``). vLLM's own ``vllm:`` metrics are checked
against vLLM's Prometheus logger source (vllm/v1/metrics/loggers.py) in the installed vLLM.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "examples" / "grafana").glob("*.json"))
METRIC = re.compile(r"\b((?:llmd[:_]|vllm:)[A-Za-z0-9_:]+)")


def _exposed(registry: CollectorRegistry) -> set[str]:
    names: set[str] = set()
    for fam in registry.collect():
        if fam.type == "counter":
            names |= {fam.name + "_total", fam.name + "_created"}
        elif fam.type == "histogram":
            names |= {fam.name + s for s in ("_bucket", "_sum", "_count", "_created")}
        else:
            names.add(fam.name)
    return names


def _bound(registry: CollectorRegistry) -> dict[type, type]:
    def bind(cls: type) -> type:
        class Bound(cls):  # type: ignore[misc, valid-type]
            def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
                kwargs.pop("multiprocess_mode", None)
                super().__init__(*args, registry=registry, **kwargs)

        return Bound

    return {Counter: bind(Counter), Gauge: bind(Gauge), Histogram: bind(Histogram)}


def exported_names() -> set[str]:
    from vllm_llmd.connectors.tiers.stats import CombinedPromMetrics

    from vllm_llmd.router.metrics import RouterMetrics

    engine = CollectorRegistry()
    CombinedPromMetrics(
        SimpleNamespace(kv_transfer_config=None), _bound(engine), ["model_name", "engine"], {0: ["m", "0"]}
    )
    return _exposed(engine) | _exposed(RouterMetrics().registry)


def queries(dashboard: dict) -> list[str]:
    out: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("expr", "definition") and isinstance(v, str):
                    out.append(v)
                elif k == "query" and isinstance(v, dict) and isinstance(v.get("query"), str):
                    out.append(v["query"])
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dashboard)
    return out


def test_there_is_a_dashboard():
    assert DASHBOARDS, "examples/grafana/*.json"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_query_names_an_exported_metric(path: Path):
    dashboard = json.loads(path.read_text())
    ours = exported_names()
    import vllm.v1.metrics.loggers as loggers

    vllm_source = Path(loggers.__file__).read_text()
    exprs = queries(dashboard)
    assert exprs
    missing = []
    for expr in exprs:
        names = METRIC.findall(expr)
        assert names, f"a query with no metric of ours or vLLM's: {expr}"
        for name in names:
            if name.startswith("vllm:"):
                base = re.sub(r"_(total|bucket|sum|count)$", "", name)
                if f'"{base}"' not in vllm_source:
                    missing.append(name)
            elif name not in ours:
                missing.append(name)
    assert not missing, f"{path.name} queries metrics nothing exports: {sorted(set(missing))}"


def test_the_checker_rejects_a_wrong_name():
    ours = exported_names()
    assert "llmd:kv_tier_evicted_blocks_total" in ours
    assert "llmd:kv_tier_evicted_blocks" not in ours  # a counter is only exposed with _total
    assert "llmd_router_decisions_total" in ours
