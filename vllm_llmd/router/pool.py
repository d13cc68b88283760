"""The pods the router can send to: health (active checks + passive outlier detection), circuit
breaking, and the fast ``/metrics`` scrape loop.

Active checks and outlier detection are independent, as in Envoy: a passing health check neither
ends an ejection nor resets the failures that led to one (issue 9: a pod answering 500 while its
``/health`` said OK was let back in a second after each ejection).

Each healthy pod's model list (``/v1/models``) is read with its health checks, every
``models_interval_s`` (:mod:`.models`).

A discovery source (flags, YAML, later Kubernetes) calls :meth:`PodPool.set_pods` with the full
list whenever it changes; pods keep their state across updates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import aiohttp

from vllm_llmd.router.config import PodConfig, PoolConfig
from vllm_llmd.router.inflight import InflightTracker, PodLoad
from vllm_llmd.router.models import ServedModels, fetch_models
from vllm_llmd.router.pod_metrics import PodMetrics, parse_metrics
from vllm_llmd.router.tier_prices import TierPriceLearner

log = logging.getLogger(__name__)

#: largest ``/metrics`` body read from a pod
MAX_METRICS_BYTES = 8 << 20


@dataclass(eq=False)
class Pod:
    config: PodConfig
    id: str = ""
    url: str = ""
    #: set by active health checks; a new pod is assumed up until a check says otherwise
    healthy: bool = True
    #: consecutive failed health checks (active)
    health_failures: int = 0
    #: consecutive failed requests (passive outlier detection)
    consecutive_failures: int = 0
    ejected_until: float = 0.0
    ejections: int = 0
    #: the router's work in flight on the pod: the in-flight tracker's own record, not a copy
    load: PodLoad = field(default_factory=PodLoad)
    metrics: PodMetrics = field(default_factory=PodMetrics)
    #: ``/metrics`` was read once for the KV capacity since the pod last became healthy
    capacity_read: bool = False
    #: the pod's load-back speeds per KV tier, learned from each scrape of its ``/metrics``
    tier_prices: TierPriceLearner = field(default_factory=TierPriceLearner)
    #: ``time.monotonic()`` after which the health check reads ``/metrics`` for the tier prices
    tier_prices_due: float = 0.0
    #: the models and adapters it reported on ``/v1/models`` (``None``: not read yet; :mod:`.models`)
    served: ServedModels | None = None

    def __post_init__(self) -> None:
        self.id = self.config.pod_id
        self.url = self.config.url

    @property
    def role(self) -> str:
        return self.config.role

    @property
    def prefill_speed(self) -> float:
        return self.config.prefill_speed

    @property
    def capacity_blocks(self) -> int | None:
        """KV capacity in the pod's own blocks: configured, else the blocks it keeps without
        recomputing them: its engine cache's (``vllm:cache_config_info``) or, when larger, its DRAM
        tier's (``llmd:kv_tier_capacity_blocks``: a block the engine evicts stays in the tier and is
        loaded back at the tier's price, docs/tiers.md)."""
        if self.config.capacity_blocks:
            return self.config.capacity_blocks
        gpu, dram = self.metrics.num_gpu_blocks, self.metrics.dram_capacity_blocks
        return max(gpu, dram) if gpu and dram else gpu or dram

    def capacity_tokens(self, default_block_size: int) -> int | None:
        """KV capacity in tokens: blocks x the pod's block size (``vllm:cache_config_info``; else
        ``default_block_size``)."""
        blocks = self.capacity_blocks
        return None if blocks is None else blocks * (self.metrics.block_size or default_block_size)

    def available(self, now: float, max_inflight: int) -> bool:
        return self.healthy and now >= self.ejected_until and self.load.requests < max_inflight


