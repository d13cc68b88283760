"""Tracing reaches the engine (issue 14): a real vLLM CPU engine run with its own
``--otlp-traces-endpoint`` exports its ``llm_request`` span to a collector in this process; the
span must continue the router's trace, as a child of the router's upstream-leg client span, and carry
the router's request id (``X-Request-Id``, vLLM's ``gen_ai.request.id``).

vLLM sends OTLP over HTTP here (``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf``,
``vllm/tracing/otel.py``: ``get_span_exporter``); the collector is the standard library's HTTP server
decoding ``ExportTraceServiceRequest`` with the OTLP protos (``opentelemetry-proto``, with the otel
extra)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from vllm_llmd.router.config import RouterConfig
from vllm_llmd.router.front import start_server
from vllm_llmd.router.server import build_router
from vllm_llmd.testing.engine import EngineProcess, EngineSpec
from vllm_llmd.testing.wait import wait_until_async

pytestmark = pytest.mark.engine


class Collector:
    """An OTLP/HTTP trace receiver: every span received, as the protobuf ``Span`` messages."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        spans = self.spans

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                for rs in req.resource_spans:
                    for ss in rs.scope_spans:
                        spans.extend(ss.spans)
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def traced_engine(test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    collector = Collector()
    logs = Path(os.environ.get("LLMD_TEST_LOG_DIR") or tmp_path_factory.mktemp("engine-logs"))
    spec = EngineSpec(
        model=test_model_dir,
        events_port=None,
        replay_port=None,
        extra_args=["--enforce-eager", "--otlp-traces-endpoint", collector.url],
        # spans leave in 100 ms batches instead of 5 s ones (the SDK's OTEL_BSP_SCHEDULE_DELAY)
        extra_env={"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf", "OTEL_BSP_SCHEDULE_DELAY": "100"},
    )
    engine = EngineProcess(spec, logs / "engine-traced.log")
    try:
        engine.start_ready()
        yield engine, collector
    finally:
        engine.stop()
        collector.close()


async def test_the_engines_span_continues_the_routers_trace(traced_engine) -> None:
    engine, collector = traced_engine
    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    cfg = RouterConfig.model_validate({"models": ["test-model"], "pods": [{"url": engine.url}]})
    srv = await start_server(build_router(cfg, tracer_provider=provider).runner(), "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as s:
            body = {"model": "test-model", "prompt": "the trace goes on", "max_tokens": 3, "ignore_eos": True}
            url = f"http://127.0.0.1:{srv.port}/v1/completions"
            async with s.post(url, json=body, headers={"X-Request-Id": "traced-1"}) as r:
                assert r.status == 200, await r.text()
        (leg,) = [x for x in exporter.get_finished_spans() if x.kind == SpanKind.CLIENT]
        trace_id, leg_id = leg.context.trace_id.to_bytes(16, "big"), leg.context.span_id.to_bytes(8, "big")

        def engine_span() -> Any:
            return next((x for x in collector.spans if x.name == "llm_request" and x.trace_id == trace_id), None)

        await wait_until_async(lambda: engine_span() is not None, 30, "the engine's llm_request span in our trace")
        span = engine_span()
        assert span.parent_span_id == leg_id  # the router's upstream leg is the engine span's parent
        attrs = {a.key: a.value.string_value for a in span.attributes if a.value.HasField("string_value")}
        assert "traced-1" in attrs["gen_ai.request.id"]  # the router's X-Request-Id reached vLLM
    finally:
        await srv.close()
        provider.shutdown()
