"""CPU per request of the router's whole HTTP path, in one process: an aiohttp client, a trivial
backend on two ports ("pods") and the router (``build_router``, the test model's tokenizer),
``N`` requests of a ~15 KB prompt, 8 at a time. CPU time (``time.process_time``) moves less with
other load than requests/s do; the client and backend cost the same whatever the router's version,
so comparing two versions (``PYTHONPATH=<other checkout>``) compares the routers.

    .venv/bin/python bench/overhead/cpu_per_request.py 1500 [stream]

``stream``: the backend streams 9 SSE chunks (the inter-token histogram's path). With
``LLMD_BENCH_ADMISSION=1`` admission control is on (never saturated). With ``LLMD_BENCH_OTEL=1``
tracing is on (the ``otel`` extra): every span is made and batched (``BatchSpanProcessor``, as with
``--otlp-traces-endpoint``) to an exporter that drops it, so the network is not measured. Prints one
JSON line.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

N = int(sys.argv[1]) if len(sys.argv) > 1 else 1500
STREAM = len(sys.argv) > 2 and sys.argv[2] == "stream"
COMPLETION = json.dumps(
    {"id": "c", "object": "text_completion", "choices": [{"index": 0, "text": " ok"}],
     "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}}
).encode()  # fmt: skip


async def generate(request: web.Request) -> web.StreamResponse:
    await request.read()
    if not STREAM:
        return web.Response(body=COMPLETION, content_type="application/json")
    r = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await r.prepare(request)
    for _ in range(8):
        await r.write(b'data: {"choices":[{"text":"x"}]}\n\n')
    await r.write(b"data: [DONE]\n\n")
    return r


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "test-model", "object": "model"}]})


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def main() -> None:
    import vllm_llmd.router.proxy as proxy
    from vllm_llmd.router.config import RouterConfig
    from vllm_llmd.router.front import start_server
    from vllm_llmd.router.server import build_router
    from vllm_llmd.testing.model import make_test_model

    app = web.Application()
    app.router.add_post("/v1/completions", generate)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    ports = []
    for _ in range(2):
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    model = make_test_model(Path(tempfile.gettempdir()) / "llmd-bench-cpu-model", shape="tiny")
    data: dict = {
        "models": ["test-model"],
        "pods": [{"url": f"http://127.0.0.1:{p}"} for p in ports],
        "tokenizer": {"path": str(model)},
    }
    if os.environ.get("LLMD_BENCH_ADMISSION"):
        data["admission"] = {"max_requests_per_pod": 4096}
    provider = None
    if os.environ.get("LLMD_BENCH_OTEL"):
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

        class Drop(SpanExporter):
            def export(self, spans: object) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Drop()))
    router = build_router(RouterConfig.model_validate(data), **({"tracer_provider": provider} if provider else {}))
    srv = await start_server(router.runner(), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{srv.port}/v1/completions"
    words = " ".join(f"w{i}" for i in range(3000))
    sem = asyncio.Semaphore(8)
    async with aiohttp.ClientSession() as s:

        async def one(i: int) -> None:
            body = {"model": "test-model", "prompt": f"{words} {i}", "max_tokens": 8, "stream": STREAM}
            async with sem, s.post(url, json=body) as r:
                await r.read()
                assert r.status == 200

        for i in range(200):  # warm-up
            await one(i)
        c0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(N)))
        c1, t1 = time.process_time(), time.perf_counter()
    await srv.close()
    await runner.cleanup()
    out = {
        "code": proxy.__file__,
        "n": N,
        "stream": STREAM,
        "otel": provider is not None,
        "cpu_ms_per_req": round((c1 - c0) / N * 1e3, 4),
        "wall_req_s": round(N / (t1 - t0), 1),
        "load": os.getloadavg()[0],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