class PodPool:
    def __init__(
        self,
        cfg: PoolConfig,
        on_change: Callable[[list[Pod]], None] | None = None,
        inflight: InflightTracker | None = None,
    ) -> None:
        self.cfg = cfg
        #: where each pod's in-flight work is counted (``Pod.load`` is the tracker's record)
        self.inflight = inflight or InflightTracker()
        self._pods: dict[str, Pod] = {}
        self._order: list[Pod] = []
        self._tasks: list[asyncio.Task[None]] = []
        #: health probes in flight (started by the health loop, one per pod, spread over the interval)
        self._probes: set[asyncio.Task[bool]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._on_change = on_change
        self.scrape_metrics = False
        #: called with a pod's id when it turns unhealthy or leaves the pool (what was learned
        #: about it may no longer hold: vllm_llmd.router.speed)
        self.on_pod_lost: list[Callable[[str], None]] = []
        #: called with the pods after every :meth:`set_pods`
        self.on_pods_set: list[Callable[[list[Pod]], None]] = []
        #: read each pod's ``/metrics`` every ``tier_prices_interval_s`` (set when the profile prices tiers)
        self.learn_tier_prices = False

    # ---- membership --------------------------------------------------------------------------
    def set_pods(self, configs: Iterable[PodConfig]) -> None:
        new: dict[str, Pod] = {}
        for c in configs:
            old = self._pods.get(c.pod_id)
            if old is not None and old.config == c:
                new[c.pod_id] = old
            else:
                new[c.pod_id] = Pod(c, load=self.inflight.load(c.pod_id))
        for pid, old in self._pods.items():
            if new.get(pid) is not old:
                self._lost(pid)
        self._pods = new
        self._order = list(new.values())
        if self._on_change is not None:
            self._on_change(self._order)
        for f in self.on_pods_set:
            f(self._order)

    def _lost(self, pod_id: str) -> None:
        for f in self.on_pod_lost:
            f(pod_id)

    @property
    def pods(self) -> list[Pod]:
        return self._order

    def get(self, pod_id: str) -> Pod | None:
        return self._pods.get(pod_id)

    def available(self, now: float | None = None) -> list[Pod]:
        t = time.monotonic() if now is None else now
        m = self.cfg.max_inflight_per_pod
        return [p for p in self._order if p.available(t, m)]

    def retry_after_s(self) -> int:
        """Seconds until an ejected pod comes back (for ``Retry-After``), at least 1."""
        now = time.monotonic()
        waits = [p.ejected_until - now for p in self._order if p.ejected_until > now]
        return max(1, int(min(waits) + 0.999)) if waits else max(1, int(self.cfg.health_interval_s + 0.999))

    # ---- passive outlier detection -----------------------------------------------------------
    def report_failure(self, pod: Pod, reason: str) -> None:
        pod.consecutive_failures += 1
        if pod.consecutive_failures >= self.cfg.failure_threshold and time.monotonic() >= pod.ejected_until:
            self._eject(pod, reason)

    def report_connect_failure(self, pod: Pod, reason: str) -> None:
        """A refused/reset connection is a strong signal: eject at once (unless already ejected: the
        requests that were in flight when the pod went down do not lengthen its ejection)."""
        pod.consecutive_failures = max(pod.consecutive_failures + 1, self.cfg.failure_threshold)
        if time.monotonic() >= pod.ejected_until:
            self._eject(pod, reason)

    def report_success(self, pod: Pod) -> None:
        pod.consecutive_failures = 0
        if pod.ejections and time.monotonic() >= pod.ejected_until:
            pod.ejections = 0

    def _eject(self, pod: Pod, reason: str) -> None:
        dur = min(self.cfg.max_ejection_s, self.cfg.ejection_s * (2 ** min(pod.ejections, 10)))
        pod.ejections += 1
        pod.ejected_until = time.monotonic() + dur
        log.warning("pod %s ejected for %.1fs: %s", pod.id, dur, reason)

    # ---- background loops --------------------------------------------------------------------
    async def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        self._tasks.append(asyncio.create_task(supervise("health", self._health_loop), name="router-health"))
        if self.scrape_metrics:
            self._tasks.append(asyncio.create_task(supervise("metrics", self._metrics_loop), name="router-metrics"))

    @property
    def running(self) -> bool:
        """The background loops were started and none has ended (``supervise`` restarts a loop that
        fails, so only a cancellation ends one)."""
        return bool(self._tasks) and not any(t.done() for t in self._tasks)

    async def stop(self) -> None:
        for t in [*self._tasks, *self._probes]:
            t.cancel()
        for t in [*self._tasks, *self._probes]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        self._probes.clear()

    async def check_health(self, pod: Pod) -> bool:
        assert self._session is not None
        why = ""
        try:
            async with self._session.get(
                pod.url + "/health", timeout=aiohttp.ClientTimeout(total=self.cfg.health_timeout_s)
            ) as r:
                ok = r.status == 200
                why = "" if ok else f"HTTP {r.status}"
        except TimeoutError:
            ok, why = False, f"no answer in {self.cfg.health_timeout_s:g} s"
        except (aiohttp.ClientError, OSError) as e:
            ok, why = False, f"{type(e).__name__}: {e}"
        if ok:
            if not pod.healthy:
                log.info("pod %s is healthy again", pod.id)
            pod.healthy = True
            pod.health_failures = 0
            if not pod.capacity_read and not self.scrape_metrics and pod.config.capacity_blocks is None:
                # the cost model needs the KV capacity even when nothing scrapes metrics: read it once
                # per healthy spell (a backend without vllm:cache_config_info is not asked again)
                pod.tier_prices_due = time.monotonic() + self.cfg.tier_prices_interval_s
                pod.capacity_read = await self.scrape(pod)
            elif self.learn_tier_prices and not self.scrape_metrics and time.monotonic() >= pod.tier_prices_due:
                # the tier prices (vllm_llmd.router.tier_prices) follow the pod's load-back speeds
                pod.tier_prices_due = time.monotonic() + self.cfg.tier_prices_interval_s
                await self.scrape(pod)
            if pod.config.models is None and (
                pod.served is None or time.monotonic() - pod.served.read_at >= self.cfg.models_interval_s
            ):
                assert self._session is not None
                served = await fetch_models(self._session, pod.url, self.cfg.health_timeout_s)
                if served is not None:
                    if pod.served is None or served.ids != pod.served.ids:
                        log.info("pod %s serves %s", pod.id, ", ".join(sorted(served.ids)) or "no model")
                    pod.served = served
        else:
            pod.health_failures += 1
            if pod.healthy and pod.health_failures >= self.cfg.failure_threshold:
                log.warning(
                    "pod %s failed %d health checks (the last: %s): marked unhealthy", pod.id, pod.health_failures, why
                )
                pod.healthy = False
                pod.capacity_read = False  # it may come back as a different engine
                self._lost(pod.id)
                pod.served = None
        return ok

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check_health(p) for p in list(self._order)))

    async def _health_loop(self) -> None:
        # The first round checks every pod at once (start-up); after that the checks are spread
        # evenly over the interval, so a large pool never stalls the event loop with a burst of
        # probes (100 pods probed together added ~4 ms to the router's p99 latency).
        await self.check_all()
        while True:
            pods = list(self._order)
            if not pods:
                await asyncio.sleep(self.cfg.health_interval_s)
                continue
            gap = self.cfg.health_interval_s / len(pods)
            for p in pods:
                await asyncio.sleep(gap)
                if self._pods.get(p.id) is p:  # still a member, with the same configuration
                    t = asyncio.create_task(self.check_health(p))
                    self._probes.add(t)
                    t.add_done_callback(self._probe_done)

    def _probe_done(self, t: asyncio.Task[bool]) -> None:
        self._probes.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("health probe failed unexpectedly", exc_info=t.exception())

    async def scrape(self, pod: Pod) -> bool:
        """Read the pod's ``/metrics`` into ``pod.metrics``; whether that worked. A body over
        ``MAX_METRICS_BYTES`` is not read (vLLM's is ~100 KB)."""
        assert self._session is not None
        try:
            async with self._session.get(
                pod.url + "/metrics", timeout=aiohttp.ClientTimeout(total=max(1.0, self.cfg.metrics_stale_s))
            ) as r:
                if r.status != 200:
                    return False
                raw = await r.content.read(MAX_METRICS_BYTES + 1)
            if len(raw) > MAX_METRICS_BYTES:
                log.warning("pod %s: /metrics is over %d bytes: not read", pod.id, MAX_METRICS_BYTES)
                return False
            text = raw.decode("utf-8")
        except (TimeoutError, aiohttp.ClientError, OSError, UnicodeDecodeError):
            return False
        pod.metrics = parse_metrics(text)
        pod.tier_prices.observe(pod.metrics)
        return True

    async def _metrics_loop(self) -> None:
        while True:
            t0 = time.monotonic()
            await asyncio.gather(*(self.scrape(p) for p in list(self._order) if p.healthy))
            await asyncio.sleep(max(0.0, self.cfg.metrics_interval_s - (time.monotonic() - t0)))


async def supervise(
    name: str, loop: Callable[[], Awaitable[None]], first_delay_s: float = 1.0, max_delay_s: float = 30.0
) -> None:
    """Run the endless ``loop``; if it ever fails (or returns), log it with its traceback and start
    it again after a back-off (``first_delay_s`` doubling to ``max_delay_s``; reset after a minute
    of running)."""
    delay = first_delay_s
    while True:
        started = time.monotonic()
        try:
            await loop()
            log.error("the %s loop stopped: restarting it in %.0f s", name, delay)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the %s loop failed: restarting it in %.0f s", name, delay)
        if time.monotonic() - started > 60.0:
            delay = first_delay_s
        await asyncio.sleep(delay)
        delay = min(max_delay_s, 2 * delay)
