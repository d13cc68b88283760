"""Prompt tokenization with the model's own tokenizer (HF ``tokenizers``), exactly as vLLM 0.32
tokenizes, with bounded memory and time for prompts of any size.

Completions add special tokens unless ``add_special_tokens`` is false; chat renders the template
(:mod:`.chat_template`) and tokenizes without special tokens (``ChatCompletionRequest.add_special_tokens``
defaults to False in vLLM).

**Segments.** Byte-level BPE never merges across pre-tokens, and in the pre-tokenizer regexes of
GPT-2, Llama 3, cl100k and their kin a space that follows a letter or digit always starts a new
pre-token. So a prompt cut at such spaces tokenizes to the concatenation of its pieces' tokens.
:class:`PromptTokenizer` checks this on sample text at start-up (a SentencePiece-style tokenizer
that prepends ``▁`` fails the check; it then gets whole-prompt encodes only) and then always
encodes in segments, in batches (``encode_batch_fast``: no offsets), so no encode ever holds more
than ``max_segment_chars`` of text: the tokenizer's own per-token state (ids, offsets, token
strings: ~80 bytes a token) stays bounded whatever the prompt size, and the result is kept as
``array('I')`` (4 bytes a token). A prompt with no cut point in ``max_segment_chars`` characters is
not tokenized (the router scores it approximately).

**Prefix cache.** A 22 KB prompt costs ~3.5 ms to encode, the router's main per-request CPU cost.
Prompts up to ``prefix_cache_bytes / 24`` characters (so that one fits in a quarter of the budget)
are cut near every ``chunk_chars`` boundary (the first cut point at most ``_MARGIN`` characters
before it) and the cuts are remembered in a :class:`~.prefix_cache.TokenPrefixCache` under the
chained hash of the text up to the chunk end; a later prompt reuses its deepest remembered cut and
encodes only the rest.

**Off the event loop.** :class:`TokenizerPool` runs the prompt work of a request body over
``inline_chars`` (``vllm_llmd.router.prompt``: rendering, tokenizing, keys) on worker threads
(``tokenizers`` releases the GIL while it encodes); at most ``max_pending`` at a time, beyond which
a request is scored approximately instead of queueing.
Measured by ``tests/robustness/big_prompt.py``: a 16 MiB prompt is tokenized on a worker while
``/health`` keeps answering (figures in bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from array import array
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from vllm_llmd.index.keys import chain_keys
from vllm_llmd.router.chat_template import ChatTemplate, resolve_chat_template
from vllm_llmd.router.prefix_cache import TokenPrefixCache

log = logging.getLogger(__name__)

T = TypeVar("T")

#: a letter or digit followed by a space: a cut before the space splits between pre-tokens
_CUT = re.compile(r"[^\W_] ")
_MARGIN = 64
#: target segment length outside the remembered chunks, and text per ``encode_batch`` call
_SEGMENT_CHARS = 4096
_BATCH_CHARS = 256 * 1024
_PROBES = (
    "Hello world, this is a test. It's 2024 and  12345 apples cost $3.50!\nNew line\tand tabs"
    " ünïcödé café naïve 日本語 text x1 y2 z3 the end",
    "  leading and trailing spaces  a b c d e f g h i j k l m n o p 1 2 3 4 5 6 7 8 9 0 ",
)


class TokenizerUnavailable(RuntimeError):
    pass


def chunk_keys(text: str, chunk_chars: int, seed: int) -> list[int]:
    """Chained hashes of ``text``'s full ``chunk_chars``-character chunks: the characters as UTF-32
    code units, so :func:`~vllm_llmd.index.keys.chain_keys`' fixed 4-byte stride is one character."""
    return chain_keys(seed, text.encode("utf-32-le", "surrogatepass"), chunk_chars)


