"""Envoy's ``ext_proc`` protocol (``envoy.service.ext_proc.v3.ExternalProcessor/Process``, a gRPC
bidirectional stream per HTTP request) spoken the way the Gateway API Inference Extension's endpoint
picker speaks it (its ``docs/proposals/004-endpoint-picker-protocol``), over a :class:`Picker`.

Messages of one HTTP request, with the processing mode of ``vllm_llmd.gateway.envoy_config``:

1. ``request_headers`` (end_of_stream false): answered at once with CONTINUE; Envoy holds the
   headers and buffers the body (BUFFERED mode).
2. ``request_body`` (the whole body; end_of_stream true): the picker decides. The answer carries
   the destination twice, as the protocol requires, with the same value ``ip:port[,ip:port...]``:
   the request header ``x-gateway-destination-endpoint`` (overwriting any client-sent one) and the
   dynamic metadata ``envoy.lb / x-gateway-destination-endpoint``; a replacement body if the picker
   rewrote it. A rejection is an ``ImmediateResponse`` in the OpenAI error shape. (A request without
   a body, e.g. a GET, is decided on its headers.)
3. ``response_headers``: status and, in ``metadata_context``, ``envoy.lb /
   x-gateway-destination-endpoint-served`` (set by Envoy's override_host load balancer): the pod
   that really served after Envoy's retries. For ``text/event-stream`` answers the reply switches
   this request's response body to STREAMED (``mode_override``; the Envoy filter needs
   ``allow_mode_override``) so the first chunk marks the first token; other answers count their
   first byte here.
4. ``response_body`` chunks (watched streams only): answered with CONTINUE, unmodified.
5. The gRPC stream ends (Envoy closes it when the HTTP stream is done or aborted): the picker's
   ``on_response_end`` releases the request's load, whatever happened before.

Envoy announces its processing mode (``protocol_config``) on the first message; a mode this
servicer cannot speak (a request body not BUFFERED, a FULL_DUPLEX_STREAMED response) ends the
stream with ``FAILED_PRECONDITION`` and one error log naming the setting.

Bounded input: the body is refused with 413 past ``max_body_bytes`` (Envoy's own buffer limit is
the first bound, see ``envoy_config``); gRPC messages are capped by the server's
``max_receive_message_length``. A picker that raises ends the stream with gRPC ``INTERNAL``; Envoy
then fails closed (500) or open (forwards without a destination) per its ``failure_mode_allow``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from prometheus_client import CollectorRegistry, Counter

from vllm_llmd.gateway.envoy_config import DESTINATION, LB_NAMESPACE, SERVED
from vllm_llmd.gateway.picker import Pick, Picker, Reject
from vllm_llmd.router.errors import error_response

log = logging.getLogger(__name__)

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_REQ_HEADERS_CONTINUE = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
_RESP_BODY_CONTINUE = pb.ProcessingResponse(response_body=pb.BodyResponse())
_REQ_TRAILERS_CONTINUE = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
_RESP_TRAILERS_CONTINUE = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
_MODE = processing_mode_pb2.ProcessingMode
_STREAMED = _MODE.STREAMED
#: body modes this servicer speaks (it never echoes bodies, as FULL_DUPLEX_STREAMED would need)
_REQUEST_BODY_MODES = frozenset((_MODE.BUFFERED,))
_RESPONSE_BODY_MODES = frozenset((_MODE.NONE, _MODE.STREAMED))


def unsupported_mode(pc: Any) -> str | None:
    """Why Envoy's announced ``protocol_config`` cannot work with this servicer, or ``None``."""
    if pc.request_body_mode not in _REQUEST_BODY_MODES:
        return f"request_body_mode {_MODE.BodySendMode.Name(pc.request_body_mode)}: the picker needs BUFFERED"
    if pc.response_body_mode not in _RESPONSE_BODY_MODES:
        return f"response_body_mode {_MODE.BodySendMode.Name(pc.response_body_mode)}: use NONE (or STREAMED)"
    return None


def _header(key: str, value: str | bytes) -> base_pb2.HeaderValueOption:
    raw = value.encode("latin-1") if isinstance(value, str) else value
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, raw_value=raw), append_action=_OVERWRITE)


