"""Engine-side KV-event defaults, driven by the environment (no per-pod flags in Kubernetes).

``LLMD_KV_EVENTS=1`` makes the plugin, in the API-server process (where plugins load before the
command line is turned into a ``VllmConfig``), wrap ``EngineArgs.create_engine_config`` so that an
engine started *without* ``--kv-events-config`` publishes KV events:

* ``endpoint`` ``tcp://<pod IP>:$LLMD_KV_EVENTS_PORT`` (default 5557), ``replay_endpoint``
  ``tcp://<pod IP>:$LLMD_KV_EVENTS_REPLAY_PORT`` (default 5558; ``0`` or ``off`` for none), bound on
  the pod's own address only (:mod:`vllm_llmd.events.publisher`: ``LLMD_KV_EVENTS_BIND_HOST``,
  ``POD_IP``, ...; ``*`` for all interfaces);
* ``topic`` ``kv@<POD_IP or host name>:<serving port>@<first served model name>``.

The user's own ``--kv-events-config`` wins: it is left as given, except that an empty ``topic``
is filled in with the derived one when ``LLMD_KV_EVENTS=1``.

In the engine-core process the plugin makes vLLM's publisher bind those endpoints and, with
``LLMD_CURVE_SERVER_SECRET``, use CURVE (:func:`vllm_llmd.events.publisher.patch_publisher`).

Independently (``LLMD_KV_EVENTS_FLUSH_ON_RESET``, on by default), in the engine-core process the
scheduler's ``reset_prefix_cache`` is wrapped to publish the resulting ``AllBlocksCleared`` at once:
vLLM publishes events only when the engine steps, so on an idle engine a reset would otherwise
stay invisible to subscribers until the next request.

Everything here is guarded: a failure logs and vLLM carries on unchanged.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from vllm_llmd.events.publisher import bind_host, endpoint, patch_publisher
from vllm_llmd.events.topic import derive_topic

logger = logging.getLogger("vllm.vllm_llmd.events")

ENABLE_ENV = "LLMD_KV_EVENTS"
PORT_ENV = "LLMD_KV_EVENTS_PORT"
REPLAY_PORT_ENV = "LLMD_KV_EVENTS_REPLAY_PORT"
FLUSH_ENV = "LLMD_KV_EVENTS_FLUSH_ON_RESET"
DEFAULT_PORT = 5557
DEFAULT_REPLAY_PORT = 5558

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_PATCH_MARK = "_llmd_kv_events_patched"


def enabled(env: Mapping[str, str]) -> bool:
    return env.get(ENABLE_ENV, "").strip().lower() in _TRUE


def _port(env: Mapping[str, str], name: str, default: int) -> int | None:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _FALSE:
        return None
    try:
        port = int(raw)
    except ValueError:
        logger.warning("vllm_llmd: %s=%r is not a port; using %d", name, raw, default)
        return default
    return port if 0 < port < 65536 else None


def served_model(engine_args: Any) -> str:
    names = getattr(engine_args, "served_model_name", None)
    if isinstance(names, list | tuple) and names:
        return str(names[0])
    if isinstance(names, str) and names:
        return names
    return str(getattr(engine_args, "model", "") or "model")


def default_events_config(engine_args: Any, env: Mapping[str, str]) -> dict[str, Any]:
    """The ``KVEventsConfig`` fields we set when the user gave none."""
    host = bind_host(env)
    cfg: dict[str, Any] = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": endpoint(host, _port(env, PORT_ENV, DEFAULT_PORT) or DEFAULT_PORT),
        "topic": derive_topic(served_model(engine_args), env),
    }
    replay = _port(env, REPLAY_PORT_ENV, DEFAULT_REPLAY_PORT)
    if replay is not None:
        cfg["replay_endpoint"] = endpoint(host, replay)
    return cfg


def fill_events_config(engine_args: Any, env: Mapping[str, str]) -> str:
    """Set ``engine_args.kv_events_config`` from the environment unless the user set it."""
    from vllm.config.kv_events import KVEventsConfig

    current = getattr(engine_args, "kv_events_config", None)
    if current is None:
        cfg = default_events_config(engine_args, env)
        engine_args.kv_events_config = KVEventsConfig(**cfg)
        logger.info("vllm_llmd: KV events on from %s: %s", ENABLE_ENV, cfg)
        return "defaulted"
    if isinstance(current, KVEventsConfig) and current.enable_kv_cache_events and not current.topic:
        current.topic = derive_topic(served_model(engine_args), env)
        logger.info("vllm_llmd: KV events topic filled in: %s", current.topic)
        return "topic-filled"
    return "user-config"


def _patch_engine_args() -> bool:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, _PATCH_MARK, False):
        return False

    @functools.wraps(original)
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            fill_events_config(self, os.environ)
        except Exception:
            logger.exception("vllm_llmd: could not apply KV-event defaults; continuing without them")
        return original(self, *args, **kwargs)

    setattr(create_engine_config, _PATCH_MARK, True)
    EngineArgs.create_engine_config = create_engine_config  # type: ignore[method-assign]
    return True


def _patch_reset_flush() -> bool:
    """Publish the events of ``Scheduler.reset_prefix_cache`` right away (see module doc).

    ``reset_prefix_cache`` runs in the engine core's busy loop (a utility call between steps), the
    same thread that publishes after each step, so publishing here keeps the order of batches.
    """
    from vllm.distributed.kv_events import KVEventBatch
    from vllm.v1.core.sched.scheduler import Scheduler

    original = Scheduler.reset_prefix_cache
    if getattr(original, _PATCH_MARK, False):
        return False

    @functools.wraps(original)
    def reset_prefix_cache(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        try:
            publisher = getattr(self, "kv_event_publisher", None)
            if result and publisher is not None and getattr(self, "kv_cache_manager", None) is not None:
                events = self.kv_cache_manager.take_events()
                if events:
                    publisher.publish(KVEventBatch(ts=time.time(), events=events))
        except Exception:
            logger.exception("vllm_llmd: could not flush KV events after a prefix-cache reset")
        return result

    setattr(reset_prefix_cache, _PATCH_MARK, True)
    Scheduler.reset_prefix_cache = reset_prefix_cache  # type: ignore[method-assign]
    return True


def apply_event_defaults(role: str) -> str:
    """Apply KV-event defaults for this process; return a short description for the log."""
    env = os.environ
    try:
        if role == "api_server":
            if not enabled(env):
                return "off"
            _patch_engine_args()
            return "env-defaults"
        if role == "engine_core":
            done = []
            try:
                done.append("publisher " + patch_publisher(env))
            except Exception:
                logger.exception("vllm_llmd: KV-event publisher settings not applied; vLLM's own are used")
            if env.get(FLUSH_ENV, "1").strip().lower() in _FALSE:
                done.append("flush-off")
            else:
                _patch_reset_flush()
                done.append("flush-on-reset")
            return ", ".join(done)
    except Exception:
        logger.exception("vllm_llmd: KV-event defaults failed; vLLM continues unchanged")
        return "error"
    return "unchanged"
