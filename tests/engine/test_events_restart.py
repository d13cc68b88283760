"""After an engine restart, the index drops the stale entries of the old engine process.

Restarts the shared engine A (and leaves it running and healthy), so it is marked destructive: it
runs after every other test (tests/conftest.py).
"""

from __future__ import annotations

import json
import random
import urllib.request
from collections.abc import Callable

import pytest

from vllm_llmd.index import KVBlockIndex, KVEventSubscriber
from vllm_llmd.testing.engine import EngineProcess
from vllm_llmd.testing.wait import wait_until

pytestmark = [pytest.mark.engine, pytest.mark.destructive]

MODEL = "test-model"


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    wait_until(cond, timeout, what, interval=0.05)


def serve(engine: EngineProcess, tokens: list[int]) -> None:
    body = json.dumps({"model": MODEL, "prompt": tokens, "max_tokens": 1}).encode()
    req = urllib.request.Request(engine.url + "/v1/completions", data=body, method="POST")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=300) as r:
        assert r.status == 200


def test_engine_restart_drops_stale_entries(engines) -> None:
    a = engines.a
    pod = f"127.0.0.1:{a.spec.port}"
    idx = KVBlockIndex(block_size=64)
    sub = KVEventSubscriber(idx)
    sub.add_pod(pod, a.spec.events_endpoint, a.spec.replay_endpoint)
    sub.start()
    rng = random.Random()
    old = [rng.randrange(10, 4000) for _ in range(300)]

    def held(tokens: list[int]) -> int:
        m = idx.match(MODEL, tokens).get(pod)
        return 0 if m is None else m.tokens

    try:
        wait_for(lambda: pod in sub.stats() and sub.stats()[pod].connected, 30, "connected")
        serve(a, old)
        wait_for(lambda: held(old) == 256, 10, "indexed before the restart")
        a.restart()  # a new engine process: empty cache, seq from 0, no event about the old blocks
        wait_for(lambda: held(old) == 0, 30, "stale entries gone after the restart")
        st = sub.stats()[pod]
        assert st.reconnects >= 1 and st.restarts >= 1
        # and the new engine's events are followed again
        new = [rng.randrange(10, 4000) for _ in range(300)]
        serve(a, new)
        wait_for(lambda: held(new) == 256, 10, "new engine's blocks indexed")
        assert held(old) == 0
    finally:
        sub.stop()
        if not a.is_healthy():  # leave the shared engine running for whoever comes next
            a.restart()