class PromptTokenizer:
    """Tokenizes completion prompts and chat conversations; thread-safe."""

    def __init__(
        self,
        model_dir: str | Path,
        prefix_cache_bytes: int = 64 << 20,
        chunk_chars: int = 256,
        max_segment_chars: int = 1 << 20,
        chat_template: str | None = None,
    ) -> None:
        from tokenizers import Tokenizer

        d = Path(model_dir)
        tok_file = d / "tokenizer.json"
        try:
            self._tok = Tokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise TokenizerUnavailable(f"cannot load {tok_file}: {e}") from e
        self._batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        self._chat = _load_chat_template(d, chat_template)
        self._chunk = chunk_chars
        self.max_segment_chars = max_segment_chars
        self._cache = TokenPrefixCache(prefix_cache_bytes)
        self._remember_chars = prefix_cache_bytes // 24
        # the cached prefix is only exact if special tokens are only ever prepended
        with_sp = self._tok.encode("a b", add_special_tokens=True).ids
        without = self._tok.encode("a b", add_special_tokens=False).ids
        self._appends_specials = with_sp[len(with_sp) - len(without) :] != without
        self.splits_cleanly = all(self._splits_cleanly(s) for s in _PROBES)
        if not self.splits_cleanly:
            log.warning(
                "the tokenizer does not split cleanly at spaces: no prefix cache, and prompts over %d characters "
                "are scored approximately",
                max_segment_chars,
            )
        self.cache_hits = 0
        self.cache_misses = 0

    @property
    def has_chat_template(self) -> bool:
        return self._chat is not None

    @property
    def prefix_cache(self) -> TokenPrefixCache:
        return self._cache

    def _splits_cleanly(self, s: str) -> bool:
        enc = self._tok.encode
        for specials in (False, True):
            whole = enc(s, add_special_tokens=specials).ids
            for m in _CUT.finditer(s):
                c = m.end() - 1
                if enc(s[:c], add_special_tokens=specials).ids + enc(s[c:], add_special_tokens=False).ids != whole:
                    return False
        return True

    # ---- completions -------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.encode_ids(text, add_special_tokens)
        if ids is None:
            raise ValueError(f"no cut point within {self.max_segment_chars} characters: not tokenized")
        return ids.tolist()

    def encode_ids(self, text: str, add_special_tokens: bool = True) -> array | None:
        """The token ids as ``array('I')``, or ``None`` when the text cannot be tokenized within
        ``max_segment_chars`` per encode."""
        n = len(text)
        if not self.splits_cleanly or (add_special_tokens and self._appends_specials) or n < 2 * self._chunk:
            if n > self.max_segment_chars:
                return None
            return array("I", self._tok.encode(text, add_special_tokens=add_special_tokens).ids)
        if n > self._remember_chars or self._cache.max_bytes == 0:
            bounds = self._bounds(text, 0, [])
            return None if bounds is None else self._encode_segments(text, bounds, add_special_tokens, [])[0]
        keys = chunk_keys(text, self._chunk, 1 if add_special_tokens else 0)
        hit = self._cache.lookup(keys)
        if hit is None:
            self.cache_misses += 1
            base, start, first = None, 0, 0
        else:
            self.cache_hits += 1
            base, start, first = hit[0], hit[1], hit[2] + 1
        # cut near the end of every chunk this encode covers (not the last one: it may be a suffix)
        cuts: list[tuple[int, int]] = []  # (chunk, cut offset)
        c = self._chunk
        for j in range(first, len(keys) - 1):
            end = (j + 1) * c
            m = _CUT.search(text, max(start, end - _MARGIN - 1), end)
            if m is not None:
                cuts.append((j, m.end() - 1))
        bounds = self._bounds(text, start, [off for _, off in cuts])
        if bounds is None:
            return None
        ids, at = self._encode_segments(text, bounds, add_special_tokens and base is None, [off for _, off in cuts])
        if base is not None:
            at = [len(base) + k for k in at]
            base.extend(ids)
            ids = base
        self._cache.remember(ids, [(keys[j], ntok, off) for (j, off), ntok in zip(cuts, at, strict=True)])
        return ids

    def _bounds(self, text: str, start: int, pinned: list[int]) -> list[int] | None:
        """Segment boundaries from ``start`` to the end of ``text``: ``pinned`` cuts plus cuts every
        ~``_SEGMENT_CHARS`` where a cut point exists; ``None`` if a segment would exceed
        ``max_segment_chars``."""
        out = [start]
        limit = self.max_segment_chars
        for target in [*pinned, len(text)]:
            p = out[-1]
            while target - p > _SEGMENT_CHARS:
                m = _CUT.search(text, p + _SEGMENT_CHARS - 1, target)
                if m is None:
                    break
                c = m.end() - 1
                if c - p > limit:
                    return None
                out.append(c)
                p = c
            if target - p > limit:
                return None
            if target > p:
                out.append(target)
        return out

    def _encode_segments(
        self, text: str, bounds: list[int], specials: bool, marks: list[int]
    ) -> tuple[array, list[int]]:
        """Encode ``text[bounds[0]:bounds[-1]]`` segment by segment; also the token count before each
        offset in ``marks`` (each one of ``bounds``)."""
        out = array("I")
        at: list[int] = []
        want = iter(marks)
        nxt = next(want, None)
        i = 0
        last = len(bounds) - 1
        while i < last:
            if i == 0 and specials:  # special tokens go around the first segment only
                group = [text[bounds[0] : bounds[1]]]
                encs = [self._tok.encode(group[0], add_special_tokens=True)]
            else:
                j, size = i, 0
                while j < last and (j == i or size + bounds[j + 1] - bounds[j] <= _BATCH_CHARS):
                    size += bounds[j + 1] - bounds[j]
                    j += 1
                group = [text[bounds[k] : bounds[k + 1]] for k in range(i, j)]
                encs = self._batch(group, add_special_tokens=False)
            for enc in encs:
                out.extend(enc.ids)
                i += 1
                while nxt is not None and nxt == bounds[i]:
                    at.append(len(out))
                    nxt = next(want, None)
        return out, at

    # ---- chat --------------------------------------------------------------------------------
    def render_chat(self, body: dict[str, Any]) -> str:
        if self._chat is None:
            raise TokenizerUnavailable("the tokenizer has no chat_template")
        return self._chat.render(body)

    def encode_chat_ids(self, body: dict[str, Any]) -> array | None:
        return self.encode_ids(self.render_chat(body), add_special_tokens=bool(body.get("add_special_tokens", False)))

    def encode_chat(self, body: dict[str, Any]) -> list[int]:
        text = self.render_chat(body)
        return self.encode(text, add_special_tokens=bool(body.get("add_special_tokens", False)))


