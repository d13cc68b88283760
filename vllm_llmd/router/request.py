"""Stage 1 of the request path: the client's HTTP request -> a validated :class:`ClientRequest`.

Reads the body within the front's limits, decodes the JSON, checks the few fields
the router itself uses (the prompt or the messages, the output budget), and strips what a client
must never send: ``kv_transfer_params`` / ``ec_transfer_params`` (top level, ``vllm_xargs``,
``extra_body``: every way vLLM 0.32 turns a request field into ``Request.kv_transfer_params``, see
:mod:`vllm_llmd.pd.requests`). Everything else in the body passes through as the client sent it.
Invalid input raises :class:`~vllm_llmd.router.errors.HTTPError` (a JSON 4xx).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from vllm_llmd.pd.requests import has_client_kv_params, strip_client_kv_params
from vllm_llmd.router.body_json import Originals, decode_json, decode_json_stepwise, encode_json
from vllm_llmd.router.config import ACCELERATOR_PATTERN, RouterConfig
from vllm_llmd.router.endpoints import CHAT, COMPLETIONS, Endpoint  # noqa: F401  (CHAT, COMPLETIONS: re-exported)
from vllm_llmd.router.errors import HTTPError
from vllm_llmd.router.front import BodyBudget, ConnectionGuard, body_received, read_body

#: vLLM's completions default (chat defaults to "the rest of the context", unknown here)
DEFAULT_MAX_TOKENS = 16
#: token ids are hashed as uint32 (vllm_llmd.index.keys); vLLM rejects ids beyond the vocabulary itself
TOKEN_ID_LIMIT = 1 << 32
#: far above any context length; keeps the load arithmetic in floats' range (issue 9: a 400-digit
#: max_tokens made every other request fail with OverflowError while it was in flight)
MAX_TOKENS_LIMIT = (1 << 31) - 1

#: a traffic class: what an accelerator kind may be (vllm_llmd.router.config.ACCELERATOR_PATTERN)
_TRAFFIC_CLASS = re.compile(ACCELERATOR_PATTERN)


@dataclass(slots=True)
class ClientRequest:
    endpoint: Endpoint
    #: the decoded body (client transfer params stripped)
    payload: dict[str, Any]
    #: the body to forward: the client's bytes, or re-encoded when something was stripped
    body: bytes
    model: str
    #: the output budget the engine will use (``max_completion_tokens`` first for chat)
    max_tokens: int
    #: the session-affinity header's value
    session_id: str | None
    #: completions: the prompt text, or the first prompt of a batch (``None`` for token ids)
    prompt_text: str | None = None
    #: completions: the client's token ids (or the first list of a batch), not yet checked
    prompt_ids: list[int] | None = None
    #: the request's ``cache_salt`` (it gives the engine's blocks a separate hash chain)
    cache_salt: str | None = None
    #: the traffic-class header's value, lowercased (the ``accelerator`` filter)
    traffic_class: str | None = None
    #: the LoRA adapter the request names (its ``model``), set with the candidate pods
    lora: str | None = None
    #: the conversation, when the prompt is one (chat, /v1/messages, Responses API items, /tokenize
    #: with messages): rendered with the chat template
    messages: list[Any] | None = None
    #: the client's bytes of the body's large top-level values (a huge body's prompt or messages)
    originals: Originals = field(default_factory=dict)

    @property
    def chat(self) -> bool:
        return self.messages is not None

    def encode(self, payload: dict[str, Any]) -> bytes:
        """A body derived from this request's (e.g. a P/D leg) as JSON: values it shares with the
        client's body are written as the client's bytes (:func:`~.body_json.encode_json`)."""
        return encode_json(payload, self.originals)


class RequestParser:
    def __init__(self, cfg: RouterConfig, guard: ConnectionGuard | None, budget: BodyBudget | None = None) -> None:
        self.max_body_bytes = cfg.max_body_bytes
        self.budget = budget
        self.body_timeout_s = cfg.server.body_timeout_s
        self.session_header = cfg.session_header
        self.traffic_class_header = cfg.traffic_class_header
        self.default_model = cfg.models[0] if cfg.models else ""
        self.guard = guard

    async def parse(self, request: web.Request, endpoint: Endpoint) -> ClientRequest:
        """The request from the client's HTTP request; a huge body is decoded in steps
        (:func:`~.body_json.decode_json_stepwise`) so the event loop keeps running."""
        body = await read_body(request, self.max_body_bytes, self.body_timeout_s, self.budget)
        body_received(request, self.guard)
        headers = request.headers
        tclass = self._traffic_class(headers.get(self.traffic_class_header))
        if endpoint.prompt == "raw":  # not JSON (multipart audio): passed as it came
            return self._build(endpoint, body, None, {}, headers.get(self.session_header), tclass)
        payload, originals = await decode_json_stepwise(body)
        return self._build(endpoint, body, payload, originals, headers.get(self.session_header), tclass)

    def build(
        self, endpoint: Endpoint, body: bytes, session_id: str | None, traffic_class: str | None = None
    ) -> ClientRequest:
        """The request from a body already read (by gateway mode's Envoy), decoded in one call."""
        tclass = self._traffic_class(traffic_class)
        payload = None if endpoint.prompt == "raw" else decode_json(body)
        return self._build(endpoint, body, payload, {}, session_id, tclass)

    def _traffic_class(self, traffic_class: str | None) -> str | None:
        tclass = None
        if traffic_class is not None:
            tclass = traffic_class.strip().lower()
            if not _TRAFFIC_CLASS.match(tclass):
                raise HTTPError(
                    400,
                    f"header {self.traffic_class_header}: expected a class name of 1-63 characters "
                    "(letters, digits, '.', '_', '-'), got "
                    f"{traffic_class[:64]!r}",
                )
        return tclass

    def _build(
        self,
        endpoint: Endpoint,
        body: bytes,
        payload: dict[str, Any] | None,
        originals: Originals,
        session_id: str | None,
        tclass: str | None,
    ) -> ClientRequest:
        if payload is None:  # not JSON (multipart audio): passed as it came
            return ClientRequest(endpoint, {}, body, self.default_model, 0, session_id, traffic_class=tclass)
        if has_client_kv_params(payload):  # a client never steers a KV transfer
            payload = strip_client_kv_params(payload)
            # the rest as the client's bytes: a huge prompt is copied, not re-encoded
            body = encode_json(payload, originals)
        # else the client's bytes are forwarded untouched
        salt = payload.get("cache_salt")
        out = ClientRequest(
            endpoint=endpoint,
            payload=payload,
            body=body,
            model=self._model(payload),
            max_tokens=max_tokens(payload, endpoint.budget),
            session_id=session_id,
            cache_salt=salt if isinstance(salt, str) else None,
            traffic_class=tclass,
            originals=originals,
        )
        kind = endpoint.prompt
        if kind == "messages" or (endpoint.messages_too and "messages" in payload):
            messages = payload.get("messages")
            if not isinstance(messages, list) or not messages:
                raise HTTPError(400, "'messages' must be a non-empty list")
            out.messages = messages
        elif kind == "prompt":
            out.prompt_text, out.prompt_ids = prompt_of(payload)
        elif kind == "input":
            out.prompt_text, out.prompt_ids, out.messages = input_of(payload)
        elif kind == "query":
            out.prompt_text = query_of(payload)
        return out

    def _model(self, payload: dict[str, Any]) -> str:
        model = payload.get("model")
        if model is None:
            return self.default_model
        if not isinstance(model, str):
            raise HTTPError(400, "'model' must be a string")
        return model  # whether a pod serves it: vllm_llmd.router.models


def max_tokens(payload: dict[str, Any], keys: tuple[str, ...]) -> int:
    """The request's output budget as vLLM reads it from the endpoint's ``keys`` (chat:
    ``max_completion_tokens`` first; none: an endpoint that generates nothing, 0); each given value
    must be an integer in ``[0, MAX_TOKENS_LIMIT]``."""
    if not keys:
        return 0
    found: int | None = None
    for key in keys:
        v = payload.get(key)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_TOKENS_LIMIT:
            raise HTTPError(400, f"'{key}' must be an integer in [0, {MAX_TOKENS_LIMIT}]")
        if found is None:
            found = v
    return DEFAULT_MAX_TOKENS if found is None else found


def prompt_of(payload: dict[str, Any]) -> tuple[str | None, list[int] | None]:
    """A completion's prompt: its text or its token ids (the first of a batch routes it)."""
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list) and (not prompt or isinstance(prompt[0], int)):
        return None, prompt  # each id is checked while it is hashed (vllm_llmd.router.prompt.checked_ids)
    raise HTTPError(400, "'prompt' must be a string, a list of strings or token ids")


