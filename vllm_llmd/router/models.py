"""Pools per model: which models and LoRA adapters each pod serves, and the router's model list.

Each pod's ``GET /v1/models`` is read when it becomes healthy and every ``pool.models_interval_s``
after (:meth:`~.pool.PodPool.check_health`). vLLM lists its served model names and every LoRA
adapter it has registered (``--lora-modules``, or loaded at run time): an adapter's card has
``parent`` = the base model's name (``vllm/entrypoints/openai/models/serving.py``,
``OpenAIServingModels.show_available_models``; ``ModelCard`` in
``vllm/entrypoints/openai/models/protocol.py``). A pod whose ``models`` are set in the
configuration is not asked.

A request goes only to pods serving its ``model``: a pod whose list is not known yet (not read, or
a backend without ``/v1/models``) is taken to serve the configured ``models`` (every model when none
are configured). A model no pod serves and the configuration does not list is a 404; one served
only by pods that are unavailable now is a 503. The router's ``/v1/models`` is the union of the
pods' cards (the first pod's card for each id) plus the configured names no pod reported.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

from vllm_llmd.router.errors import HTTPError

log = logging.getLogger(__name__)

#: a pod's model list is small; a larger answer is not read
MAX_MODELS_BYTES = 1 << 20
#: cards kept per pod (adapters included); a pod listing more is read up to this many
MAX_MODELS_PER_POD = 4096

_decoder = msgspec.json.Decoder()


@dataclass(frozen=True, slots=True)
class ServedModels:
    """What one pod reported on ``/v1/models``."""

    #: model ids (base models and adapters)
    ids: frozenset[str]
    #: the adapters among them (cards with a ``parent``)
    adapters: frozenset[str]
    #: the cards as the pod sent them, in its order
    cards: tuple[dict[str, Any], ...]
    read_at: float


def parse_models(body: bytes, now: float | None = None) -> ServedModels | None:
    """An OpenAI ``/v1/models`` answer -> :class:`ServedModels` (``None`` if it is not one)."""
    try:
        data = _decoder.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return None
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list):
        return None
    cards = []
    for card in items[:MAX_MODELS_PER_POD]:
        if isinstance(card, dict) and isinstance(card.get("id"), str) and card["id"]:
            cards.append(card)
    ids = frozenset(c["id"] for c in cards)
    adapters = frozenset(c["id"] for c in cards if isinstance(c.get("parent"), str) and c["parent"])
    return ServedModels(ids, adapters, tuple(cards), time.monotonic() if now is None else now)


async def fetch_models(session: aiohttp.ClientSession, url: str, timeout_s: float) -> ServedModels | None:
    """``GET url/v1/models``; ``None`` when the pod does not answer one (it keeps its last list)."""
    try:
        async with (
            asyncio.timeout(timeout_s),
            session.get(url + "/v1/models") as r,
        ):
            if r.status != 200:
                return None
            body = await r.content.read(MAX_MODELS_BYTES + 1)
    except (TimeoutError, aiohttp.ClientError, OSError):
        return None
    if len(body) > MAX_MODELS_BYTES:
        log.warning("%s/v1/models is over %d bytes: not read", url, MAX_MODELS_BYTES)
        return None
    return parse_models(body)


class ModelCatalog:
    """Which pods serve which model, from the pods' lists and the configured ``models``."""

    def __init__(self, configured: Iterable[str]) -> None:
        self.configured = tuple(configured)
        self._configured = frozenset(self.configured)

    def serves(self, pod: Any, model: str) -> bool:
        """``pod``: a :class:`~.pool.Pod` (its ``config.models`` or its ``served`` list)."""
        static = pod.config.models
        if static is not None:
            return model in static
        served: ServedModels | None = pod.served
        if served is not None:
            return model in served.ids
        return not self._configured or model in self._configured

    def is_adapter(self, pods: Iterable[Any], model: str) -> bool:
        return any(p.served is not None and model in p.served.adapters for p in pods)

    def select(self, model: str, available: list[Any], every: list[Any]) -> list[Any]:
        """The available pods serving ``model``: a 404 when no pod serves it and it is not configured,
        a 503 (the caller's) when none of those serving it is available."""
        out = [p for p in available if self.serves(p, model)]
        if not out and model not in self._configured and not any(self.serves(p, model) for p in every):
            raise HTTPError(404, f"The model `{model}` does not exist.", "NotFoundError")
        return out

    def listing(self, pods: Iterable[Any]) -> list[dict[str, Any]] | None:
        """The union of the pods' cards and the configured names; ``None`` when nothing is known."""
        seen: dict[str, dict[str, Any]] = {}
        for p in pods:
            static = p.config.models
            cards = p.served.cards if p.served is not None else ()
            for c in cards:
                seen.setdefault(c["id"], c)
            for name in static or ():
                seen.setdefault(name, _card(name))
        for name in self.configured:
            seen.setdefault(name, _card(name))
        return list(seen.values()) or None


def _card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "vllm-llmd", "root": name}
