"""A request body's JSON, decoded and re-encoded without stalling the event loop on a huge body.

``msgspec`` decodes a 16 MiB body (one long prompt) in one call that holds the GIL for 60-140 ms
(measured on this project's 2-core box), and re-encodes it in 70-160 ms: every other request and
``/health`` wait that long (issue 9's bound is 100 ms). So a body over ``BIG_BODY_BYTES`` is decoded
in steps, the event loop running between them (:func:`decode_json_stepwise`):

1. the top-level object as ``dict[str, msgspec.Raw]``: one scan of the body (~20-30 ms for 16 MiB);
   a ``Raw`` is a view of the body's bytes, not a copy;
2. each value of at most ``_DIRECT_BYTES`` decoded at once; a larger one descended into, at most
   ``_MAX_DEPTH`` levels (deeper: decoded at once, so a deeply nested body costs at most that many
   scans): an array of numbers and literals (token ids) ``_PIECE_BYTES`` at a time, cut at commas; other
   arrays as ``list[dict[str, Raw]]`` (a chat's messages: one scan for both levels) or else
   ``list[Raw]``, an object as ``dict[str, Raw]`` (either with over ``_MAX_ITEMS`` items: at once,
   stepping through many small items costs more than it saves); a string ``_PIECE_BYTES`` at a time
   (cut where no UTF-8 sequence, escape or surrogate pair is split, :func:`_cut`), the pieces joined.
   The scans validate the JSON's structure, so every piece is whole JSON.

The result equals ``msgspec.json.decode(body)``; the original bytes of each large top-level value are
kept (:class:`Originals`) so :func:`encode_json` writes an unchanged value back as the client's own
bytes (``msgspec`` writes a ``Raw`` verbatim): stripping a client's ``kv_transfer_params`` or building
a P/D leg from a huge body costs a copy, not a re-encode. Measured by
``tests/robustness/big_prompt.py`` (figures in bench/RESULTS.md, "One huge prompt").
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import msgspec

from vllm_llmd.router.errors import HTTPError

#: bodies over this are decoded in steps (below it one decode holds the GIL ~10 ms at most)
BIG_BODY_BYTES = 1 << 20
#: a value up to this is decoded in one call (~1-3 ms)
_DIRECT_BYTES = 256 << 10
#: a long string is decoded this many bytes at a time (~1-2 ms each)
_PIECE_BYTES = 512 << 10
#: the event loop runs after about this many bytes of decoding
_YIELD_BYTES = 512 << 10
#: containers descended into (each descent is one scan of the value)
_MAX_DEPTH = 4
#: an array or object with more items than this is decoded at once
_MAX_ITEMS = 4096
#: how far past a piece's target end a cut point is looked for
_CUT_SEARCH = 64

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()
_as_object = msgspec.json.Decoder(dict[str, msgspec.Raw])
_as_objects = msgspec.json.Decoder(list[dict[str, msgspec.Raw]])
_as_array = msgspec.json.Decoder(list[msgspec.Raw])

_BACKSLASH, _U, _QUOTE, _LBRACE, _LBRACKET = 0x5C, 0x75, 0x22, 0x7B, 0x5B
#: the hex digits that open a high surrogate's escape (\uD800-\uDBFF), lowercased
_HIGH_SURROGATE = (b"d8", b"d9", b"da", b"db")

#: a large top-level value's decoded object and its bytes in the client's body
Originals = dict[str, tuple[Any, msgspec.Raw]]


def _malformed(e: Exception) -> HTTPError:
    if isinstance(e, RecursionError):  # msgspec's depth limit is the interpreter's recursion limit
        return HTTPError(400, "malformed JSON body: nested too deeply")
    return HTTPError(400, f"malformed JSON body: {e}")


def decode_json(body: bytes) -> dict[str, Any]:
    """The body's JSON object in one call; ``HTTPError`` 400 if it is not one."""
    if not body:
        raise HTTPError(400, "empty request body: expected a JSON object")
    try:
        payload = _decoder.decode(body)
    except (msgspec.DecodeError, RecursionError) as e:
        raise _malformed(e) from e
    if not isinstance(payload, dict):
        raise HTTPError(400, "the JSON body must be an object")
    return payload


def encode_json(payload: Mapping[str, Any], originals: Originals | None = None) -> bytes:
    """``payload`` as JSON; a top-level value that is still the very object decoded from the client's
    body (``originals``) is written as the client's bytes."""
    if not originals:
        return _encoder.encode(payload)
    out: dict[str, Any] = {}
    for k, v in payload.items():
        orig = originals.get(k)
        out[k] = orig[1] if orig is not None and orig[0] is v else v
    return _encoder.encode(out)


class _Steps:
    """Lets the event loop run after every ``_YIELD_BYTES`` of decoding."""

    def __init__(self) -> None:
        self.since = 0

    async def done(self, nbytes: int) -> None:
        self.since += nbytes
        if self.since >= _YIELD_BYTES:
            self.since = 0
            await asyncio.sleep(0)