def input_of(payload: dict[str, Any]) -> tuple[str | None, list[int] | None, list[Any] | None]:
    """``input`` of embeddings / pooling / classify (text, token ids, or a batch of either: the
    first routes it) or of the Responses API (text, or items: a conversation after ``instructions``)."""
    inp = payload.get("input")
    if isinstance(inp, list) and inp and isinstance(inp[0], dict):  # Responses API items
        items = [i for i in inp if isinstance(i, dict) and "role" in i]
        instructions = payload.get("instructions")
        head = [{"role": "system", "content": instructions}] if isinstance(instructions, str) else []
        return None, None, [*head, *items] or None
    if isinstance(inp, list) and inp and isinstance(inp[0], str | list):
        inp = inp[0]
    if isinstance(inp, str):
        return inp, None, None
    if isinstance(inp, list) and (not inp or isinstance(inp[0], int)):
        return None, inp, None
    if inp is None:
        return "", None, None  # the engine says what is missing
    raise HTTPError(400, "'input' must be a string, a list of strings or token ids, or input items")


def query_of(payload: dict[str, Any]) -> str:
    """Score / rerank: the query (``query``, ``text_1``, ``queries``, ``data_1``; the first of a list),
    the head every scored pair starts with."""
    for key in ("query", "text_1", "queries", "data_1"):
        v = payload.get(key)
        if isinstance(v, list) and v:
            v = v[0]
        if isinstance(v, str):
            return v
    return ""
