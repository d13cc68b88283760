"""What one huge prompt costs the router: extra RSS, and how long ``/health`` waits meanwhile.

Starts the real router (``vllm-llmd router`` in its own process, with the test model's tokenizer)
in front of a stand-in backend (its own process) that reads and discards the body, samples the
router's RSS (``/proc/PID/status``) every 10 ms and probes ``/health`` every 20 ms while one prompt
of ``--mib`` MiB (completions, then chat) goes through. A stall of the router's event loop delays
every probe in flight, so the slowest probe bounds the longest stall. Prints one line per request
and exits 1 if a limit is exceeded (``--max-rss-mib``, ``--max-health-ms``).

    .venv/bin/python tests/robustness/big_prompt.py --mib 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from vllm_llmd.testing.engine import free_port
from vllm_llmd.testing.model import make_test_model
from vllm_llmd.testing.wait import wait_until_async

COMPLETION = {"id": "cmpl-1", "object": "text_completion", "choices": [{"index": 0, "text": "ok"}]}


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def backend(port: int) -> None:
    async def generate(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(COMPLETION)

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="")

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/completions", generate)
    app.router.add_post("/v1/chat/completions", generate)
    app.router.add_get("/health", ok)
    app.router.add_get("/metrics", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()  # until the parent terminates this process


def prose(tokenizer_dir: Path, chars: int) -> str:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    rng = random.Random(0)
    piece = " ".join(tok.decode([rng.randrange(10, 4000) for _ in range(256)]) for _ in range(64))
    return (piece * (chars // len(piece) + 1))[:chars]


def body_of(payload: dict[str, Any], text: str, limit: int) -> bytes:
    """``payload`` with ``text`` as its prompt (or only message), cut so the body fits in ``limit``."""
    while True:
        if "messages" in payload:
            payload["messages"] = [{"role": "user", "content": text}]
        else:
            payload["prompt"] = text
        body = json.dumps(payload, ensure_ascii=False).encode()
        if len(body) <= limit:
            return body
        text = text[: len(text) - (len(body) - limit)]  # non-ASCII characters take more than a byte


def _post(url: str, body: bytes) -> int:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            r.read()
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


async def _measure(base: str, pid: int, body: bytes, path: str) -> dict[str, Any]:
    peak = [rss_mib(pid)]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib(pid))
            time.sleep(0.01)  # pacing: the RSS sampling period

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    lat: list[float] = []
    async with aiohttp.ClientSession() as s:

        async def probe() -> None:
            while not done.is_set():
                t = time.perf_counter()
                async with s.get(base + "/health") as r:
                    await r.read()
                lat.append(time.perf_counter() - t)
                await asyncio.sleep(0.02)  # pacing: the probes' inter-arrival gap

        prober = asyncio.create_task(probe())
        # the big request goes out from its own thread with a blocking client (its socket writes
        # release the GIL): sent from this event loop, building and writing 16 MiB stalled the
        # probes here by up to 140 ms, which then counted against the router
        t0 = time.perf_counter()
        status = await asyncio.to_thread(_post, base + path, body)
        took = time.perf_counter() - t0
        after = len(lat)  # a few probes after the request (a stall at its end shows too)
        await wait_until_async(lambda: len(lat) >= after + 5 or prober.done(), 60, "five /health probes after it")
        done.set()
        await prober
    th.join()
    return {
        "status": status,
        "seconds": took,
        "peak_rss_mib": peak[0],
        "max_health_ms": 1e3 * max(lat),
        "probes": len(lat),
    }


async def measure_big_prompts(mib: float, model: Path | None = None) -> dict[str, dict[str, Any]]:
    """Per request kind (completions, chat): HTTP status, seconds, extra RSS peak, slowest /health."""
    if model is None:
        model = make_test_model(Path(tempfile.mkdtemp(prefix="llmd-big-")) / "tiny", shape="tiny")
    bport, rport = free_port(), free_port()
    # the stand-in backend runs in its own process: reading 16 MiB bodies must not slow the probes
    stand_in = subprocess.Popen([sys.executable, __file__, "--serve-backend", str(bport)], start_new_session=True)
    cmd = [sys.executable, "-m", "vllm_llmd.cli", "router", "--port", str(rport)]
    cmd += ["--worker", f"http://127.0.0.1:{bport}", "--tokenizer", str(model), "--model", "test-model"]
    router = subprocess.Popen([*cmd, "--log-level", "warning"], start_new_session=True)
    base = f"http://127.0.0.1:{rport}"
    out: dict[str, dict[str, Any]] = {}
    try:
        async with aiohttp.ClientSession() as s:

            async def up() -> bool:
                assert router.poll() is None, "router exited"
                try:
                    async with s.post(base + "/v1/completions", json={"model": "test-model", "prompt": "warm"}) as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_until_async(up, 60, "router and backend up", interval=0.1)
        limit = int(mib * (1 << 20))
        text = prose(model, limit)
        base_rss = rss_mib(router.pid)
        for name, path, payload in (
            ("completions", "/v1/completions", {"model": "test-model", "max_tokens": 1}),
            ("chat", "/v1/chat/completions", {"model": "test-model", "messages": []}),
        ):
            body = body_of(payload, text, limit)
            r = await _measure(base, router.pid, body, path)
            r["body_mib"] = len(body) / (1 << 20)
            r["extra_rss_mib"] = r["peak_rss_mib"] - base_rss
            r["rss_before_mib"] = base_rss
            out[name] = r
    finally:
        for proc in (router, stand_in):
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=float, default=16.0, help="request body size (the router's limit is 16 MiB)")
    ap.add_argument("--max-rss-mib", type=float, default=200.0)
    ap.add_argument("--max-health-ms", type=float, default=100.0)
    ap.add_argument("--serve-backend", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_backend is not None:
        asyncio.run(backend(args.serve_backend))
        return 0
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    results = asyncio.run(measure_big_prompts(args.mib))
    failed = False
    for name, r in results.items():
        ok = r["status"] == 200 and r["extra_rss_mib"] < args.max_rss_mib and r["max_health_ms"] < args.max_health_ms
        failed |= not ok
        print(
            f"{name}: body {r['body_mib']:.2f} MiB, HTTP {r['status']} in {r['seconds']:.2f} s, router RSS "
            f"{r['rss_before_mib']:.0f} MiB before, extra peak {r['extra_rss_mib']:.0f} MiB "
            f"(limit {args.max_rss_mib:g}), "
            f"slowest /health {r['max_health_ms']:.0f} ms of {r['probes']} probes (limit {args.max_health_ms:g}) -> "
            f"{'ok' if ok else 'OVER LIMIT'}",
            flush=True,
        )
    print(f"load average before: {load}; after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
