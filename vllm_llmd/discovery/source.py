"""Kubernetes discovery: keep the router's pod pool and KV-event subscriptions equal to the pods
that a label selector, or an InferencePool, selects — without a restart.

The client is **kubernetes-asyncio** (PyPI ``kubernetes-asyncio``, the ``k8s`` extra). Why this one
of the four maintained Python clients:

* it is asyncio on **aiohttp**, which the router already runs on (one event loop, one HTTP stack;
  ``lightkube`` and ``kr8s`` bring httpx/anyio, the official ``kubernetes`` client is synchronous
  and would need a thread per watch);
* it is generated from the Kubernetes OpenAPI spec like the official client, so every list/watch
  parameter this module needs is public API (``allow_watch_bookmarks``, ``resource_version``,
  ``timeout_seconds``, ``limit``/``_continue``, ``field_selector``), custom resources
  (InferencePool) need no code generation (``CustomObjectsApi``), and its models (``V1Pod`` ...)
  are the ones the tests build objects from;
* it loads in-cluster service-account credentials (refreshing the projected token) and kubeconfig
  files (exec plugins, OIDC) the same way kubectl does.

We do not use its ``watch.Watch`` helper: it resumes silently and retries a 410 once with the same
resourceVersion; :mod:`vllm_llmd.discovery.listwatch` runs the list/watch loop explicitly so a
410 always relists and every resume is counted.

What is read from each pod: :mod:`vllm_llmd.discovery.pods`. Outputs, after every change:

* ``pool.set_pods(static + routable)`` — the static ``pods:`` of the config first, then every
  discovered endpoint whose pod is ready (``PodPool.set_pods`` keeps the state of pods it already
  has);
* ``subscriber.add_pod`` / ``remove_pod`` — every discovered endpoint with an events port is
  subscribed to while its pod exists with an IP, ready or not; a pod that is deleted, finished, or
  changes IP or ports is unsubscribed, which drops its entries from the KV index;
* ``on_removed(pod_id)`` callbacks — for per-pod router state (approximate prefix memory) of pods
  that are gone.

State read elsewhere: :attr:`synced` (the first list applied; the readiness probe, ``vllm_llmd.router.probes``),
:meth:`stats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from vllm_llmd.discovery.inferencepool import PLURAL, BadPool, PoolTarget, parse_pool
from vllm_llmd.discovery.listwatch import ListWatch
from vllm_llmd.discovery.pods import BadPod, DiscoveredPod, PodDefaults, read_pod
from vllm_llmd.router.config import ConfigError, DiscoveryConfig, PodConfig

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class PodSink(Protocol):
    def set_pods(self, configs: Sequence[PodConfig]) -> None: ...


class EventSink(Protocol):
    def add_pod(self, pod: str, endpoint: str, replay_endpoint: str | None = None) -> None: ...
    def remove_pod(self, pod: str) -> None: ...


def default_namespace() -> str:
    """``$POD_NAMESPACE`` (downward API), else the service account's namespace, else ``default``."""
    ns = os.environ.get("POD_NAMESPACE")
    if ns:
        return ns
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


def label_selector(selector: str | dict[str, str]) -> str:
    if isinstance(selector, str):
        return selector
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


async def make_api_client(cfg: DiscoveryConfig) -> Any:
    """A kubernetes-asyncio ``ApiClient``: ``api_server`` (plain HTTP, no credentials), else
    ``kubeconfig``, else in-cluster, else the default kubeconfig."""
    from kubernetes_asyncio import client, config

    conf = client.Configuration()
    if cfg.api_server:
        conf.host = cfg.api_server.rstrip("/")
    elif cfg.kubeconfig:
        await config.load_kube_config(config_file=cfg.kubeconfig, client_configuration=conf)
    else:
        try:
            config.load_incluster_config(client_configuration=conf)
        except config.ConfigException:
            await config.load_kube_config(client_configuration=conf)
    return client.ApiClient(configuration=conf)


