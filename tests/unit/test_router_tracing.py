"""OpenTelemetry tracing (issue 14, the ``otel`` extra): a real in-process SDK with its own
``InMemorySpanExporter``, the router and our in-process pods (router_fakes), P/D included."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator

import aiohttp
import pytest
from opentelemetry.sdk import trace as sdk_trace  # the otel extra, part of dev
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from router_fakes import FakeBackend

from vllm_llmd.router.config import ConfigError, RouterConfig
from vllm_llmd.router.front import start_server
from vllm_llmd.router.server import build_router

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


@pytest.fixture
async def pd_backends() -> AsyncIterator[tuple[FakeBackend, FakeBackend]]:
    p, d = await FakeBackend("prefill").start(), await FakeBackend("decode").start()
    yield p, d
    await p.close()
    await d.close()


def _cfg(p: FakeBackend, d: FakeBackend) -> RouterConfig:
    return RouterConfig.model_validate(
        {
            "models": ["test-model"],
            "pods": [{"url": p.url, "role": "prefill"}, {"url": d.url, "role": "decode"}],
            "pd": {"threshold_tokens": 100},
        }
    )


def _traceparent(headers: dict[str, str]) -> tuple[str, str]:
    (tp,) = [v for k, v in headers.items() if k.lower() == "traceparent"]
    version, trace_id, span_id, _flags = tp.split("-")
    assert version == "00"
    return trace_id, span_id


async def test_pd_request_trace_spans_links_and_traceparent(pd_backends) -> None:
    p, d = pd_backends
    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    router = build_router(_cfg(p, d), tracer_provider=provider)
    srv = await start_server(router.runner(), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{srv.port}/v1/completions"
    try:
        async with aiohttp.ClientSession() as s:
            body = {"model": "test-model", "prompt": "word " * 2000, "max_tokens": 2}
            async with s.post(url, json=body) as r:
                assert r.status == 200 and r.headers["X-LLMD-Prefill-Pod"] == p.pod_id
            spans = exporter.get_finished_spans()
            (server,) = [x for x in spans if x.kind == SpanKind.SERVER]
            assert server.parent is None  # no traceparent from the client: a new trace
            tid = server.context.trace_id
            (route,) = [x for x in spans if x.name == "llmd.route"]
            assert route.parent is not None and route.parent.span_id == server.context.span_id
            a = route.attributes
            assert a["llmd.pod"] == d.pod_id and a["llmd.pd"] == "disaggregated"
            assert a["llmd.model"] == "test-model" and a["llmd.prompt_tokens"] > 0
            assert a["llmd.predicted_cached_tokens"] == 0 and list(a["llmd.prefill_sources"]) == [p.pod_id]
            assert list(a["llmd.scorers"]) and all(f"llmd.score.{n}" in a for n in a["llmd.scorers"])
            legs = {x.attributes["llmd.leg"]: x for x in spans if x.kind == SpanKind.CLIENT}
            assert set(legs) == {"prefill", "decode"}  # and no span of the pool's health checks
            assert legs["prefill"].attributes["llmd.pod"] == p.pod_id
            assert legs["decode"].attributes["llmd.pod"] == d.pod_id
            assert legs["prefill"].end_time <= legs["decode"].start_time
            for leg, pod in ((legs["prefill"], p), (legs["decode"], d)):
                assert leg.context.trace_id == tid and leg.parent.span_id == server.context.span_id
                # what the pod got: this leg's own span as the parent of the engine's spans
                assert _traceparent(pod.headers[0]) == (f"{tid:032x}", f"{leg.context.span_id:016x}")

            exporter.clear()  # a client's traceparent is continued
            body["prompt"] = "other " * 2000
            tp = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
            async with s.post(url, json=body, headers={"traceparent": tp}) as r:
                assert r.status == 200
            spans = exporter.get_finished_spans()
            (server,) = [x for x in spans if x.kind == SpanKind.SERVER]
            assert f"{server.context.trace_id:032x}" == CLIENT_TRACE
            assert server.parent is not None and f"{server.parent.span_id:016x}" == CLIENT_SPAN
            assert {f"{x.context.trace_id:032x}" for x in spans} == {CLIENT_TRACE}
            for pod in (p, d):
                trace_id, span_id = _traceparent(pod.headers[1])
                assert trace_id == CLIENT_TRACE and span_id != CLIENT_SPAN  # the router's leg span
    finally:
        await srv.close()
        provider.shutdown()


async def test_a_colocated_request_and_an_error_are_traced(pd_backends) -> None:
    _, d = pd_backends
    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    cfg = RouterConfig.model_validate({"models": ["test-model"], "pods": [{"url": d.url}]})
    srv = await start_server(build_router(cfg, tracer_provider=provider).runner(), "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{srv.port}/v1/completions"
            async with s.post(url, json={"model": "test-model", "prompt": "hi", "max_tokens": 1}) as r:
                assert r.status == 200
            async with s.post(url, json={"model": "nope", "prompt": "hi"}) as r:
                assert r.status == 404
        spans = exporter.get_finished_spans()
        route, refused = [x for x in spans if x.name == "llmd.route"]
        assert route.attributes["llmd.pd"] == "colocated" and route.attributes["llmd.pod"] == d.pod_id
        assert refused.status.status_code == StatusCode.ERROR and "nope" in refused.status.description
        (leg,) = [x for x in spans if x.kind == SpanKind.CLIENT]
        assert "llmd.leg" not in leg.attributes and leg.attributes["llmd.pod"] == d.pod_id
        servers = [x.attributes for x in spans if x.kind == SpanKind.SERVER]  # the old or the new semconv name
        codes = sorted(a.get("http.status_code", a.get("http.response.status_code")) for a in servers)
        assert codes == [200, 404]  # the error answer has its server span too
    finally:
        await srv.close()
        provider.shutdown()


def test_tracing_without_the_extra_names_it(monkeypatch) -> None:
    # the extra missing: its modules cannot be imported
    monkeypatch.setitem(sys.modules, "opentelemetry.instrumentation.aiohttp_server", None)
    cfg = RouterConfig.model_validate(
        {"models": ["m"], "pods": [{"url": "http://127.0.0.1:9"}], "server": {"otlp_traces_endpoint": "http://c:4317"}}
    )
    with pytest.raises(ConfigError, match=r"pip install 'vllm-llmd\[otel\]'"):
        build_router(cfg)


def test_the_cli_flag_without_the_extra_is_a_clear_error_and_off_costs_no_import() -> None:
    code = """
import sys
sys.modules["opentelemetry.instrumentation.aiohttp_client"] = None
from vllm_llmd.cli import main
from vllm_llmd.router.server import build_router
from vllm_llmd.router.config import RouterConfig
r = build_router(RouterConfig.model_validate({"models": ["m"], "pods": [{"url": "http://127.0.0.1:9"}]}))
assert r.tracing is None and not [m for m, v in sys.modules.items() if m.startswith("opentelemetry") and v], "off"
sys.exit(main(["router", "--worker", "http://127.0.0.1:9", "--otlp-traces-endpoint", "http://c:4317", "--check"]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "needs the otel extra (pip install 'vllm-llmd[otel]')" in out.stderr


def test_the_otlp_exporters_import_beside_the_gateway_protos() -> None:
    """xds-protos (the gateway extra) ships an older copy of opentelemetry-proto's modules; the OTLP
    exporters (the router's and vLLM's) must still import (scripts/setup-env.sh lays them back)."""
    import vllm_llmd.gateway.extproc  # noqa: F401  (the xds protos, loaded first)
    from vllm_llmd.router.tracing import exporter_provider

    exporter_provider("http://127.0.0.1:9/v1/traces").shutdown()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: F401
