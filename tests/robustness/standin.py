"""Stand-in vLLM pods for the robustness suite, in their own process:
``python standin.py PORT [PORT ...]`` serves the router unit tests' FakeBackend on each port
(OpenAI-shaped completions, chat, streams, /health, /metrics) until terminated."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))

from aiohttp import web
from router_fakes import FakeBackend


async def serve(ports: list[int]) -> None:
    runners = []
    for i, port in enumerate(ports):
        backend = FakeBackend(f"pod{i}")
        backend.received = _Discard()  # type: ignore[assignment]
        backend.headers = _Discard()  # type: ignore[assignment]
        runner = web.AppRunner(backend.app(), access_log=None, handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
    print("ready", flush=True)
    await asyncio.Event().wait()


class _Discard(list):  # a soak sends thousands of requests: keep nothing
    def append(self, item: object) -> None:
        pass


if __name__ == "__main__":
    asyncio.run(serve([int(p) for p in sys.argv[1:]]))
