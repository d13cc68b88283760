"""Issue 9: what a hostile client or a broken pod did to the router, each case kept as a test
(against our in-process stand-in backends; the fuzzing and the soak are in tests/robustness)."""

from __future__ import annotations

import asyncio
import json
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from router_fakes import CliRouter, FakeBackend, config_for, start_router

from vllm_llmd.testing.model import make_test_model
from vllm_llmd.testing.wait import wait_until_async

WORDS = "kari tone musa lovi stra ion ent verdor qua".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_model(tmp_path_factory.mktemp("hardening") / "tiny", shape="tiny")


@pytest.fixture
async def backends() -> AsyncIterator[list[FakeBackend]]:
    bs = [await FakeBackend("a").start(), await FakeBackend("b").start()]
    yield bs
    for b in bs:
        await b.close()


def _prose(n_chars: int) -> str:
    words = " ".join(f"{WORDS[i % len(WORDS)]}{(i * 7) % 97}" for i in range(n_chars // 4 + 1))
    return words[:n_chars]


async def _probe_health(base: str, stop: asyncio.Event) -> list[float]:
    lat: list[float] = []
    async with aiohttp.ClientSession() as s:
        while not stop.is_set():
            t = time.perf_counter()
            async with s.get(base + "/health") as r:
                assert r.status == 200
            lat.append(time.perf_counter() - t)
            await asyncio.sleep(0.01)  # pacing: the probes' inter-arrival gap
    return lat


# ---- case 1: one long prompt -------------------------------------------------------------------


@pytest.mark.timing
async def test_one_long_prompt_neither_blows_up_memory_nor_stalls_health(backends, model_dir: Path) -> None:
    """A 250 KB prompt took the old router's tokenizer cache to hundreds of MB (quadratic) and
    stalled the event loop for about a second."""
    _router, srv = await start_router(config_for(backends, tokenizer={"path": str(model_dir)}))
    base = f"http://127.0.0.1:{srv.port}"
    stop = asyncio.Event()
    tracemalloc.start()
    try:
        prober = asyncio.create_task(_probe_health(base, stop))
        body = {"model": "test-model", "prompt": _prose(250_000), "max_tokens": 1}
        async with aiohttp.ClientSession() as s, s.post(base + "/v1/completions", json=body) as r:
            assert r.status == 200
        peak = tracemalloc.get_traced_memory()[1]
        stop.set()
        lat = await prober
    finally:
        tracemalloc.stop()
        await srv.close()
    assert peak < 64 << 20, f"peak {peak / 2**20:.0f} MiB"
    assert len(lat) >= 3 and max(lat) < 1.0, max(lat)


# ---- case 2: kv_transfer_params through vllm_xargs ----------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        {"vllm_xargs": {"kv_transfer_params": "anything", "keep": 1}},
        {"vllm_xargs": {"ec_transfer_params": "anything", "keep": 1}},
        {"ec_transfer_params": {"remote_host": "evil"}, "vllm_xargs": {"keep": 1}},
        {"extra_body": {"ec_transfer_params": {}}, "vllm_xargs": {"keep": 1}},
    ],
)
async def test_client_transfer_params_are_stripped_from_every_place_vllm_reads_them(backends, extra) -> None:
    """vLLM 0.32 fills ``SamplingParams.extra_args`` from ``vllm_xargs`` (then the top-level field),
    and ``Request.kv_transfer_params`` comes from there: a client must reach neither way."""
    _router, srv = await start_router(config_for(backends))
    try:
        body = {"model": "test-model", "prompt": "x", "max_tokens": 1, **extra}
        async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{srv.port}/v1/completions", json=body) as r:
            assert r.status == 200
        got = next(b for b in backends if b.received).received[0]
        for where in (got, got.get("vllm_xargs", {}), got.get("extra_body", {})):
            assert "kv_transfer_params" not in where and "ec_transfer_params" not in where, got
        assert got["vllm_xargs"] == {"keep": 1}  # everything else passes through
    finally:
        await srv.close()


# ---- case 3: numbers at their limits ------------------------------------------------------------