async def decode_json_stepwise(body: bytes) -> tuple[dict[str, Any], Originals]:
    """The body's JSON object, as :func:`decode_json` gives it, decoded in steps of a few ms each
    (module docstring); and the original bytes of its top-level values over ``_DIRECT_BYTES``."""
    if len(body) <= BIG_BODY_BYTES:
        return decode_json(body), {}
    steps = _Steps()
    await asyncio.sleep(0)  # not in the same step as reading the body's last bytes (and joining them)
    try:
        top = _as_object.decode(body)
    except msgspec.ValidationError as e:  # valid JSON so far, but not an object
        raise HTTPError(400, "the JSON body must be an object") from e
    except (msgspec.DecodeError, RecursionError) as e:
        raise _malformed(e) from e
    await asyncio.sleep(0)
    payload: dict[str, Any] = {}
    originals: Originals = {}
    try:
        for k, raw in top.items():
            v = await _value(raw, 1, steps)
            payload[k] = v
            if len(raw) > _DIRECT_BYTES:
                originals[k] = (v, raw)
    except (msgspec.DecodeError, RecursionError) as e:
        raise _malformed(e) from e
    return payload, originals


async def _value(raw: msgspec.Raw, depth: int, steps: _Steps) -> Any:
    n = len(raw)
    if n <= _DIRECT_BYTES or depth > _MAX_DEPTH:
        out = _decoder.decode(raw)
        await steps.done(n)
        return out
    view = memoryview(raw)
    first = view[0]
    if first == _QUOTE:
        return await _string(view, steps)
    if first == _LBRACKET:
        flat = bytes(view)
        if all(flat.find(c, 1) < 0 for c in (b'"', b"[", b"{")):  # numbers and literals (token ids)
            return await _flat_array(flat, steps)
        try:
            objs = _as_objects.decode(raw)
        except msgspec.ValidationError:  # not all objects
            items = _as_array.decode(raw)
            await steps.done(n)
            if len(items) > _MAX_ITEMS:
                return _whole(raw)
            return [await _value(r, depth + 1, steps) for r in items]
        await steps.done(n)
        if len(objs) > _MAX_ITEMS:
            return _whole(raw)
        return [{k: await _value(r, depth + 2, steps) for k, r in o.items()} for o in objs]
    if first == _LBRACE:
        obj = _as_object.decode(raw)
        await steps.done(n)
        if len(obj) > _MAX_ITEMS:
            return _whole(raw)
        return {k: await _value(r, depth + 1, steps) for k, r in obj.items()}
    return _decoder.decode(raw)  # a number or a literal


def _whole(raw: msgspec.Raw) -> Any:
    """Many small items: at once (stepping through them would cost more than it saves)."""
    return _decoder.decode(raw)


async def _flat_array(b: bytes, steps: _Steps) -> list[Any]:
    """An array of numbers and literals (``b``: from ``[`` to ``]``), cut at commas."""
    end = len(b) - 1
    out: list[Any] = []
    a = 1
    while a < end:
        p = b.find(b",", a + _PIECE_BYTES, end)
        if p < 0:
            p = end
        out.extend(_decoder.decode(b"[" + b[a:p] + b"]"))
        await steps.done(p - a)
        a = p + 1
    return out


async def _string(view: memoryview, steps: _Steps) -> str:
    """A JSON string literal (``view``: from its opening to its closing quote), ``_PIECE_BYTES`` at a time."""
    end = len(view) - 1  # the closing quote
    pieces: list[str] = []
    a = 1
    while a < end:
        p = a + _PIECE_BYTES
        if p >= end:
            p = end
        else:
            cut = _cut(view, p, a, end)
            p = end if cut is None else cut  # None: no safe cut nearby (a run of backslashes), the rest at once
        pieces.append(_decoder.decode(b'"' + view[a:p] + b'"'))
        await steps.done(p - a)
        a = p
    out = "".join(pieces)  # the longest step: ~10-30 ms for 16 MiB (a 32 MiB UCS-2 string) here
    await asyncio.sleep(0)
    return out


def _cut(b: memoryview, p: int, lo: int, hi: int) -> int | None:
    """A position in ``[p, p + _CUT_SEARCH)`` (and ``< hi``) where a string's bytes may be cut: it
    starts a UTF-8 sequence and is not inside an escape nor between a surrogate pair's halves.
    ``lo``: a position known to be at such a boundary (escapes are read from there)."""
    for q in range(p, min(p + _CUT_SEARCH, hi)):
        if 0x80 <= b[q] < 0xC0:  # a UTF-8 continuation byte
            continue
        if not _inside_escape(b, q, lo):
            return q
    return None


def _inside_escape(b: memoryview, q: int, lo: int) -> bool:
    r"""Whether cutting before ``b[q]`` splits an escape (``\uXXXX`` is 6 bytes, the others 2) or
    separates a high surrogate's escape from the low one that must follow it."""
    for s in range(max(lo, q - 6), q):
        if b[s] != _BACKSLASH:
            continue
        starts = _starts_escape(b, s, lo)
        if starts is None:
            return True  # cannot tell: not a cut point
        if not starts:
            continue
        if b[s + 1] == _U:
            if s + 6 > q or (s + 6 == q and bytes(b[s + 2 : s + 4]).lower() in _HIGH_SURROGATE):
                return True
        elif s + 2 > q:
            return True
    return False


def _starts_escape(b: memoryview, s: int, lo: int) -> bool | None:
    """Whether the backslash at ``s`` starts an escape (an even number of backslashes before it, back
    to ``lo``); ``None`` after 64 of them."""
    k, t = 0, s - 1
    while t >= lo and b[t] == _BACKSLASH:
        k += 1
        if k > 64:
            return None
        t -= 1
    return k % 2 == 0
