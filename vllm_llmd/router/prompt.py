"""Stage 2 of the request path: a :class:`~vllm_llmd.router.request.ClientRequest` -> the
scheduler's :class:`~vllm_llmd.router.scheduling.SchedRequest`: the prompt's tokens (the model's own
tokenizer, off the event loop for large prompts: :mod:`.tokenize`) and its block keys, the input
of the prefix view.

Block keys are the KV index's own (:mod:`vllm_llmd.index.keys`: ``chain_keys`` from
``root_key(model, cache_salt)`` over ``block_size``-token blocks), for the routing memory too, so
one derivation serves the index, the speculative entries and the approximate prefix cache. Without
tokens (no tokenizer, an untokenizable prompt, the workers busy) the prompt text is keyed the same
way with each character as one 4-byte unit (UTF-32) and ``4 * block_size`` characters a block,
from a separate root. Only the first ``index.max_prompt_blocks`` blocks are keyed.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Sequence
from typing import Any

from vllm_llmd.index.keys import chain_keys, root_key, token_bytes
from vllm_llmd.router.errors import HTTPError
from vllm_llmd.router.request import TOKEN_ID_LIMIT, ClientRequest
from vllm_llmd.router.scheduling import SchedRequest
from vllm_llmd.router.tokenize import PromptTokenizer, TokenizerPool

log = logging.getLogger(__name__)

#: separates the roots of text keys from token keys (the two never describe the same blocks)
_TEXT_ROOT = 0x7465_7874_6B65_7973
#: characters counted as one token without a tokenizer
CHARS_PER_TOKEN = 4


def token_block_keys(
    model: str, token_ids: Sequence[int], block_size: int, max_blocks: int, salt: str | None = None
) -> list[int]:
    """Keys of the prompt's first ``max_blocks`` full blocks (the index's keys)."""
    n = min(len(token_ids), max_blocks * block_size)
    n -= n % block_size
    if n <= 0:
        return []
    head = token_ids if n == len(token_ids) else token_ids[:n]
    return chain_keys(root_key(model, salt), token_bytes(head), block_size)


def text_block_keys(model: str, text: str, block_size: int, max_blocks: int, salt: str | None = None) -> list[int]:
    """Keys of the text's first ``max_blocks`` full blocks of ``CHARS_PER_TOKEN * block_size`` characters."""
    chars = CHARS_PER_TOKEN * block_size
    head = text[: max_blocks * chars]
    return chain_keys(root_key(model, salt) ^ _TEXT_ROOT, head.encode("utf-32-le", "surrogatepass"), chars)


class PromptStage:
    def __init__(
        self,
        tokenizer: PromptTokenizer | None,
        pool: TokenizerPool | None,
        block_size: int,
        max_prompt_blocks: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.pool = pool
        self.block_size = block_size
        self.max_blocks = max_prompt_blocks
        self._template_failure_logged = False
        if tokenizer is not None and not tokenizer.has_chat_template:
            log.warning("the tokenizer has no chat_template: chat requests are scored approximately")

    async def build(self, req: ClientRequest, body_size: int) -> SchedRequest:
        """The scheduler's request; a body over ``inline_chars`` is worked on a worker thread (its
        rendering, tokens, token checks and keys), the event loop only waits."""
        if self.pool is None:
            return self._prompt(req)
        out = await self.pool.run(body_size, self._prompt, req)
        return out if out is not None else self._approximate(req)  # the workers are all busy

    def _prompt(self, req: ClientRequest) -> SchedRequest:
        ids: Sequence[int] | None = None
        text = ""
        if req.messages is not None:
            ids = self._chat_ids(req)
            if ids is None:
                text = conversation_text(req.messages)
        elif req.prompt_ids is not None:
            ids = checked_ids(req.prompt_ids)
        else:
            text = req.prompt_text or ""
            if self.tokenizer is not None:
                ids = self.tokenizer.encode_ids(text, bool(req.payload.get("add_special_tokens", True)))
        return self._keyed(req, ids, text)

    def _approximate(self, req: ClientRequest) -> SchedRequest:
        """Without tokenizing: text keys (client token ids: their first blocks as they are)."""
        if req.prompt_ids is not None:
            head = checked_ids(req.prompt_ids[: self.max_blocks * self.block_size])
            out = self._keyed(req, head, "")
            out.prompt_tokens = len(req.prompt_ids)
            return out
        text = conversation_text(req.messages) if req.messages is not None else req.prompt_text or ""
        return self._keyed(req, None, text)

    def _keyed(self, req: ClientRequest, ids: Sequence[int] | None, text: str) -> SchedRequest:
        bs, cap, salt = self.block_size, self.max_blocks, req.cache_salt
        if ids is not None:
            keys = token_block_keys(req.model, ids, bs, cap, salt)
            n = len(ids)
        else:
            keys = text_block_keys(req.model, text, bs, cap, salt)
            n = max(1, len(text) // CHARS_PER_TOKEN)
        return SchedRequest(
            req.model,
            ids,
            text,
            n,
            req.max_tokens,
            keys,
            session_id=req.session_id,
            traffic_class=req.traffic_class,
            lora=req.lora,
        )

    def _chat_ids(self, req: ClientRequest) -> Sequence[int] | None:
        tok = self.tokenizer
        if tok is None or not tok.has_chat_template:
            return None
        try:
            body = (
                req.payload
                if req.payload.get("messages") is req.messages
                else {**req.payload, "messages": req.messages}
            )
            return tok.encode_chat_ids(body)
        except Exception as e:  # a template error is the engine's to report; route approximately
            log.debug("chat template failed: %s", e)
            if not self._template_failure_logged:
                log.warning("the chat template fails on some requests: those are scored approximately (%s)", e)
                self._template_failure_logged = True
            return None


def conversation_text(messages: list[Any]) -> str:
    """A conversation as text, for approximate keys when it cannot be rendered and tokenized."""
    return "".join(
        f"{m.get('role', '')}: {m.get('content', '')}\n" if isinstance(m, dict) else str(m) for m in messages
    )


def checked_ids(ids: list[int]) -> array:
    """Client token ids as ``array('I')``: each must be an integer in ``[0, 2**32)`` (a 400 if not)."""
    try:
        return array("I", ids)
    except (OverflowError, TypeError) as e:
        raise HTTPError(400, f"token ids must be integers in [0, {TOKEN_ID_LIMIT})") from e
