"""Wire the router together from a :class:`RouterConfig` and run it (``vllm-llmd router``)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from vllm_llmd.router.config import RouterConfig
from vllm_llmd.router.front import start_server
from vllm_llmd.router.inflight import InflightTracker
from vllm_llmd.router.metrics import RouterMetrics
from vllm_llmd.router.pool import PodPool
from vllm_llmd.router.prefix_memory import PrefixMemory
from vllm_llmd.router.proxy import RouterApp
from vllm_llmd.router.scheduling import Decider, SchedulingContext, build_scheduler
from vllm_llmd.router.scheduling.registry import create_plugin, registered_params
from vllm_llmd.router.speed import SpeedEstimator
from vllm_llmd.router.tokenize import load_tokenizer

log = logging.getLogger("vllm_llmd.router")

#: the interpreter's thread switch interval in the router process (Python's default: 5 ms). While a
#: tokenizer worker runs Python code (vllm_llmd.router.tokenize), the event loop waits up to this
#: long for the GIL after each of its own system calls, several per request: with 5 ms, ``/health``
#: answered in 130-230 ms during a 16 MiB chat prompt, with 0.5 ms in ~50 ms (tests/robustness/
#: big_prompt.py, bench/RESULTS.md "One huge prompt").
SWITCH_INTERVAL_S = 0.0005


def _make_index(cfg: RouterConfig) -> tuple[Any, Any]:
    """The KV event index and its subscriber, or ``(None, None)`` when no pod publishes events."""
    with_events = [p for p in cfg.pods if p.events]
    if not with_events and not (cfg.discovery and cfg.discovery.events_port):
        return None, None
    from vllm_llmd.index import KVBlockIndex, KVEventSubscriber

    index = KVBlockIndex(block_size=cfg.index.block_size, capacity_blocks=cfg.index.capacity_blocks)
    sub = KVEventSubscriber(index)
    for p in with_events:
        sub.add_pod(p.pod_id, p.events, p.replay)
    return index, sub


def _make_decider(cfg: RouterConfig, ctx: SchedulingContext) -> Decider:
    """The P/D decider named in ``pd.decider``, its parameters from the ``pd`` section."""
    pd = cfg.pd
    params = registered_params("decider", pd.decider_name)
    fields = set(params.model_fields) if params is not None else set()
    raw = {k: v for k, v in pd.model_dump().items() if k in fields}
    raw.update(pd.decider_params)
    return create_plugin("decider", pd.decider_name, raw, ctx, "pd.decider", Decider)


def configure_logging(cfg: RouterConfig) -> None:
    """The process's log format and level (once: later calls change nothing)."""
    logging.basicConfig(
        level=getattr(logging, cfg.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def build_router(cfg: RouterConfig, tracer_provider: Any | None = None) -> RouterApp:
    """``tracer_provider``: trace with this OpenTelemetry provider (:mod:`.tracing`; else with one
    exporting to ``server.otlp_traces_endpoint`` if that is set)."""
    tokenizer = load_tokenizer(
        cfg.tokenizer.path,
        prefix_cache_bytes=cfg.tokenizer.prefix_cache_bytes,
        chunk_chars=cfg.tokenizer.prefix_cache_chunk_chars,
        max_segment_chars=cfg.tokenizer.max_segment_chars,
        chat_template=cfg.tokenizer.chat_template,
    )
    index = subscriber = None
    if tokenizer is not None:
        index, subscriber = _make_index(cfg)
    elif any(p.events for p in cfg.pods) or (cfg.discovery and cfg.discovery.events_port):
        log.warning("KV events are configured but there is no tokenizer: events are not used")
    inflight = InflightTracker()
    ctx = SchedulingContext(
        index=index,
        memory=PrefixMemory(cfg.index.memory_blocks_per_pod),
        inflight=inflight,
        block_size=cfg.index.block_size,
        speculative_ttl_s=cfg.index.speculative_ttl_s,
        metrics_stale_s=cfg.pool.metrics_stale_s,
        speeds=SpeedEstimator(cfg.speed) if cfg.speed.learn else None,
    )
    scheduler = build_scheduler(cfg.profile, ctx)
    ctx.decode_token_weight = scheduler.decode_token_weight  # the P/D decider uses the profile's weight
    prefill_scheduler = build_scheduler(cfg.pd.prefill_profile or cfg.profile, ctx, "pd.prefill_profile")
    decider = _make_decider(cfg, ctx)
    pool = PodPool(cfg.pool, inflight=inflight)
    pool.set_pods(cfg.pods)
    router = RouterApp(
        cfg, pool, scheduler, tokenizer, RouterMetrics(), index, subscriber, prefill_scheduler, decider, tracer_provider
    )
    if cfg.discovery is not None:  # Kubernetes: pods come and go without a restart
        from vllm_llmd.discovery.source import KubernetesDiscovery

        router.discovery = KubernetesDiscovery(
            cfg.discovery, pool, subscriber, static=cfg.pods, on_removed=[ctx.memory.remove_pod]
        )
        router.app.cleanup_ctx.append(router.discovery.lifecycle)  # started before the pool, stopped first
    return router


async def serve(router: RouterApp, host: str, port: int, ready: asyncio.Event | None = None) -> None:
    sc = router.cfg.server
    tls = None
    if sc.tls_cert is not None and sc.tls_key is not None:
        from vllm_llmd.router.auth import tls_context

        tls = tls_context(sc.tls_cert, sc.tls_key)
    server = await start_server(router.runner(), host, port, ssl_context=tls)
    log.info(
        "router listening on %s://%s:%d, pods: %s",
        "https" if tls is not None else "http",
        host,
        server.port,
        ", ".join(p.id for p in router.pool.pods) or "none",
    )
    stop = stop_on_signals()
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info("router shutting down")
        await server.close()


def run(cfg: RouterConfig, router: RouterApp | None = None) -> int:
    """Serve until SIGINT/SIGTERM; ``router``: built from ``cfg`` already (else built here)."""
    configure_logging(cfg)
    router = router or build_router(cfg)
    run_server(serve(router, cfg.host, cfg.port))
    return 0


def stop_on_signals(stop: asyncio.Event | None = None) -> asyncio.Event:
    """``stop`` (or a new event), set on SIGINT/SIGTERM where the running loop takes signal handlers."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop


def run_server(main: Coroutine[Any, Any, None]) -> None:
    """Run a server's coroutine to the end on uvloop (asyncio's own loop where uvloop is missing).

    Start-up objects (tokenizer, config, plugin instances) never die: keep them out of every later
    collection, and collect the young generation less often. Per-request garbage is mostly acyclic
    (freed by reference counting), so this trims the collector's pauses from the latency tail.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a base dependency off Windows
        runner = asyncio.run
    runner(main)
