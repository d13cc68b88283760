"""Install anywhere (issue 14): a fresh venv with only ``pip install <this repo>`` (a wheel built from
the checkout, no extras) runs the router with a chat-template tokenizer in front of a real engine.

The venv gets the base dependencies from the package index as a user's would (nothing is copied or
linked from the test environment). Its cost (wheel build, venv, install) is printed with the load
average; by hand under load average 14-20 on the 2-core machine: wheel 35-40 s, venv 4-10 s,
install 37 s-2.3 min (37 distributions, 118 MB).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from router_harness import pod_id, prose

from vllm_llmd.testing.engine import free_port
from vllm_llmd.testing.wait import wait_until_async

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], timeout: float) -> float:
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fresh")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    t_wheel = _run([*pip, "wheel", "--quiet", "--no-deps", "-w", str(d / "wheel"), str(ROOT)], 900)
    (wheel,) = (d / "wheel").glob("vllm_llmd-*.whl")
    t_venv = _run([sys.executable, "-m", "venv", str(d / "venv")], 300)
    py = d / "venv" / "bin" / "python"
    t_install = _run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(wheel)], 1200)
    print(
        f"\nfresh install: wheel {t_wheel:.1f} s, venv {t_venv:.1f} s, pip install {t_install:.1f} s "
        f"(load average {os.getloadavg()[0]:.1f})"
    )
    return py


def test_base_install_has_no_heavy_or_test_only_packages(fresh_venv: Path) -> None:
    code = (
        "import importlib.util as u, sys\n"
        "mods = ['torch', 'vllm', 'numpy', 'safetensors', 'transformers', 'grpc', 'kubernetes_asyncio']\n"
        "print(','.join(m for m in mods if u.find_spec(m)))\n"
        # the router and the engine plugin's entry point import
        "import vllm_llmd.router.server, vllm_llmd.plugin, jinja2\n"
    )
    out = subprocess.run([str(fresh_venv), "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"the base install pulled {out.stdout.strip()}"
    # the test-model generator names the extra it needs instead of a traceback
    cli = fresh_venv.parent / "vllm-llmd"
    out = subprocess.run([str(cli), "make-test-model", "/nonexistent"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "vllm-llmd[testing]" in out.stderr


async def test_fresh_router_routes_chat_precisely_to_a_real_engine(fresh_venv: Path, engines, test_model_dir) -> None:
    engine = engines.a
    port = free_port()
    cli = fresh_venv.parent / "vllm-llmd"
    cmd = [str(cli), "router", "--port", str(port), "--tokenizer", str(test_model_dir), "--model", "test-model"]
    cmd += ["--worker", f"{engine.url}={engine.spec.events_endpoint},{engine.spec.replay_endpoint}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:

            async def up() -> bool:
                assert proc.poll() is None, f"the router exited: {proc.stderr.read() if proc.stderr else ''}"
                try:
                    async with s.get(base + "/health") as r:
                        return r.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_until_async(up, 120, "the fresh router's /health answers 200", interval=0.2)
            body = {
                "model": "test-model",
                "messages": [{"role": "system", "content": prose(3, 60)}, {"role": "user", "content": "hi"}],
                "max_tokens": 2,
            }
            async with s.post(base + "/v1/chat/completions", json=body) as r:
                out = await r.json()
                assert r.status == 200, out
                assert r.headers["X-LLMD-Pod"] == pod_id(engine)
            async with s.get(base + "/metrics") as r:
                metrics = await r.text()
        # the router rendered the chat template (chat_template.jinja) and tokenized exactly as the engine
        line = next(x for x in metrics.splitlines() if x.startswith("llmd_router_prompt_tokens_total{"))
        assert float(line.split()[-1]) == out["usage"]["prompt_tokens"], line
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        err = proc.stderr.read() if proc.stderr else ""
    assert "scored approximately" not in err, err
