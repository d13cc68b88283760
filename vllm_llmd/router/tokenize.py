"""Prompt tokenization with the model's own tokenizer (HF ``tokenizers``), chat templates applied
the way vLLM 0.32 applies them, and a prompt-prefix cache that keeps the cost off the hot path.

Chat: vLLM renders ``tokenizer_config.json``'s ``chat_template`` with transformers'
``render_jinja_template`` (``transformers/utils/chat_template_utils.py``: an
``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with ``tojson``,
``raise_exception`` and ``strftime_now``; the special tokens of the tokenizer are passed as
variables), with ``add_generation_prompt=True`` by default, then tokenizes the text with
``add_special_tokens=False`` (``ChatCompletionRequest.add_special_tokens`` defaults to False).
Content given as a list of parts is joined with ``"\\n"`` (``vllm/renderers/chat_utils.py``).

Prefix cache: a 22 KB prompt costs ~3.5 ms to encode, the router's main per-request CPU cost. BPE
never merges across pre-token boundaries, so the tokens of a long shared prefix can be reused: the
prompt is cut into ``chunk_chars`` chunks with chained hashes; for each chunk boundary we remember
the tokens up to a whitespace word boundary at least ``_MARGIN`` characters before it. A new prompt
reuses the deepest remembered boundary and encodes only the rest.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from datetime import datetime
from pathlib import Path
from typing import Any

import xxhash

log = logging.getLogger(__name__)

_MARGIN = 64


class TokenizerUnavailable(RuntimeError):
    pass


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
        return "\n".join(texts)
    return str(content)


class PromptTokenizer:
    """Tokenizes completion prompts and chat conversations; thread-safe for concurrent encodes."""

    def __init__(self, model_dir: str | Path, prefix_cache_entries: int = 4096, chunk_chars: int = 256) -> None:
        from tokenizers import Tokenizer

        d = Path(model_dir)
        tok_file = d / "tokenizer.json"
        try:
            self._tok = Tokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise TokenizerUnavailable(f"cannot load {tok_file}: {e}") from e
        cfg: dict[str, Any] = {}
        cfg_file = d / "tokenizer_config.json"
        if cfg_file.exists():
            try:
                cfg = json.loads(cfg_file.read_text())
            except (OSError, ValueError) as e:
                log.warning("cannot read %s (%s); chat requests will not be tokenized", cfg_file, e)
        self._special: dict[str, Any] = {}
        for k in ("bos_token", "eos_token", "unk_token", "pad_token"):
            v = cfg.get(k)
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                self._special[k] = v
        self._template = None
        tmpl = cfg.get("chat_template")
        if isinstance(tmpl, list):  # named templates: vLLM uses "default"
            tmpl = next((t.get("template") for t in tmpl if isinstance(t, dict) and t.get("name") == "default"), None)
        if isinstance(tmpl, str):
            self._template = _compile_template(tmpl)
        self._cache_entries = prefix_cache_entries
        self._chunk = chunk_chars
        self._cache: OrderedDict[tuple[bool, int], tuple[list[int], int]] = OrderedDict()
        # the prefix cache is only exact if special tokens are only ever prepended
        with_sp = self._tok.encode("a b", add_special_tokens=True).ids
        without = self._tok.encode("a b", add_special_tokens=False).ids
        self._appends_specials = with_sp[len(with_sp) - len(without) :] != without
        self.cache_hits = 0
        self.cache_misses = 0

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    # ---- completions -------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._cache_entries == 0 or len(text) < 2 * self._chunk or (add_special_tokens and self._appends_specials):
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        return self._encode_cached(text, add_special_tokens)

    def _chunk_hashes(self, text: str) -> list[int]:
        hashes = []
        h = 0
        c = self._chunk
        for i in range(c, len(text) + 1, c):
            h = xxhash.xxh3_64_intdigest(text[i - c : i].encode("utf-8", "surrogatepass"), h)
            hashes.append(h)
        return hashes

    def _encode_cached(self, text: str, specials: bool) -> list[int]:
        hashes = self._chunk_hashes(text)
        cache = self._cache
        best = -1
        for k in range(len(hashes) - 1, -1, -1):
            if (specials, hashes[k]) in cache:
                best = k
                break
        if best >= 0:
            key = (specials, hashes[best])
            cache.move_to_end(key)
            ids, off = cache[key]
            self.cache_hits += 1
            tail = self._tok.encode(text[off:], add_special_tokens=False)
            out = ids + tail.ids
            start_chunk, base_tokens, base_off = best + 1, len(ids), off
            enc_offsets = tail.offsets
        else:
            self.cache_misses += 1
            enc = self._tok.encode(text, add_special_tokens=specials)
            out = enc.ids
            start_chunk, base_tokens, base_off = 0, 0, 0
            enc_offsets = enc.offsets
        # remember boundaries of the chunks this encode covered (not the last one: it may be a suffix)
        self._remember(text, hashes, specials, out, enc_offsets, start_chunk, base_tokens, base_off)
        return out

    def _remember(
        self,
        text: str,
        hashes: list[int],
        specials: bool,
        ids: list[int],
        offsets: list[tuple[int, int]],
        start_chunk: int,
        base_tokens: int,
        base_off: int,
    ) -> None:
        cache = self._cache
        j = 0
        n = len(offsets)
        for k in range(start_chunk, len(hashes) - 1):
            key = (specials, hashes[k])
            if key in cache:
                continue
            boundary = (k + 1) * self._chunk - _MARGIN - base_off
            # first token at or after the boundary that starts a whitespace-led word
            while j < n and offsets[j][0] < boundary:
                j += 1
            jj = j
            while jj < n:
                s = offsets[jj][0] + base_off
                if s > 0 and text[s].isspace() and not text[s - 1].isspace() and offsets[jj][0] != offsets[jj][1]:
                    break
                jj += 1
            if jj >= n or offsets[jj][0] + base_off >= (k + 1) * self._chunk:
                continue
            cache[key] = (ids[: base_tokens + jj], offsets[jj][0] + base_off)
            if len(cache) > self._cache_entries:
                cache.popitem(last=False)

    # ---- chat --------------------------------------------------------------------------------
    def render_chat(self, body: dict[str, Any]) -> str:
        if self._template is None:
            raise TokenizerUnavailable("the tokenizer has no chat_template")
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise ValueError("'messages' must be a list")
        conv = []
        for m in messages:
            if not isinstance(m, dict):
                raise ValueError("each message must be an object")
            m2 = dict(m)
            m2["content"] = _content_text(m.get("content"))
            conv.append(m2)
        kwargs: dict[str, Any] = dict(self._special)
        extra = body.get("chat_template_kwargs")
        if isinstance(extra, dict):
            kwargs.update(extra)
        continue_final = bool(body.get("continue_final_message", False))
        kwargs["add_generation_prompt"] = bool(body.get("add_generation_prompt", not continue_final))
        kwargs["continue_final_message"] = continue_final
        if body.get("tools") is not None:
            kwargs["tools"] = body.get("tools")
        return str(self._template.render(messages=conv, **kwargs))

    def encode_chat(self, body: dict[str, Any]) -> list[int]:
        text = self.render_chat(body)
        return self.encode(text, add_special_tokens=bool(body.get("add_special_tokens", False)))


def _compile_template(source: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def load_tokenizer(path: str | Path | None, **kw: Any) -> PromptTokenizer | None:
    """The tokenizer, or ``None`` (logged once) so the router falls back to approximate scoring."""
    if path is None:
        log.warning("no --tokenizer given: precise prefix scoring is off, using the approximate scorer")
        return None
    try:
        return PromptTokenizer(path, **kw)
    except (TokenizerUnavailable, OSError) as e:
        log.warning("tokenizer unavailable (%s): precise prefix scoring is off, using the approximate scorer", e)
        return None
