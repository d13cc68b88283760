"""Record a real vLLM CPU engine's HTTP responses, /metrics and KV event payloads for the simulator's
format tests (``tests/unit/test_sim_http.py`` replays the same requests against a simulated pod
with the same settings and compares, field by field).

    flock /tmp/llmd-engine.lock .venv/bin/python bench/sim_golden.py      # ~1 min; writes
    tests/unit/sim_golden.json

The engine: the tiny test model, block size 32, 24 blocks, max_model_len 512,
``--enable-prompt-tokens-details``, KV events with replay, ``--enforce-eager``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import zmq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vllm_llmd.testing.engine import EngineProcess, EngineSpec  # noqa: E402
from vllm_llmd.testing.model import make_test_model  # noqa: E402

OUT = REPO / "tests" / "unit" / "sim_golden.json"
ENGINE = {"block_size": 32, "num_gpu_blocks": 24, "max_model_len": 512}
PROMPT = "Ka ri to ne mu sa lo vi de pa su ko ra fe ti no ma gu le bi zo ha yu we xi " * 3
MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Ka ri to ne mu"}]
M = "test-model"

#: (name, method, path, body); the order matters (prefix-cache state carries over)
CASES: list[tuple[str, str, str, Any]] = [
    ("models", "GET", "/v1/models", None),
    ("health", "GET", "/health", None),
    ("version", "GET", "/version", None),
    ("cmpl", "POST", "/v1/completions", {"model": M, "prompt": PROMPT, "max_tokens": 3}),
    ("cmpl_again", "POST", "/v1/completions", {"model": M, "prompt": PROMPT, "max_tokens": 3}),
    ("cmpl_stream", "POST", "/v1/completions", {"model": M, "prompt": PROMPT, "max_tokens": 3, "stream": True}),
    ("cmpl_stream_usage", "POST", "/v1/completions",
     {"model": M, "prompt": PROMPT, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}),
    ("cmpl_stream_cont", "POST", "/v1/completions",
     {"model": M, "prompt": PROMPT, "max_tokens": 3, "stream": True,
      "stream_options": {"include_usage": True, "continuous_usage_stats": True}}),
    ("cmpl_ids", "POST", "/v1/completions", {"model": M, "prompt": [5, 6, 7, 8], "max_tokens": 2}),
    ("cmpl_salt", "POST", "/v1/completions", {"model": M, "prompt": PROMPT, "max_tokens": 1, "cache_salt": "s1"}),
    ("chat", "POST", "/v1/chat/completions", {"model": M, "messages": MSGS, "max_tokens": 3}),
    ("chat_stream", "POST", "/v1/chat/completions", {"model": M, "messages": MSGS, "max_tokens": 3, "stream": True}),
    ("chat_stream_usage", "POST", "/v1/chat/completions",
     {"model": M, "messages": MSGS, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}),
    ("chat_stream_cont", "POST", "/v1/chat/completions",
     {"model": M, "messages": MSGS, "max_tokens": 3, "stream": True,
      "stream_options": {"include_usage": True, "continuous_usage_stats": True}}),
    ("err_model", "POST", "/v1/completions", {"model": "nope", "prompt": "x", "max_tokens": 3}),
    ("err_max_tokens", "POST", "/v1/completions", {"model": M, "prompt": "x", "max_tokens": 100000}),
    ("err_no_prompt", "POST", "/v1/completions", {"model": M, "max_tokens": 3}),
    ("err_too_long", "POST", "/v1/completions", {"model": M, "prompt": PROMPT * 8, "max_tokens": 3}),
    ("tokenize", "POST", "/tokenize", {"model": M, "prompt": PROMPT}),
    ("metrics", "GET", "/metrics", None),
    ("reset", "POST", "/reset_prefix_cache", None),
]  # fmt: skip


def request(url: str, method: str, body: Any) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return {"status": r.status, "content_type": r.headers.get("Content-Type"), "body": r.read().decode()}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "content_type": e.headers.get("Content-Type"), "body": e.read().decode()}


def main() -> int:
    model = make_test_model(REPO / "bench" / "out" / "models" / "tiny", shape="tiny")
    spec = EngineSpec(model=model, served_model_name=M, **ENGINE,
                      extra_args=["--enable-prompt-tokens-details", "--enforce-eager"])  # fmt: skip
    log = REPO / "bench" / "out" / "sim_golden_engine.log"
    events: list[dict[str, Any]] = []
    stop = threading.Event()

    def subscribe() -> None:
        sock = zmq.Context.instance().socket(zmq.SUB)
        sock.connect(spec.events_endpoint or "")
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.setsockopt(zmq.RCVTIMEO, 200)
        while not stop.is_set():
            try:
                topic, seq, payload = sock.recv_multipart()
            except zmq.Again:
                continue
            events.append({"topic": topic.decode(), "seq": int.from_bytes(seq, "big"), "payload": payload.hex()})
        sock.close(0)

    engine = EngineProcess(spec, log)
    cases: dict[str, Any] = {}
    try:
        engine.start_ready()
        t = threading.Thread(target=subscribe)
        t.start()
        time.sleep(1.0)  # the SUB socket's subscription must reach the publisher before the first event
        for name, method, path, body in CASES:
            cases[name] = {"method": method, "path": path, "request": body, **request(spec.url + path, method, body)}
            time.sleep(0.2)  # each request's events in their own batches
        time.sleep(1.0)
    finally:
        stop.set()
        engine.stop()
    OUT.write_text(
        json.dumps({"engine": ENGINE, "served_model_name": M, "cases": cases, "events": events}, indent=1) + "\n"
    )
    print(f"wrote {OUT.relative_to(REPO)}: {len(cases)} responses, {len(events)} event batches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
