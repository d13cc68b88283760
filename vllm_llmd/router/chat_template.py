"""Chat conversations rendered to prompt text the way vLLM 0.32 renders them.

vLLM renders ``tokenizer_config.json``'s ``chat_template`` with transformers'
``render_jinja_template`` (``transformers/utils/chat_template_utils.py``: an
``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with ``tojson``,
``raise_exception`` and ``strftime_now``; the special tokens of the tokenizer are passed as
variables), with ``add_generation_prompt=True`` by default. Content given as a list of parts is
joined with ``"\\n"`` (``vllm/renderers/chat_utils.py``).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any


def content_text(content: Any) -> str:
    """A message's ``content`` as text (a list of parts: its text parts joined with ``\\n``)."""
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


class ChatTemplate:
    """A compiled ``chat_template`` plus the special-token variables it is rendered with."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        self._template = _compile(source)
        self._special = dict(special_tokens)

    def render(self, body: dict[str, Any]) -> str:
        """The prompt text of an OpenAI chat request ``body`` (``ValueError`` on a bad conversation)."""
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise ValueError("'messages' must be a list")
        conv = []
        for m in messages:
            if not isinstance(m, dict):
                raise ValueError("each message must be an object")
            m2 = dict(m)
            m2["content"] = content_text(m.get("content"))
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


def _compile(source: str) -> Any:
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