async def test_a_huge_max_tokens_is_a_400_and_nobody_else_suffers(backends) -> None:
    """A 400-digit ``max_tokens`` passed validation and, while in flight, failed every other request
    with a 500 (``OverflowError`` in the scorers)."""
    gate = asyncio.Event()
    for b in backends:
        b.gate = gate  # a stream that got through would stay in flight
    _router, srv = await start_router(config_for(backends))
    url = f"http://127.0.0.1:{srv.port}/v1/completions"
    try:
        async with aiohttp.ClientSession() as s:
            huge = {"model": "test-model", "prompt": "x", "max_tokens": int("9" * 400), "stream": True}
            async with s.post(url, json=huge) as r:
                assert r.status == 400
                assert "max_tokens" in (await r.json())["error"]["message"]
            chat = {"model": "test-model", "messages": [{"role": "user", "content": "x"}]}
            chat["max_completion_tokens"] = 10**30
            async with s.post(url.replace("/completions", "/chat/completions"), json=chat) as r:
                assert r.status == 400
            gate.set()
            async with s.post(url, json={"model": "test-model", "prompt": "y", "max_tokens": 2}) as r:
                assert r.status == 200
    finally:
        gate.set()
        await srv.close()


async def test_huge_numbers_in_a_pods_metrics_never_crash_scoring_or_health(backends, caplog) -> None:
    """A 4,000-digit ``num_gpu_blocks`` gave every request a 500; a 5,000-digit one killed the health
    task silently, so a pod whose ``/health`` said 503 stayed available."""
    backends[0].num_gpu_blocks = "9" * 4000
    backends[1].num_gpu_blocks = "9" * 5000
    router, srv = await start_router(config_for(backends, pool={"health_interval_s": 0.05, "failure_threshold": 1}))
    url = f"http://127.0.0.1:{srv.port}/v1/completions"
    try:
        await wait_until_async(lambda: all(b.metrics_requests >= 1 for b in backends), 10, "capacity read")
        assert all(p.capacity_blocks is None for p in router.pool.pods)  # rejected, not taken
        assert "num_gpu_blocks" in caplog.text  # with a log line
        async with aiohttp.ClientSession() as s:
            for i in range(4):
                async with s.post(url, json={"model": "test-model", "prompt": "p" * 300 + str(i)}) as r:
                    assert r.status == 200
            backends[1].healthy = False
            await wait_until_async(lambda: len(router.pool.available()) == 1, 10, "the failing pod marked down")
    finally:
        await srv.close()


async def test_a_failing_background_loop_is_logged_and_restarted(caplog) -> None:
    from vllm_llmd.router.pool import supervise

    runs = 0

    async def loop() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise ValueError(f"boom {runs}")
        await asyncio.Event().wait()

    task = asyncio.create_task(supervise("test", loop, first_delay_s=0.01))
    try:
        await wait_until_async(lambda: runs == 3, 5, "two restarts")
    finally:
        task.cancel()
    assert "the test loop failed" in caplog.text and "boom 2" in caplog.text


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b'{"model": "test-model", "prompt": [1, -1, 2]}', "token ids"),
        (b'{"model": "test-model", "prompt": [1, 4294967296]}', "token ids"),
        (b'{"model": "test-model", "prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", "deep"),
        (b'{"model": "test-model", "prompt": "x", "max_tokens": 1e400}', "JSON"),
    ],
)
async def test_bad_numbers_and_deep_json_get_a_json_400(backends, raw: bytes, text: str) -> None:
    """Token ids out of uint32 and 10k-deep JSON gave aiohttp's plain-text 500."""
    _router, srv = await start_router(config_for(backends, max_body_bytes=1 << 20))
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"http://127.0.0.1:{srv.port}/v1/completions", data=raw) as r,
        ):
            assert r.status == 400
            assert r.headers["Content-Type"].startswith("application/json")
            err = (await r.json())["error"]
            assert err["code"] == 400 and text in err["message"]
        assert not any(b.received for b in backends)
    finally:
        await srv.close()


async def test_unknown_routes_and_methods_answer_json(backends) -> None:
    _router, srv = await start_router(config_for(backends))
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{srv.port}/nope") as r:
                assert r.status == 404 and (await r.json())["error"]["code"] == 404
            async with s.get(f"http://127.0.0.1:{srv.port}/v1/completions") as r:
                assert r.status == 405 and (await r.json())["error"]["type"] == "MethodNotAllowedError"
    finally:
        await srv.close()


# ---- case 4: slow clients ------------------------------------------------------------------------

PARTIAL = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


