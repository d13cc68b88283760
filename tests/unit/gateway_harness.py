"""A real Envoy in front of in-process stand-in backends, with gateway mode in the test's event loop
(``vllm_llmd.testing.gateway``): the fast gateway tests share this."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from router_fakes import FakeBackend

from vllm_llmd.router.config import PodConfig, RouterConfig
from vllm_llmd.testing.engine import free_port
from vllm_llmd.testing.gateway import GatewayStack, gateway_stack


class HoldingBackend(FakeBackend):
    """A :class:`FakeBackend` that can hold its answer (no response headers) until ``hold`` is set,
    stream like vLLM (response headers at once, the first chunk when ``first_chunk`` is set), and
    keeps each request's transport (a test can break a stream)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.hold: asyncio.Event | None = None
        self.first_chunk: asyncio.Event | None = None
        self.arrived = 0
        self.transports: list[Any] = []

    async def generate(self, request: web.Request) -> web.StreamResponse:
        self.arrived += 1
        self.transports.append(request.transport)
        if self.hold is not None:
            await self.hold.wait()
        if self.first_chunk is not None:
            # vLLM (Starlette's StreamingResponse) sends the headers at admission, then the tokens
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            resp._payload_writer.send_headers()  # aiohttp would hold them until the first chunk
            await self.first_chunk.wait()
            await resp.write(b'data: {"choices": [{"text": "a"}]}\n\n')
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        return await super().generate(request)


@dataclass
class Gateway(GatewayStack):
    backends: list[HoldingBackend] | None = None


@contextlib.asynccontextmanager
async def gateway(
    tmp_path: Path,
    n: int = 2,
    dead: int = 0,
    envoy: dict[str, Any] | None = None,
    gw: dict[str, Any] | None = None,
    edit: Any = None,
    **router_cfg: Any,
) -> AsyncIterator[Any]:
    """``n`` live stand-in backends plus ``dead`` pods nothing listens on, the picker, and Envoy."""
    backends = [await HoldingBackend(f"b{i}").start() for i in range(n)]
    urls = [b.url for b in backends] + [f"http://127.0.0.1:{free_port()}" for _ in range(dead)]
    data: dict[str, Any] = {
        "models": ["test-model"],
        "pods": [PodConfig(url=u).model_dump() for u in urls],
        "port": free_port(),
    }
    data.update(router_cfg)
    try:
        async with gateway_stack(RouterConfig.model_validate(data), tmp_path, envoy, gw, edit) as st:
            yield Gateway(st.url, st.router, st.router_url, st.envoy, backends)
    finally:
        for b in backends:
            await b.close()
