"""Where the parts of the llm-d topic (:mod:`vllm_llmd.wire.topic`) come from on an engine."""

from __future__ import annotations

import socket
import sys
from collections.abc import Mapping, Sequence

from vllm_llmd.wire.topic import make_topic

#: Overrides the address part (else ``POD_IP``, else the host name).
HOST_ENV = "LLMD_KV_EVENTS_HOST"
#: Overrides the serving port (else ``--port`` from the command line, else vLLM's default 8000).
SERVER_PORT_ENV = "LLMD_KV_EVENTS_SERVER_PORT"
DEFAULT_SERVER_PORT = 8000


def pod_address(env: Mapping[str, str]) -> str:
    """This pod's address as the router sees it: ``LLMD_KV_EVENTS_HOST``, ``POD_IP`` (the Kubernetes
    downward API), ``POD_IPS`` (first entry), else the host name. IPv6 addresses are bracketed."""
    host = env.get(HOST_ENV) or env.get("POD_IP") or (env.get("POD_IPS") or "").split(",")[0].strip()
    if not host:
        host = socket.gethostname()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return host


def argv_port(argv: Sequence[str]) -> int | None:
    """``--port N`` / ``--port=N`` from a vLLM command line, if present and valid."""
    for i, arg in enumerate(argv):
        value = None
        if arg == "--port" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--port="):
            value = arg.split("=", 1)[1]
        if value is not None:
            try:
                port = int(value)
            except ValueError:
                return None
            return port if 0 < port < 65536 else None
    return None


def server_port(env: Mapping[str, str], argv: Sequence[str] | None = None) -> int:
    raw = env.get(SERVER_PORT_ENV)
    if raw:
        try:
            return int(raw)
        except ValueError:
            pass
    port = argv_port(sys.argv if argv is None else argv)
    return DEFAULT_SERVER_PORT if port is None else port


def derive_topic(model: str, env: Mapping[str, str], argv: Sequence[str] | None = None) -> str:
    return make_topic(pod_address(env), server_port(env, argv), model)
