"""The OpenAI-compatible request and response shapes of vLLM 0.32's API server, for the simulator.

Requests: the fields vLLM's ``CompletionRequest`` / ``ChatCompletionRequest`` define that change
what the simulator must do are read (``model``, ``prompt`` / ``messages``, ``max_tokens``,
``max_completion_tokens``, ``stream``, ``stream_options``, ``cache_salt``, ``add_special_tokens``);
sampling fields are accepted and ignored (generation always runs to ``max_tokens``, finish reason
``length``); fields that would change the response's shape and are not simulated (``n`` > 1,
``echo``, ``logprobs``, ``best_of``, ``return_token_ids``, ``use_beam_search``, ``prompt_embeds``,
``tools``) are refused with a 400 that names them.

Responses: byte-for-byte the JSON vLLM emits (key order, nulls, which keys a stream chunk omits),
from ``entrypoints/openai/completion/serving.py`` (``completion_stream_generator``,
``request_output_to_completion_response``), ``entrypoints/openai/chat_completion/serving.py``
(``chat_completion_stream_generator``, ``_make_prompt_tokens_details``) and the pydantic models of
``entrypoints/openai/*/protocol.py`` (``model_dump_json(exclude_unset=True)`` for stream chunks,
``exclude_none=True`` for the final usage chunk). ``tests/unit/test_sim_http.py`` compares them with
responses recorded from a real engine (``tests/unit/sim_golden.json``, written by
``bench/sim_golden.py``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

VLLM_VERSION = "0.32.0"

#: request fields the simulator cannot honour without changing the response's shape
_UNSUPPORTED = ("echo", "logprobs", "top_logprobs", "best_of", "use_beam_search", "prompt_embeds", "tools",
                "return_token_ids", "prompt_logprobs")  # fmt: skip


class RequestError(Exception):
    """A request vLLM would refuse: HTTP status, message, error type and the offending parameter."""

    def __init__(self, message: str, status: int = 400, err_type: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status = status
        self.err_type = err_type
        self.param = param

    def body(self) -> bytes:
        return dumps({"error": {"message": str(self), "type": self.err_type, "param": self.param, "code": self.status}})


def dumps(obj: Any) -> bytes:
    """Compact JSON as pydantic's ``model_dump_json`` writes it."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{os.urandom(8).hex()}"


@dataclass
class ParsedRequest:
    chat: bool
    model: str
    stream: bool
    include_usage: bool
    continuous_usage: bool
    max_tokens: int | None
    cache_salt: str | None
    #: completions: the prompt (text or token ids); chat: the whole body (rendered by the tokenizer)
    prompt: str | list[int] | None = None
    body: dict[str, Any] = field(default_factory=dict)
    add_special_tokens: bool = True


def _int_field(body: dict[str, Any], key: str) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"{key} must be an integer", param=key)
    if v < 1:
        raise RequestError(f"{key} must be at least 1, got {v}", param=key)
    return v


def parse_request(body: Any, chat: bool, served: list[str]) -> ParsedRequest:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", err_type="Bad Request", param="body")
    model = body.get("model")
    if model is None:
        model = served[0]
    if model not in served:
        raise RequestError(
            f"The model `{model}` does not exist. Valid aliases: {', '.join(served)}.",
            status=404,
            err_type="NotFoundError",
            param="model",
        )
    for key in _UNSUPPORTED:
        if body.get(key) not in (None, False, 0, [], {}):
            raise RequestError(f"{key} is not supported by the vllm-llmd simulator", param=key)
    n = body.get("n")
    if n not in (None, 1):
        raise RequestError("n > 1 is not supported by the vllm-llmd simulator", param="n")
    stream = bool(body.get("stream", False))
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise RequestError("stream_options must be an object", param="stream_options")
    if opts and not stream:
        raise RequestError("Stream options can only be defined when `stream=True`.", param="stream_options")
    include_usage = bool(opts and opts.get("include_usage"))
    continuous = include_usage and bool(opts and opts.get("continuous_usage_stats"))
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise RequestError("Parameter 'cache_salt' must be a non-empty string if provided.", param="cache_salt")
    if chat:
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            raise RequestError("messages must be a non-empty list", param="messages")
        max_tokens = _int_field(body, "max_completion_tokens") or _int_field(body, "max_tokens")
        prompt = None
    else:
        prompt = _completion_prompt(body)
        max_tokens = _int_field(body, "max_tokens") if "max_tokens" in body else 16
    return ParsedRequest(
        chat=chat,
        model=model,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous,
        max_tokens=max_tokens,
        cache_salt=salt,
        prompt=prompt,
        body=body if chat else {},
        add_special_tokens=bool(body.get("add_special_tokens", not chat)),
    )


def _completion_prompt(body: dict[str, Any]) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
            raise RequestError(
                "prompt must be a string, a list of token ids or a list with one of those "
                "(batched prompts are not supported by the vllm-llmd simulator)",
                param="prompt",
            )
    elif not isinstance(prompt, str) or not prompt:
        raise RequestError(
            "Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)", param="prompt"
        )
    return prompt


