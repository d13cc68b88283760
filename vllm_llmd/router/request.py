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
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from vllm_llmd.pd.requests import has_client_kv_params, strip_client_kv_params
from vllm_llmd.router.config import ACCELERATOR_PATTERN, RouterConfig
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
_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A generation endpoint the router serves (more can be added: the request shape is per endpoint)."""

    path: str
    chat: bool


COMPLETIONS = Endpoint("/v1/completions", chat=False)
CHAT = Endpoint("/v1/chat/completions", chat=True)


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
        body = await read_body(request, self.max_body_bytes, self.body_timeout_s, self.budget)
        body_received(request, self.guard)
        return self.build(
            endpoint, body, request.headers.get(self.session_header), request.headers.get(self.traffic_class_header)
        )

    def build(
        self, endpoint: Endpoint, body: bytes, session_id: str | None, traffic_class: str | None = None
    ) -> ClientRequest:
        """The request from a body already read (by :meth:`parse`, or by gateway mode's Envoy)."""
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
        payload = decode_json(body)
        if has_client_kv_params(payload):  # a client never steers a KV transfer
            payload = strip_client_kv_params(payload)
            body = _encoder.encode(payload)
        salt = payload.get("cache_salt")
        out = ClientRequest(
            endpoint=endpoint,
            payload=payload,
            body=body,
            model=self._model(payload),
            max_tokens=max_tokens(payload, endpoint.chat),
            session_id=session_id,
            cache_salt=salt if isinstance(salt, str) else None,
            traffic_class=tclass,
        )
        if endpoint.chat:
            messages = payload.get("messages")
            if not isinstance(messages, list) or not messages:
                raise HTTPError(400, "'messages' must be a non-empty list")
        else:
            out.prompt_text, out.prompt_ids = prompt_of(payload)
        return out

    def _model(self, payload: dict[str, Any]) -> str:
        model = payload.get("model")
        if model is None:
            return self.default_model
        if not isinstance(model, str):
            raise HTTPError(400, "'model' must be a string")
        return model  # whether a pod serves it: vllm_llmd.router.models


def decode_json(body: bytes) -> dict[str, Any]:
    if not body:
        raise HTTPError(400, "empty request body: expected a JSON object")
    try:
        payload = _decoder.decode(body)
    except msgspec.DecodeError as e:
        raise HTTPError(400, f"malformed JSON body: {e}") from e
    except RecursionError as e:  # msgspec's depth limit is the interpreter's recursion limit
        raise HTTPError(400, "malformed JSON body: nested too deeply") from e
    if not isinstance(payload, dict):
        raise HTTPError(400, "the JSON body must be an object")
    return payload


def max_tokens(payload: dict[str, Any], chat: bool) -> int:
    """The request's output budget as vLLM reads it (chat: ``max_completion_tokens`` first); each
    given value must be an integer in ``[0, MAX_TOKENS_LIMIT]``."""
    found: int | None = None
    for key in ("max_completion_tokens", "max_tokens") if chat else ("max_tokens", "max_completion_tokens"):
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
