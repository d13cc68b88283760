"""Chat conversations rendered to prompt text the way vLLM 0.32 renders them.

vLLM renders ``tokenizer_config.json``'s ``chat_template`` with transformers'
``render_jinja_template`` (``transformers/utils/chat_template_utils.py``: an
``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with ``tojson``,
``raise_exception`` and ``strftime_now``; the special tokens of the tokenizer are passed as
variables), with ``add_generation_prompt=True`` by default. Content given as a list of parts is
joined with ``"\\n"`` (``vllm/renderers/chat_utils.py``).

Which template: :func:`resolve_chat_template` follows vLLM 0.32's ``resolve_chat_template``
(``vllm/renderers/hf.py``): the server's ``--chat-template`` first (a file, else the literal
template: ``vllm/renderers/chat_utils.py``, ``_load_chat_template``), then the tokenizer's own as
transformers loads it (``PreTrainedTokenizerBase.from_pretrained`` in
``transformers/tokenization_utils_base.py``): ``chat_template.jinja`` and
``additional_chat_templates/*.jinja`` in the model directory take priority over
``tokenizer_config.json``'s ``chat_template`` (a string, or named templates of which ``default``
is used).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

from vllm_llmd.router.config import ConfigError

log = logging.getLogger(__name__)

#: transformers' file names (``transformers/utils/hub.py``: CHAT_TEMPLATE_FILE, CHAT_TEMPLATE_DIR)
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"


class ChatTemplateError(ConfigError):
    """A ``--chat-template`` that is neither a readable file nor a template."""


def load_template_arg(value: str) -> str:
    """``--chat-template``: a file's text, or the value itself when it looks like a template
    (vLLM's ``_load_chat_template``: a value without ``{``, ``}`` or a newline must be a file)."""
    try:
        return Path(value).read_text()
    except OSError as e:
        if not any(c in value for c in "{}\n"):
            raise ChatTemplateError(f"chat template {value!r} looks like a file path but cannot be read: {e}") from e
        return value


def tokenizer_chat_template(model_dir: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """The model directory's default chat template as transformers loads it, or ``None``."""
    templates: dict[str, str] = {}
    f = model_dir / CHAT_TEMPLATE_FILE
    if f.is_file():
        templates["default"] = f.read_text(encoding="utf-8")
    d = model_dir / CHAT_TEMPLATE_DIR
    if d.is_dir():
        for t in sorted(d.glob("*.jinja")):
            templates[t.name.removesuffix(".jinja")] = t.read_text(encoding="utf-8")
    if templates:  # the files win over tokenizer_config.json
        return templates.get("default")
    tmpl = tokenizer_config.get("chat_template")
    if isinstance(tmpl, list):  # named templates: vLLM asks for none, so "default"
        tmpl = next((t.get("template") for t in tmpl if isinstance(t, dict) and t.get("name") == "default"), None)
    return tmpl if isinstance(tmpl, str) else None


def resolve_chat_template(
    model_dir: Path, tokenizer_config: dict[str, Any], override: str | None = None
) -> ChatTemplate | None:
    """The template chat requests are rendered with (``override``: the ``--chat-template`` value)."""
    if override is not None:
        source: str | None = load_template_arg(override)
    else:
        source = tokenizer_chat_template(model_dir, tokenizer_config)
    if source is None:
        return None
    special: dict[str, str] = {}
    for k in ("bos_token", "eos_token", "unk_token", "pad_token"):
        v = tokenizer_config.get(k)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            special[k] = v
    return ChatTemplate(source, special)


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
