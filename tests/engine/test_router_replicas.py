"""Active-active replicas (issue 15): two ``vllm-llmd router`` processes with the same config in
front of the session's two real engines choose the same pod for the same prefix once warmed up
(each follows every engine's KV events), and a replica killed and restarted rebuilds its index from
the engines' replay endpoints before it reports ready. The rebuild time is printed (``-s``)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from router_harness import pod_id, prefix_hits, prose

from vllm_llmd.testing.replicas import RouterReplica, write_config
from vllm_llmd.testing.wait import wait_until

pytestmark = pytest.mark.engine


def _converged(replicas: list[RouterReplica], timeout: float = 60.0) -> int:
    """Wait until every replica's index holds the same, non-zero number of blocks twice in a row."""
    seen: list[tuple[int, ...]] = []

    def same() -> bool:
        sizes = tuple(r.index_blocks() for r in replicas)
        seen.append(sizes)
        return len(set(sizes)) == 1 and sizes[0] > 0 and len(seen) > 1 and seen[-2] == sizes

    wait_until(same, timeout, "the replicas' indexes converging", interval=0.2)
    return seen[-1][0]


def test_two_replicas_route_alike_and_a_restarted_one_rebuilds(engines, test_model_dir, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "router.yaml", [engines.a, engines.b], test_model_dir)
    logs = tmp_path / "logs"
    r1, r2 = RouterReplica(cfg, logs / "r1.log").start(), RouterReplica(cfg, logs / "r2.log").start()
    r3 = None
    try:
        for r in (r1, r2):
            r.wait_for("/readyz", 120)
        # warm-up: four prefixes warmed on an engine behind the routers' backs (only KV events tell
        # the replicas where they are), two more through the replicas, split between them
        direct = {0: engines.a, 1: engines.b, 2: engines.b, 3: engines.a}
        prompts = {k: prose(400 + k, 700) for k in range(6)}
        for k, engine in direct.items():
            _post_engine(engine, prompts[k] + " warm")
        warmed = {k: pod_id(e) for k, e in direct.items()}
        for k in (4, 5):
            warmed[k] = (r1, r2)[k % 2].complete(prompts[k] + " warm").pod
        _converged([r1, r2])
        # the same pod for the same prefix from both replicas, the one holding the prefix
        for k, prompt in prompts.items():
            a, b = r1.complete(prompt + " ask r1"), r2.complete(prompt + " ask r2")
            assert a.pod == b.pod == warmed[k], (k, a, b, warmed[k])
            assert a.predicted_cached_tokens >= 1024 and b.predicted_cached_tokens >= 1024, (a, b)
        # a replica dies and comes back: it answers at once (/livez) but is ready only once its
        # index is rebuilt from the engines' replay endpoints, and then routes as its peer does
        r2.kill()
        blocks = _converged([r1])
        r3 = RouterReplica(cfg, logs / "r3.log").start()
        live_s = r3.wait_for("/livez", 120)
        ready_s = r3.wait_for("/readyz", 120)
        t0 = time.monotonic()
        wait_until(lambda: r3.index_blocks() == r1.index_blocks(), 30, "the restarted replica's index = its peer's")
        extra_s = time.monotonic() - t0
        sync_s = r3.get_json("/readyz")["info"]["index_sync_s"]
        assert sync_s is not None and sync_s < ready_s
        print(
            f"\nreplica restart: process up (/livez) {live_s:.2f} s, ready {ready_s:.2f} s after start; index "
            f"rebuilt from replay in {sync_s:.3f} s (slowest pod), = peer's {extra_s:.2f} s after; {blocks} blocks"
        )
        hits_before = {e.url: prefix_hits(e) for e in engines}
        for k, prompt in prompts.items():
            c = r3.complete(prompt + " ask r3")
            assert c.pod == warmed[k] and c.predicted_cached_tokens >= 1024, (k, c, warmed[k])
        gained = sum(prefix_hits(e) - hits_before[e.url] for e in engines)
        assert gained >= 6 * 1024  # the engines really reused the prefixes the restarted replica sent back
    finally:
        for r in (r1, r2, r3):
            if r is not None:
                r.stop()


def _post_engine(engine, prompt: str) -> None:
    import json
    import urllib.request

    body = json.dumps({"model": "test-model", "prompt": prompt, "max_tokens": 1}).encode()
    headers = {"Content-Type": "application/json"}
    req = urllib.request.Request(engine.url + "/v1/completions", data=body, headers=headers)
    with urllib.request.urlopen(req, timeout=300) as r:
        assert r.status == 200
