"""Optional API keys and a TLS listener (issue 14)."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from router_fakes import FakeBackend, config_for

from vllm_llmd.router.config import ConfigError, parse_config
from vllm_llmd.router.front import start_server
from vllm_llmd.router.server import build_router


@pytest.fixture
async def pods() -> AsyncIterator[list[FakeBackend]]:
    bs = [await FakeBackend("a").start()]
    yield bs
    for b in bs:
        await b.close()


async def test_api_keys(pods: list[FakeBackend]) -> None:
    router = build_router(config_for(pods, server={"api_keys": ["k-one", "k-two"]}))
    srv = await start_server(router.runner(), "127.0.0.1", 0)
    base = f"http://127.0.0.1:{srv.port}"
    body = {"model": "test-model", "prompt": "x", "max_tokens": 1}
    try:
        async with aiohttp.ClientSession() as s:
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic k-one"}):
                async with s.post(base + "/v1/completions", json=body, headers=headers) as r:
                    assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
                    assert (await r.json())["error"]["type"] == "AuthenticationError"
            for path in ("/tokenize", "/v1/models"):
                async with s.request("POST" if path == "/tokenize" else "GET", base + path) as r:
                    assert r.status == 401, path
            assert not pods[0].received and not pods[0].other_calls  # nothing reached a pod
            for key in ("k-one", "k-two"):
                async with s.post(base + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
                    assert r.status == 200
            for path in ("/health", "/metrics"):  # probes and Prometheus need no key
                async with s.get(base + path) as r:
                    assert r.status == 200, path
        assert pods[0].headers[-1]["Authorization"] == "Bearer k-two"  # forwarded as sent
    finally:
        await srv.close()


def test_bad_server_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="go together"):
        parse_config({"server": {"tls_cert": "/x.pem"}})
    with pytest.raises(ConfigError, match="empty key"):
        parse_config({"server": {"api_keys": [""]}})


async def test_tls_listener(pods: list[FakeBackend], tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    from vllm_llmd.router.auth import tls_context

    router = build_router(config_for(pods, server={"tls_cert": str(cert), "tls_key": str(key)}))
    srv = await start_server(router.runner(), "127.0.0.1", 0, ssl_context=tls_context(str(cert), str(key)))
    client_ctx = ssl.create_default_context(cafile=str(cert))
    try:
        async with aiohttp.ClientSession() as s:
            body = {"model": "test-model", "prompt": "x", "max_tokens": 1}
            async with s.post(f"https://127.0.0.1:{srv.port}/v1/completions", json=body, ssl=client_ctx) as r:
                assert r.status == 200
            with pytest.raises(aiohttp.ClientError):  # plain HTTP to the TLS port
                async with s.post(f"http://127.0.0.1:{srv.port}/v1/completions", json=body) as r:
                    await r.read()
    finally:
        await srv.close()
