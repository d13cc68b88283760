"""Liveness (``/livez``) and readiness (``/readyz``) of the router (vllm_llmd/router/probes.py),
against our own in-process backends and vLLM's own ZMQ event publisher; gateway mode's gRPC health
services follow the same checks."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import zmq
from router_fakes import FakeBackend, config_for, start_router

from vllm_llmd.router.config import PodConfig, RouterConfig
from vllm_llmd.router.pool import PodPool
from vllm_llmd.router.probes import Probes
from vllm_llmd.testing.engine import free_port
from vllm_llmd.testing.wait import wait_until_async

FAST_HEALTH = {"health_interval_s": 0.05, "failure_threshold": 1}


@pytest.fixture
async def backend() -> AsyncIterator[FakeBackend]:
    b = await FakeBackend("a").start()
    yield b
    await b.close()


async def _get(s: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    async with s.get(url) as r:
        return r.status, await r.json()


async def test_readiness_follows_the_pods_and_liveness_does_not(backend: FakeBackend) -> None:
    router, srv = await start_router(config_for([backend], pool=FAST_HEALTH))
    base = f"http://127.0.0.1:{srv.port}"
    try:
        async with aiohttp.ClientSession() as s:
            assert (await _get(s, base + "/livez"))[0] == 200
            status, body = await _get(s, base + "/readyz")
            assert status == 200 and body["checks"] == {"discovery": True, "pods": True, "index": True}
            backend.healthy = False  # the only engine goes down: the router cannot route

            async def unready() -> bool:
                return (await _get(s, base + "/readyz"))[0] == 503

            await wait_until_async(unready, 10, "/readyz answers 503", interval=0.05)
            status, body = await _get(s, base + "/readyz")
            assert body["checks"]["pods"] is False and "none available" in body["detail"]["pods"]
            assert (await _get(s, base + "/health"))[0] == 503  # /health keeps its meaning
            status, body = await _get(s, base + "/livez")
            assert status == 200 and all(body["checks"].values())  # the process still works
            backend.healthy = True

            async def ready() -> bool:
                return (await _get(s, base + "/readyz"))[0] == 200

            await wait_until_async(ready, 10, "/readyz answers 200 again", interval=0.05)
            # liveness fails when the pool's loops are gone (a process that can no longer health-check)
            await router.pool.stop()
            status, body = await _get(s, base + "/livez")
            assert status == 503 and body["checks"]["pool_loops"] is False
    finally:
        await srv.close()


async def test_readiness_waits_for_the_index_to_sync_from_replay(backend: FakeBackend, test_model_dir: Path) -> None:
    """A (re)started router is unready until every available pod's KV event stream is synced from
    the engine's replay endpoint; an engine started later (vLLM's publisher) makes it ready."""
    from vllm.distributed.kv_events import ZmqEventPublisher

    live = zmq.Context.instance().socket(zmq.PUB)
    live_port = live.bind_to_random_port("tcp://127.0.0.1")
    replay_port = free_port()  # nothing answers replays yet: an engine still starting
    pod = PodConfig(
        url=backend.url, events=f"tcp://127.0.0.1:{live_port}", replay=f"tcp://127.0.0.1:{replay_port}"
    ).model_dump()
    cfg = RouterConfig.model_validate(
        {"models": ["test-model"], "pods": [pod], "tokenizer": {"path": str(test_model_dir)}, "pool": FAST_HEALTH}
    )
    router, srv = await start_router(cfg)
    router.subscriber.replay_timeout_s = 0.2
    base = f"http://127.0.0.1:{srv.port}"
    pub = None
    try:
        async with aiohttp.ClientSession() as s:

            async def replays_failed() -> bool:
                st = router.subscriber.stats().get(backend.pod_id)
                return st is not None and st.connected and st.errors >= 1

            await wait_until_async(replays_failed, 10, "a failed replay", interval=0.05)
            status, body = await _get(s, base + "/readyz")
            assert status == 503 and body["checks"] == {"discovery": True, "pods": True, "index": False}
            assert body["detail"]["index"] == {"waiting_for_replay": [backend.pod_id]}
            pub = ZmqEventPublisher(
                data_parallel_rank=0,
                endpoint=f"tcp://*:{free_port()}",
                replay_endpoint=f"tcp://*:{replay_port}",
                topic="kv@127.0.0.1:1@test-model",
            )

            async def ready() -> bool:
                return (await _get(s, base + "/readyz"))[0] == 200

            await wait_until_async(ready, 15, "/readyz answers 200 once the replay answered", interval=0.05)
            assert router.subscriber.stats()[backend.pod_id].synced
            # the rebuild took at least the failed replays before the engine came up
            sync_s = (await _get(s, base + "/readyz"))[1]["info"]["index_sync_s"]
            assert sync_s is not None and sync_s >= 0.2
    finally:
        await srv.close()
        live.close(linger=0)
        if pub is not None:
            pub.shutdown()


class _Subscriber:
    """The two things the probes read from ``KVEventSubscriber`` (``alive``, ``synced``)."""

    def __init__(self) -> None:
        self.alive = True
        self.done: set[str] = set()

    def synced(self, pod: str) -> bool:
        return pod in self.done

    def sync_seconds(self) -> float | None:
        return None


class _Discovery:
    def __init__(self) -> None:
        self.synced = asyncio.Event()


async def test_index_readiness_latches_and_a_dead_replay_times_out() -> None:
    t = [0.0]
    pool = PodPool(RouterConfig().pool)
    sub, disc = _Subscriber(), _Discovery()
    probes = Probes(pool, sub, lambda: disc, index_sync_timeout_s=30.0, clock=lambda: t[0])
    probes.start()
    a = PodConfig(url="http://10.0.0.1:8000", events="tcp://10.0.0.1:5557", replay="tcp://10.0.0.1:5558")
    r = probes.readiness()
    assert not r.ok and r.checks == {"discovery": False, "pods": False, "index": False}
    disc.synced.set()
    pool.set_pods([a])
    r = probes.readiness()
    assert not r.ok and r.checks["index"] is False and r.detail["index"] == {"waiting_for_replay": [a.pod_id]}
    sub.done.add(a.pod_id)
    assert probes.readiness().ok
    # a scale-up: the new pod's stream is not synced yet, but the replicas stay ready (latched)
    b = PodConfig(url="http://10.0.0.2:8000", events="tcp://10.0.0.2:5557", replay="tcp://10.0.0.2:5558")
    pool.set_pods([a, b])
    assert probes.readiness().ok
    # a fresh router whose one pod never answers replays is ready after index_sync_timeout_s
    fresh = Probes(pool, _Subscriber(), lambda: disc, index_sync_timeout_s=30.0, clock=lambda: t[0])
    fresh.start()
    assert not fresh.readiness().ok
    t[0] = 30.0
    r = fresh.readiness()
    assert r.ok and r.detail["index"] == {"unsynced_after_timeout": sorted([a.pod_id, b.pod_id])}
    # liveness: the KV subscriber thread is part of "the process works"
    sub.alive = False
    assert probes.liveness().checks["kv_subscriber"] is False and not probes.liveness().ok


async def test_gateway_grpc_health_follows_readiness(backend: FakeBackend) -> None:
    """Kubernetes probes the ext_proc port with gRPC health, service "readiness"
    (examples/kubernetes/components/gateway/router-ext-proc-patch.yaml): every service the router
    registers answers SERVING while it can route, the readiness ones NOT_SERVING while it cannot
    (liveness stays SERVING), an unknown service NOT_FOUND (a probe naming it would fail)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from vllm_llmd.gateway.server import HEALTH_SERVICES, READINESS_SERVICES, GatewayOptions, serve_gateway
    from vllm_llmd.router.server import build_router

    cfg = config_for([backend], pool=FAST_HEALTH).model_copy(update={"port": free_port()})
    addr = f"127.0.0.1:{free_port()}"
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve_gateway(build_router(cfg), GatewayOptions(ext_proc=addr), ready, stop))
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    try:
        await asyncio.wait_for(ready.wait(), 30)
        async with grpc.aio.insecure_channel(addr) as ch:
            stub = health_pb2_grpc.HealthStub(ch)

            async def statuses() -> dict[str, int]:
                out = {}
                for name in HEALTH_SERVICES:
                    out[name] = (await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status
                return out

            async def all_serving() -> bool:
                return set((await statuses()).values()) == {serving}

            await wait_until_async(all_serving, 10, "every gRPC health service SERVING", interval=0.05)
            backend.healthy = False

            async def unready() -> bool:
                st = await statuses()
                return all(st[n] == not_serving for n in READINESS_SERVICES)

            await wait_until_async(unready, 10, "readiness NOT_SERVING with no engine", interval=0.05)
            assert (await statuses())["liveness"] == serving
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Check(health_pb2.HealthCheckRequest(service="no-such-service"), timeout=5)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            backend.healthy = True
            await wait_until_async(all_serving, 10, "SERVING again", interval=0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def test_discovery_without_the_k8s_extra_is_a_clear_error(tmp_path: Path) -> None:
    """``vllm-llmd router`` with ``discovery:`` but no kubernetes-asyncio: exit 2 and one line saying
    what to install, not a traceback (the client is hidden from the process as if not installed)."""
    cfg = tmp_path / "router.yaml"
    cfg.write_text("models: [m]\ndiscovery:\n  selector: {app: vllm}\n")
    code = (
        "import sys; sys.modules['kubernetes_asyncio'] = None\n"
        "from vllm_llmd.cli import main\n"
        f"sys.exit(main(['router', '--config', {str(cfg)!r}, '--port', '0']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "pip install 'vllm-llmd[k8s]'" in out.stderr and "Traceback" not in out.stderr
