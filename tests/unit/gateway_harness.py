"""A real Envoy in front of in-process stand-in backends, with gateway mode (``serve_gateway``) in
the test's event loop: the fast gateway tests share this."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from router_fakes import FakeBackend

from vllm_llmd.gateway.envoy_config import EnvoyOptions, bootstrap
from vllm_llmd.gateway.server import GatewayOptions, serve_gateway
from vllm_llmd.router.config import PodConfig, RouterConfig
from vllm_llmd.router.proxy import RouterApp
from vllm_llmd.router.server import build_router
from vllm_llmd.testing.engine import free_port
from vllm_llmd.testing.envoy import EnvoyProcess


class HoldingBackend(FakeBackend):
    """A :class:`FakeBackend` that can hold its answer (no response headers) until ``hold`` is set."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.hold: asyncio.Event | None = None
        self.arrived = 0
        self.transports: list[Any] = []

    async def generate(self, request: web.Request) -> web.StreamResponse:
        self.arrived += 1
        self.transports.append(request.transport)
        if self.hold is not None:
            await self.hold.wait()
        return await super().generate(request)


@dataclass
class Gateway:
    url: str  # Envoy's listener
    router: RouterApp
    router_url: str  # the router's own HTTP side (/metrics, /health)
    envoy: EnvoyProcess
    backends: list[HoldingBackend]

    def load(self) -> dict[str, tuple[int, int, int]]:
        """The picker's in-flight accounting per pod: (requests, prefill tokens, decode tokens)."""
        out = {}
        for p in self.router.pool.pods:
            ld = self.router.inflight.load(p.id)
            out[p.id] = (ld.requests, ld.prefill_tokens, ld.decode_tokens)
        return out

    def idle(self) -> bool:
        return all(v == (0, 0, 0) for v in self.load().values()) and all(
            p.inflight_requests == 0 for p in self.router.pool.pods
        )


@contextlib.asynccontextmanager
async def gateway(
    tmp_path: Path,
    n: int = 2,
    dead: int = 0,
    envoy: dict[str, Any] | None = None,
    gw: dict[str, Any] | None = None,
    **router_cfg: Any,
) -> AsyncIterator[Gateway]:
    """``n`` live stand-in backends plus ``dead`` pods nothing listens on, the picker, and Envoy."""
    backends = [await HoldingBackend(f"b{i}").start() for i in range(n)]
    urls = [b.url for b in backends] + [f"http://127.0.0.1:{free_port()}" for _ in range(dead)]
    data: dict[str, Any] = {
        "models": ["test-model"],
        "pods": [PodConfig(url=u).model_dump() for u in urls],
        "port": free_port(),
    }
    data.update(router_cfg)
    cfg = RouterConfig.model_validate(data)
    router = build_router(cfg)
    picker_addr = f"127.0.0.1:{free_port()}"
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve_gateway(router, GatewayOptions(ext_proc=picker_addr, **(gw or {})), ready, stop))
    proc: EnvoyProcess | None = None
    try:
        await asyncio.wait_for(ready.wait(), 30)
        opts = EnvoyOptions(
            pods=[u.removeprefix("http://") for u in urls],
            picker=picker_addr,
            listen_port=free_port(),
            admin_port=free_port(),
            max_body_bytes=cfg.max_body_bytes,
            retries=cfg.pool.max_retries,
            connect_timeout_s=cfg.pool.connect_timeout_s,
        )
        for k, v in (envoy or {}).items():
            setattr(opts, k, v)
        proc = EnvoyProcess(bootstrap(opts), tmp_path / "envoy.log")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, proc.start_ready)
        yield Gateway(f"http://127.0.0.1:{opts.listen_port}", router, f"http://127.0.0.1:{cfg.port}", proc, backends)
    finally:
        if proc is not None:
            proc.stop()
        stop.set()
        await asyncio.wait_for(task, 30)
        for b in backends:
            await b.close()
