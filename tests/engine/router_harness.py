"""Start the router in-process in front of the session's real engines (shared by the router engine tests)."""

from __future__ import annotations

import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from vllm_llmd.router.config import PodConfig, RouterConfig
from vllm_llmd.router.front import start_server
from vllm_llmd.router.proxy import RouterApp
from vllm_llmd.router.server import build_router
from vllm_llmd.testing.engine import EngineProcess

WORDS = "kari tone musa lovi stra ion ent verdor qua pre lum dor ix ar el om un cy".split()


def pod_id(engine: EngineProcess) -> str:
    return f"127.0.0.1:{engine.spec.port}"


def prose(seed: int, words: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * (seed % 5 + 3)) % len(WORDS)] + str((seed + i) % 97) for i in range(words))


def prefix_hits(engine: EngineProcess) -> float:
    with urllib.request.urlopen(engine.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("vllm:prefix_cache_hits_total"))


@asynccontextmanager
async def routed(engines: Any, model_dir: Path, **overrides: Any) -> AsyncIterator[tuple[RouterApp, str]]:
    pods = [
        PodConfig(url=e.url, events=e.spec.events_endpoint, replay=e.spec.replay_endpoint).model_dump() for e in engines
    ]
    data: dict[str, Any] = {"models": ["test-model"], "pods": pods, "tokenizer": {"path": str(model_dir)}}
    data.update(overrides)
    router = build_router(RouterConfig.model_validate(data))
    server = await start_server(router.runner(), "127.0.0.1", 0)
    try:
        yield router, f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()