async def test_idle_partial_connections_never_lock_new_clients_out(backends) -> None:
    """20k idle partial connections filled the old router's fd limit and every new client was
    refused until they closed. Here the router runs with 256 fds and takes 400 partial connections;
    a new client is still served, and the router keeps at most its connection bound."""
    import resource

    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    cli = CliRouter(["--worker", backends[0].url, "--model", "test-model"], preexec_fn=low_fd_limit)
    writers: list[asyncio.StreamWriter] = []
    try:
        await cli.ready()
        async with aiohttp.ClientSession() as s:
            async with s.get(cli.base + "/health") as r:  # a kept-alive connection stays open throughout
                assert r.status == 200
            for _ in range(400):
                try:
                    _reader, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", cli.port), 5)
                except (OSError, TimeoutError):
                    continue  # the old router stops accepting: the point of the test is the next request
                w.write(PARTIAL)
                writers.append(w)
            # a new client, queued behind all of them
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as fresh,
                fresh.post(cli.base + "/v1/completions", json={"model": "test-model", "prompt": "hi"}) as r,
            ):
                assert r.status == 200
    finally:
        for w in writers:
            w.close()
        cli.stop()


async def test_a_client_slow_to_send_headers_or_body_is_cut_off(backends) -> None:
    router, srv = await start_router(config_for(backends, server={"header_timeout_s": 0.3, "body_timeout_s": 0.3}))
    try:
        reader, w = await asyncio.open_connection("127.0.0.1", srv.port)
        w.write(PARTIAL)  # headers never finished
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the router
        w.close()
        reader, w = await asyncio.open_connection("127.0.0.1", srv.port)
        w.write(PARTIAL + b"Content-Length: 100\r\n\r\n" + b'{"model": ')  # a body that never completes
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer.startswith(b"HTTP/1.1 408") and b"RequestTimeoutError" in answer
        w.close()
        assert not any(b.received for b in backends)
        assert len(router.guard) <= 1
    finally:
        await srv.close()


# ---- case 5: upstream timeouts and abandoned requests ------------------------------------------


async def test_a_hung_pod_times_out_and_the_next_pod_answers(backends) -> None:
    backends[0].die = "hang"
    router, srv = await start_router(config_for(backends, pool={"first_byte_timeout_s": 0.5}))
    url = f"http://127.0.0.1:{srv.port}/v1/completions"
    try:
        async with aiohttp.ClientSession() as s:
            for i, stream in enumerate((False, True, False, True)):
                t = time.monotonic()
                body = {"model": "test-model", "prompt": f"q{i}", "max_tokens": 1, "stream": stream}
                async with s.post(url, json=body) as r:
                    assert r.status == 200 and r.headers["X-LLMD-Pod"] == backends[1].pod_id
                    await r.read()
                assert time.monotonic() - t < 5
        assert backends[0].received  # it was tried, timed out and was given up
        await wait_until_async(lambda: backends[0].abandoned == len(backends[0].received), 5, "hung requests dropped")
        assert all(ld.requests == 0 for ld in (router.inflight.load(p.id) for p in router.pool.pods))
    finally:
        await srv.close()


async def test_a_stream_that_stalls_is_aborted_after_the_idle_timeout(backends) -> None:
    for b in backends:
        b.die = "hang_midstream"
    router, srv = await start_router(config_for(backends, pool={"stream_idle_timeout_s": 0.5}))
    try:
        body = {"model": "test-model", "prompt": "x", "max_tokens": 3, "stream": True}
        async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{srv.port}/v1/completions", json=body) as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await asyncio.wait_for(r.read(), 10)
        assert all(router.inflight.load(p.id).requests == 0 for p in router.pool.pods)
    finally:
        await srv.close()


