"""Issue 9, case 9: the KV-event publisher binds the pod's own address, and CURVE protects the event
and side-channel sockets. vLLM's own ``ZmqEventPublisher`` (with the plugin's engine-core patch),
our subscriber and the handshake on real sockets; keys made by pyzmq's ``zmq.auth``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
import zmq.auth
from test_handshake import make_info
from vllm.distributed.kv_events import BlockStored, KVEventBatch, ZmqEventPublisher
from vllm_llmd.connectors.handshake import HandshakeError, HandshakeServer, fetch_engine_info

from vllm_llmd.events.publisher import patch_publisher
from vllm_llmd.index import KVBlockIndex, KVEventSubscriber
from vllm_llmd.testing.engine import free_port
from vllm_llmd.testing.wait import wait_until
from vllm_llmd.wire.curve import CurveClient, CurveConfigError, client_from_env, server_from_env

POD = "127.0.0.1:8000"
TOPIC = f"kv@{POD}@m"


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    """A fleet's certificates, as ``zmq.auth.create_certificates`` writes them."""
    for name in ("server", "router", "stranger"):
        zmq.auth.create_certificates(tmp_path, name)
    allowed = tmp_path / "clients"
    allowed.mkdir()
    (allowed / "router.key").write_bytes((tmp_path / "router.key").read_bytes())
    return {
        "LLMD_CURVE_SERVER_SECRET": str(tmp_path / "server.key_secret"),
        "LLMD_CURVE_SERVER_PUBLIC": str(tmp_path / "server.key"),
        "LLMD_CURVE_CLIENT_SECRET": str(tmp_path / "router.key_secret"),
        "LLMD_CURVE_CLIENTS": str(allowed),
        "stranger": str(tmp_path / "stranger.key_secret"),
    }


@pytest.fixture
def restore_publisher() -> Iterator[None]:
    setup = ZmqEventPublisher.__dict__["_socket_setup"]
    yield
    ZmqEventPublisher._socket_setup = setup  # type: ignore[method-assign]


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp shows them) listening on ``port``."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, p = local.split(":")
        if int(p, 16) == port and state == "0A":
            out.add(addr)
    return out


