"""One simulated pod on the network: vLLM's HTTP API (aiohttp) in front of a :class:`SimEngine`,
and its KV event publisher. Many pods share one process and one event loop.

Routes (as ``vllm.entrypoints.openai.api_server`` serves them): ``POST /v1/completions``,
``POST /v1/chat/completions`` (JSON or SSE), ``GET /v1/models``, ``GET /health`` (200, empty),
``GET /version``, ``GET /metrics`` (:mod:`vllm_llmd.sim.metrics`), ``POST /tokenize``, and
``POST /reset_prefix_cache`` (vLLM serves it with ``VLLM_SERVER_DEV_MODE=1``).

Prompts are tokenized by the model's ``tokenizer.json`` through
:class:`vllm_llmd.router.tokenize.PromptTokenizer` (completions: ``add_special_tokens`` defaults to
true; chat: the model's template as vLLM resolves it, ``chat_template.jinja`` before
``tokenizer_config.json``, then no special tokens), as vLLM does.
Generated tokens are drawn from the vocabulary's ids that decode on their own to non-empty text
(:class:`Vocabulary`), so the streamed text and ``usage`` agree token for token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq.asyncio
from aiohttp import web

from vllm_llmd.router.tokenize import PromptTokenizer, TokenizerUnavailable
from vllm_llmd.sim.engine import Output, SimEngine, SimRequest
from vllm_llmd.sim.events import EventPublisher
from vllm_llmd.sim.openai import (
    VLLM_VERSION,
    ParsedRequest,
    RequestError,
    ResponseWriter,
    dumps,
    models_body,
    new_request_id,
    parse_request,
    resolve_max_tokens,
)
from vllm_llmd.sim.profile import PodProfile

log = logging.getLogger(__name__)


class Vocabulary:
    """Token ids the simulator generates, and their text (decoded one by one, cached)."""

    def __init__(self, model_dir: str | Path, max_ids: int = 50_000) -> None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
        special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self.text: dict[int, str] = {}
        for i in range(min(tok.get_vocab_size(), max_ids)):
            if i in special:
                continue
            s = tok.decode([i], skip_special_tokens=True)
            if s and "\ufffd" not in s and s.isprintable():
                self.text[i] = s
        if not self.text:
            raise TokenizerUnavailable(f"{model_dir}: no token decodes to printable text")
        self.ids = sorted(self.text)

    def decode(self, ids: list[int]) -> str:
        return "".join(self.text[i] for i in ids)


@dataclass(frozen=True)
class PodEndpoints:
    index: int
    host: str
    port: int
    events_port: int | None
    replay_port: int | None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def events(self) -> str | None:
        return None if self.events_port is None else f"tcp://{self.host}:{self.events_port}"

    @property
    def replay(self) -> str | None:
        return None if self.replay_port is None else f"tcp://{self.host}:{self.replay_port}"


class SimPod:
    """One pod: HTTP server, engine, event publisher. ``await start()`` / ``await stop()``."""

    def __init__(
        self,
        ep: PodEndpoints,
        profile: PodProfile,
        model: str,
        tokenizer: PromptTokenizer,
        vocab: Vocabulary,
        zctx: zmq.asyncio.Context,
        root: str | None = None,
    ) -> None:
        self.ep = ep
        self.profile = profile
        self.model = model
        self.served = [model]
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.root = root
        self.publisher: EventPublisher | None = None
        if profile.kv_events and ep.events_port is not None:
            self.publisher = EventPublisher(
                zctx,
                f"tcp://{ep.host}:{ep.events_port}",
                None if ep.replay_port is None else f"tcp://{ep.host}:{ep.replay_port}",
                topic=f"kv@{ep.host}:{ep.port}@{model}",
                buffer_steps=profile.replay_buffer_steps,
            )
        ids = list(vocab.ids)
        random.Random(profile.seed).shuffle(ids)
        self.engine = SimEngine(
            profile,
            model,
            ids,
            publish=self.publisher.publish if self.publisher else None,
            seed=profile.seed * 1_000_003 + ep.index,
        )
        digest = hashlib.sha256(f"{model}|{profile.model_dump_json()}".encode()).hexdigest()[:8]
        self.fingerprint = f"vllm-{VLLM_VERSION}-{digest}"
        self.created = int(time.time())
        self._runner: web.AppRunner | None = None
        self.requests = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/version", self._version)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/reset_prefix_cache", self._reset)
        return app

    async def start(self) -> None:
        self.engine.start()
        if self.publisher is not None:
            self.publisher.start()
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.ep.host, self.ep.port, backlog=1024, reuse_address=True)
        await site.start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.engine.stop()
        if self.publisher is not None:
            await self.publisher.close()

    # ---- simple routes ------------------------------------------------------------------------------
    async def _health(self, _: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _version(self, _: web.Request) -> web.Response:
        return web.Response(body=dumps({"version": VLLM_VERSION}), content_type="application/json")

    async def _models(self, _: web.Request) -> web.Response:
        body = models_body(self.served, self.root, self.profile.max_model_len, self.created)
        return web.Response(body=body, content_type="application/json")

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(
            body=self.engine.metrics.render(), headers={"Content-Type": "text/plain; version=1.0.0; charset=utf-8"}
        )

    async def _reset(self, _: web.Request) -> web.Response:
        return web.Response(body=dumps({"success": self.engine.reset_prefix_cache()}), content_type="application/json")

    async def _tokenize(self, request: web.Request) -> web.Response:
        try:
            body = await self._json(request)
            if isinstance(body, dict) and "messages" in body:
                tokens = self.tokenizer.encode_chat(body)
            else:
                prompt = body.get("prompt") if isinstance(body, dict) else None
                if not isinstance(prompt, str):
                    raise RequestError("prompt must be a string", param="prompt")
                tokens = self.tokenizer.encode(prompt, add_special_tokens=bool(body.get("add_special_tokens", True)))
        except RequestError as e:
            return web.Response(status=e.status, body=e.body(), content_type="application/json")
        except (TokenizerUnavailable, ValueError) as e:
            return self._error(RequestError(str(e)))
        out = {"count": len(tokens), "max_model_len": self.profile.max_model_len, "tokens": tokens, "token_strs": None}
        return web.Response(body=dumps(out), content_type="application/json")

    # ---- generation ---------------------------------------------------------------------------------
    @staticmethod
    async def _json(request: web.Request) -> Any:
        raw = await request.read()
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(f"JSON decode error: {e}", err_type="Bad Request", param="body") from None

    @staticmethod
    def _error(e: RequestError) -> web.Response:
        return web.Response(status=e.status, body=e.body(), content_type="application/json")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    def _tokens(self, req: ParsedRequest) -> list[int]:
        if req.chat:
            try:
                return self.tokenizer.encode_chat(req.body)
            except TokenizerUnavailable as e:
                raise RequestError(f"cannot apply the chat template: {e}") from None
            except Exception as e:  # jinja2 template errors, bad message shapes
                raise RequestError(f"cannot apply the chat template: {e}", param="messages") from None
        if isinstance(req.prompt, list):
            return list(req.prompt)
        assert isinstance(req.prompt, str)
        return self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            parsed = parse_request(await self._json(request), chat, self.served)
            tokens = self._tokens(parsed)
            max_tokens = resolve_max_tokens(parsed, len(tokens), self.profile.max_model_len)
        except RequestError as e:
            return self._error(e)
        self.requests += 1
        rid = new_request_id("chatcmpl" if chat else "cmpl")
        writer = ResponseWriter(parsed, rid, self.fingerprint, self.profile.enable_prompt_tokens_details)
        if self.profile.cost.request_s > 0:
            await asyncio.sleep(self.profile.cost.request_s)
        sreq = SimRequest(rid, tokens, max_tokens, parsed.cache_salt)
        self.engine.add_request(sreq)
        try:
            if parsed.stream:
                return await self._stream(request, sreq, writer)
            return await self._full(sreq, writer)
        except (asyncio.CancelledError, ConnectionResetError):
            self.engine.abort(sreq)
            raise

    async def _stream(self, request: web.Request, sreq: SimRequest, writer: ResponseWriter) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        n_prompt = sreq.num_prompt_tokens
        first = writer.first_chunk(n_prompt)
        if first is not None:
            await resp.write(first)
        n = 0
        first_out: Output | None = None
        while True:
            out = await sreq.outputs.get()
            first_out = first_out or out
            n += len(out.token_ids)
            await resp.write(writer.token_chunk(self.vocab.decode(out.token_ids), out.finish_reason, n_prompt, n))
            if out.finish_reason is not None:
                break
        if writer.req.include_usage:
            await resp.write(writer.usage_chunk(n_prompt, n, first_out.cached_tokens, first_out.created_cache_tokens))
        await resp.write(writer.DONE)
        await resp.write_eof()
        return resp

    async def _full(self, sreq: SimRequest, writer: ResponseWriter) -> web.Response:
        ids: list[int] = []
        first_out: Output | None = None
        while True:
            out = await sreq.outputs.get()
            first_out = first_out or out
            ids.extend(out.token_ids)
            if out.finish_reason is not None:
                break
        body = writer.full(
            self.vocab.decode(ids),
            out.finish_reason,
            sreq.num_prompt_tokens,
            len(ids),
            first_out.cached_tokens,
            first_out.created_cache_tokens,
        )
        return web.Response(body=body, content_type="application/json")


async def close_quietly(pods: list[SimPod]) -> None:
    for p in pods:
        with contextlib.suppress(Exception):
            await p.stop()