def resolve_max_tokens(req: ParsedRequest, prompt_len: int, max_model_len: int) -> int:
    """``get_max_tokens`` of ``entrypoints/serve/utils/api_utils.py`` plus the renderer's length
    checks (vLLM tokenizes at most ``max_model_len + 1`` tokens, hence "at least")."""
    if prompt_len > max_model_len:
        n = max_model_len + 1
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt contains at "
            f"least {n} input tokens, which exceeds this limit even without any output tokens. Please reduce the "
            f"length of the input prompt. (parameter=input_tokens, value={n})",
            param="input_tokens",
        )
    if req.max_tokens is not None and req.max_tokens > max_model_len:
        raise RequestError(
            f"max_tokens={req.max_tokens} cannot be greater than max_model_len={max_model_len}. "
            f"Please request fewer output tokens. (parameter=max_tokens, value={req.max_tokens})",
            param="max_tokens",
        )
    room = max_model_len - prompt_len
    if room < 1:
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens and your prompt has {prompt_len}: "
            "no room is left for output tokens.",
            param="input_tokens",
        )
    return min(room, req.max_tokens) if req.max_tokens is not None else room


class ResponseWriter:
    """Builds one request's response bodies (stream chunks or the full JSON) in vLLM's format."""

    def __init__(self, req: ParsedRequest, request_id: str, fingerprint: str, details: bool) -> None:
        self.req = req
        self.id = request_id
        self.created = int(time.time())
        self.fingerprint = fingerprint
        self.details = details
        self.object = "chat.completion.chunk" if req.chat else "text_completion"

    def _head(self) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.req.model}

    @staticmethod
    def _usage(prompt: int, completion: int) -> dict[str, Any]:
        return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}

    def _details(self, cached: int | None, created: int | None, full: bool) -> dict[str, Any] | None:
        if not self.details:
            return None
        if self.req.chat:
            if cached is None and created is None:
                return None
            d: dict[str, Any] = {"cached_tokens": cached, "created_cache_tokens": created}
        else:
            if cached is None:
                return None
            d = {"cached_tokens": cached, "created_cache_tokens": None}
        if full:
            d["multimodal_tokens"] = None
        return {k: v for k, v in d.items() if full or v is not None}

    # ---- streaming ----------------------------------------------------------------------------------
    def first_chunk(self, prompt_tokens: int) -> bytes | None:
        """Chat streams open with the role; completions have no opening chunk."""
        if not self.req.chat:
            return None
        chunk = self._head()
        chunk["choices"] = [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        ]
        if self.req.continuous_usage:
            chunk["usage"] = {**self._usage(prompt_tokens, 0), "completion_tokens_details": None}
        chunk["prompt_token_ids"] = None
        chunk["prompt_text"] = None
        return b"data: " + dumps(chunk) + b"\n\n"

    def token_chunk(self, text: str, finish_reason: str | None, prompt_tokens: int, completion_tokens: int) -> bytes:
        chunk = self._head()
        if self.req.chat:
            choice: dict[str, Any] = {"index": 0, "delta": {"content": text}, "logprobs": None,
                                      "finish_reason": finish_reason}  # fmt: skip
            if finish_reason is not None:
                choice["stop_reason"] = None
            choice["token_ids"] = None
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason, "stop_reason": None,
                      "prompt_token_ids": None, "token_ids": None}  # fmt: skip
        chunk["choices"] = [choice]
        if finish_reason is not None and not self.req.include_usage:
            chunk["system_fingerprint"] = self.fingerprint
        if self.req.continuous_usage:
            usage = self._usage(prompt_tokens, completion_tokens)
            if self.req.chat:
                usage["completion_tokens_details"] = None
            chunk["usage"] = usage
        return b"data: " + dumps(chunk) + b"\n\n"

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached: int | None, created: int | None) -> bytes:
        chunk = self._head()
        chunk["choices"] = []
        usage = self._usage(prompt_tokens, completion_tokens)
        det = self._details(cached, created, full=False)
        if det is not None:
            usage["prompt_tokens_details"] = det
        chunk["usage"] = usage
        chunk["system_fingerprint"] = self.fingerprint
        return b"data: " + dumps(chunk) + b"\n\n"

    DONE = b"data: [DONE]\n\n"

    # ---- full response ------------------------------------------------------------------------------
    def full(
        self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int, cached: int | None,
        created: int | None,
    ) -> bytes:  # fmt: skip
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion" if self.req.chat else "text_completion",
            "created": self.created,
            "model": self.req.model,
        }
        if self.req.chat:
            message = {"role": "assistant", "content": text, "refusal": None, "annotations": None, "audio": None,
                       "function_call": None, "reasoning": None}  # fmt: skip
            body["choices"] = [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason,
                                "stop_reason": None, "token_ids": None, "routed_experts": None}]  # fmt: skip
        else:
            body["choices"] = [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason,
                                "stop_reason": None, "token_ids": None, "prompt_logprobs": None,
                                "prompt_token_ids": None, "routed_experts": None}]  # fmt: skip
        body["service_tier"] = None
        body["system_fingerprint"] = self.fingerprint
        usage = self._usage(prompt_tokens, completion_tokens)
        usage["prompt_tokens_details"] = self._details(cached, created, full=True)
        usage["completion_tokens_details"] = None
        body["usage"] = usage
        if self.req.chat:
            body["prompt_logprobs"] = None
            body["prompt_token_ids"] = None
            body["prompt_text"] = None
        body["kv_transfer_params"] = None
        body["ec_transfer_params"] = None
        body["metrics"] = None
        return dumps(body)


def models_body(served: list[str], root: str | None, max_model_len: int, created: int) -> bytes:
    data = []
    for name in served:
        perm = {"id": f"modelperm-{os.urandom(8).hex()}", "object": "model_permission", "created": created,
                "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False, "organization": "*",
                "group": None, "is_blocking": False}  # fmt: skip
        data.append({"id": name, "object": "model", "created": created, "owned_by": "vllm", "root": root,
                     "parent": None, "max_model_len": max_model_len, "permission": [perm]})  # fmt: skip
    return dumps({"object": "list", "data": data})
