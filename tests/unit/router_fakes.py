"""Our own in-process OpenAI-style backends for router unit tests (not mocks of a third-party API:
they answer the few routes the router forwards, in the shape vLLM's OpenAI server uses)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from vllm_llmd.index import KVBlockIndex
from vllm_llmd.router.config import PodConfig, RouterConfig
from vllm_llmd.router.front import RunningServer, start_server
from vllm_llmd.router.proxy import RouterApp
from vllm_llmd.router.server import build_router
from vllm_llmd.wire.kv_events import BlockStored, encode_batch, seq_to_bytes


@dataclass
class FakeBackend:
    name: str
    received: list[dict[str, Any]] = field(default_factory=list)
    #: the bodies of ``received`` as they came
    raw_bodies: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    healthy: bool = True
    #: a streaming answer waits on this after its first chunk (to prove the router does not buffer)
    gate: asyncio.Event | None = None
    cached_tokens: int = 0
    #: "before_first_byte": drop the connection before answering; "midstream": after the first chunk;
    #: "hang": never answer; "hang_midstream": stop after the first chunk, never end the stream;
    #: "error": answer 500 (in vLLM's error shape) while ``/health`` says OK
    die: str | None = None
    #: requests whose connection the caller dropped while this backend was still answering them
    abandoned: int = 0
    #: KV capacity reported in ``vllm:cache_config_info`` (``None``: the line is left out; a string
    #: is sent as is)
    num_gpu_blocks: int | str | None = None
    health_requests: int = 0
    metrics_requests: int = 0
    #: ``/v1/models`` cards as vLLM's ``OpenAIServingModels.show_available_models`` lists them: the
    #: served names, then each adapter with ``parent`` = the base model (``(id, parent)`` pairs)
    served: list[tuple[str, str | None]] = field(default_factory=lambda: [("test-model", None)])
    #: the text of ``vllm:lora_requests_info`` lines for ``/metrics``
    lora_metrics: str = ""
    #: (method, path, content type, body) of calls to endpoints other than the ones above
    other_calls: list[tuple[str, str, str, bytes]] = field(default_factory=list)
    server: TestServer | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/v1/chat/completions", self.generate)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_route("*", "/{tail:.*}", self.other)  # vLLM's other endpoints
        return app

    async def start(self) -> FakeBackend:
        self.server = TestServer(self.app(), host="127.0.0.1")
        await self.server.start_server()
        return self

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def pod_id(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.port}"

    async def health(self, request: web.Request) -> web.Response:
        self.health_requests += 1
        return web.Response(status=200 if self.healthy else 503)

    async def models(self, request: web.Request) -> web.Response:
        cards = []
        for mid, parent in self.served:
            root = f"/adapters/{mid}" if parent else f"/models/{mid}"
            cards.append({"id": mid, "object": "model", "owned_by": "vllm", "root": root, "parent": parent})
        return web.json_response({"object": "list", "data": cards})

    async def metrics(self, request: web.Request) -> web.Response:
        self.metrics_requests += 1
        text = 'vllm:num_requests_waiting{engine="0"} 0.0\n' + self.lora_metrics
        if self.num_gpu_blocks is not None:  # the info gauge as vLLM's metrics logger renders it
            text += (
                f'vllm:cache_config_info{{block_size="64",engine="0",num_gpu_blocks="{self.num_gpu_blocks}",'
                'enable_prefix_caching="True"} 1.0\n'
            )
        return web.Response(text=text)

    async def other(self, request: web.Request) -> web.Response:
        """Any other endpoint: records the call (path, content type, body) and answers it in JSON."""
        raw = await request.read()
        self.other_calls.append((request.method, request.path, request.content_type, raw))
        return web.json_response({"object": "echo", "path": request.path, "served_by": self.name})

    async def _hang(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:  # the caller hung up (aiohttp's test server cancels the handler)
            self.abandoned += 1
            raise

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(body)
        self.raw_bodies.append(await request.read())  # read once: aiohttp keeps the bytes
        self.headers.append(dict(request.headers))
        if self.die == "before_first_byte":
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if self.die == "hang":
            await self._hang()
        if self.die == "error":
            err = {"error": {"message": "EngineCore encountered an issue", "type": "InternalServerError", "code": 500}}
            return web.json_response(err, status=500)
        usage = {
            "prompt_tokens": 10,
            "completion_tokens": 2,
            "total_tokens": 12,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }
        kv = body.get("kv_transfer_params") or {}
        if kv.get("do_remote_decode"):
            # what LLMDConnector's producer answers on a prefill leg (connectors/scheduler.py:
            # request_finished -> vllm_llmd.wire.RemotePrefill)
            return web.json_response(
                {
                    "id": "cmpl-p",
                    "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
                    "kv_transfer_params": {
                        "do_remote_prefill": True,
                        "do_remote_decode": False,
                        "remote_block_ids": [[1, 2]],
                        "remote_engine_id": f"engine-{self.name}",
                        "remote_request_id": "req-1",
                        "remote_host": "127.0.0.1",
                        "remote_port": 5600,
                        "remote_num_tokens": 10,
                        "remote_block_size": 16,
                        "tp_size": 1,
                    },
                }
            )
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "cmpl-1",
                    "object": "text_completion",
                    "model": body.get("model"),
                    "served_by": self.name,
                    "choices": [{"index": 0, "text": "hi", "finish_reason": "length"}],
                    "usage": usage,
                },
                headers={"X-Served-By": self.name},
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Served-By": self.name})
        await resp.prepare(request)
        await resp.write(
            b"data: " + json.dumps({"choices": [{"text": "a"}], "served_by": self.name}).encode() + b"\n\n"
        )
        if self.die == "midstream":
            assert request.transport is not None
            request.transport.abort()
            return resp
        if self.die == "hang_midstream":
            await self._hang()
        if self.gate is not None:
            await self.gate.wait()
        await resp.write(b"data: " + json.dumps({"choices": [{"text": "b"}], "usage": usage}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


async def start_router(cfg: RouterConfig) -> tuple[RouterApp, RunningServer]:
    """The router as ``vllm-llmd router`` serves it (the front's limits included), on a free port."""
    router = build_router(cfg)
    return router, await start_server(router.runner(), "127.0.0.1", 0)


def config_for(backends: list[FakeBackend], **kw: Any) -> RouterConfig:
    data: dict[str, Any] = {"models": ["test-model"], "pods": [PodConfig(url=b.url).model_dump() for b in backends]}
    data.update(kw)
    return RouterConfig.model_validate(data)


class CliRouter:
    """``vllm-llmd router`` in its own process (as operators run it), with ``args`` after ``router``."""

    def __init__(self, args: list[str], **popen: Any) -> None:
        import subprocess
        import sys

        from vllm_llmd.testing.engine import free_port

        self.port = free_port()
        cmd = [sys.executable, "-m", "vllm_llmd.cli", "router", "--port", str(self.port), *args]
        popen.setdefault("stderr", subprocess.DEVNULL)
        self.proc = subprocess.Popen(cmd, **popen)
        self.base = f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def ready(self, timeout: float = 60) -> CliRouter:
        """Once ``/health`` answers 200 (the process must not exit meanwhile)."""
        import aiohttp

        from vllm_llmd.testing.wait import wait_until_async

        async with aiohttp.ClientSession() as s:

            async def up() -> bool:
                assert self.proc.poll() is None, "the router exited"
                try:
                    async with s.get(self.base + "/health") as r:
                        return r.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_until_async(up, timeout, "router /health answers 200", interval=0.1)
        return self

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: Any) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 15 s."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def store_blocks(index: KVBlockIndex, pod: str, toks: list[int], seq: int, medium: str = "GPU", bs: int = 64) -> None:
    """Publish ``toks``' whole blocks as one ``BlockStored`` batch of ``pod`` (seq ``seq``) to ``index``."""
    n = len(toks) - len(toks) % bs
    ev = BlockStored(
        block_hashes=list(range(seq * 1000, seq * 1000 + n // bs)),
        parent_block_hash=None,
        token_ids=toks[:n],
        block_size=bs,
        lora_id=None,
        medium=medium,
        lora_name=None,
    )
    index.ingest(pod, [f"kv@{pod}@m".encode(), seq_to_bytes(seq), encode_batch([ev])])
