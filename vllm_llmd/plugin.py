"""The vLLM engine plugin: the ``vllm.general_plugins`` entry point ``vllm_llmd``.

vLLM calls :func:`register` once in every process it starts (API server, engine core, each
worker, and the model-inspection subprocess). It must be cheap, idempotent, free of side effects
beyond registration, and must never abort vLLM's start-up: every step logs and carries on.

What it does:
1. announces itself with the process role (``api_server``, ``engine_core``, ``worker``, ``other``)
   and the vLLM release, with a warning when that release is not one we support
   (:mod:`vllm_llmd.vllm_compat`);
2. registers our KV connector names with vLLM's ``KVConnectorFactory`` (lazily: nothing of the
   connector is imported until vLLM resolves the name);
3. (see :mod:`vllm_llmd.events.engine_config`) fills in KV-event settings from the environment;
4. in the API server, refuses ``kv_transfer_params`` that are not an object with HTTP 400 instead
   of vLLM's own 500 (see :mod:`vllm_llmd.connectors.api_guard`);
5. in engine processes, names the platform (``rbln`` for vllm-rbln's ``RblnPlatform``, else vLLM's
   device type): ``LLMDConnector``'s ``transport: auto`` picks the transport for it when the KV cache
   is registered (connectors/platform.py).
6. in the API server, checks ``LLMDConnector``'s ``kv_connector_extra_config`` as soon as vLLM has
   built the engine config, so a bad block (e.g. an unwritable ``tiers.disk.path``) stops the server
   in seconds with the connector's error, not minutes later when the workers build the connector.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import threading

# A child of vLLM's own logger, so the line lands in the engine's log with vLLM's format
# (vLLM configures the "vllm" logger; ours propagates to it).
logger = logging.getLogger("vllm.vllm_llmd")

#: Connector names we register, with the module that defines them (resolved lazily by vLLM).
CONNECTORS: dict[str, tuple[str, str]] = {
    "LLMDConnector": ("vllm_llmd.connectors.llmd_connector", "LLMDConnector"),
}

#: Set to a file path to have every process that runs :func:`register` append one JSON line
#: ``{"role": ..., "pid": ...}`` to it (used by tests and for debugging fleet images).
TRACE_ENV = "LLMD_PLUGIN_TRACE"

_lock = threading.Lock()
_registered = False
#: The role this process registered as, once :func:`register` ran (``None`` before).
registered_role: str | None = None


def process_role() -> str:
    """Name the kind of vLLM process we run in, from its process title or name."""
    title = ""
    try:
        import setproctitle  # vLLM depends on it and titles its processes with it

        title = setproctitle.getproctitle()
    except Exception:  # pragma: no cover - setproctitle missing: fall back to the name
        title = ""
    name = multiprocessing.current_process().name
    for text in (title, name):
        if "EngineCore" in text:
            return "engine_core"
        if "Worker" in text:
            return "worker"
    if name == "MainProcess":
        return "api_server"
    return "other"


def _register_connectors() -> list[str]:
    try:
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    except Exception as exc:  # vLLM missing or broken: not ours to fail on
        logger.warning("vllm_llmd: cannot import KVConnectorFactory (%s); connectors not registered", exc)
        return []
    done = []
    for name, (module, cls) in CONNECTORS.items():
        try:
            if name not in KVConnectorFactory._registry:
                KVConnectorFactory.register_connector(name, module, cls)
            done.append(name)
        except Exception as exc:
            logger.warning("vllm_llmd: could not register connector %s: %s", name, exc)
    return done


def _guard_kv_params() -> None:
    try:
        from vllm_llmd.connectors.api_guard import install

        install()
    except Exception as exc:  # vLLM missing or changed: not ours to fail on
        logger.warning("vllm_llmd: kv_transfer_params guard not installed: %s", exc)


def platform_name(role: str) -> str:
    """The accelerator platform of an engine process ("-" elsewhere, or when vLLM cannot say)."""
    if role not in ("engine_core", "worker"):
        return "-"
    try:
        from vllm_llmd.connectors.platform import current_vllm_platform, is_rbln_platform

        platform = current_vllm_platform()
        if platform is None:
            return "-"
        return "rbln" if is_rbln_platform(platform) else str(getattr(platform, "device_type", "") or "-")
    except Exception:  # a platform plugin that cannot load here: not ours to fail on
        return "-"


_CHECK_MARK = "_llmd_connector_config_checked"


def _check_connector_config_early() -> bool:
    """Wrap ``EngineArgs.create_engine_config`` to parse LLMDConnector's extra config right away.
    The parse raising is deliberate: it is the same error the connector raises in every worker."""
    import functools

    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, _CHECK_MARK, False):
        return True

    @functools.wraps(original)
    def create_engine_config(self: object, *args: object, **kwargs: object) -> object:
        config = original(self, *args, **kwargs)
        ktc = getattr(config, "kv_transfer_config", None)
        if ktc is not None and ktc.kv_connector in CONNECTORS:
            from vllm_llmd.connectors.config import LLMDConnectorConfig

            LLMDConnectorConfig.from_extra(ktc.kv_connector_extra_config, default_port=0)
        return config

    setattr(create_engine_config, _CHECK_MARK, True)
    EngineArgs.create_engine_config = create_engine_config  # type: ignore[method-assign]
    return True


def _trace(role: str) -> None:
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"role": role, "pid": os.getpid()}) + "\n")
    except OSError as exc:
        logger.warning("vllm_llmd: cannot write plugin trace %s: %s", path, exc)


def register() -> None:
    """Entry point for ``vllm.general_plugins``. Safe to call any number of times."""
    global _registered, registered_role
    with _lock:
        if _registered:
            return
        _registered = True
        try:
            role = process_role()
            registered_role = role
            connectors = _register_connectors()
            from vllm_llmd.events.engine_config import apply_event_defaults

            events = apply_event_defaults(role)
            if role == "api_server":
                _guard_kv_params()
                try:
                    _check_connector_config_early()
                except Exception as exc:  # an older/newer vLLM without this method: workers still check
                    logger.warning("vllm_llmd: early connector config check not installed: %s", exc)
            from vllm_llmd.vllm_compat import installed_vllm_version, version_note

            version = installed_vllm_version()
            supported, note = version_note(version)
            if not supported:
                logger.warning("vllm_llmd: %s; loading anyway", note)
            logger.info(
                "vllm_llmd plugin loaded (role=%s pid=%d vllm=%s platform=%s connectors=%s events=%s)",
                role,
                os.getpid(),
                version,
                platform_name(role),
                ",".join(connectors) or "-",
                events,
            )
            _trace(role)
        except Exception:  # never abort vLLM's start-up
            logger.exception("vllm_llmd plugin failed to register; vLLM continues without it")
