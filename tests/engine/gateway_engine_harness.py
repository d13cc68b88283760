"""The gateway's configuration for the session's real engines (shared by the gateway engine tests)."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

from vllm_llmd.router.config import PodConfig, RouterConfig
from vllm_llmd.testing.engine import EngineProcess, free_port


def gateway_config(engines: Any, model_dir: Path, **overrides: Any) -> RouterConfig:
    pods = [
        PodConfig(url=e.url, events=e.spec.events_endpoint, replay=e.spec.replay_endpoint).model_dump() for e in engines
    ]
    data: dict[str, Any] = {
        "models": ["test-model"],
        "pods": pods,
        "tokenizer": {"path": str(model_dir)},
        "port": free_port(),
    }
    data.update(overrides)
    return RouterConfig.model_validate(data)


def cache_counts(engine: EngineProcess) -> tuple[float, float]:
    """The engine's own prefix-cache counters: (hit tokens, queried tokens)."""
    with urllib.request.urlopen(engine.url + "/metrics", timeout=10) as r:
        text = r.read().decode()

    def total(name: str) -> float:
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))

    return total("vllm:prefix_cache_hits_total"), total("vllm:prefix_cache_queries_total")