def _headers_dict(hm: Any) -> dict[str, str]:
    """Envoy ``HeaderMap`` -> ``{lower-case name: value}`` (``raw_value`` since Envoy 1.2x, else ``value``).
    Each field of a upb message is read once (every read builds a new Python object)."""
    out: dict[str, str] = {}
    for h in hm.headers:
        raw = h.raw_value
        out[h.key] = raw.decode("latin-1") if raw else h.value
    return out


def _status_and_type(hm: Any) -> tuple[int, str]:
    """``:status`` and ``content-type`` of a response ``HeaderMap`` (all the servicer reads of it)."""
    status, ctype = 0, ""
    for h in hm.headers:
        key = h.key
        if key == ":status" or key == "content-type":
            raw = h.raw_value
            value = raw.decode("latin-1") if raw else h.value
            if key == ":status":
                status = int(value) if value.isdigit() else 0
            else:
                ctype = value
    return status, ctype


def immediate(rej: Reject) -> pb.ProcessingResponse:
    """An ``ImmediateResponse`` in the OpenAI/vLLM error shape (the router's ``error_response``)."""
    body = error_response(rej.status, rej.message, rej.err_type).body
    assert isinstance(body, bytes)
    hdrs = [_header("content-type", "application/json")]
    hdrs += [_header(k.lower(), v) for k, v in rej.headers.items()]
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=rej.status),
            headers=pb.HeaderMutation(set_headers=hdrs),
            body=body,
            details=f"llmd_{rej.err_type}",
        )
    )


#: answers to a request body naming endpoints and keeping the body, by endpoint list: built once
#: (a few hundred distinct lists in a fleet); cleared when it reaches the bound
_PICKED: dict[str, pb.ProcessingResponse] = {}
_PICKED_MAX = 4096


def picked_response(pick: Pick) -> pb.ProcessingResponse:
    """The ``request_body`` answer for ``pick`` (cached when it names endpoints and keeps the body;
    the message is only ever serialized, never changed, once built)."""
    if pick.body is None and pick.endpoints:
        key = ",".join(pick.endpoints)
        out = _PICKED.get(key)
        if out is None:
            if len(_PICKED) >= _PICKED_MAX:
                _PICKED.clear()
            common, meta = destination_common(pick)
            out = _PICKED[key] = pb.ProcessingResponse(
                request_body=pb.BodyResponse(response=common), dynamic_metadata=meta
            )
        return out
    common, meta = destination_common(pick)
    return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common), dynamic_metadata=meta)


def destination_common(pick: Pick) -> tuple[pb.CommonResponse, struct_pb2.Struct | None]:
    """The header mutation (+ body) and the ``envoy.lb`` metadata naming ``pick.endpoints``."""
    if not pick.endpoints:
        common = pb.CommonResponse()
        meta = None
    else:
        value = ",".join(pick.endpoints)
        common = pb.CommonResponse(header_mutation=pb.HeaderMutation(set_headers=[_header(DESTINATION, value)]))
        meta = struct_pb2.Struct()
        meta.fields[LB_NAMESPACE].struct_value.fields[DESTINATION].string_value = value
    if pick.body is not None:
        common.body_mutation.body = pick.body
        common.header_mutation.set_headers.append(_header("content-length", str(len(pick.body))))
    return common, meta


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        c = Counter(
            "llmd_gateway_extproc_streams",
            "ext_proc streams by outcome (picked, passthrough, rejected, failed, aborted)",
            ["outcome"],
            registry=registry,
        )
        self.picked, self.passthrough, self.rejected = c.labels("picked"), c.labels("passthrough"), c.labels("rejected")
        self.failed, self.aborted = c.labels("failed"), c.labels("aborted")


