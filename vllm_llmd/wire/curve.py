"""ZMQ CURVE (encryption and client authentication) for the KV-event and side-channel sockets.

KV events carry every prompt's token ids, and the side channel hands out the addresses of an
engine's KV memory. With CURVE on, a server socket (an engine's event publisher, its replay socket,
its side channel) talks only to clients that know its public key and, with an allowlist, only to
clients whose own keys are listed; everything on the wire is encrypted. pyzmq's own key tools
make the keys: ``python -c "import zmq.auth; zmq.auth.create_certificates('.', 'server')"`` writes
``server.key`` (public) and ``server.key_secret`` (both keys).

Configuration, from the environment (each value a Z85 key of 40 characters or the path of a ZMQ
certificate file, as ``zmq.auth.create_certificates`` writes them):

=============================  ===================================================================
``LLMD_CURVE_SERVER_SECRET``   engines: the server key pair (its secret key, or a ``.key_secret``
                               file); turns CURVE on for the publisher, replay and side channel
``LLMD_CURVE_SERVER_PUBLIC``   clients (the router, decode engines): the servers' public key
``LLMD_CURVE_CLIENT_SECRET``   clients: their own key pair (optional: a fresh one is made)
``LLMD_CURVE_CLIENTS``         engines: the client public keys accepted, a directory of ``.key``
                               files or comma-separated Z85 keys; unset = any client that knows the
                               server's public key (encryption, no client authentication)
=============================  ===================================================================

One server key pair for the fleet (a Kubernetes Secret mounted in every engine) is the expected
use: decode engines dial prefill engines named in ``kv_transfer_params`` and must know their key.
Imports nothing of ``vllm_llmd``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85

SERVER_SECRET_ENV = "LLMD_CURVE_SERVER_SECRET"
SERVER_PUBLIC_ENV = "LLMD_CURVE_SERVER_PUBLIC"
CLIENT_SECRET_ENV = "LLMD_CURVE_CLIENT_SECRET"
CLIENTS_ENV = "LLMD_CURVE_CLIENTS"
ZAP_DOMAIN = "llmd"


class CurveConfigError(ValueError):
    pass


def _z85(value: str) -> bytes | None:
    value = value.strip()
    if len(value) == 40:
        try:
            if len(z85.decode(value)) == 32:
                return value.encode()
        except (ValueError, KeyError, TypeError):
            return None
    return None


def load_key(value: str, *, secret: bool) -> tuple[bytes, bytes | None]:
    """``(public, secret)`` from a Z85 key or a certificate file (``secret``: ``value`` is a
    secret key, whose public half is derived)."""
    key = _z85(value)
    if key is not None:
        return (zmq.curve_public(key), key) if secret else (key, None)
    path = Path(value)
    if not path.is_file():
        raise CurveConfigError(f"{value[:60]!r} is neither a 40-character Z85 key nor a certificate file")
    from zmq.auth import load_certificate

    try:
        public, secret_key = load_certificate(path)
    except Exception as exc:
        raise CurveConfigError(f"cannot read the certificate {path}: {exc}") from exc
    if secret and secret_key is None:
        raise CurveConfigError(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret_key


def _load_clients(value: str) -> frozenset[bytes]:
    path = Path(value)
    if path.is_dir():
        from zmq.auth import load_certificates

        keys = frozenset(load_certificates(path))
    else:
        keys = frozenset(load_key(v, secret=False)[0] for v in value.split(",") if v.strip())
    if not keys:
        raise CurveConfigError(f"{CLIENTS_ENV}={value!r} lists no client key")
    return keys


@dataclass(frozen=True)
class CurveServer:
    public: bytes
    secret: bytes
    #: accepted client public keys (Z85); ``None``: any client that knows our public key
    clients: frozenset[bytes] | None = None

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE server (before it binds); starts the ZAP handler of its context."""
        _authenticator(sock.context, self.clients)
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True


@dataclass(frozen=True)
class CurveClient:
    server_public: bytes
    public: bytes
    secret: bytes

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE client of servers holding ``server_public`` (before it connects)."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server_public


def server_from_env(env: Mapping[str, str] = os.environ) -> CurveServer | None:
    raw = env.get(SERVER_SECRET_ENV, "").strip()
    if not raw:
        return None
    public, secret = load_key(raw, secret=True)
    assert secret is not None
    clients = env.get(CLIENTS_ENV, "").strip()
    return CurveServer(public, secret, _load_clients(clients) if clients else None)


def client_from_env(env: Mapping[str, str] = os.environ) -> CurveClient | None:
    raw = env.get(SERVER_PUBLIC_ENV, "").strip()
    if not raw:
        return None
    server_public, _ = load_key(raw, secret=False)
    own = env.get(CLIENT_SECRET_ENV, "").strip()
    if own:
        public, secret = load_key(own, secret=True)
        assert secret is not None
    else:
        public, secret = zmq.curve_keypair()
    return CurveClient(server_public, public, secret)


class _Allowlist:
    def __init__(self, keys: frozenset[bytes]) -> None:
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


_auth_lock = threading.Lock()
_authenticators: dict[int, tuple[zmq.Context, object, frozenset[bytes] | None]] = {}


def _authenticator(ctx: zmq.Context, clients: frozenset[bytes] | None) -> None:
    """One ZAP handler (pyzmq's ``ThreadAuthenticator``) per context, checking client keys."""
    with _auth_lock:
        known = _authenticators.get(id(ctx))
        if known is not None and known[0] is ctx:
            if known[2] != clients:
                raise CurveConfigError("one ZMQ context cannot serve two different client allowlists")
            return
        from zmq.auth import CURVE_ALLOW_ANY
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(ctx)
        auth.start()
        if clients is None:
            auth.configure_curve(domain=ZAP_DOMAIN, location=CURVE_ALLOW_ANY)
        else:
            auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=_Allowlist(clients))
        _authenticators[id(ctx)] = (ctx, auth, clients)


def stop_authenticator(ctx: zmq.Context) -> None:
    """Stop the ZAP handler of ``ctx`` (before the context is terminated)."""
    with _auth_lock:
        known = _authenticators.pop(id(ctx), None)
    if known is not None:
        known[1].stop()  # type: ignore[attr-defined]
