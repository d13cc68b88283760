"""The seam between the ext_proc protocol (``vllm_llmd.gateway.extproc``) and whatever decides.

The gateway only translates Envoy's messages; a :class:`Picker` owns the decision and the load
accounting of one request from pick to end. Today :mod:`vllm_llmd.gateway.router_picker` adapts the
router's objects; once the router's request path is split into stages, a picker over those stages
replaces it without touching the protocol code.

Lifecycle of one request (each hook is called at most once, except ``on_response_data``)::

    pick(path, headers, body) -> Pick | Reject
      on_response_headers(pick, status, served)     the pod's (or Envoy's local) response status
      on_first_byte(pick)                           first body chunk of a watched stream, else at headers
      on_response_data(pick, chunk)                 every chunk of a watched (SSE) stream
      on_response_end(pick, complete)               always: the HTTP stream ended or was aborted

``on_response_end`` is guaranteed (the gRPC stream's end), so in-flight accounting is released for
requests Envoy aborts (client gone, no pod answered, stream reset) as well as for finished ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(slots=True)
class Pick:
    """A routing decision. ``endpoints``: ``ip:port`` best first; Envoy tries the first and, on a
    connect failure or reset before response headers, the next ones. Empty: no opinion (Envoy's own
    load balancing, e.g. for ``GET /v1/models``)."""

    endpoints: list[str]
    #: replacement request body (e.g. a client's ``kv_transfer_params`` stripped); ``None``: as sent
    body: bytes | None = None
    #: the picker's own bookkeeping for this request (opaque to the gateway)
    attempt: Any = None
    #: ``time.perf_counter()`` when Envoy's request headers reached the gateway (set by it; 0: unknown)
    started: float = 0.0


@dataclass(slots=True)
class Reject:
    """Answer the client directly (Envoy's ``ImmediateResponse``) in the OpenAI error shape."""

    status: int
    message: str
    err_type: str
    headers: Mapping[str, str] = field(default_factory=dict)


class Picker(Protocol):
    async def pick(self, path: str, headers: Mapping[str, str], body: bytes) -> Pick | Reject:
        """Decide for one request. ``headers`` have lower-case names (HTTP/2 style, incl. ``:path``).
        Raising is a picker failure: Envoy then fails open or closed (``failure_mode_allow``)."""
        ...

    def on_response_headers(self, pick: Pick, status: int, served: str | None) -> Mapping[str, str]:
        """The response started; ``served``: the endpoint Envoy finally used (``None`` if Envoy did
        not say). Returns headers to add to the client's response."""
        ...

    def on_first_byte(self, pick: Pick) -> None: ...

    def on_response_data(self, pick: Pick, data: bytes) -> None: ...

    def on_response_end(self, pick: Pick, complete: bool) -> None:
        """``complete``: the response was delivered to its end; ``False``: aborted or unknown."""
        ...
