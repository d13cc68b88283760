"""A bounded soak of the router (issue 9): ``vllm-llmd router`` (its own process, the test model's
tokenizer) in front of two stand-in pods (their own process), all on loopback, under a steady mix
of clients for ``LLMD_SOAK_SECONDS`` (default 60): completions and chat, streamed or not, gzip
bodies, clients that leave mid-request, malformed requests, and idle half-sent connections.

After a warm-up that fills the router's bounded caches (small bounds are configured so that they
fill quickly), it checks that the router's RSS and open file descriptors stay flat and that nothing
admitted is lost: every request the router took (anything but a 4xx answer) got a complete answer.
Also a script: ``python tests/robustness/test_soak.py --seconds 180``.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "unit"))

from harness import open_fds, rss_mib  # noqa: E402
from router_fakes import CliRouter, stop_process  # noqa: E402

from vllm_llmd.testing.engine import free_port  # noqa: E402
from vllm_llmd.testing.wait import wait_until_async  # noqa: E402

SOAK_SECONDS = float(os.environ.get("LLMD_SOAK_SECONDS", "60"))
#: flat means: after the warm-up, at most this much growth (a leak per request would show thousands
#: of fds over a soak; the router's pooled upstream connections vary by up to clients x pods = 24)
MAX_RSS_GROWTH_MIB = 24.0
MAX_FD_GROWTH = 24
WORDS = "kari tone musa lovi stra ion ent verdor qua pre lum dor ix ar el om un cy".split()


def _prefix(k: int) -> str:
    return " ".join(f"{WORDS[(k * 7 + i) % len(WORDS)]}{(k + i) % 89}" for i in range(900))


class Load:
    """Closed-loop clients; counts what they sent and what came back."""

    def __init__(self, base: str, seed: int) -> None:
        self.base = base
        self.rng = random.Random(seed)
        self.prefixes = [_prefix(k) for k in range(16)]
        self.counts: Counter[str] = Counter()
        self.lost: list[str] = []

    def _body(self) -> tuple[str, dict[str, Any]]:
        rng = self.rng
        prompt = rng.choice(self.prefixes) + f" question {rng.randrange(10**6)}"
        stream = rng.random() < 0.35
        if rng.random() < 0.2:
            return "/v1/chat/completions", {
                "model": "test-model",
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 4,
                "stream": stream,
            }
        return "/v1/completions", {"model": "test-model", "prompt": prompt, "max_tokens": 4, "stream": stream}

    async def one(self, s: aiohttp.ClientSession) -> None:
        rng = self.rng
        roll = rng.random()
        path, body = self._body()
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if roll < 0.05:  # malformed: must be a 4xx, never a loss
            kind = "malformed"
            data = rng.choice([b"{not json", b"[" * 5000, json.dumps({**body, "max_tokens": 10**40}).encode()])
        elif roll < 0.12:  # the client leaves before the answer is complete
            kind = "abandoned"
        elif roll < 0.2:
            kind = "gzip"
            data = gzip.compress(data)
            headers["Content-Encoding"] = "gzip"
        else:
            kind = "normal"
        self.counts["sent"] += 1
        self.counts[kind] += 1
        try:
            if kind == "abandoned":
                try:
                    async with asyncio.timeout(rng.choice([0.0005, 0.002, 0.01])):
                        async with s.post(self.base + path, data=data, headers=headers) as r:
                            await r.content.readany()
                            await asyncio.sleep(1)  # pacing: a client that stops reading mid-answer
                except TimeoutError:
                    pass
                return
            async with s.post(self.base + path, data=data, headers=headers) as r:
                out = await r.read()
                if kind == "malformed":
                    if not 400 <= r.status < 500:
                        self.lost.append(f"malformed request answered {r.status}")
                    return
                if r.status != 200:
                    self.lost.append(f"{kind} {path}: HTTP {r.status} {out[:200]!r}")
                elif body.get("stream") and not out.endswith(b"data: [DONE]\n\n"):
                    self.lost.append(f"{kind} {path}: truncated stream {out[-100:]!r}")
                elif not body.get("stream") and b'"choices"' not in out:
                    self.lost.append(f"{kind} {path}: incomplete answer {out[:100]!r}")
                else:
                    self.counts["answered"] += 1
        except (aiohttp.ClientError, OSError) as e:
            self.lost.append(f"{kind} {path}: {type(e).__name__}: {e}")

    async def run(self, seconds: float, clients: int = 12, idle_conns: int = 40) -> None:
        deadline = time.monotonic() + seconds
        idle: list[asyncio.StreamWriter] = []
        port = int(self.base.rsplit(":", 1)[1])
        for _ in range(idle_conns):  # half-sent requests, left hanging for the whole phase
            _r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            idle.append(w)

        async def client() -> None:
            async with aiohttp.ClientSession() as s:
                while time.monotonic() < deadline:
                    await self.one(s)

        try:
            await asyncio.gather(*(client() for _ in range(clients)))
        finally:
            for w in idle:
                w.close()


async def _settled_fds(pid: int) -> int:
    """The router's open fds once closed client connections are gone (two equal readings)."""
    last = [-1]

    def steady() -> bool:
        n = open_fds(pid)
        same = n == last[0]
        last[0] = n
        return same

    await wait_until_async(steady, 10, "router fds settle", interval=0.3)
    return last[0]


