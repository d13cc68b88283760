"""Gateway mode (``vllm-llmd router --ext-proc ADDR``): the router's scheduling behind Envoy.

One process, one event loop (uvloop), one scheduling state:

* the gRPC server on ``ADDR`` speaks ``ext_proc`` to Envoy (:mod:`vllm_llmd.gateway.extproc`) and
  the standard gRPC health protocol, with the services the inference extension's EPP exposes:
  ``liveness`` follows the router's liveness, ``readiness``,
  ``envoy.service.ext_proc.v3.ExternalProcessor`` and ``""`` follow its readiness
  (:mod:`vllm_llmd.router.probes`, the same checks as HTTP ``/livez`` and ``/readyz``, re-read every
  ``HEALTH_POLL_S``); all are ``NOT_SERVING`` while the router shuts down;
* the router's own HTTP app keeps serving on ``--host/--port``: ``/health``, ``/metrics`` (the
  router's registry plus ``llmd_gateway_*``), and the proxy endpoints, which share the picker's
  in-flight accounting. It also owns the pod pool's health/metrics loops and the KV event subscriber.

Why a flag on ``router`` rather than a separate sub-command: gateway mode is the same router (same
YAML, flags, scheduling profile, pool, index and metrics) with a second front door, so every flag
keeps its meaning and a deployment switches mode with one flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from vllm_llmd.gateway.extproc import ExtProcServicer
from vllm_llmd.gateway.router_picker import RouterAppPicker
from vllm_llmd.router.config import RouterConfig
from vllm_llmd.router.proxy import RouterApp

log = logging.getLogger("vllm_llmd.gateway")

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
HEALTH_SERVICES = ("", "liveness", "readiness", EXT_PROC_SERVICE)
#: the gRPC health services that follow readiness (``liveness`` follows liveness)
READINESS_SERVICES = ("", "readiness", EXT_PROC_SERVICE)
#: seconds between re-reads of the probes for the gRPC health services
HEALTH_POLL_S = 0.5
#: room for protobuf framing and headers on top of the largest accepted body
_GRPC_SLACK_BYTES = 1 << 20


@dataclass
class GatewayOptions:
    #: gRPC listen address ``host:port`` for Envoy's ext_proc filter
    ext_proc: str = "127.0.0.1:9002"
    #: fallback endpoints after the best one (``None``: ``pool.max_retries``); 0 for an ORIGINAL_DST cluster
    fallbacks: int | None = None
    #: switch ``text/event-stream`` answers to STREAMED bodies to see the first token
    watch_streams: bool = True


def build_grpc_server(router: RouterApp, opts: GatewayOptions) -> tuple[grpc.aio.Server, Any, ExtProcServicer]:
    limit = router.cfg.max_body_bytes + _GRPC_SLACK_BYTES
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ]
    )
    picker = RouterAppPicker(router, opts.fallbacks)
    servicer = ExtProcServicer(picker, router.cfg.max_body_bytes, opts.watch_streams, router.metrics.registry)
    pb_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if server.add_insecure_port(opts.ext_proc) == 0:
        raise OSError(f"cannot listen on {opts.ext_proc}")
    return server, health, servicer


def _status(serving: bool) -> Any:
    return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING


async def _set_health(health: Any, serving: bool) -> None:
    for name in HEALTH_SERVICES:
        await health.set(name, _status(serving))


async def follow_probes(router: RouterApp, health: Any, interval_s: float = HEALTH_POLL_S) -> None:
    """Keep the gRPC health services equal to the router's probes (until cancelled)."""
    last: tuple[bool, bool] | None = None
    while True:
        now = (router.probes.liveness().ok, router.probes.readiness().ok)
        if now != last:
            if last is None or now[1] != last[1]:
                log.info("gateway: readiness %s", "SERVING" if now[1] else "NOT_SERVING")
            await health.set("liveness", _status(now[0]))
            for name in READINESS_SERVICES:
                await health.set(name, _status(now[1]))
            last = now
        await asyncio.sleep(interval_s)


async def serve_gateway(
    router: RouterApp, opts: GatewayOptions, ready: asyncio.Event | None = None, stop: asyncio.Event | None = None
) -> None:
    """Run both front doors until SIGINT/SIGTERM (or ``stop``)."""
    cfg = router.cfg
    runner = router.runner()  # the router's HTTP front, with its limits
    await runner.setup()  # runs the app's startup: pool loops, KV event subscriber
    site = web.TCPSite(runner, cfg.host, cfg.port, backlog=1024, reuse_address=True)
    await site.start()
    server, health, _ = build_grpc_server(router, opts)
    await _set_health(health, False)  # until the probes are first read: known, not serving
    await server.start()
    follow = asyncio.create_task(follow_probes(router, health), name="gateway-health")
    log.info(
        "gateway: ext_proc on %s, router HTTP on http://%s:%d, pods: %s",
        opts.ext_proc,
        cfg.host,
        cfg.port,
        ", ".join(p.id for p in router.pool.pods) or "none",
    )
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info("gateway shutting down")
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follow
        await _set_health(health, False)
        await server.stop(grace=5)
        await runner.cleanup()


def run(cfg: RouterConfig, opts: GatewayOptions, router: RouterApp | None = None) -> int:
    """Serve until SIGINT/SIGTERM; ``router``: built from ``cfg`` already (else built here)."""
    from vllm_llmd.router.server import SWITCH_INTERVAL_S, build_router, configure_logging

    configure_logging(cfg)
    router = router or build_router(cfg)
    # as vllm_llmd.router.server.run: start-up objects out of the collector, young generation
    # collected less often (trims GC pauses from the latency tail)
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    sys.setswitchinterval(SWITCH_INTERVAL_S)  # as the router's: the loop waits less for the GIL
    try:
        import uvloop

        uvloop.run(serve_gateway(router, opts))
    except ImportError:  # pragma: no cover - uvloop is a base dependency off Windows
        asyncio.run(serve_gateway(router, opts))
    return 0