class KubernetesDiscovery:
    def __init__(
        self,
        cfg: DiscoveryConfig,
        pool: PodSink,
        subscriber: EventSink | None = None,
        *,
        static: Sequence[PodConfig] = (),
        on_removed: Sequence[Callable[[str], None]] = (),
    ) -> None:
        if importlib.util.find_spec("kubernetes_asyncio") is None:
            raise ConfigError("discovery: the Kubernetes client is not installed: pip install 'vllm-llmd[k8s]'")
        self.cfg = cfg
        self.namespace = cfg.namespace or default_namespace()
        self.pool = pool
        self.subscriber = subscriber
        self.static = list(static)
        self._static_ids = {p.pod_id for p in static}
        self.on_removed = list(on_removed)
        self.defaults = PodDefaults(
            scheme=cfg.scheme, port=cfg.port, events_port=cfg.events_port or None, replay_port=cfg.replay_port or None
        )
        self._api: Any = None
        self._pool_watch: ListWatch | None = None
        self._pod_watch: ListWatch | None = None
        self._pool_task: asyncio.Task[None] | None = None
        self._pod_task: asyncio.Task[None] | None = None
        #: pool mode: the pool's selector and ports (None: not seen yet, or deleted, or unusable)
        self._target: PoolTarget | None = None
        #: the label selector of the running pod watch (pool mode)
        self._watching: str | None = None
        self._target_seen = False
        self._retargets: set[asyncio.Task[None]] = set()
        self._retarget_lock = asyncio.Lock()
        #: pod name -> the pod's JSON and what was read from it
        self._raw: dict[str, dict[str, Any]] = {}
        self._pods: dict[str, DiscoveredPod] = {}
        #: pod name -> the reason it was skipped last (logged once per new reason)
        self._skipped: dict[str, str] = {}
        self._routed: list[PodConfig] = []
        self._subscribed: dict[str, tuple[str, str | None]] = {}
        self._known: set[str] = set()
        self.synced = asyncio.Event()

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        from kubernetes_asyncio import client

        try:
            self._api = await make_api_client(self.cfg)
        except Exception as e:
            raise RuntimeError(f"discovery: cannot load Kubernetes credentials: {type(e).__name__}: {e}") from e
        if self.cfg.inference_pool is not None:
            group, version = self.cfg.inference_pool_api.split("/")
            call = functools.partial(
                client.CustomObjectsApi(self._api).list_namespaced_custom_object,
                group,
                version,
                self.namespace,
                PLURAL,
                field_selector=f"metadata.name={self.cfg.inference_pool}",
            )
            self._pool_watch = self._listwatch(
                call,
                f"InferencePool {self.namespace}/{self.cfg.inference_pool}",
                self._on_pool_list,
                self._on_pool_event,
            )
            self._pool_task = asyncio.create_task(self._pool_watch.run(), name="k8s-inferencepool-watch")
        else:
            assert self.cfg.selector is not None
            self._start_pod_watch(label_selector(self.cfg.selector))
        log.info("kubernetes discovery started in namespace %s (%s)", self.namespace, self._describe())

    async def stop(self) -> None:
        for task in (self._pool_task, *self._retargets, self._pod_task):
            if task is not None:
                task.cancel()
        for task in (self._pool_task, *self._retargets, self._pod_task):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._pool_task = self._pod_task = None
        if self._api is not None:
            await self._api.close()
            self._api = None

    async def lifecycle(self, app: Any) -> Any:
        """For ``aiohttp.web.Application.cleanup_ctx``."""
        await self.start()
        yield
        await self.stop()

    def stats(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "source": self._describe(),
            "synced": self.synced.is_set(),
            "pods_seen": len(self._pods),
            "pods_skipped": dict(self._skipped),
            "endpoints_routed": len(self._routed),
            "endpoints_subscribed": len(self._subscribed),
            "pool_watch": vars(self._pool_watch.stats) if self._pool_watch else None,
            "pod_watch": vars(self._pod_watch.stats) if self._pod_watch else None,
        }

    def _describe(self) -> str:
        if self.cfg.inference_pool is not None:
            return f"InferencePool {self.cfg.inference_pool} ({self.cfg.inference_pool_api})"
        return f"selector {label_selector(self.cfg.selector or '')!r}"

    def _listwatch(self, call: Any, what: str, on_list: Any, on_event: Any) -> ListWatch:
        return ListWatch(
            call,
            what,
            on_list,
            on_event,
            watch_timeout_s=self.cfg.watch_timeout_s,
            backoff_s=self.cfg.backoff_s,
            backoff_max_s=self.cfg.backoff_max_s,
        )

    # ------------------------------------------------------------- pod watch
    def _start_pod_watch(self, selector: str) -> None:
        from kubernetes_asyncio import client

        call = functools.partial(
            client.CoreV1Api(self._api).list_namespaced_pod, self.namespace, label_selector=selector
        )
        self._pod_watch = self._listwatch(
            call, f"pods {self.namespace} {selector!r}", self._on_pod_list, self._on_pod_event
        )
        self._pod_task = asyncio.create_task(self._pod_watch.run(), name="k8s-pod-watch")

    async def _stop_pod_watch(self) -> None:
        task, self._pod_task = self._pod_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _read(self, obj: dict[str, Any]) -> DiscoveredPod | None:
        name = str((obj.get("metadata") or {}).get("name", "?"))
        try:
            pod = read_pod(obj, self.defaults, self._target.ports if self._target else None)
        except BadPod as e:
            reason = str(e)
            if self._skipped.get(name) != reason:
                log.warning("discovery: skipping %s", reason)
            self._skipped[name] = reason
            return None
        if pod.ip is None and not pod.gone:
            reason = "no pod IP yet"
            if self._skipped.get(name) != reason:
                log.info("discovery: pod %s has no IP yet", name)
            self._skipped[name] = reason
        else:
            self._skipped.pop(name, None)
        return pod

    def _on_pod_list(self, items: list[dict[str, Any]]) -> None:
        self._raw = {str(o.get("metadata", {}).get("name")): o for o in items}
        self._pods = {}
        self._skipped = {}
        for name, obj in self._raw.items():
            pod = self._read(obj)
            if pod is not None:
                self._pods[name] = pod
        self._apply()
        if self._target is not None or self.cfg.inference_pool is None:
            self.synced.set()

    def _on_pod_event(self, kind: str, obj: dict[str, Any]) -> None:
        name = str((obj.get("metadata") or {}).get("name", ""))
        if not name:
            return
        if kind == "DELETED":
            self._raw.pop(name, None)
            self._pods.pop(name, None)
            self._skipped.pop(name, None)
        else:
            self._raw[name] = obj
            pod = self._read(obj)
            if pod is None:
                self._pods.pop(name, None)
            else:
                self._pods[name] = pod
        self._apply()

    # ------------------------------------------------------------ pool watch
    def _on_pool_list(self, items: list[dict[str, Any]]) -> None:
        obj = items[0] if items else None
        if obj is not None:
            obj = {"apiVersion": self.cfg.inference_pool_api, "kind": "InferencePool", **obj}
        self._set_target(obj)

    def _on_pool_event(self, kind: str, obj: dict[str, Any]) -> None:
        self._set_target(None if kind == "DELETED" else {"apiVersion": self.cfg.inference_pool_api, **obj})

    def _set_target(self, obj: dict[str, Any] | None) -> None:
        target = None
        if obj is None:
            log.warning("discovery: InferencePool %s/%s not found: no pods", self.namespace, self.cfg.inference_pool)
        else:
            try:
                target = parse_pool(obj)
            except BadPool as e:
                log.error("discovery: %s: no pods until it is fixed", e)
        if self._target_seen and target == self._target:
            return
        self._target_seen = True
        self._target = target
        # applied in order (a lock), each time with the newest target
        task = asyncio.get_running_loop().create_task(self._retarget())
        self._retargets.add(task)
        task.add_done_callback(self._retargets.discard)

    async def _retarget(self) -> None:
        async with self._retarget_lock:
            target = self._target
            selector = target.label_selector if target is not None else None
            if selector is not None and selector == self._watching:
                # same pods, maybe other ports: re-read what we have
                self._pods = {n: p for n, o in self._raw.items() if (p := self._read(o)) is not None}
                self._apply()
                return
            await self._stop_pod_watch()
            self._raw, self._pods, self._skipped = {}, {}, {}
            self._watching = selector
            self._apply()
            if target is None:
                self.synced.set()  # the answer is known: no pods
                return
            log.info(
                "discovery: InferencePool %s selects %r, ports %s",
                self.cfg.inference_pool,
                target.label_selector,
                list(target.ports),
            )
            self._start_pod_watch(target.label_selector)

    # ----------------------------------------------------------------- apply
    def _apply(self) -> None:
        routed: list[PodConfig] = []
        subscribed: dict[str, tuple[str, str | None]] = {}
        seen: set[str] = set()
        for name in sorted(self._pods):
            pod = self._pods[name]
            if pod.gone:
                continue
            for ep in pod.endpoints:
                if ep.pod_id in self._static_ids or ep.pod_id in seen:
                    log.warning("discovery: pod %s endpoint %s is already configured; ignored", name, ep.pod_id)
                    continue
                seen.add(ep.pod_id)
                if ep.events:
                    subscribed[ep.pod_id] = (ep.events, ep.replay)
                if pod.routable:
                    routed.append(ep)
        if routed != self._routed:
            added = {p.pod_id for p in routed} - {p.pod_id for p in self._routed}
            dropped = {p.pod_id for p in self._routed} - {p.pod_id for p in routed}
            self._routed = routed
            self.pool.set_pods([*self.static, *routed])
            log.info("discovery: %d pods routable (+%s -%s)", len(routed), sorted(added), sorted(dropped))
        if self.subscriber is not None:
            for pod_id, eps in self._subscribed.items():
                if subscribed.get(pod_id) != eps:
                    self.subscriber.remove_pod(pod_id)
            for pod_id, eps in subscribed.items():
                if self._subscribed.get(pod_id) != eps:
                    self.subscriber.add_pod(pod_id, eps[0], eps[1])
        self._subscribed = subscribed
        for pod_id in self._known - seen:
            for forget in self.on_removed:
                try:
                    forget(pod_id)
                except Exception:
                    log.exception("discovery: forgetting %s failed", pod_id)
        self._known = seen
