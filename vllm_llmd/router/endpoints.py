"""The endpoints the router passes through, and where each keeps the prompt it is routed by.

vLLM 0.32's OpenAI-compatible server (``vllm/entrypoints/*/api_router.py``) serves, besides
completions and chat: embeddings (``/v1/embeddings``, ``/v2/embed``), ``/pooling``, ``/classify``,
score and rerank (``/score``, ``/v1/score``, ``/rerank``, ``/v1/rerank``, ``/v2/rerank``), the
Responses API (``/v1/responses``), Anthropic's ``/v1/messages`` (and ``/count_tokens``),
``/tokenize`` / ``/detokenize``, the ``*/render`` endpoints, audio transcription and translation.
Each is routed like a completion by the prompt it carries (:class:`Endpoint` ``prompt``): its
tokens and block keys, so a prompt shared with earlier requests goes where its KV is (pooling
endpoints only use the prefix view's load side when the engine does not cache their prefixes);
endpoints without a prompt (``/detokenize``, audio: multipart bodies) go to the least-loaded
healthy pod serving the request's model. Only completions and chat are disaggregated (P/D).

Not passed through (a JSON 404 like any unknown path): vLLM's operator endpoints (``/sleep``,
``/wake_up``, ``/pause``, ``/reset_prefix_cache``, ``/collective_rpc``, profiling, weight updates,
``/v1/load_lora_adapter`` ...): a client must not reach a pod's administration through the router.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: where the routing prompt is: ``prompt`` (text or token ids; ``messages`` too for /tokenize),
#: ``messages`` (a chat), ``input`` (text, token ids, or Responses API items), ``query`` (score and
#: rerank: the query, the shared head of every pair), ``none`` (JSON without a prompt), ``raw``
#: (a body that is not JSON: passed as it came)
PromptKind = Literal["prompt", "messages", "input", "query", "none", "raw"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An endpoint the router serves by forwarding it to a pod."""

    path: str
    #: the body is a chat: its ``messages`` are the prompt (rendered with the chat template)
    chat: bool
    prompt: PromptKind = "prompt"
    #: output-budget fields, first found wins (empty: the endpoint generates nothing)
    budget: tuple[str, ...] = ("max_tokens", "max_completion_tokens")
    #: may be disaggregated (prefill leg + decode)
    pd: bool = False
    #: the body may carry ``messages`` instead of its usual prompt (vLLM's chat-style embeddings,
    #: pooling, classify and /tokenize requests)
    messages_too: bool = False


COMPLETIONS = Endpoint("/v1/completions", chat=False, pd=True)
CHAT = Endpoint(
    "/v1/chat/completions", chat=True, prompt="messages", budget=("max_completion_tokens", "max_tokens"), pd=True
)

_POOLING = [
    Endpoint(p, chat=False, prompt="input", budget=(), messages_too=True)
    for p in ("/v1/embeddings", "/v2/embed", "/pooling", "/classify")
]
_SCORING = [
    Endpoint(p, chat=False, prompt="query", budget=())
    for p in ("/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank")
]

#: every POST endpoint the router forwards, by path
POST_ENDPOINTS: dict[str, Endpoint] = {
    e.path: e
    for e in [
        COMPLETIONS,
        CHAT,
        *_POOLING,
        *_SCORING,
        Endpoint("/v1/responses", chat=False, prompt="input", budget=("max_output_tokens",)),
        Endpoint("/v1/messages", chat=True, prompt="messages", budget=("max_tokens",)),
        Endpoint("/v1/messages/count_tokens", chat=True, prompt="messages", budget=()),
        Endpoint("/tokenize", chat=False, prompt="prompt", budget=(), messages_too=True),
        Endpoint("/detokenize", chat=False, prompt="none", budget=()),
        Endpoint("/v1/chat/completions/render", chat=True, prompt="messages", budget=()),
        Endpoint("/v1/completions/render", chat=False, prompt="prompt", budget=()),
        Endpoint("/v1/responses/render", chat=False, prompt="input", budget=()),
        Endpoint("/v1/audio/transcriptions", chat=False, prompt="raw", budget=()),
        Endpoint("/v1/audio/translations", chat=False, prompt="raw", budget=()),
    ]
}
#: GET endpoints answered by any healthy pod
GET_ENDPOINTS = ("/version",)
