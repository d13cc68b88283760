"""A static oracle router for the prefix_repetition benchmark: perfect affinity, perfect balance.

The k-th distinct prompt prefix it sees goes to worker ``k mod N``, and every later request with
the same prefix goes to the same worker. A prefix is identified by a hash of the prompt's first
``--prefix-chars`` characters (the benchmark's shared prefixes are 2048 tokens, several KB of text,
so the first 1000 characters identify them). It is a benchmark yardstick, not a router: no health
checks, no retries. Bodies and responses (including SSE streams) pass through unchanged.

    python bench/oracle_router.py --port 8000 --worker http://127.0.0.1:8001 --worker http://127.0.0.1:8002

``--assign 1,0,0,1,...`` replaces ``k mod N`` by a given worker per distinct prefix, in the order the
prefixes first arrive: a placement taken from another router's decision log (``bench/decision_log.py
--assign``) replayed through this thin proxy, to tell that placement's cost from that router's own
overhead (bench/RESULTS.md, "Issue 12: ours against the oracle on hotprefix, taken apart").

``--spread-hot F`` (a yardstick for issue 12's hotprefix target, not a policy): once at least 16
requests were seen, a prefix with more than the share ``F`` of them is *hot* and each of its requests
goes to the worker with the fewest requests in flight at this proxy (the hot prefix is prefilled once
on each worker it reaches, then hits there); the other prefixes keep their static worker.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from typing import Any

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "content-encoding"}


def prompt_text(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        return json.dumps(prompt[0] if isinstance(prompt[0], list) else prompt)
    messages = body.get("messages")
    if isinstance(messages, list):
        return "".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    return ""


class Oracle:
    def __init__(
        self, workers: list[str], prefix_chars: int, assign: list[int] | None = None, spread_hot: float = 0.0
    ) -> None:
        self.workers = workers
        self.spread_hot = spread_hot
        self.seen: dict[bytes, int] = {}
        self.total = 0
        self.inflight = [0] * len(workers)
        self.prefix_chars = prefix_chars
        self.assign = assign or []
        self.assignment: dict[bytes, int] = {}
        self.counts = [0] * len(workers)
        self.session: ClientSession | None = None

    def pick(self, text: str) -> int:
        key = hashlib.blake2b(text[: self.prefix_chars].encode(), digest_size=16).digest()
        k = len(self.assignment)
        idx = self.assignment.setdefault(key, self.assign[k] if k < len(self.assign) else k % len(self.workers))
        n = self.seen[key] = self.seen.get(key, 0) + 1
        self.total += 1
        if self.spread_hot > 0 and self.total >= 16 and n > self.spread_hot * self.total:
            idx = min(range(len(self.workers)), key=lambda i: (self.inflight[i], i != idx))
        self.counts[idx] += 1
        return idx

    async def start(self, _app: web.Application) -> None:
        self.session = ClientSession(
            connector=TCPConnector(limit=0, force_close=False), timeout=ClientTimeout(total=None)
        )

    async def close(self, _app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    async def forward(self, request: web.Request, worker: str, body: bytes | None) -> web.StreamResponse:
        assert self.session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        async with self.session.request(
            request.method, worker + request.path_qs, data=body, headers=headers
        ) as upstream:
            out = web.StreamResponse(status=upstream.status)
            for k, v in upstream.headers.items():
                if k.lower() not in _HOP_BY_HOP:
                    out.headers[k] = v
            await out.prepare(request)
            async for chunk in upstream.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            parsed = json.loads(body)
        except ValueError:
            return web.json_response({"error": "malformed JSON"}, status=400)
        idx = self.pick(prompt_text(parsed) if isinstance(parsed, dict) else "")
        self.inflight[idx] += 1
        try:
            return await self.forward(request, self.workers[idx], body)
        finally:
            self.inflight[idx] -= 1

    async def passthrough(self, request: web.Request) -> web.StreamResponse:
        return await self.forward(request, self.workers[0], None)

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "prefixes": len(self.assignment), "requests_per_worker": self.counts})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--worker", action="append", required=True, help="backend base URL (repeat)")
    ap.add_argument("--prefix-chars", type=int, default=1000)
    ap.add_argument("--spread-hot", type=float, default=0.0, help="share above which a prefix is spread (0 = off)")
    ap.add_argument("--assign", default="", help="worker index per distinct prefix, in arrival order (comma list)")
    args = ap.parse_args()
    assign = [int(x) for x in args.assign.split(",") if x.strip()]
    if any(not 0 <= i < len(args.worker) for i in assign):
        ap.error(f"--assign names a worker outside 0..{len(args.worker) - 1}")
    oracle = Oracle([w.rstrip("/") for w in args.worker], args.prefix_chars, assign, args.spread_hot)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.on_startup.append(oracle.start)
    app.on_cleanup.append(oracle.close)
    app.router.add_post("/v1/completions", oracle.generate)
    app.router.add_post("/v1/chat/completions", oracle.generate)
    app.router.add_get("/health", oracle.health)
    app.router.add_get("/v1/models", oracle.passthrough)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
