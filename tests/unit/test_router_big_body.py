"""A huge request body costs the event loop only steps of a few ms (issue 9's 100 ms ``/health``
bound): the stepwise JSON decode equals msgspec's one-call decode, unchanged values go back out as
the client's bytes, the body is read and written in steps, and a client's transfer params are still
stripped everywhere. The step sizes are shrunk here so small bodies take the stepwise paths; the
16 MiB figures come from tests/robustness/big_prompt.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from router_fakes import FakeBackend, config_for, start_router

from vllm_llmd.router import body_json, front, upstream
from vllm_llmd.router.body_json import decode_json_stepwise, encode_json
from vllm_llmd.router.errors import HTTPError


@pytest.fixture
def small_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(body_json, "BIG_BODY_BYTES", 64)
    monkeypatch.setattr(body_json, "_DIRECT_BYTES", 16)
    monkeypatch.setattr(body_json, "_PIECE_BYTES", 8)
    monkeypatch.setattr(body_json, "_YIELD_BYTES", 32)
    monkeypatch.setattr(body_json, "_MAX_ITEMS", 4)
    monkeypatch.setattr(front, "READ_STEP_BYTES", 1024)
    monkeypatch.setattr(upstream, "WRITE_STEP_BYTES", 1024)


def _stepwise(body: bytes) -> tuple[dict[str, Any], body_json.Originals]:
    return asyncio.run(decode_json_stepwise(body))


# strings that stress the cuts: multi-byte UTF-8, astral characters (a surrogate pair when escaped),
# quotes, backslashes, control characters
_TEXT = st.lists(st.sampled_from([*'ab \\"\n\t/é日😀\x00\x1f\u2028', "\\u", "\\\\", "\\ud83d"]), max_size=120).map(
    "".join
)
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(_TEXT, inner, max_size=6),
    max_leaves=30,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.dictionaries(_TEXT, _JSON, min_size=1, max_size=6),
    st.sampled_from(["msgspec", "ascii", "utf8", "indent"]),
)
def test_the_stepwise_decode_equals_one_decode(small_steps: None, payload: dict[str, Any], style: str) -> None:
    if style == "msgspec":
        body = msgspec.json.encode(payload)
    else:
        body = json.dumps(payload, ensure_ascii=style == "ascii", indent=2 if style == "indent" else None).encode()
    got, originals = _stepwise(body)
    assert got == msgspec.json.decode(body)
    # what goes back out unchanged is the client's own bytes, and decodes to the same
    assert msgspec.json.decode(encode_json(got, originals)) == got
    for k, (value, raw) in originals.items():
        assert got[k] is value and bytes(raw) in body


def test_long_strings_are_cut_between_characters_and_escapes(small_steps: None) -> None:
    for text in ["😀" * 50, "\\" * 300, '"' * 100, "é" * 77, "a\\" * 40 + "b", "\U0001f600x" * 30]:
        for ascii_only in (False, True):
            body = json.dumps({"prompt": text, "n": 1}, ensure_ascii=ascii_only).encode()
            assert _stepwise(body)[0] == {"prompt": text, "n": 1}, (text, ascii_only)


def test_token_ids_are_cut_at_commas(small_steps: None) -> None:
    ids = [*range(3000), 2**40, -7, 1.5, True, None]
    for body in (msgspec.json.encode({"prompt": ids}), json.dumps({"prompt": ids}, indent=3).encode()):
        assert _stepwise(body)[0] == {"prompt": ids}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[" + b"1," * 100 + b"1]", "must be an object"),
        (b'{"prompt": "' + b"x" * 100 + b'", }', "malformed JSON body"),
        (b'{"prompt": "' + b"x" * 100 + b'"} trailing', "malformed JSON body"),
        (b'{"prompt": "' + b"x" * 100 + b'\x01"}', "malformed JSON body"),
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "malformed JSON body"),
    ],
)
def test_a_bad_huge_body_is_a_400(small_steps: None, body: bytes, message: str) -> None:
    with pytest.raises(HTTPError) as e:
        _stepwise(body)
    assert e.value.status == 400 and message in str(e.value)


def test_a_rewritten_body_keeps_the_clients_bytes_for_its_unchanged_values(small_steps: None) -> None:
    text = "héllo wörld " * 20
    body = json.dumps({"prompt": text, "kv_transfer_params": {"x": 1}, "max_tokens": 3}).encode()  # \\u escapes
    payload, originals = _stepwise(body)
    out = encode_json({k: v for k, v in payload.items() if k != "kv_transfer_params"}, originals)
    assert json.dumps(text).encode() in out  # copied as sent (escaped), not re-encoded
    assert json.loads(out) == {"prompt": text, "max_tokens": 3}
    # a value changed after decoding is encoded afresh
    assert json.loads(encode_json({"prompt": "other"}, originals)) == {"prompt": "other"}


# ---- through the router ---------------------------------------------------------------------------


@pytest.fixture
async def backend() -> AsyncIterator[FakeBackend]:
    b = await FakeBackend("a").start()
    yield b
    await b.close()


@pytest.mark.parametrize(
    "extra",
    [
        {"kv_transfer_params": {"remote_host": "evil"}},
        {"vllm_xargs": {"kv_transfer_params": "anything", "keep": 1}},
        {"extra_body": {"ec_transfer_params": {}}, "vllm_xargs": {"keep": 1}},
        {},
    ],
)
async def test_a_big_body_is_routed_whole_and_never_carries_client_transfer_params(
    small_steps: None, backend: FakeBackend, extra: dict[str, Any]
) -> None:
    """Issue 9 case 2 on the stepwise path: stripped from every place vLLM reads them, the prompt
    forwarded intact; with nothing to strip the client's bytes go on untouched."""
    _router, srv = await start_router(config_for([backend]))
    prompt = 'the quick brown fox 😀 jumps \\ over "lazy" dogs\n' * 200
    sent = json.dumps({"model": "test-model", "prompt": prompt, "max_tokens": 1, **extra}, indent=1).encode()
    try:
        async with aiohttp.ClientSession() as s:
            headers = {"Content-Type": "application/json"}
            async with s.post(f"http://127.0.0.1:{srv.port}/v1/completions", data=sent, headers=headers) as r:
                assert r.status == 200, await r.text()
    finally:
        await srv.close()
    got, raw = backend.received[0], backend.raw_bodies[0]
    for where in (got, got.get("vllm_xargs", {}), got.get("extra_body", {})):
        assert "kv_transfer_params" not in where and "ec_transfer_params" not in where, got
    assert got["prompt"] == prompt
    if not extra:
        assert raw == sent
    else:
        assert json.dumps(prompt).encode() in raw  # the prompt as the client's bytes
        if "vllm_xargs" in extra:
            assert got["vllm_xargs"] == {"keep": 1}
    # written in steps, still with its length (not chunked)
    hdrs = {k.lower(): v for k, v in backend.headers[0].items()}
    assert hdrs["content-length"] == str(len(raw)) and "transfer-encoding" not in hdrs


async def test_a_big_chat_body_is_routed_whole(small_steps: None, backend: FakeBackend) -> None:
    _router, srv = await start_router(config_for([backend]))
    messages = [
        {"role": "system", "content": "be brief " * 50},
        {"role": "user", "content": [{"type": "text", "text": "日本語 text " * 300}]},
    ]
    body = {"model": "test-model", "messages": messages, "max_tokens": 1}
    try:
        async with aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{srv.port}/v1/chat/completions"
            async with s.post(url, json=body) as r:
                assert r.status == 200, await r.text()
            too_big = {"model": "test-model", "prompt": "x" * (17 << 20)}
            async with s.post(url.replace("/chat", ""), json=too_big) as r:
                assert r.status == 413  # read in steps, still bounded
    finally:
        await srv.close()
    assert backend.received == [body]
