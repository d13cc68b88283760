"""Optional API keys and TLS for the router's listener.

* **API keys** (``server.api_keys``, or ``--api-key`` / ``VLLM_LLMD_API_KEY`` like vLLM's
  ``--api-key`` / ``VLLM_API_KEY``): every request except ``/health``, ``/livez``, ``/readyz``
  and ``/metrics`` (probes and Prometheus) must carry ``Authorization: Bearer <one of the keys>``,
  compared in constant time; otherwise 401 in the OpenAI error shape, before its body is read.
  vLLM checks only ``/v1`` paths (``vllm/entrypoints/openai/server_utils.py``,
  ``AuthenticationMiddleware``); the router checks every forwarded path, ``/tokenize`` and
  ``/version`` included. The header is forwarded to the pods as sent (pods started with the same
  ``--api-key`` accept it).
* **TLS** (``server.tls_cert``, ``server.tls_key``): the listener speaks HTTPS (``ssl.SSLContext``
  with the server defaults of ``ssl.create_default_context``).
"""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web

from vllm_llmd.router.errors import error_response

#: paths that never need a key (liveness/readiness probes, Prometheus)
OPEN_PATHS = frozenset({"/health", "/livez", "/readyz", "/metrics"})


def key_middleware(keys: Iterable[str]) -> Callable[..., Awaitable[web.StreamResponse]]:
    wanted = [k.encode() for k in keys]

    @web.middleware
    async def check_key(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path not in OPEN_PATHS:
            auth = request.headers.get("Authorization", "")
            scheme, _, token = auth.partition(" ")
            given = token.strip().encode() if scheme.lower() == "bearer" else b""
            # every key is compared (constant time per key, and the same work whichever matches)
            ok = False
            for k in wanted:
                ok |= hmac.compare_digest(given, k)
            if not ok:
                resp = error_response(401, "invalid or missing API key", "AuthenticationError")
                resp.headers["WWW-Authenticate"] = "Bearer"
                return resp
        return await handler(request)

    return check_key


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx
