"""Liveness and readiness: what ``/livez`` and ``/readyz`` answer (proxy mode and gateway mode's
HTTP side), and what gateway mode's gRPC health services follow.

``/health`` keeps its own meaning (200 while at least one pod is available, else 503); the probes
are for the platform:

* **Liveness** -- the process works: the answer itself shows the event loop runs (HTTP and gRPC
  share it); the pool's health/metrics loops are running (:attr:`PodPool.running`) and the KV event
  subscriber's thread is alive (:attr:`KVEventSubscriber.alive`). Nothing about the engines: a
  liveness probe that failed while the engines load would restart every router for nothing.
* **Readiness** -- it can route now, and route as its peer replicas do:

  - ``discovery``: Kubernetes discovery, when configured, has applied its first list
    (``KubernetesDiscovery.synced``);
  - ``pods``: at least one pod is known and available (healthy, not ejected, under its in-flight
    cap) to serve generation (role ``both`` or ``decode``);
  - ``index``: every available pod that publishes KV events has had its stream synced from the
    engine's replay endpoint (:meth:`KVEventSubscriber.synced`), so a router that (re)starts
    takes traffic only once its index holds what the engines hold -- the point of active-active
    replicas (docs/kubernetes.md, "Replicas"). This check *latches*: once it has passed, a pod that
    joins later (a scale-up) does not make every replica unready at once; until its stream syncs,
    the new pod only scores no prefix hits. A pod whose replay never answers stops holding
    readiness back after ``server.index_sync_timeout_s`` from start-up (it is named in ``detail``).

Readiness fails while no engine is available (``pods``): with every router unready a Service has no
endpoints and clients are refused at once rather than answered 503 by each router.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vllm_llmd.router.pool import PodPool


class _Subscriber(Protocol):
    @property
    def alive(self) -> bool: ...
    def synced(self, pod: str) -> bool: ...
    def sync_seconds(self) -> float | None: ...


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    #: check name -> passed
    checks: dict[str, bool]
    #: what a failing (or timed-out) check is waiting for
    detail: dict[str, Any] = field(default_factory=dict)
    #: facts for operators (``index_sync_s``: seconds the slowest pod's stream took to sync)
    info: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": "ok" if self.ok else "unavailable", "checks": self.checks}
        if self.detail:
            out["detail"] = self.detail
        if self.info:
            out["info"] = self.info
        return out


class Probes:
    def __init__(
        self,
        pool: PodPool,
        subscriber: _Subscriber | None,
        discovery: Callable[[], Any | None],
        index_sync_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.subscriber = subscriber
        #: the discovery source, when there is one (set on the router after it is built)
        self._discovery = discovery
        self.index_sync_timeout_s = index_sync_timeout_s
        self._clock = clock
        self._started: float | None = None
        self._index_ready = False

    def start(self) -> None:
        """The router started serving: the index sync timeout counts from here."""
        self._started = self._clock()

    def liveness(self) -> ProbeResult:
        checks = {"event_loop": True, "pool_loops": self.pool.running}
        if self.subscriber is not None:
            checks["kv_subscriber"] = self.subscriber.alive
        return ProbeResult(all(checks.values()), checks)

    def readiness(self) -> ProbeResult:
        detail: dict[str, Any] = {}
        disc = self._discovery()
        discovery_ok = disc is None or disc.synced.is_set()
        if not discovery_ok:
            detail["discovery"] = "waiting for the first list of pods"
        available = [p for p in self.pool.available() if p.role != "prefill"]
        pods_ok = bool(available)
        if not pods_ok:
            detail["pods"] = f"{len(self.pool.pods)} pods known, none available"
        index_ok = self._index_check(detail, discovery_ok and pods_ok)
        checks = {"discovery": discovery_ok, "pods": pods_ok, "index": index_ok}
        info = {}
        if self.subscriber is not None:
            info["index_sync_s"] = self.subscriber.sync_seconds()
        return ProbeResult(all(checks.values()), checks, detail, info)

    def _index_check(self, detail: dict[str, Any], pods_known: bool) -> bool:
        sub = self.subscriber
        if sub is None or self._index_ready:
            return True
        if self._started is None or not pods_known:
            detail["index"] = "waiting for pods"
            return False
        waiting = sorted(p.id for p in self.pool.available() if p.config.events and not sub.synced(p.id))
        if not waiting:
            self._index_ready = True
            return True
        if self._clock() - self._started >= self.index_sync_timeout_s:
            # a replay endpoint that never answers must not keep the router out forever
            detail["index"] = {"unsynced_after_timeout": waiting}
            self._index_ready = True
            return True
        detail["index"] = {"waiting_for_replay": waiting}
        return False