def _sample(metrics_text: str, name: str, pod: str | None = None) -> float:
    """The sum of ``name``'s samples (for ``pod`` only, if given) in a ``/metrics`` text; 0 if none."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(name + "{") and (pod is None or f'pod="{pod}"' in line):
            total += float(line.split()[-1])
    return total


async def test_an_abandoned_request_is_dropped_at_once_and_never_sent_again(backends, tmp_path: Path) -> None:
    """The old router kept an abandoned request (and its in-flight count) alive; when the hung pod
    later died, it re-sent the request to another pod. Runs the router as ``vllm-llmd router``."""
    backends[0].die = "hang"
    cfg = tmp_path / "router.yaml"  # the router marks a dead pod down at its first failed health check
    cfg.write_text("pool:\n  health_interval_s: 0.1\n  failure_threshold: 1\n")
    args = ["--config", str(cfg), "--model", "test-model", "--worker", backends[0].url, "--worker", backends[1].url]
    cli = CliRouter(args)
    try:
        await cli.ready()
        for i in range(6):  # some go to the hung pod; those clients give up after 0.3 s
            body = {"model": "test-model", "prompt": f"p{i}" * 50, "max_tokens": 1}
            try:
                async with (
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as c,
                    c.post(cli.base + "/v1/completions", json=body) as r,
                ):
                    await r.read()
            except TimeoutError:
                pass
        hung = len(backends[0].received)
        assert hung >= 1
        served = len(backends[1].received)
        async with aiohttp.ClientSession() as s:

            async def metrics() -> str:
                async with s.get(cli.base + "/metrics") as r:
                    return await r.text()

            async def released() -> bool:
                return _sample(await metrics(), "llmd_router_inflight_requests", backends[0].pod_id) == 0

            await wait_until_async(released, 3, "the abandoned requests' in-flight count released")
            await wait_until_async(lambda: backends[0].abandoned == hung, 3, "the pod saw them dropped")
            await backends[0].close()  # the hung pod dies now

            async def seen_dead() -> str | None:  # the old router re-sent at once, before this
                text = await metrics()
                return text if _sample(text, "llmd_router_pod_available", backends[0].pod_id) == 0 else None

            text = await wait_until_async(seen_dead, 10, "the router marked the dead pod down")
        assert _sample(text, "llmd_router_upstream_retries_total") == 0  # no re-send was even tried
        assert len(backends[1].received) == served  # nothing was re-sent to the other pod
    finally:
        cli.stop()


# ---- case 6: 5xx before the first byte; ejections that last ------------------------------------


async def test_a_pod_answering_500_is_retried_around_and_stays_ejected(backends) -> None:
    """One pod answering 500 while its ``/health`` said OK failed 9 of 20 requests: 5xx were not
    retried, and each ejection was ended by the next passing health check ~1 s later."""
    backends[0].die = "error"
    cfg = config_for(backends, pool={"health_interval_s": 0.05, "ejection_s": 30.0})
    router, srv = await start_router(cfg)
    url = f"http://127.0.0.1:{srv.port}/v1/completions"
    try:
        async with aiohttp.ClientSession() as s:
            for stream in (False, True):
                for i in range(10):
                    body = {"model": "test-model", "prompt": f"q{i}" * 30, "max_tokens": 1, "stream": stream}
                    async with s.post(url, json=body) as r:
                        assert r.status == 200, await r.text()
                        assert r.headers["X-LLMD-Pod"] == backends[1].pod_id
                        await r.read()
        bad = router.pool.get(backends[0].pod_id)
        assert bad is not None and bad.ejected_until > time.monotonic()
        checks = backends[0].health_requests
        await wait_until_async(lambda: backends[0].health_requests >= checks + 5, 10, "health checks passing")
        assert bad.healthy and bad.ejected_until > time.monotonic()  # still ejected: 30 s were asked for
        assert [p.id for p in router.pool.available()] == [backends[1].pod_id]
        assert len(backends[0].received) <= cfg.pool.failure_threshold  # tried until ejected, then left alone
    finally:
        await srv.close()


async def test_a_5xx_is_relayed_when_no_other_pod_is_left(backends) -> None:
    for b in backends:
        b.die = "error"
    _router, srv = await start_router(config_for(backends, pool={"max_retries": 1}))
    try:
        body = {"model": "test-model", "prompt": "x", "max_tokens": 1}
        async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{srv.port}/v1/completions", json=body) as r:
            assert r.status == 500  # the last pod's own answer, as it sent it
            assert (await r.json())["error"]["message"] == "EngineCore encountered an issue"
        assert len(backends[0].received) + len(backends[1].received) == 2  # 1 + max_retries
    finally:
        await srv.close()


# ---- case 8 (router part): compressed request bodies --------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_compressed_body_is_forwarded_decoded_without_its_encoding_header(backends, encoding: str) -> None:
    """The old router decoded a ``Content-Encoding: gzip`` body and forwarded it with the header."""
    import gzip
    import json
    import zlib

    _router, srv = await start_router(config_for(backends))
    raw = json.dumps({"model": "test-model", "prompt": "hello " * 100, "max_tokens": 1}).encode()
    data = gzip.compress(raw) if encoding == "gzip" else zlib.compress(raw)
    headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"http://127.0.0.1:{srv.port}/v1/completions", data=data, headers=headers) as r,
        ):
            assert r.status == 200
        got = next(b for b in backends if b.received)
        assert got.received[0]["prompt"] == "hello " * 100
        assert "Content-Encoding" not in got.headers[0]
    finally:
        await srv.close()


async def test_a_compressed_body_is_bounded_by_its_decoded_size(backends) -> None:
    import gzip

    _router, srv = await start_router(config_for(backends, max_body_bytes=1 << 20))
    bomb = gzip.compress(b'{"model": "test-model", "prompt": "' + b"a" * (64 << 20) + b'"}')
    assert len(bomb) < 1 << 20  # small on the wire, 64 MiB decoded
    tracemalloc.start()
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                f"http://127.0.0.1:{srv.port}/v1/completions",
                data=bomb,
                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
            ) as r,
        ):
            assert r.status == 413
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        await srv.close()
    assert peak < 16 << 20, peak
    assert not any(b.received for b in backends)


async def test_failures_of_requests_in_flight_do_not_lengthen_an_ejection() -> None:
    from vllm_llmd.router.config import PodConfig, PoolConfig
    from vllm_llmd.router.pool import PodPool

    pool = PodPool(PoolConfig(ejection_s=2.0, max_ejection_s=30.0))
    pool.set_pods([PodConfig(url="http://127.0.0.1:9")])
    pod = pool.pods[0]
    for _ in range(10):  # ten requests in flight when the pod died, all failing at once
        pool.report_connect_failure(pod, "connection refused")
    assert pod.ejections == 1 and pod.ejected_until - time.monotonic() <= 2.0


async def test_request_bodies_held_at_once_are_bounded(backends) -> None:
    """Connections x 16 MiB bodies was unbounded: bodies in flight now have a byte budget (503 beyond)."""
    gate = asyncio.Event()
    for b in backends:
        b.gate = gate  # streams stay in flight, their bodies held
    cfg = config_for(backends, max_body_bytes=32 << 10, server={"max_body_bytes_in_flight": 64 << 10})
    router, srv = await start_router(cfg)
    url = f"http://127.0.0.1:{srv.port}/v1/completions"
    body = {"model": "test-model", "prompt": "x" * 30_000, "max_tokens": 1, "stream": True}
    try:
        async with aiohttp.ClientSession() as s:
            held = [await s.post(url, json=body) for _ in range(2)]
            assert [r.status for r in held] == [200, 200]
            async with s.post(url, json=body) as r:
                assert r.status == 503 and r.headers["Retry-After"] == "1"
            async with s.post(url, json={"model": "test-model", "prompt": "small"}) as r:
                assert r.status == 200  # a small body still fits
            gate.set()
            for r in held:
                await r.read()
                r.release()
            await wait_until_async(lambda: router.bodies.held == 0, 5, "bodies released")
            async with s.post(url, json=body) as r:
                assert r.status == 200
    finally:
        gate.set()
        await srv.close()


@pytest.mark.timing
async def test_a_huge_list_of_token_ids_is_checked_off_the_event_loop(backends) -> None:
    """A 16 MiB body of token ids (millions of them) is checked and keyed on a worker thread; a bad
    id anywhere in it is still a 400."""
    _router, srv = await start_router(config_for(backends, max_body_bytes=16 << 20))
    url = f"http://127.0.0.1:{srv.port}/v1/completions"
    stop = asyncio.Event()
    # the bodies are encoded before probing starts: this test's client shares the router's event loop,
    # and encoding 13 MiB of JSON on it (~1 s on a loaded box) would be a stall of the test's own
    ids = list(range(1, 1_500_000))  # ~13 MiB of JSON
    good = json.dumps({"model": "test-model", "prompt": ids, "max_tokens": 1}).encode()
    bad = json.dumps({"model": "test-model", "prompt": [*ids, -1], "max_tokens": 1}).encode()
    headers = {"Content-Type": "application/json"}
    try:
        prober = asyncio.create_task(_probe_health(f"http://127.0.0.1:{srv.port}", stop))
        async with aiohttp.ClientSession() as s:
            async with s.post(url, data=good, headers=headers) as r:
                assert r.status == 200
            async with s.post(url, data=bad, headers=headers) as r:
                assert r.status == 400 and "token ids" in (await r.json())["error"]["message"]
        stop.set()
        lat = await prober
    finally:
        stop.set()
        await srv.close()
    assert lat and max(lat) < 1.0
