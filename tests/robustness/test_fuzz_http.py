"""Property-based fuzzing of the router's HTTP front (issue 9): request bodies (JSON of the real
request fields with values at their edges, and raw bytes), headers (encodings, lengths, chunking,
odd values) and numbers at their limits, sent over real TCP to the real aiohttp router (the CLI's
runner and limits, with the test model's tokenizer) in front of stand-in backends, aggregated and
with P/D roles.

For every input: the router answers (never drops the connection without an answer), never with a
500 of its own making, answers every error as JSON in the OpenAI shape, keeps answering ``/health``
at once, and never lets a client's ``kv_transfer_params`` / ``ec_transfer_params`` reach a pod.
``LLMD_FUZZ_EXAMPLES`` sets the examples per property (default 150).
"""

from __future__ import annotations

import gzip
import json
import os
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import REPORT, ThreadedRouter, http_request, raw_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("LLMD_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], database=None
)
STEER = ("kv_transfer_params", "ec_transfer_params")

EDGE_INTS = st.sampled_from(
    [0, 1, -1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63), 10**30, 10**400]
)
EDGE_FLOATS = st.sampled_from([0.0, -0.0, 1e-320, 1e308, -1e308, 0.5, 1.0000000000000002])
NUMBERS = st.one_of(st.integers(), EDGE_INTS, EDGE_FLOATS, st.floats(allow_nan=False, allow_infinity=False))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=40))
JUNK = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
TOKEN_IDS = st.lists(st.one_of(st.integers(0, 4095), EDGE_INTS), max_size=300)
PROMPTS = st.one_of(
    st.text(max_size=3000),
    TOKEN_IDS,
    st.lists(st.text(max_size=200), max_size=3),
    st.lists(TOKEN_IDS, max_size=3),
    JUNK,
)
CONTENT = st.one_of(
    st.text(max_size=2000),
    st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=200)}), max_size=3),
    JUNK,
)
MESSAGES = st.one_of(
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["system", "user", "assistant", "tool", "x"]), "content": CONTENT}
        ),
        max_size=4,
    ),
    JUNK,
)
STEERING = st.dictionaries(st.sampled_from(STEER), JUNK, max_size=2)
OPTIONAL_FIELDS = {
    "max_tokens": st.one_of(NUMBERS, JUNK),
    "max_completion_tokens": st.one_of(NUMBERS, JUNK),
    "stream": st.one_of(st.booleans(), JUNK),
    "stream_options": JUNK,
    "n": NUMBERS,
    "temperature": NUMBERS,
    "add_special_tokens": JUNK,
    "add_generation_prompt": JUNK,
    "continue_final_message": JUNK,
    "chat_template_kwargs": JUNK,
    "tools": JUNK,
    "vllm_xargs": st.one_of(STEERING, st.dictionaries(st.text(max_size=8), SCALARS, max_size=3), JUNK),
    "extra_body": st.one_of(STEERING, JUNK),
    "kv_transfer_params": JUNK,
    "ec_transfer_params": JUNK,
}


def _bodies(chat: bool) -> st.SearchStrategy[dict[str, Any]]:
    required: dict[str, st.SearchStrategy[Any]] = {"model": st.one_of(st.just("test-model"), JUNK)}
    required["messages" if chat else "prompt"] = MESSAGES if chat else PROMPTS
    return st.fixed_dictionaries(required, optional=OPTIONAL_FIELDS)


RAW_BODIES = st.one_of(
    st.binary(max_size=2000),
    st.builds(lambda n: b"[" * n + b"]" * n, st.integers(1, 20_000)),
    st.builds(lambda n: b'{"model": "test-model", "prompt": ' + b"[" * n, st.integers(1, 5000)),
    st.sampled_from(
        [
            b"",
            b"null",
            b"\xef\xbb\xbf{}",
            b'{"prompt": "\xff\xfe"}',
            b'{"prompt": "a", "prompt": [1, 2], "model": "test-model"}',
            b'{"model": "test-model", "prompt": "x", "kv\\u005ftransfer_params": {"remote_host": "evil"}}',
            b'{"model": "test-model", "prompt": "x", "max_tokens": 1e400}',
            b'{"model": "test-model", "prompt": "x", "max_tokens": NaN}',
            b'{"model": "test-model", "prompt": "\\ud800"}',
            b'{"model": "test-model", "prompt": [1, 2, 3' + b", 1" * 20000 + b"]}",
            b"{" + b'"a": 1,' * 30000 + b'"model": "test-model", "prompt": "x"}',
        ]
    ),
    st.builds(lambda n: b'{"model": "test-model", "prompt": "' + b"a" * n + b'"}', st.integers(60_000, 80_000)),
)


class Stats:
    def __init__(self) -> None:
        self.inputs = 0
        self.crashes: list[str] = []
        self.statuses: dict[int, int] = {}

    def record(self, status: int, what: str) -> None:
        self.inputs += 1
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status in (0, 500):
            self.crashes.append(f"{status}: {what[:300]}")


