"""Where the engine's KV-event sockets listen, and CURVE on them.

vLLM's ``ZmqEventPublisher`` (vllm/distributed/kv_events.py; ``_socket_setup`` in 0.30-0.33) *binds*
an endpoint with a wildcard (``tcp://*:5557``) and *connects* every other one; the replay endpoint
is always bound. So a publisher can listen on all interfaces or dial out, but not listen
on one address. Every prompt's token ids travel on that socket, so:

* **bind address.** With ``LLMD_KV_EVENTS=1`` the plugin's default endpoints name this pod's own
  address (:func:`bind_host`: ``LLMD_KV_EVENTS_BIND_HOST``, else ``POD_IP`` / ``POD_IPS`` /
  ``LLMD_KV_EVENTS_HOST`` when it is an IP, else the host name's address), e.g.
  ``tcp://10.1.2.3:5557``, and in the engine-core process the plugin binds the publisher's PUB
  socket on exactly that endpoint before vLLM's own ``_socket_setup`` would connect it.
  ``LLMD_KV_EVENTS_BIND_HOST=*`` restores all interfaces. A ``--kv-events-config`` of your own is used as vLLM reads it.
* **CURVE.** With ``LLMD_CURVE_SERVER_SECRET`` set (:mod:`vllm_llmd.wire.curve`), the publisher's
  PUB and replay ROUTER sockets are CURVE servers: subscribers need the server's public key (and,
  with ``LLMD_CURVE_CLIENTS``, a listed key of their own). The plugin hands the publisher a context
  whose sockets come out configured, around vLLM's own ``_socket_setup``.

Everything is guarded: a failure logs and vLLM's publisher runs as vLLM wrote it.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import socket
from collections.abc import Mapping
from typing import Any

from vllm_llmd.wire.curve import CurveServer, server_from_env

logger = logging.getLogger("vllm.vllm_llmd.events")

BIND_ENV = "LLMD_KV_EVENTS_BIND_HOST"
_PATCH_MARK = "_llmd_publisher_patched"


def _ip(value: str) -> str | None:
    try:
        return str(ipaddress.ip_address(value.strip().strip("[]")))
    except ValueError:
        return None


def bind_host(env: Mapping[str, str]) -> str:
    """The address the plugin's default event endpoints bind: an IP, or ``*`` (all interfaces)."""
    explicit = env.get(BIND_ENV, "").strip()
    if explicit:
        return explicit if explicit == "*" else (_ip(explicit) or explicit)
    for name in ("LLMD_KV_EVENTS_HOST", "POD_IP"):
        ip = _ip(env.get(name, ""))
        if ip:
            return ip
    ip = _ip((env.get("POD_IPS") or "").split(",")[0])
    if ip:
        return ip
    try:
        ip = socket.gethostbyname(socket.gethostname())
    except OSError:
        ip = ""
    if ip and not ipaddress.ip_address(ip).is_loopback:
        return ip
    logger.warning("vllm_llmd: no pod address (set POD_IP or %s); KV events bind all interfaces", BIND_ENV)
    return "*"


def endpoint(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def _endpoint_host(ep: str) -> str | None:
    if not ep.startswith("tcp://"):
        return None
    host = ep[len("tcp://") :].rsplit(":", 1)[0]
    return _ip(host) or host


class _SecuredContext:
    """Stands in for the publisher's ``zmq.Context`` during ``_socket_setup``: every socket it makes
    is a CURVE server (and IPv6-capable when the pod's address is IPv6)."""

    def __init__(self, ctx: Any, curve: CurveServer | None, ipv6: bool) -> None:
        self._ctx, self._curve, self._ipv6 = ctx, curve, ipv6

    def socket(self, kind: int, **kw: Any) -> Any:
        import zmq

        sock = self._ctx.socket(kind, **kw)
        if self._ipv6:
            sock.setsockopt(zmq.IPV6, 1)
        if self._curve is not None:
            self._curve.apply(sock)
        return sock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)


def patch_publisher(env: Mapping[str, str] = os.environ) -> str:
    """In the engine-core process: bind our default endpoints' host, and CURVE. Returns what it did."""
    from vllm.distributed.kv_events import ZmqEventPublisher

    from vllm_llmd.events.engine_config import enabled

    if getattr(ZmqEventPublisher._socket_setup, _PATCH_MARK, False):
        return "already"
    host = bind_host(env) if enabled(env) else "*"
    curve = server_from_env(env)
    if host == "*" and curve is None:
        return "unchanged"
    original_setup = ZmqEventPublisher._socket_setup

    @functools.wraps(original_setup)
    def socket_setup(self: Any) -> None:
        real = self._ctx
        self._ctx = _SecuredContext(real, curve, ":" in host)
        try:
            if host != "*" and self._pub is None and _endpoint_host(self._endpoint or "") == host:
                import zmq

                # vLLM would *connect* this endpoint (it binds wildcards only): bind it; vLLM's own
                # setup then skips the PUB it finds made (vLLM 0.30-0.33 all check ``_pub is None``)
                pub = self._ctx.socket(zmq.PUB)
                pub.set_hwm(self._hwm)
                pub.bind(self._endpoint)
                self._pub = pub
            original_setup(self)
        finally:
            self._ctx = real

    setattr(socket_setup, _PATCH_MARK, True)
    ZmqEventPublisher._socket_setup = socket_setup  # type: ignore[method-assign]
    return ("bind " + host if host != "*" else "") + (" curve" if curve else "")
