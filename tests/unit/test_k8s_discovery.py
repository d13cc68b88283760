"""Kubernetes discovery against a local server speaking the API's list/watch protocol
(vllm_llmd.testing.k8s_api; no cluster runs here), with objects built from kubernetes-asyncio's
own models, feeding the router's real PodPool and the real ZMQ KVEventSubscriber.

Pod IPs are loopback addresses (127.0.0.x): the subscriber really dials them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
import zmq
from kubernetes_asyncio.client import (
    ApiClient,
    V1Container,
    V1ObjectMeta,
    V1Pod,
    V1PodCondition,
    V1PodSpec,
    V1PodStatus,
)
from router_fakes import FakeBackend, start_router

from vllm_llmd.discovery.inferencepool import BadPool, parse_pool
from vllm_llmd.discovery.pods import BadPod, PodDefaults, read_pod
from vllm_llmd.discovery.source import KubernetesDiscovery
from vllm_llmd.index import KVBlockIndex, KVEventSubscriber
from vllm_llmd.router.config import ConfigError, DiscoveryConfig, PoolConfig, RouterConfig, parse_config
from vllm_llmd.router.pool import PodPool
from vllm_llmd.testing.k8s_api import FakeKubeAPI, is_true
from vllm_llmd.testing.wait import wait_until_async
from vllm_llmd.wire import BlockStored, encode_batch

NS = "llm"
POOLS = ("inference.networking.k8s.io", "v1", "inferencepools")


class _Serializer(ApiClient):
    """kubernetes-asyncio's own model -> JSON conversion (``sanitize_for_serialization``) without
    the HTTP session an ``ApiClient`` opens: that method uses no instance state."""

    def __init__(self) -> None:
        pass


_SER = _Serializer()


def pod(
    name: str,
    ip: str | None,
    *,
    ready: bool = True,
    phase: str = "Running",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    deleting: bool = False,
) -> dict[str, Any]:
    model = V1Pod(
        api_version="v1",
        kind="Pod",
        metadata=V1ObjectMeta(
            name=name,
            namespace=NS,
            labels={"app": "vllm", **(labels or {})},
            annotations=annotations,
            deletion_timestamp=datetime(2026, 1, 1, tzinfo=UTC) if deleting else None,
        ),
        spec=V1PodSpec(containers=[V1Container(name="vllm", image="vllm-llmd:cpu")]),
        status=V1PodStatus(
            phase=phase,
            pod_ip=ip,
            conditions=[V1PodCondition(type="Ready", status="True" if ready else "False")],
        ),
    )
    return _SER.sanitize_for_serialization(model)


def pool_v1(selector: dict[str, str], ports: list[int], name: str = "gpu-pool") -> dict[str, Any]:
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"selector": {"matchLabels": selector}, "targetPorts": [{"number": p} for p in ports]},
    }


@pytest.fixture
async def api() -> AsyncIterator[FakeKubeAPI]:
    server = FakeKubeAPI()
    server.register_kind(*POOLS, "InferencePool")
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def subscriber() -> Iterator[KVEventSubscriber]:
    sub = KVEventSubscriber(KVBlockIndex(block_size=16), reconnect_ivl_ms=50, reconnect_ivl_max_ms=200)
    sub.start()
    yield sub
    sub.stop()


def _cfg(api: FakeKubeAPI, **kw: Any) -> DiscoveryConfig:
    data: dict[str, Any] = {"namespace": NS, "api_server": api.url, "backoff_s": 0.05, "backoff_max_s": 0.2}
    data.update(kw)
    if "inference_pool" not in data:
        data.setdefault("selector", {"app": "vllm"})
    return DiscoveryConfig.model_validate(data)


class Harness:
    def __init__(self, api: FakeKubeAPI, sub: KVEventSubscriber, **kw: Any) -> None:
        self.api = api
        self.sub = sub
        self.pool = PodPool(PoolConfig())
        self.forgotten: list[str] = []
        self.disc = KubernetesDiscovery(_cfg(api, **kw), self.pool, sub, on_removed=[self.forgotten.append])

    def routed(self) -> list[str]:
        return sorted(p.id for p in self.pool.pods)

    def subscribed(self) -> list[str]:
        return sorted(self.sub.stats())

    async def until(self, routed: list[str], subscribed: list[str] | None = None, what: str = "") -> None:
        def ok() -> bool:
            return self.routed() == sorted(routed) and (subscribed is None or self.subscribed() == sorted(subscribed))

        try:
            await wait_until_async(ok, 10.0, what or f"routed {routed}, subscribed {subscribed}")
        except AssertionError:
            raise AssertionError(
                f"{what}: routed {self.routed()} (want {sorted(routed)}), subscribed {self.subscribed()} "
                f"(want {subscribed}); discovery {self.disc.stats()}"
            ) from None

    def watch_requests(self) -> list[dict[str, str]]:
        return [q for _, q in self.api.requests if is_true(q.get("watch"))]


@pytest.fixture
async def harness(api: FakeKubeAPI, subscriber: KVEventSubscriber) -> AsyncIterator[Harness]:
    h = Harness(api, subscriber)
    yield h
    await h.disc.stop()


async def test_pods_added_made_not_ready_and_removed_without_restart(api: FakeKubeAPI, harness: Harness) -> None:
    api.put(pod("a", "127.0.0.2"), NS)
    api.put(pod("b", "127.0.0.3", ready=False), NS)  # subscribed (warm index), not routed
    api.put(pod("c", "127.0.0.4", labels={"app": "other"}), NS)  # not selected
    await harness.disc.start()
    await wait_until_async(harness.disc.synced.is_set, 10.0, "first list")
    await harness.until(["127.0.0.2:8000"], ["127.0.0.2:8000", "127.0.0.3:8000"], "initial list")
    ev = harness.sub.stats()["127.0.0.2:8000"]
    assert (ev.endpoint, ev.replay_endpoint) == ("tcp://127.0.0.2:5557", "tcp://127.0.0.2:5558")

    api.put(pod("b", "127.0.0.3"), NS)  # b becomes ready
    await harness.until(["127.0.0.2:8000", "127.0.0.3:8000"], what="b ready")
    api.put(pod("a", "127.0.0.2", ready=False), NS)  # a made not ready: out of the pool, still subscribed
    await harness.until(["127.0.0.3:8000"], ["127.0.0.2:8000", "127.0.0.3:8000"], "a not ready")
    api.put(pod("c", "127.0.0.4"), NS)  # relabelled into the selector: ADDED
    await harness.until(["127.0.0.3:8000", "127.0.0.4:8000"], what="c relabelled in")
    api.put(pod("b", "127.0.0.3", labels={"app": "other"}), NS)  # relabelled out: DELETED
    await harness.until(["127.0.0.4:8000"], ["127.0.0.2:8000", "127.0.0.4:8000"], "b relabelled out")
    api.put(pod("c", "127.0.0.4", deleting=True), NS)  # terminating: out, unsubscribed
    await harness.until([], ["127.0.0.2:8000"], "c terminating")
    api.delete("a", NS)
    await harness.until([], [], "a deleted")
    assert sorted(harness.forgotten) == ["127.0.0.2:8000", "127.0.0.3:8000", "127.0.0.4:8000"]
    st = harness.disc.stats()["pod_watch"]
    assert st["lists"] == 1 and st["watches"] == 1 and st["expired"] == 0 and st["errors"] == 0


async def test_a_dropped_watch_resumes_from_its_resource_version(api: FakeKubeAPI, harness: Harness) -> None:
    api.put(pod("a", "127.0.0.2"), NS)
    await harness.disc.start()
    await harness.until(["127.0.0.2:8000"])
    api.put(pod("b", "127.0.0.3"), NS)
    await harness.until(["127.0.0.2:8000", "127.0.0.3:8000"])
    api.bookmark()
    await wait_until_async(lambda: harness.disc.stats()["pod_watch"]["bookmarks"] == 1, 10.0, "bookmark")
    last_rv = str(api.rv)
    assert harness.disc.stats()["pod_watch"]["resource_version"] == last_rv
    assert api.drop_watches() == 1
    # changes while the watch is down arrive when it resumes, without a relist
    api.delete("a", NS)
    api.put(pod("d", "127.0.0.5"), NS)
    await harness.until(["127.0.0.3:8000", "127.0.0.5:8000"], ["127.0.0.3:8000", "127.0.0.5:8000"], "resumed")
    watches = harness.watch_requests()
    assert len(watches) == 2 and watches[1]["resourceVersion"] == last_rv
    assert is_true(watches[0]["allowWatchBookmarks"]) and watches[0]["labelSelector"] == "app=vllm"
    st = harness.disc.stats()["pod_watch"]
    assert st["lists"] == 1 and st["errors"] == 1 and st["expired"] == 0


@pytest.mark.parametrize("gone_as_http", [False, True], ids=["error-event", "http-410"])
async def test_410_gone_on_resume_relists(subscriber: KVEventSubscriber, gone_as_http: bool) -> None:
    api = FakeKubeAPI(gone_as_http=gone_as_http)
    await api.start()
    h = Harness(api, subscriber)
    try:
        api.put(pod("a", "127.0.0.2"), NS)
        api.put(pod("b", "127.0.0.3"), NS)
        await h.disc.start()
        await h.until(["127.0.0.2:8000", "127.0.0.3:8000"])
        api.drop_watches()
        api.delete("a", NS)  # its DELETED event is lost with the history: only a relist can show it
        api.put(pod("c", "127.0.0.4"), NS)
        api.compact()
        await h.until(["127.0.0.3:8000", "127.0.0.4:8000"], ["127.0.0.3:8000", "127.0.0.4:8000"], "after relist")
        st = h.disc.stats()["pod_watch"]
        assert st["lists"] == 2 and st["expired"] == 1
        lists = [q for _, q in api.requests if not is_true(q.get("watch"))]
        assert len(lists) == 2 and "resourceVersion" not in lists[1]
        assert h.forgotten == ["127.0.0.2:8000"]
    finally:
        await h.disc.stop()
        await api.stop()


async def test_list_pages_are_followed(api: FakeKubeAPI, harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("vllm_llmd.discovery.listwatch.LIST_LIMIT", 2)
    for i in range(5):
        api.put(pod(f"p{i}", f"127.0.0.{10 + i}"), NS)
    await harness.disc.start()
    await harness.until([f"127.0.0.{10 + i}:8000" for i in range(5)])
    lists = [q for _, q in api.requests if not is_true(q.get("watch"))]
    assert [q.get("limit") for q in lists] == ["2", "2", "2"] and "continue" in lists[2]


async def test_inference_pool_selector_and_target_ports(api: FakeKubeAPI, subscriber: KVEventSubscriber) -> None:
    api.put(pod("g1", "127.0.0.2", labels={"pool": "gpu"}), NS)
    api.put(pod("g2", "127.0.0.3", labels={"pool": "gpu", "llmd.ai/role": "prefill"}), NS)
    api.put(pod("n1", "127.0.0.4", labels={"pool": "npu", "llm-d.ai/role": "decode"}), NS)
    api.put(pool_v1({"pool": "gpu"}, [8000, 8001]), NS, POOLS)
    h = Harness(api, subscriber, inference_pool="gpu-pool")
    try:
        await h.disc.start()
        await wait_until_async(h.disc.synced.is_set, 10.0, "synced")
        gpu = ["127.0.0.2:8000", "127.0.0.2:8001", "127.0.0.3:8000", "127.0.0.3:8001"]
        # every target port is an endpoint; events belong to the first port's engine
        await h.until(gpu, ["127.0.0.2:8000", "127.0.0.3:8000"], "gpu pool")
        roles = {p.id: p.role for p in h.pool.pods}
        assert roles["127.0.0.3:8001"] == "prefill" and roles["127.0.0.2:8000"] == "both"
        pool_requests = [q for p, q in api.requests if p.endswith("/inferencepools")]
        assert pool_requests[0]["fieldSelector"] == "metadata.name=gpu-pool"
        pod_requests = [q for p, q in api.requests if p.endswith("/pods")]
        assert pod_requests[0]["labelSelector"] == "pool=gpu"

        api.put(pool_v1({"pool": "gpu"}, [9000]), NS, POOLS)  # ports change: same pods re-read
        await h.until(["127.0.0.2:9000", "127.0.0.3:9000"], ["127.0.0.2:9000", "127.0.0.3:9000"], "new port")
        api.put(pool_v1({"pool": "npu"}, [9000]), NS, POOLS)  # selector change: a new pod watch
        await h.until(["127.0.0.4:9000"], ["127.0.0.4:9000"], "npu pool")
        assert h.pool.pods[0].role == "decode"  # from llm-d's label
        api.put({**pool_v1({"pool": "npu"}, [9000]), "spec": {"selector": {}, "targetPorts": []}}, NS, POOLS)
        await h.until([], [], "invalid pool: no pods")
        api.put(pool_v1({"pool": "npu"}, [9000]), NS, POOLS)
        await h.until(["127.0.0.4:9000"], what="pool fixed")
        api.delete("gpu-pool", NS, POOLS)
        await h.until([], [], "pool deleted")
    finally:
        await h.disc.stop()


async def test_a_missing_inference_pool_means_no_pods_until_created(
    api: FakeKubeAPI, subscriber: KVEventSubscriber
) -> None:
    api.put(pod("g1", "127.0.0.2", labels={"pool": "gpu"}), NS)
    h = Harness(api, subscriber, inference_pool="gpu-pool")
    try:
        await h.disc.start()
        await wait_until_async(h.disc.synced.is_set, 10.0, "synced with no pool")
        assert h.routed() == []
        api.put(pool_v1({"pool": "gpu"}, [8000]), NS, POOLS)
        await h.until(["127.0.0.2:8000"], what="pool created")
    finally:
        await h.disc.stop()


async def test_bad_pods_are_logged_and_skipped(
    api: FakeKubeAPI, harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vllm_llmd.discovery")
    api.put(pod("good", "127.0.0.2"), NS)
    api.put(pod("pending", None, phase="Pending", ready=False), NS)
    api.put(pod("badport", "127.0.0.3", annotations={"llmd.ai/events-port": "five"}), NS)
    api.put(pod("typo", "127.0.0.4", annotations={"llmd.ai/event-port": "5557"}), NS)
    api.put(pod("badrole", "127.0.0.5", labels={"llmd.ai/role": "prefil"}), NS)
    api.put(pod("badspeed", "127.0.0.6", annotations={"llmd.ai/prefill-speed": "-1"}), NS)
    await harness.disc.start()
    await harness.until(["127.0.0.2:8000"], ["127.0.0.2:8000"], "only the good pod")
    skipped = harness.disc.stats()["pods_skipped"]
    assert set(skipped) == {"pending", "badport", "typo", "badrole", "badspeed"}
    text = caplog.text
    assert "llmd.ai/events-port='five' is not a port number" in text
    assert "unknown annotation(s) ['llmd.ai/event-port']" in text
    assert "llmd.ai/role='prefil'" in text and "prefill_speed" in text and "pending has no IP yet" in text
    n = text.count("llmd.ai/events-port='five'")
    api.put(pod("badport", "127.0.0.3", ready=False, annotations={"llmd.ai/events-port": "five"}), NS)
    api.put(pod("pending", "127.0.0.7", annotations={"llmd.ai/events-port": "off"}), NS)  # got an IP
    api.put(pod("typo", "127.0.0.4", annotations={"llmd.ai/events-port": "6000"}), NS)  # fixed
    await harness.until(
        ["127.0.0.2:8000", "127.0.0.4:8000", "127.0.0.7:8000"], ["127.0.0.2:8000", "127.0.0.4:8000"], "fixed"
    )
    assert harness.sub.stats()["127.0.0.4:8000"].endpoint == "tcp://127.0.0.4:6000"
    assert caplog.text.count("llmd.ai/events-port='five'") == n  # the same problem is logged once
    assert harness.disc.stats()["pod_watch"]["errors"] == 0


def test_read_pod_annotations_and_defaults() -> None:
    d = PodDefaults(events_port=None, replay_port=None, port=8080, scheme="https")
    p = read_pod(
        pod(
            "x",
            "fd00::7",
            annotations={"llmd.ai/port": "9000", "llmd.ai/capacity-blocks": "4096", "llmd.ai/events-port": "7000"},
        ),
        d,
    )
    (ep,) = p.endpoints
    assert ep.url == "https://[fd00::7]:9000" and ep.capacity_blocks == 4096
    assert ep.events == "tcp://[fd00::7]:7000" and ep.replay is None and p.routable
    assert read_pod(pod("y", "127.0.0.9"), d).endpoints[0].url == "https://127.0.0.9:8080"
    done = read_pod(pod("z", "127.0.0.9", phase="Succeeded", ready=False), d)
    assert done.gone and not done.routable
    with pytest.raises(BadPod, match=re.escape("llmd.ai/port='0'")):
        read_pod(pod("w", "127.0.0.9", annotations={"llmd.ai/port": "0"}), d)
    with pytest.raises(BadPod, match="without metadata"):
        read_pod({"status": {}}, d)


def test_read_pod_accelerator_label() -> None:
    d = PodDefaults(events_port=None, replay_port=None, port=8080, scheme="http")
    (ep,) = read_pod(pod("n", "127.0.0.9", labels={"llmd.ai/accelerator": "NPU"}), d).endpoints
    assert ep.accelerator == "npu"
    assert read_pod(pod("g", "127.0.0.9"), d).endpoints[0].accelerator is None
    with pytest.raises(BadPod, match="pod b: accelerator"):
        read_pod(pod("b", "127.0.0.9", labels={"llmd.ai/accelerator": "-gpu"}), d)


def test_parse_pool_versions_and_errors() -> None:
    t = parse_pool(pool_v1({"app": "vllm", "tier": "gpu"}, [8000, 8001]))
    assert t.ports == (8000, 8001) and t.label_selector == "app=vllm,tier=gpu"
    old = {
        "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
        "kind": "InferencePool",
        "metadata": {"name": "p"},
        "spec": {"selector": {"app": "vllm"}, "targetPortNumber": 8000, "extensionRef": {"name": "epp"}},
    }
    assert parse_pool(old).ports == (8000,)
    with pytest.raises(BadPool, match="targetPorts"):
        parse_pool(pool_v1({"app": "vllm"}, [8000, 8000]))
    bad = pool_v1({"app": "vllm"}, [8000])
    bad["spec"]["targetPort"] = 1
    with pytest.raises(BadPool, match="targetPort: Extra inputs are not permitted"):
        parse_pool(bad)
    ref = pool_v1({"app": "vllm"}, [8000])
    ref["spec"]["endpointPickerRef"] = {"name": "router"}
    with pytest.raises(BadPool, match="port is required"):
        parse_pool(ref)


def test_discovery_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="exactly one of 'selector' or 'inference_pool'"):
        parse_config({"discovery": {"selector": "app=x", "inference_pool": "p"}})
    with pytest.raises(ConfigError, match="would select every pod"):
        parse_config({"discovery": {"selector": {}}})
    with pytest.raises(ConfigError, match=re.escape("unknown key 'discovery.selectr'")):
        parse_config({"discovery": {"selectr": "app=x"}})


async def test_router_wiring_routes_to_discovered_pods_and_drops_removed_pods_from_the_index(
    api: FakeKubeAPI, test_model_dir: Any
) -> None:
    """server.py: a ``discovery:`` config starts the source with the app; requests reach a pod
    that appeared after start-up; a deleted pod leaves the pool and its KV index entries go."""

    backend = await FakeBackend("pod-a").start()
    assert backend.server is not None
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    events_port = pub.bind_to_random_port("tcp://127.0.0.1")
    cfg = RouterConfig.model_validate(
        {
            "models": ["test-model"],
            "tokenizer": {"path": str(test_model_dir)},
            "index": {"block_size": 16},
            "discovery": _cfg(api).model_dump(),
        }
    )
    router, server = await start_router(cfg)
    try:
        client_url = f"http://127.0.0.1:{server.port}/v1/completions"
        assert router.discovery is not None and router.index is not None
        await wait_until_async(router.discovery.synced.is_set, 10.0, "synced")
        annotations = {
            "llmd.ai/port": str(backend.server.port),
            "llmd.ai/events-port": str(events_port),
            "llmd.ai/replay-port": "off",
        }
        api.put(pod("a", "127.0.0.1", annotations=annotations), NS)
        pod_id = f"127.0.0.1:{backend.server.port}"
        await wait_until_async(lambda: [p.id for p in router.pool.pods] == [pod_id], 10.0, "pod in the pool")
        async with aiohttp.ClientSession() as s:
            async with s.post(client_url, json={"model": "test-model", "prompt": "hello", "max_tokens": 2}) as r:
                assert r.status == 200
            assert len(backend.received) == 1
            tokens = list(range(1, 33))
            payload = encode_batch([BlockStored([11, 12], None, tokens, 16, None, "GPU", None)])

            def indexed() -> bool:
                pub.send_multipart([b"kv@127.0.0.1@test-model", (0).to_bytes(8, "big"), payload])
                return pod_id in router.index.pods()

            await wait_until_async(indexed, 10.0, "events from the discovered pod indexed")
            api.delete("a", NS)
            await wait_until_async(lambda: router.pool.pods == [], 10.0, "pod left the pool")
            await wait_until_async(lambda: pod_id not in router.index.pods(), 10.0, "index dropped the pod")
            async with s.post(client_url, json={"model": "test-model", "prompt": "hello", "max_tokens": 2}) as r:
                assert r.status == 503
    finally:
        await server.close()
        await backend.close()
        pub.close(linger=0)
    assert router.discovery._pod_task is None  # stopped with the app
