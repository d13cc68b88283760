"""What one huge prompt costs the router: extra RSS, and how long ``/health`` waits meanwhile.

Starts the real router (``vllm-llmd router`` in its own process, with the test model's tokenizer)
in front of a stand-in backend (its own process) that reads and discards the body, samples the router's
RSS (``/proc/PID/status``) every 10 ms and probes ``/health`` every 20 ms while one prompt of
``--mib`` MiB (completions, then chat) goes through. A stall of the router's event loop delays every
probe in flight, so the slowest probe bounds the longest stall. Prints one line per request and
exits 1 if a limit is exceeded (``--max-rss-mib``, ``--max-health-ms``).

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
from pathlib import Path

import aiohttp
from aiohttp import web

from vllm_llmd.testing.engine import free_port
from vllm_llmd.testing.model import make_test_model

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


async def measure(base: str, pid: int, body: bytes, path: str) -> dict[str, float]:
    peak = [rss_mib(pid)]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib(pid))
            time.sleep(0.01)

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
                await asyncio.sleep(0.02)

        prober = asyncio.create_task(probe())
        t0 = time.perf_counter()
        async with s.post(base + path, data=body, headers={"Content-Type": "application/json"}) as r:
            status = r.status
            await r.read()
        took = time.perf_counter() - t0
        await asyncio.sleep(0.2)  # a few probes after the request
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


async def main_async(args: argparse.Namespace) -> int:
    model = make_test_model(Path(tempfile.mkdtemp(prefix="llmd-big-")) / "tiny", shape="tiny")
    bport, rport = free_port(), free_port()
    # the stand-in backend runs in its own process: reading 16 MiB bodies must not slow the probes
    stand_in = subprocess.Popen([sys.executable, __file__, "--serve-backend", str(bport)], start_new_session=True)
    cmd = [
        sys.executable,
        "-m",
        "vllm_llmd.cli",
        "router",
        "--port",
        str(rport),
        "--worker",
        f"http://127.0.0.1:{bport}",
    ]
    cmd += ["--tokenizer", str(model), "--model", "test-model", "--log-level", "warning"]
    router = subprocess.Popen(cmd, start_new_session=True)
    base = f"http://127.0.0.1:{rport}"
    failed = False
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(300):
                try:
                    async with s.post(base + "/v1/completions", json={"model": "test-model", "prompt": "warm up"}) as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        budget = int(args.mib * (1 << 20)) - 200
        text = prose(model, budget)
        base_rss = rss_mib(router.pid)
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"router RSS before: {base_rss:.0f} MiB; prompt {len(text) / (1 << 20):.2f} MiB; load average {load}")
        bodies = {
            "completions": ("/v1/completions", {"model": "test-model", "prompt": text, "max_tokens": 1}),
            "chat": ("/v1/chat/completions", {"model": "test-model", "messages": [{"role": "user", "content": text}]}),
        }
        for name, (path, payload) in bodies.items():
            body = json.dumps(payload, ensure_ascii=False).encode()
            while len(body) > budget + 200:  # non-ASCII characters take more than one byte
                cut = len(body) - budget - 200
                key = "prompt" if "prompt" in payload else "messages"
                if key == "prompt":
                    payload["prompt"] = payload["prompt"][:-cut]
                else:
                    payload["messages"][0]["content"] = payload["messages"][0]["content"][:-cut]
                body = json.dumps(payload, ensure_ascii=False).encode()
            r = await measure(base, router.pid, body, path)
            extra = r["peak_rss_mib"] - base_rss
            ok = r["status"] == 200 and extra < args.max_rss_mib and r["max_health_ms"] < args.max_health_ms
            failed |= not ok
            print(
                f"{name}: body {len(body) / (1 << 20):.2f} MiB, HTTP {r['status']} in {r['seconds']:.2f} s, "
                f"extra RSS peak {extra:.0f} MiB (limit {args.max_rss_mib}), slowest /health "
                f"{r['max_health_ms']:.0f} ms of {r['probes']} probes (limit {args.max_health_ms}) -> "
                f"{'ok' if ok else 'OVER LIMIT'}",
                flush=True,
            )
    finally:
        for proc in (router, stand_in):
            proc.terminate()
            proc.wait(10)
    return 1 if failed else 0


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
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