class ExtProcServicer(pb_grpc.ExternalProcessorServicer):
    def __init__(
        self,
        picker: Picker,
        max_body_bytes: int,
        watch_streams: bool = True,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.picker = picker
        self.max_body_bytes = max_body_bytes
        self.watch_streams = watch_streams
        self.metrics = GatewayMetrics(registry)
        self._mode_warned = False

    async def _decide(self, path: str, headers: Mapping[str, str], body: bytes, context: Any) -> Pick | Reject:
        """The picker's answer, counted (rejected, picked or passed through); a picker error aborts the stream."""
        try:
            res = await self.picker.pick(path, headers, body)
        except Exception as e:
            self.metrics.failed.inc()
            log.exception("picker failed on %s", path)
            await context.abort(grpc.StatusCode.INTERNAL, f"picker failed: {type(e).__name__}: {e}")
            raise  # not reached: abort raises
        if isinstance(res, Reject):
            self.metrics.rejected.inc()
        else:
            (self.metrics.picked if res.endpoints else self.metrics.passthrough).inc()
        return res

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: Any
    ) -> AsyncIterator[pb.ProcessingResponse]:
        picker = self.picker
        pick: Pick | None = None
        path = ""
        started = 0.0
        headers: dict[str, str] = {}
        size = 0
        watching = first = False
        #: the response reached its end (headers with end_of_stream, or the last watched chunk), or
        #: started and is not watched (then the stream's close is its end)
        complete = False
        ended = False
        try:
            async for req in request_iterator:
                kind = req.WhichOneof("request")
                if kind == "request_body":
                    body = req.request_body.body  # read once: each read copies the bytes out of upb
                    size += len(body)
                    if size > self.max_body_bytes:
                        self.metrics.rejected.inc()
                        yield immediate(
                            Reject(413, f"request body exceeds {self.max_body_bytes} bytes", "RequestTooLargeError")
                        )
                        return
                    res = await self._decide(path, headers, body, context)
                    if isinstance(res, Reject):
                        yield immediate(res)
                        return
                    pick = res
                    pick.started = started
                    yield picked_response(pick)
                elif kind == "request_headers":
                    started = time.perf_counter()  # the request's latency counts from here
                    if req.HasField("protocol_config"):
                        why = unsupported_mode(req.protocol_config)
                        if why is not None:
                            self.metrics.failed.inc()
                            if not self._mode_warned:
                                self._mode_warned = True
                                log.error(
                                    "Envoy's ext_proc processing mode is unsupported (%s): see docs/gateway.md", why
                                )
                            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"vllm-llmd picker: {why}")
                    rh = req.request_headers
                    headers = _headers_dict(rh.headers)
                    path = headers.get(":path", "")
                    if not rh.end_of_stream:
                        yield _REQ_HEADERS_CONTINUE
                        continue
                    res = await self._decide(path, headers, b"", context)
                    if isinstance(res, Reject):
                        yield immediate(res)
                        return
                    pick = res
                    pick.started = started
                    common, meta = destination_common(pick)
                    yield pb.ProcessingResponse(
                        request_headers=pb.HeadersResponse(response=common), dynamic_metadata=meta
                    )
                elif kind == "response_headers":
                    rh = req.response_headers
                    if pick is None:
                        yield pb.ProcessingResponse(response_headers=pb.HeadersResponse())
                        continue
                    status, ctype = _status_and_type(rh.headers)
                    served = None
                    fm = req.metadata_context.filter_metadata
                    if LB_NAMESPACE in fm:
                        v = fm[LB_NAMESPACE].fields.get(SERVED)
                        served = v.string_value if v is not None else None
                    extra = picker.on_response_headers(pick, status, served)
                    out = pb.ProcessingResponse(
                        response_headers=pb.HeadersResponse(
                            response=pb.CommonResponse(
                                header_mutation=pb.HeaderMutation(set_headers=[_header(k, v) for k, v in extra.items()])
                            )
                        )
                    )
                    if rh.end_of_stream:
                        complete = ended = True
                        picker.on_first_byte(pick)
                        picker.on_response_end(pick, True)
                    elif self.watch_streams and ctype.startswith("text/event-stream"):
                        watching = first = True
                        out.mode_override.response_body_mode = _STREAMED
                    else:
                        complete = True
                        picker.on_first_byte(pick)
                    yield out
                elif kind == "response_body":
                    if pick is not None and watching:
                        rb = req.response_body
                        if first:
                            first = False
                            picker.on_first_byte(pick)
                        if rb.body:
                            picker.on_response_data(pick, rb.body)
                        if rb.end_of_stream and not ended:
                            complete = ended = True
                            picker.on_response_end(pick, True)
                    yield _RESP_BODY_CONTINUE
                elif kind == "request_trailers":
                    yield _REQ_TRAILERS_CONTINUE
                elif kind == "response_trailers":
                    yield _RESP_TRAILERS_CONTINUE
        finally:
            # Envoy closed the stream (or reset it): the HTTP stream is over, one way or another
            if pick is not None and not ended:
                if not complete:
                    self.metrics.aborted.inc()
                picker.on_response_end(pick, complete)