@pytest.fixture(scope="module", params=["aggregated", "pd"])
def router(request: pytest.FixtureRequest, robustness_model: Path) -> Iterator[ThreadedRouter]:
    cfg: dict[str, Any] = {
        "tokenizer": {"path": str(robustness_model)},
        "max_body_bytes": 64 << 10,
        "server": {"body_timeout_s": 0.5},  # bodies shorter than announced are cut off quickly
    }
    r = ThreadedRouter(**cfg).start()
    if request.param == "pd":  # prefill + decode roles; every prompt long enough is disaggregated
        r.call(_set_roles(r))
    stats = Stats()
    r.stats = stats  # type: ignore[attr-defined]
    yield r
    r.stop()
    REPORT[f"fuzz ({request.param})"] = {
        "inputs tried": stats.inputs,
        "crashes": len(stats.crashes),
        "statuses": dict(sorted(stats.statuses.items())),
    }
    assert not stats.crashes, stats.crashes[:5]


async def _set_roles(r: ThreadedRouter) -> None:
    from vllm_llmd.router.config import PodConfig

    pool = r.router.pool
    a, b = (p.config for p in pool.pods)
    pool.set_pods([PodConfig(url=a.url, role="prefill"), PodConfig(url=b.url, role="decode")])
    r.router.cfg.pd.threshold_tokens = 0


def _check(r: ThreadedRouter, status: int, headers: dict[str, str], body: bytes, what: str) -> None:
    r.stats.record(status, what)  # type: ignore[attr-defined]
    assert status not in (0, 500), f"{status} {body[:200]!r} for {what[:300]}"
    if status >= 400 and headers.get("content-type", "").startswith("application/json"):
        err = json.loads(body)["error"]
        assert err["code"] == status and isinstance(err["message"], str)
    t = time.monotonic()
    hs, _, _ = raw_request(r.port, http_request(r.port, "GET", "/health", b"", {}))
    # a stall of the kind found in issue 9 lasts many seconds; 5 s leaves room for a descheduled process
    # on a 2-core CI machine running engines beside this test (seen: 1.2 s)
    assert hs in (200, 503) and time.monotonic() - t < 5.0, "health stalled"
    for b in r.backends:
        for got in b.received[-3:]:
            nested = [got, got.get("vllm_xargs"), got.get("extra_body")]
            for where in nested:
                if isinstance(where, dict):
                    assert not (set(where) & {"ec_transfer_params"}), got
            # the only kv_transfer_params a pod may see are the router's own P/D legs
            kv = got.get("kv_transfer_params")
            assert kv is None or "do_remote_decode" in kv or "remote_engine_id" in kv, got
            for where in nested[1:]:
                assert not (isinstance(where, dict) and "kv_transfer_params" in where), got


@FUZZ
@given(chat=st.booleans(), body=st.data())
def test_fuzzed_json_bodies(router: ThreadedRouter, chat: bool, body: st.DataObject) -> None:
    payload = body.draw(_bodies(chat))
    raw = json.dumps(payload).encode()
    path = "/v1/chat/completions" if chat else "/v1/completions"
    status, headers, out = raw_request(router.port, http_request(router.port, "POST", path, raw, {}))
    _check(router, status, headers, out, f"{path} {raw[:300]!r}")


@FUZZ
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), raw=RAW_BODIES)
def test_fuzzed_raw_bodies(router: ThreadedRouter, path: str, raw: bytes) -> None:
    status, headers, out = raw_request(router.port, http_request(router.port, "POST", path, raw, {}))
    _check(router, status, headers, out, f"{path} {raw[:300]!r}")
    if status == 200:
        assert headers["content-type"].startswith(("application/json", "text/event-stream"))


HEADER_VALUES = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=300
)


@FUZZ
@given(
    encoding=st.sampled_from([None, "gzip", "deflate", "identity", "br", "zstd", "x-garbage", "gzip, deflate"]),
    encode_as=st.sampled_from([None, "gzip", "deflate"]),
    content_type=st.one_of(st.none(), st.sampled_from(["application/json", "text/plain", "x/y; charset=utf-16"])),
    chunked=st.booleans(),
    length_delta=st.sampled_from([0] * 8 + [-5, 5]),  # +5: a body shorter than announced
    extra=st.dictionaries(
        st.sampled_from(["x-session-id", "X-LLMD-Pod", "Connection", "Expect", "Authorization", "X-Custom"]),
        HEADER_VALUES,
        max_size=3,
    ),
    prompt=st.text(max_size=500),
    stream=st.booleans(),
)
def test_fuzzed_headers(
    router: ThreadedRouter,
    encoding: str | None,
    encode_as: str | None,
    content_type: str | None,
    chunked: bool,
    length_delta: int,
    extra: dict[str, str],
    prompt: str,
    stream: bool,
) -> None:
    body = json.dumps({"model": "test-model", "prompt": prompt, "max_tokens": 2, "stream": stream}).encode()
    if encode_as == "gzip":
        body = gzip.compress(body)
    elif encode_as == "deflate":
        body = zlib.compress(body)
    headers = dict(extra)
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    if content_type is not None:
        headers["Content-Type"] = content_type
    if chunked:
        headers["Transfer-Encoding"] = "chunked"
        wire = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 97]), body[i : i + 97]) for i in range(0, len(body), 97))
        wire += b"0\r\n\r\n"
    else:
        headers["Content-Length"] = str(max(0, len(body) + length_delta))
        wire = body
    request = http_request(router.port, "POST", "/v1/completions", wire, headers)
    status, rheaders, out = raw_request(router.port, request)
    _check(router, status, rheaders, out, f"headers {headers} body {body[:200]!r}")
