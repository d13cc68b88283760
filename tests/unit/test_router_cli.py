"""``vllm-llmd router`` as the benchmark harness runs it: a child process, flags only, SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import aiohttp
import pytest
from router_fakes import FakeBackend

from vllm_llmd.testing.engine import free_port
from vllm_llmd.testing.wait import wait_until_async


async def test_cli_router_serves_and_stops_on_sigterm() -> None:
    backend = await FakeBackend("a").start()
    port = free_port()
    events = f"tcp://127.0.0.1:{free_port()}"  # nothing publishes there: the router must still serve
    cmd = [sys.executable, "-m", "vllm_llmd.cli", "router", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--worker", f"{backend.url}={events}", "--model", "test-model", "--log-level", "info"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as s:

            async def healthy() -> bool:
                assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
                try:
                    async with s.get(base + "/health") as r:
                        return r.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_until_async(healthy, 30, "router /health answers 200", interval=0.1)
            body = {"model": "test-model", "prompt": "hello", "max_tokens": 1}
            async with s.post(base + "/v1/completions", json=body) as r:
                assert r.status == 200 and (await r.json())["served_by"] == "a"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.get_running_loop().run_in_executor(None, lambda: proc.wait(30)) == 0
        out = proc.stdout.read().decode() if proc.stdout else ""
        assert "no --tokenizer given" in out  # the approximate fallback is announced once
        assert out.count("approximate scorer") == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await backend.close()


def test_help_is_plain_text(capsys) -> None:
    """``vllm-llmd --help`` printed the module docstring's raw RST (````vllm-llmd````)."""
    from vllm_llmd.cli import main

    for argv in (["--help"], ["router", "--help"], ["make-test-model", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert "``" not in out and ":mod:" not in out and ":class:" not in out
        assert len(out.splitlines()) > 3
