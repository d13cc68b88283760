"""The simulator against a real vLLM CPU engine: the same prompts give the same KV events (block
hashes, parents, tokens, evictions, in order) and the same prefix-cache hits, request by request.

One real engine (tiny model, block size 32, 40 blocks so the sequence evicts, prompt-token details
on) and one simulated pod started through ``vllm-llmd sim`` with a profile of the same settings
receive the same sequence of completions and chat requests, one at a time: shared-prefix prompts
(text and token ids), a salted prompt, chat conversations, enough of them to evict.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from vllm_llmd.testing.engine import EngineProcess, EngineSpec
from vllm_llmd.testing.wait import wait_until

pytestmark = pytest.mark.engine

MODEL = "test-model"
SETTINGS = {"block_size": 32, "num_gpu_blocks": 40, "max_model_len": 1024}


def _replay(endpoint: str, start: int) -> list[tuple[int, bytes]]:
    """The batches a publisher's replay endpoint still holds from ``start`` on, as ``(seq, payload)``
    (vLLM's ``ZmqEventPublisher._service_replay``: one message a batch, then an empty-topic end)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart([b"", start.to_bytes(8, "big")])
        out = []
        while True:
            assert sock.poll(10_000), f"no replay answer from {endpoint}"
            _, topic, seq, payload = sock.recv_multipart()
            if not topic:
                return out
            out.append((int.from_bytes(seq, "big"), payload))
    finally:
        sock.close(0)


class Events:
    """Every KV event a publisher sends from now on, in order (a SUB socket on its own thread).

    No wait for the subscription to reach the publisher (ZMQ's slow joiner): :meth:`backfill` asks
    the replay endpoint for what was published before the first batch received, as a late
    subscriber does; ``start`` (the publisher's next seq when we began) keeps earlier batches out."""

    def __init__(self, endpoint: str, replay: str) -> None:
        self._dec = msgspec.msgpack.Decoder()
        self._replay_endpoint = replay
        held = _replay(replay, 0)
        self.start = held[-1][0] + 1 if held else 0
        self.missed: list[tuple[int, list[Any]]] = []
        self.batches: list[tuple[int, list[Any]]] = []
        self._stop = threading.Event()
        self._sock = zmq.Context.instance().socket(zmq.SUB)
        self._sock.connect(endpoint)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.setsockopt(zmq.RCVTIMEO, 100)
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                _, seq, payload = self._sock.recv_multipart()
            except zmq.Again:
                continue
            self.batches.append((int.from_bytes(seq, "big"), self._dec.decode(payload)[1]))

    def backfill(self) -> None:
        wait_until(lambda: self.batches, 10, "a batch on the live stream")
        first = self.batches[0][0]
        held = _replay(self._replay_endpoint, self.start)
        self.missed = [(seq, msgspec.msgpack.decode(p)[1]) for seq, p in held if seq < first]
        seqs = [seq for seq, _ in [*self.missed, *self.batches]]
        assert seqs == list(range(self.start, self.start + len(seqs))), seqs

    def events(self) -> list[Any]:
        return [e for _, evs in [*self.missed, *self.batches] for e in evs]

    def close(self) -> None:
        self._stop.set()
        self._t.join()
        self._sock.close(0)


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


@pytest.fixture(scope="module")
def real(test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    logs = tmp_path_factory.mktemp("sim-validation")
    spec = EngineSpec(
        model=test_model_dir,
        served_model_name=MODEL,
        **SETTINGS,
        extra_args=["--enforce-eager", "--enable-prompt-tokens-details"],
    )
    engine = EngineProcess(spec, logs / "engine.log")
    try:
        engine.start_ready()
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def sim(test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("sim")
    profile = d / "profile.yaml"
    profile.write_text(
        json.dumps(
            {
                "model": MODEL,
                "tokenizer": str(test_model_dir),
                "classes": [{"name": "like-real", "count": 1, "enable_prompt_tokens_details": True, **SETTINGS}],
            }
        )
    )
    endpoints = d / "endpoints.json"
    out = d / "sim.out"
    with open(out, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_llmd.cli", "sim", "--profile", str(profile), "--endpoints", str(endpoints)],
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: b"ready:" in out.read_bytes() or proc.poll() is not None, 60, "the simulator to start")
        assert proc.poll() is None, out.read_text()
        (pod,) = json.loads(endpoints.read_text())
        yield pod
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0, out.read_text()
    assert "stopped: 1 pods" in out.read_text()


def _sequence() -> list[tuple[str, dict[str, Any]]]:
    """(path, body) of every request, in order; max_tokens 1 so only prompt blocks get hashes."""
    rng = random.Random(7)
    words = "ka ri to ne mu sa lo vi de pa su ko ra fe ti no ma gu le bi zo ha yu we xi qua pre stra".split()

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    bases = [text(300), text(450), text(200)]
    reqs: list[tuple[str, dict[str, Any]]] = []
    for i in range(18):
        b = bases[i % 3] if i % 5 else bases[(i // 5) % 3]
        prompt = b + " " + text(rng.randrange(1, 80))
        if i % 4 == 0:  # repeat the previous prompt: a full-prompt hit, one block recomputed
            prompt = reqs[-1][1]["prompt"] if reqs and "prompt" in reqs[-1][1] else prompt
        body: dict[str, Any] = {"model": MODEL, "prompt": prompt, "max_tokens": 1}
        if i == 7:
            body["cache_salt"] = "tenant-a"
        reqs.append(("/v1/completions", body))
        if i % 6 == 5:
            msgs = [{"role": "system", "content": bases[0]}, {"role": "user", "content": text(20)}]
            reqs.append(("/v1/chat/completions", {"model": MODEL, "messages": msgs, "max_tokens": 1}))
    ids = [rng.randrange(10, 4000) for _ in range(200)]
    reqs += [("/v1/completions", {"model": MODEL, "prompt": ids[:k], "max_tokens": 1}) for k in (200, 120, 200)]
    return reqs


def test_same_events_and_hits_as_a_real_engine(real: EngineProcess, sim: dict[str, Any]) -> None:
    real_events = Events(real.spec.events_endpoint or "", real.spec.replay_endpoint or "")
    sim_events = Events(sim["events"], sim["replay"])
    try:
        urls = {"real": real.url, "sim": sim["url"]}
        before = {k: metric(u, "vllm:prefix_cache_hits_total") for k, u in urls.items()}
        usage: dict[str, list[tuple[int, int]]] = {"real": [], "sim": []}
        for path, body in _sequence():
            for k, u in urls.items():
                out = post(u + path, body)
                usage[k].append((out["usage"]["prompt_tokens"], out["usage"]["prompt_tokens_details"]["cached_tokens"]))
        real_events.backfill()
        sim_events.backfill()
        n_real = len(real_events.events())
        wait_until(lambda: len(sim_events.events()) >= n_real, 10, "the simulator's events")
        assert usage["sim"] == usage["real"]
        hits = [c for _, c in usage["real"]]
        assert sum(1 for c in hits if c) >= 8 and sum(1 for c in hits if not c) >= 4  # both outcomes exercised

        def strip(e: Any) -> Any:
            return {k: v for k, v in e.items() if k != "kv_cache_spec_sliding_window"}

        theirs = [strip(e) for e in real_events.events()]
        mine = [strip(e) for e in sim_events.events()]
        assert [e["type"] for e in mine].count("BlockRemoved") >= 10  # the sequence evicts
        assert mine == theirs
        after = {k: metric(u, "vllm:prefix_cache_hits_total") for k, u in urls.items()}
        assert after["sim"] - before["sim"] == after["real"] - before["real"] > 0
    finally:
        real_events.close()
        sim_events.close()


def test_streams_have_the_same_shape(real: EngineProcess, sim: dict[str, Any]) -> None:
    """One streamed completion and one streamed chat with usage: the same chunk sequence, key for key."""
    bodies = [
        ("/v1/completions", {"model": MODEL, "prompt": "ka ri to " * 30, "max_tokens": 4, "stream": True,
                             "stream_options": {"include_usage": True}}),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "ne mu sa"}],
                                  "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}),
    ]  # fmt: skip

    def chunks(url: str, body: dict[str, Any]) -> list[list[str]]:
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            events = [e[6:] for e in r.read().decode().split("\n\n") if e]
        assert events[-1] == "[DONE]"
        return [list(json.loads(e)) for e in events[:-1]]  # top-level keys, in order

    for path, body in bodies:
        assert chunks(sim["url"] + path, body) == chunks(real.url + path, body), path