def _publish(pub: ZmqEventPublisher, tokens: list[int], first: int) -> None:
    ev = BlockStored(
        block_hashes=[first + i for i in range(len(tokens) // 16)],
        parent_block_hash=None,
        token_ids=tokens,
        block_size=16,
        lora_id=None,
        medium="GPU",
        lora_name=None,
    )
    pub.publish(KVEventBatch(ts=time.time(), events=[ev]))


def test_the_plugin_binds_the_pods_address_not_every_interface(restore_publisher: None) -> None:
    """Before: the plugin's default endpoint was tcp://*:5557 (all interfaces); vLLM connects any
    other endpoint instead of binding it, so the plugin makes it bind the pod's address."""
    assert patch_publisher({"LLMD_KV_EVENTS": "1", "POD_IP": "127.0.0.1"}) == "bind 127.0.0.1"
    port, replay = free_port(), free_port()
    pub = ZmqEventPublisher(0, f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{replay}", topic=TOPIC)
    try:
        assert _listening(port) == {"0100007F"} and _listening(replay) == {"0100007F"}  # 127.0.0.1 only
        idx = KVBlockIndex(block_size=16)
        sub = KVEventSubscriber(idx, curve=None)
        sub.add_pod(POD, f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{replay}")
        sub.start()
        try:
            toks = list(range(1, 33))
            _publish(pub, toks, 1)
            wait_until(lambda: POD in idx.match("m", toks), 10, "events received")
        finally:
            sub.stop()
    finally:
        pub.shutdown()
    # a user's own endpoint on another host is still dialled, as vLLM does
    other = ZmqEventPublisher(0, f"tcp://127.0.0.2:{free_port()}", topic=TOPIC)
    try:
        assert not _listening(int(other._endpoint.rsplit(":", 1)[1]))
    finally:
        other.shutdown()


def test_curve_lets_only_listed_clients_read_the_events(keys: dict[str, str], restore_publisher: None) -> None:
    assert patch_publisher(keys) == " curve"  # LLMD_KV_EVENTS off: the endpoint is the user's, CURVE on
    port, replay = free_port(), free_port()
    pub = ZmqEventPublisher(0, f"tcp://*:{port}", f"tcp://*:{replay}", topic=TOPIC)
    client = client_from_env(keys)
    assert client is not None
    stranger = CurveClient(client.server_public, *zmq.auth.load_certificate(keys["stranger"]))  # type: ignore[arg-type]
    idxs = {name: KVBlockIndex(block_size=16) for name in ("router", "stranger", "plain")}
    subs = {
        name: KVEventSubscriber(idxs[name], curve=c, replay_timeout_s=0.3)
        for name, c in (("router", client), ("stranger", stranger), ("plain", None))
    }
    try:
        for s in subs.values():
            s.add_pod(POD, f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{replay}")
            s.start()
        toks = list(range(1, 33))
        first = 1

        def published_and_received() -> bool:
            nonlocal first
            _publish(pub, toks, first)
            first += 2
            return POD in idxs["router"].match("m", toks)

        wait_until(published_and_received, 10, "the listed client reads the events", interval=0.1)
        for _ in range(5):
            _publish(pub, toks, first)
            first += 2
        wait_until(lambda: subs["router"].stats()[POD].replayed_batches >= 1, 10, "the listed client replays")
        assert idxs["stranger"].stats().batches == 0 and idxs["plain"].stats().batches == 0
        assert not subs["stranger"].stats()[POD].connected and not subs["plain"].stats()[POD].connected
    finally:
        for s in subs.values():
            s.stop()
        pub.shutdown()


def test_curve_on_the_side_channel(keys: dict[str, str]) -> None:
    server = server_from_env(keys)
    client = client_from_env(keys)
    assert server is not None and client is not None and server.clients == {client.public}
    srv = HandshakeServer(make_info(), "127.0.0.1", 0, curve=server)
    port = int(srv.endpoint.rsplit(":", 1)[1])
    try:
        assert fetch_engine_info("127.0.0.1", port, 0, 5, curve=client) == make_info()
        with pytest.raises(HandshakeError, match="no handshake answer"):
            fetch_engine_info("127.0.0.1", port, 0, 0.5)  # plain text: nothing gets through
        stranger = CurveClient(client.server_public, *zmq.auth.load_certificate(keys["stranger"]))  # type: ignore[arg-type]
        with pytest.raises(HandshakeError, match="no handshake answer"):
            fetch_engine_info("127.0.0.1", port, 0, 0.5, curve=stranger)  # not on the list
        assert srv.served == 1
    finally:
        srv.close()


def test_keys_from_the_environment_as_z85_and_bad_keys_are_clear_errors(keys: dict[str, str]) -> None:
    public, secret = zmq.curve_keypair()
    server = server_from_env({"LLMD_CURVE_SERVER_SECRET": secret.decode()})
    assert server is not None and server.public == public and server.clients is None  # any client
    client = client_from_env({"LLMD_CURVE_SERVER_PUBLIC": public.decode()})
    assert client is not None and client.server_public == public  # a fresh client key pair
    assert server_from_env({}) is None and client_from_env({}) is None
    with pytest.raises(CurveConfigError, match="neither a 40-character Z85 key nor a certificate file"):
        server_from_env({"LLMD_CURVE_SERVER_SECRET": "not-a-key"})
    with pytest.raises(CurveConfigError, match="no secret key"):
        server_from_env({"LLMD_CURVE_SERVER_SECRET": keys["LLMD_CURVE_SERVER_PUBLIC"]})
    empty = Path(keys["stranger"]).parent / "empty"
    empty.mkdir()
    with pytest.raises(CurveConfigError, match="lists no client key"):
        server_from_env({**keys, "LLMD_CURVE_CLIENTS": str(empty)})