def _load_chat_template(d: Path, override: str | None) -> ChatTemplate | None:
    cfg: dict[str, Any] = {}
    cfg_file = d / "tokenizer_config.json"
    if cfg_file.exists():
        try:
            cfg = json.loads(cfg_file.read_text())
        except (OSError, ValueError) as e:
            log.warning("cannot read %s (%s); chat requests will not be tokenized", cfg_file, e)
    if override is not None:  # the operator's choice: an unusable one stops the start (ChatTemplateError)
        return resolve_chat_template(d, cfg if isinstance(cfg, dict) else {}, override)
    try:
        return resolve_chat_template(d, cfg if isinstance(cfg, dict) else {})
    except Exception as e:  # jinja2's TemplateError, an unreadable file: the model's, not ours
        log.warning("the model's chat template cannot be used (%s): chat requests are scored approximately", e)
        return None


class TokenizerPool:
    """Runs tokenizations of more than ``inline_chars`` on ``workers`` threads, at most
    ``max_pending`` at a time; :meth:`run` returns ``None`` (score approximately) when that many
    are already running or queued, so a burst of huge prompts never queues without bound."""

    def __init__(self, workers: int = 2, max_pending: int = 32, inline_chars: int = 32768) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llmd-tokenize")
        self.max_pending = max_pending
        self.inline_chars = inline_chars
        self.pending = 0
        self.rejected = 0

    async def run(self, size: int, fn: Callable[..., T | None], *args: Any) -> T | None:
        if size <= self.inline_chars:
            return fn(*args)
        if self.pending >= self.max_pending:
            self.rejected += 1
            return None
        loop = asyncio.get_running_loop()
        self.pending += 1

        def finished(_: object) -> None:  # on the worker thread (or here, if cancelled before it ran)
            try:
                loop.call_soon_threadsafe(self._finished)
            except RuntimeError:  # the loop is closed: nothing is waiting any more
                pass

        fut = self._executor.submit(fn, *args)
        fut.add_done_callback(finished)
        return await asyncio.wrap_future(fut)

    def _finished(self) -> None:
        self.pending -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def load_tokenizer(path: str | Path | None, **kw: Any) -> PromptTokenizer | None:
    """The tokenizer, or ``None`` (logged once) so the router falls back to approximate scoring.

    Turns off ``tokenizers``' own thread pool unless ``TOKENIZERS_PARALLELISM`` is set: waking it
    for every prompt cost more than it saved (bench/bench_router_decision.py, 2 busy cores: wall
    p50 9.7 -> 2.0 ms, CPU 2.2 -> 1.75 ms a decision); large prompts get the worker threads."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if path is None:
        log.warning("no --tokenizer given: precise prefix scoring is off, using the approximate scorer")
        return None
    try:
        return PromptTokenizer(path, **kw)
    except (TokenizerUnavailable, OSError, ImportError) as e:
        log.warning("tokenizer unavailable (%s): precise prefix scoring is off, using the approximate scorer", e)
        return None
