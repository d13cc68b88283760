"""OpenTelemetry tracing of the proxy: ``server.otlp_traces_endpoint`` (``--otlp-traces-endpoint``),
the ``otel`` extra (``pip install 'vllm-llmd[otel]'``).

Set up as vLLM sets up its own (``vllm/tracing/otel.py``: ``init_otel_tracer``,
``get_span_exporter``): the endpoint is an OTLP collector, ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL``
picks ``grpc`` (default) or ``http/protobuf``, spans leave in batches (``BatchSpanProcessor``); the
resource is ``service.name=vllm-llmd-router`` unless ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES``
say otherwise. A request's trace holds:

* the **server span** of the maintained aiohttp server instrumentation
  (``opentelemetry-instrumentation-aiohttp-server``, ``create_aiohttp_middleware``), which continues
  a client's W3C ``traceparent`` (the global propagator);
* ``llmd.route`` (its child): stages 2-4's choice, with the attributes in :func:`decided`: the pod
  chosen, the ranking, each scorer's score of that pod, predicted cached and prompt tokens, and
  ``llmd.pd`` (``colocated``: no P/D on this path; ``aggregated``: the decider kept it on one pod;
  ``disaggregated``: a prefill leg was chosen);
* one **client span per upstream leg** (``opentelemetry-instrumentation-aiohttp-client``,
  ``create_trace_config``), children of the server span, with ``llmd.pod`` and, with P/D,
  ``llmd.leg`` (``prefill`` / ``decode``). Each writes ``traceparent`` into its leg's headers, which
  vLLM's API server reads (``vllm/tracing/otel.py``, ``extract_trace_context``) when the engine runs
  with ``--otlp-traces-endpoint``, so the engine's ``llm_request`` span joins the same trace.

The pool's background HTTP (health checks, metrics scrapes, model lists) runs with HTTP
instrumentation suppressed (``opentelemetry.instrumentation.utils.suppress_http_instrumentation``).
Off (the default) nothing of OpenTelemetry is imported and the request path only checks ``None``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from vllm_llmd.router.config import ConfigError

if TYPE_CHECKING:
    import aiohttp

    from vllm_llmd.router.scheduling import Decision, SchedRequest

EXTRA_HINT = "pip install 'vllm-llmd[otel]'"
#: the leg an upstream request is (``prefill`` / ``decode`` with P/D; unset when colocated)
LEG: ContextVar[str | None] = ContextVar("llmd_leg", default=None)


def _require() -> None:
    try:
        import opentelemetry.instrumentation.aiohttp_client
        import opentelemetry.instrumentation.aiohttp_server
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"tracing (server.otlp_traces_endpoint) needs the otel extra ({EXTRA_HINT}): {e}") from e


def exporter_provider(endpoint: str) -> Any:
    """A tracer provider batching spans to the OTLP collector at ``endpoint``, as vLLM's."""
    _require()
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")
    exporter: Any
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True)
        elif protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

            exporter = HttpExporter(endpoint=endpoint)
        else:
            raise ConfigError(f"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL={protocol!r}: grpc or http/protobuf")
    except ImportError as e:
        # xds-protos (the gateway extra) ships its own, older copy of opentelemetry-proto's modules:
        # installed after opentelemetry-proto, it replaces them (docs/router.md, scripts/setup-env.sh)
        raise ConfigError(
            f"the OTLP exporter cannot be imported ({e}); if xds-protos replaced opentelemetry-proto's files, "
            "reinstall it: pip install --force-reinstall --no-deps opentelemetry-proto==<its installed version>"
        ) from e
    attrs = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": "vllm-llmd-router"}
    provider = TracerProvider(resource=Resource.create(attrs))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _leg_hook(span: Any, params: aiohttp.TraceRequestStartParams) -> None:
    if span is None or not span.is_recording():
        return
    span.set_attribute("llmd.pod", f"{params.url.host}:{params.url.port}")
    leg = LEG.get()
    if leg is not None:
        span.set_attribute("llmd.leg", leg)


class Tracing:
    """The tracer provider and what the proxy hangs on its server, client session and request path."""

    def __init__(self, provider: Any, owned: bool = False) -> None:
        """``owned``: the provider was made here (:func:`exporter_provider`) and is shut down with
        the router; a caller's own provider is left to the caller."""
        _require()
        from opentelemetry.trace import SpanKind, StatusCode

        self.provider = provider
        self.owned = owned
        self.tracer = provider.get_tracer("vllm_llmd.router")
        self._internal = SpanKind.INTERNAL
        self._error = StatusCode.ERROR

    def server_middleware(self) -> Any | None:
        """The aiohttp server instrumentation's middleware for our own application. Its module keeps
        its settings in globals that ``instrument()`` fills (excluded URLs, semconv mode, meters), so
        it is instrumented and at once un-instrumented, leaving ``web.Application`` unpatched.
        ``None`` when the process is instrumented already (``opentelemetry-instrument``): every
        ``web.Application`` then has the middleware."""
        from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor, create_aiohttp_middleware

        inst = AioHttpServerInstrumentor()
        if inst.is_instrumented_by_opentelemetry:
            return None
        inst.instrument(tracer_provider=self.provider)
        if not inst.is_instrumented_by_opentelemetry:  # it refuses on a dependency conflict (and logs why)
            raise ConfigError("opentelemetry-instrumentation-aiohttp-server refused to instrument aiohttp")
        inst.uninstrument()
        return create_aiohttp_middleware(tracer_provider=self.provider)

    def client_trace_config(self) -> aiohttp.TraceConfig:
        from opentelemetry.instrumentation.aiohttp_client import create_trace_config

        return create_trace_config(request_hook=_leg_hook, tracer_provider=self.provider)

    @staticmethod
    def background() -> contextlib.AbstractContextManager[Any]:
        """Tasks started inside are not traced (health checks, scrapes)."""
        from opentelemetry.instrumentation.utils import suppress_http_instrumentation

        return suppress_http_instrumentation()

    def route_span(self) -> Any:
        """``llmd.route``, a child of the current (server) span; not made current: the legs that
        follow are the server span's children."""
        return self.tracer.start_span("llmd.route", kind=self._internal)

    @staticmethod
    def decided(span: Any, model: str, req: SchedRequest, decision: Decision) -> None:
        if not span.is_recording():
            return
        pid = decision.chosen.id
        span.set_attribute("llmd.model", model)
        span.set_attribute("llmd.pod", pid)
        span.set_attribute("llmd.ranked", [c.id for c in decision.ranked])
        span.set_attribute("llmd.predicted_cached_tokens", decision.predicted_cached_tokens)
        span.set_attribute("llmd.prompt_tokens", req.prompt_tokens)
        span.set_attribute("llmd.scorers", list(decision.scores))
        for name, scores in decision.scores.items():
            span.set_attribute(f"llmd.score.{name}", float(scores.get(pid, 0.0)))

    def failed(self, span: Any, exc: BaseException) -> None:
        """The decision failed (no pod serves the model, none healthy, admission refused)."""
        span.set_status(self._error, f"{type(exc).__name__}: {exc}")
        span.end()

    @staticmethod
    @contextlib.contextmanager
    def leg(name: str) -> Iterator[None]:
        token = LEG.set(name)
        try:
            yield
        finally:
            LEG.reset(token)

    def shutdown(self) -> None:
        if self.owned:
            self.provider.shutdown()
