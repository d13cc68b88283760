"""KV events from real vLLM CPU engines (A: block 32, B: block 64) into one KVBlockIndex (block 64)."""

from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import zmq

from vllm_llmd.index import KVBlockIndex, KVEventSubscriber
from vllm_llmd.testing.engine import EngineProcess
from vllm_llmd.testing.wait import wait_until

pytestmark = pytest.mark.engine

MODEL = "test-model"
VOCAB = 4096  # the tiny test model's vocabulary


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``cond`` until true; return the seconds it took."""
    t0 = time.monotonic()
    wait_until(cond, timeout, what)
    return time.monotonic() - t0


def post(engine: EngineProcess, path: str, body: dict | None = None, timeout: float = 300) -> dict:
    data = b"" if body is None else json.dumps(body).encode()
    req = urllib.request.Request(engine.url + path, data=data, method="POST")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if raw else {}


def unique_prompt(n: int) -> list[int]:
    """Random token ids: no other test (engines are shared) sends the same prefix."""
    rng = random.Random()
    return [rng.randrange(10, VOCAB - 10) for _ in range(n)]


def serve(engine: EngineProcess, tokens: list[int]) -> None:
    out = post(engine, "/v1/completions", {"model": MODEL, "prompt": tokens, "max_tokens": 1, "return_token_ids": True})
    # the engine saw exactly these ids (no BOS added to a token prompt), so our keys line up with its blocks
    assert out["choices"][0]["prompt_token_ids"] == tokens


def pod_id(engine: EngineProcess) -> str:
    return f"127.0.0.1:{engine.spec.port}"


@dataclass
class Tracked:
    idx: KVBlockIndex
    sub: KVEventSubscriber

    def held(self, engine: EngineProcess, tokens: list[int]) -> int:
        m = self.idx.match(MODEL, tokens).get(pod_id(engine))
        return 0 if m is None else m.tokens


def connected(sub: KVEventSubscriber, pods: list[str]) -> bool:
    st = sub.stats()
    return all(p in st and st[p].connected for p in pods)


@pytest.fixture(scope="module")
def tracked(engines) -> Iterator[Tracked]:
    idx = KVBlockIndex(block_size=64)
    sub = KVEventSubscriber(idx)
    for e in engines:
        sub.add_pod(pod_id(e), e.spec.events_endpoint, e.spec.replay_endpoint)
    sub.start()
    wait_for(lambda: connected(sub, [pod_id(e) for e in engines]), 30, "subscriber connected to both engines")
    yield Tracked(idx, sub)
    sub.stop()


def test_served_by_a_then_both(engines, tracked: Tracked) -> None:
    tokens = unique_prompt(300)
    serve(engines.a, tokens)
    # A (block 32) holds 9 full blocks = 288 tokens -> 4 full canonical blocks of 64
    wait_for(lambda: tracked.held(engines.a, tokens) == 256, 10, "A's blocks indexed")
    assert tracked.held(engines.b, tokens) == 0
    assert tracked.idx.match(MODEL, tokens)[pod_id(engines.a)].tiers == ["GPU"] * 4  # CPU vLLM reports "GPU"
    serve(engines.b, tokens)
    wait_for(lambda: tracked.held(engines.b, tokens) == 256, 10, "B's blocks indexed")
    assert tracked.held(engines.a, tokens) == 256
    # a prompt sharing only the first 128 tokens matches 2 canonical blocks on both
    other = tokens[:128] + unique_prompt(200)
    assert {p: m.tokens for p, m in tracked.idx.match(MODEL, other).items()} == {
        pod_id(engines.a): 128,
        pod_id(engines.b): 128,
    }
    assert tracked.idx.stats().decode_errors == 0


def reset_prefix_cache(engine: EngineProcess) -> None:
    """``/reset_prefix_cache`` fails while requests run on the (shared) engine: retry briefly."""

    def reset() -> bool:
        try:
            post(engine, "/reset_prefix_cache")
        except urllib.error.HTTPError:
            return False
        return True

    wait_until(reset, 60, "/reset_prefix_cache accepted", interval=0.2)


def test_reset_prefix_cache_reaches_the_index_without_a_further_request(engines, tracked: Tracked) -> None:
    tokens = unique_prompt(200)
    serve(engines.a, tokens)
    serve(engines.b, tokens)
    wait_for(lambda: tracked.held(engines.a, tokens) == 192 and tracked.held(engines.b, tokens) == 192, 10, "indexed")
    reset_prefix_cache(engines.a)
    # no further request: vLLM alone would publish AllBlocksCleared only at the next engine step;
    # the plugin flushes it from reset_prefix_cache (docs/kv-events.md). Without the flush the entries
    # would stay until the next request, which never comes: any deadline tells the two apart, and a
    # generous one keeps a busy CI machine (engines beside unit tests on 2 cores) from failing it.
    took = wait_for(lambda: tracked.held(engines.a, tokens) == 0, 15.0, "A's entries gone after the reset")
    print(f"entries gone {took * 1000:.0f} ms after /reset_prefix_cache returned")
    assert tracked.held(engines.b, tokens) == 192


def test_eviction_under_pressure_removes_entries(engines, tracked: Tracked) -> None:
    tokens = unique_prompt(300)
    serve(engines.b, tokens)
    wait_for(lambda: tracked.held(engines.b, tokens) == 256, 10, "indexed")
    # B has 320 blocks of 64 tokens: 6 prompts of 3968 tokens need 372 blocks, evicting the oldest
    for _ in range(6):
        serve(engines.b, unique_prompt(3968))
        if tracked.held(engines.b, tokens) == 0:
            break
    wait_for(lambda: tracked.held(engines.b, tokens) == 0, 5, "evicted blocks gone from the index")
    st = tracked.sub.stats()[pod_id(engines.b)]
    assert st.errors == 0 and st.lag_s is not None


def test_env_var_alone_enables_events_with_the_pod_topic(env_events_engine) -> None:
    """The engine got no --kv-events-config; LLMD_KV_EVENTS=1 + POD_IP made the plugin set it up."""
    env = env_events_engine
    idx = KVBlockIndex(block_size=64)
    sub = KVEventSubscriber(idx)
    sub.add_pod(env.pod, env.events_endpoint, env.replay_endpoint)
    sub.start()
    try:
        wait_for(lambda: connected(sub, [env.pod]), 30, "connected to the env-configured publisher")
        tokens = unique_prompt(260)
        serve(env.engine, tokens)
        # two engine blocks of 128 tokens (a multiple of the index's 64) -> 4 canonical blocks
        wait_for(lambda: (idx.match(MODEL, tokens).get(env.pod) or _none).tokens == 256, 10, "indexed")
        # the publisher and the replay socket listen on the pod's address only (POD_IP=127.0.0.1),
        # not on every interface (issue 9, case 9: before, the plugin bound tcp://*:<port>)
        for ep in (env.events_endpoint, env.replay_endpoint):
            assert _listening(int(ep.rsplit(":", 1)[1])) == {"127.0.0.1"}, ep
        # the topic is exactly kv@<POD_IP>:<serving port>@<served model name>
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        try:
            dealer.connect(env.replay_endpoint)
            dealer.send_multipart([b"", (0).to_bytes(8, "big")])
            assert dealer.poll(5000)
            _, topic, seq, payload = dealer.recv_multipart()
            assert topic.decode() == f"kv@{env.pod}@{MODEL}"
            assert len(seq) == 8 and payload
        finally:
            dealer.close(linger=0)
    finally:
        sub.stop()


def _listening(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on ``port`` (from /proc/net/tcp and tcp6)."""
    import ipaddress
    from pathlib import Path

    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            addr, p = fields[1].split(":")
            if int(p, 16) != port or fields[3] != "0A":
                continue
            raw = bytes.fromhex(addr)
            # the kernel prints each 32-bit word in host (little-endian) order
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            out.add(str(ipaddress.ip_address(words)))
    return out


class _NoMatch:
    tokens = 0


_none = _NoMatch()
