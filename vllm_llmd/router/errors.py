"""Errors as the router answers them: always JSON in the OpenAI / vLLM ``ErrorResponse`` shape
``{"error": {"message", "type", "param", "code"}}`` (``vllm/entrypoints/serve/engine/protocol.py``),
never aiohttp's plain-text pages."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web

log = logging.getLogger(__name__)

_encoder = msgspec.json.Encoder()

#: OpenAI error ``type`` by HTTP status
ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    413: "RequestTooLargeError",
    415: "UnsupportedMediaTypeError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


class HTTPError(Exception):
    """An error answer: raised by any request stage, turned into a response by :func:`json_errors`."""

    def __init__(
        self,
        status: int,
        message: str,
        err_type: str | None = None,
        headers: dict[str, str] | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type or ERROR_TYPES.get(status, "Error")
        self.headers = headers
        #: close the connection after the answer (e.g. the body was not read to its end)
        self.close = close


def error_response(
    status: int, message: str, err_type: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    """An error in the OpenAI / vLLM ``ErrorResponse`` shape."""
    kind = err_type or ERROR_TYPES.get(status, "Error")
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.Response(status=status, body=_encoder.encode(body), content_type="application/json", headers=headers)


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error a handler raises, and every one it fails to catch, as a JSON error answer."""
    try:
        return await handler(request)
    except HTTPError as e:
        resp = error_response(e.status, e.message, e.err_type, e.headers)
        if e.close:
            resp.force_close()
        return resp
    except web.HTTPException as e:
        if e.status < 400:
            raise
        headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after")}
        return error_response(e.status, e.reason, None, headers or None)
    except RecursionError:
        return error_response(400, "the request nests too deeply", "BadRequestError")
    except Exception:
        log.exception("unexpected error handling %s %s", request.method, request.path)
        return error_response(500, "internal router error", "InternalServerError")