async def soak(seconds: float, model_dir: Path) -> dict[str, Any]:
    ports = [free_port(), free_port()]
    cfg = {
        "models": ["test-model"],
        "pods": [{"url": f"http://127.0.0.1:{p}"} for p in ports],
        "tokenizer": {"path": str(model_dir), "prefix_cache_bytes": 2 << 20},
        "index": {"memory_blocks_per_pod": 4000},
        "log_level": "warning",
    }
    cfg_file = Path(tempfile.mkdtemp(prefix="llmd-soak-")) / "router.json"
    cfg_file.write_text(json.dumps(cfg))
    standin = subprocess.Popen([sys.executable, str(HERE / "standin.py"), *map(str, ports)], stdout=subprocess.PIPE)
    router: CliRouter | None = None
    try:
        assert standin.stdout is not None
        await asyncio.get_running_loop().run_in_executor(None, standin.stdout.readline)  # "ready"
        router = CliRouter(["--config", str(cfg_file)], stderr=None)
        base = router.base
        await router.ready()
        warm = Load(base, seed=1)
        await warm.run(min(8.0, seconds))
        fd0, rss0 = await _settled_fds(router.pid), rss_mib(router.pid)
        load = Load(base, seed=2)
        t0 = time.monotonic()
        await load.run(seconds)
        took = time.monotonic() - t0
        fd1, rss1 = await _settled_fds(router.pid), rss_mib(router.pid)
        assert router.proc.poll() is None, "router exited"
        return {
            "seconds": round(took, 1),
            "requests sent": load.counts["sent"],
            "answered": load.counts["answered"],
            "malformed": load.counts["malformed"],
            "abandoned": load.counts["abandoned"],
            "requests lost": len(load.lost),
            "lost (first)": load.lost[:3],
            "RSS MiB after warm-up": round(rss0, 1),
            "RSS growth MiB": round(rss1 - rss0, 1),
            "fds after warm-up": fd0,
            "fd growth": fd1 - fd0,
            "warm-up lost": len(warm.lost),
        }
    finally:
        if router is not None:
            router.stop()
        stop_process(standin)


def test_soak_router_stays_flat_and_loses_nothing(robustness_model: Path) -> None:
    from harness import REPORT

    result = asyncio.run(soak(SOAK_SECONDS, robustness_model))
    REPORT["soak"] = result
    assert result["requests lost"] == 0 and result["warm-up lost"] == 0, result
    assert result["answered"] > 100, result
    assert result["RSS growth MiB"] < MAX_RSS_GROWTH_MIB, result
    assert result["fd growth"] <= MAX_FD_GROWTH, result


if __name__ == "__main__":
    from vllm_llmd.testing.model import make_test_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=SOAK_SECONDS)
    args = ap.parse_args()
    model = make_test_model(Path(tempfile.mkdtemp(prefix="llmd-soak-model-")) / "tiny", shape="tiny")
    res = asyncio.run(soak(args.seconds, model))
    print(json.dumps(res, indent=1))
    ok = res["requests lost"] == 0 and res["RSS growth MiB"] < MAX_RSS_GROWTH_MIB and res["fd growth"] <= MAX_FD_GROWTH
    sys.exit(0 if ok else 1)
