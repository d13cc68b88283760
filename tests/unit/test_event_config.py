"""Engine-side KV-event settings: topic derivation and the env-driven defaults on vLLM's EngineArgs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from vllm.config.kv_events import KVEventsConfig
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.core.sched.scheduler import Scheduler

from vllm_llmd.events import engine_config
from vllm_llmd.events.engine_config import apply_event_defaults, default_events_config, fill_events_config
from vllm_llmd.events.publisher import bind_host, endpoint
from vllm_llmd.events.topic import argv_port, derive_topic, pod_address, server_port


def test_pod_address_prefers_override_then_pod_ip_then_hostname() -> None:
    assert pod_address({"LLMD_KV_EVENTS_HOST": "h", "POD_IP": "10.0.0.1"}) == "h"
    assert pod_address({"POD_IP": "10.0.0.1"}) == "10.0.0.1"
    assert pod_address({"POD_IPS": "10.0.0.2,fd00::2"}) == "10.0.0.2"
    assert pod_address({"POD_IP": "fd00::1"}) == "[fd00::1]"
    import socket

    assert pod_address({}) == socket.gethostname()


def test_server_port_from_env_or_command_line() -> None:
    assert argv_port(["serve", "--port", "9000"]) == 9000
    assert argv_port(["serve", "--port=9001"]) == 9001
    assert argv_port(["serve", "--port", "x"]) is None
    assert argv_port(["serve"]) is None
    assert server_port({"LLMD_KV_EVENTS_SERVER_PORT": "7000"}, ["--port", "9000"]) == 7000
    assert server_port({}, ["--port", "9000"]) == 9000
    assert server_port({}, []) == 8000
    assert derive_topic("llama", {"POD_IP": "10.1.2.3"}, ["--port", "8080"]) == "kv@10.1.2.3:8080@llama"


def _args(**kw: object) -> EngineArgs:
    return EngineArgs(model="/nonexistent/model", **kw)  # type: ignore[arg-type]


def test_defaults_fill_only_when_the_user_gave_no_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["api_server", "--port", "8123"])
    env = {"LLMD_KV_EVENTS": "1", "POD_IP": "10.9.8.7", "LLMD_KV_EVENTS_PORT": "6000"}
    args = _args(served_model_name=["served", "alias"])
    assert fill_events_config(args, env) == "defaulted"
    cfg = args.kv_events_config
    assert isinstance(cfg, KVEventsConfig)
    assert cfg.enable_kv_cache_events and cfg.publisher == "zmq"
    # bound on the pod's own address, not on every interface (issue 9, case 9)
    assert cfg.endpoint == "tcp://10.9.8.7:6000" and cfg.replay_endpoint == "tcp://10.9.8.7:5558"
    assert cfg.topic == "kv@10.9.8.7:8123@served"
    # the user's own config wins
    mine = KVEventsConfig(enable_kv_cache_events=True, endpoint="tcp://router:9999", topic="mine")
    args = _args(kv_events_config=mine)
    assert fill_events_config(args, env) == "user-config"
    assert args.kv_events_config is mine and mine.topic == "mine" and mine.endpoint == "tcp://router:9999"
    # ... but an empty topic is filled in
    blank = KVEventsConfig(enable_kv_cache_events=True)
    args = _args(kv_events_config=blank)
    assert fill_events_config(args, env) == "topic-filled" and blank.topic == "kv@10.9.8.7:8123@/nonexistent/model"


def test_replay_port_can_be_turned_off() -> None:
    env = {"LLMD_KV_EVENTS_REPLAY_PORT": "off", "LLMD_KV_EVENTS_PORT": "bogus", "POD_IP": "1.2.3.4"}
    cfg = default_events_config(_args(), env)
    assert "replay_endpoint" not in cfg and cfg["endpoint"] == "tcp://1.2.3.4:5557"


def test_bind_host_is_the_pods_own_address() -> None:
    assert bind_host({"POD_IP": "10.1.2.3"}) == "10.1.2.3"
    assert bind_host({"POD_IPS": "fd00::7,10.0.0.1"}) == "fd00::7"
    assert endpoint("fd00::7", 5557) == "tcp://[fd00::7]:5557"
    assert bind_host({"LLMD_KV_EVENTS_HOST": "10.0.0.9", "POD_IP": "10.1.2.3"}) == "10.0.0.9"
    assert bind_host({"LLMD_KV_EVENTS_HOST": "pod-a.example", "POD_IP": "10.1.2.3"}) == "10.1.2.3"
    assert bind_host({"LLMD_KV_EVENTS_BIND_HOST": "*", "POD_IP": "10.1.2.3"}) == "*"  # opt back in
    cfg = default_events_config(_args(), {"LLMD_KV_EVENTS_BIND_HOST": "*", "POD_IP": "10.1.2.3"})
    assert cfg["endpoint"] == "tcp://*:5557"


@pytest.fixture
def restore_patches() -> Iterator[None]:
    from vllm.distributed.kv_events import ZmqEventPublisher

    orig_create = EngineArgs.create_engine_config
    orig_reset = Scheduler.reset_prefix_cache
    orig_setup = ZmqEventPublisher.__dict__["_socket_setup"]
    yield
    EngineArgs.create_engine_config = orig_create  # type: ignore[method-assign]
    Scheduler.reset_prefix_cache = orig_reset  # type: ignore[method-assign]
    ZmqEventPublisher._socket_setup = orig_setup  # type: ignore[method-assign]


def test_apply_event_defaults_by_role(monkeypatch: pytest.MonkeyPatch, restore_patches: None) -> None:
    monkeypatch.delenv("LLMD_KV_EVENTS", raising=False)
    original = EngineArgs.create_engine_config
    assert apply_event_defaults("api_server") == "off"
    assert EngineArgs.create_engine_config is original
    monkeypatch.setenv("LLMD_KV_EVENTS", "1")
    assert apply_event_defaults("api_server") == "env-defaults"
    patched = EngineArgs.create_engine_config
    assert patched is not original and getattr(patched, engine_config._PATCH_MARK)
    assert apply_event_defaults("api_server") == "env-defaults"
    assert EngineArgs.create_engine_config is patched  # idempotent
    assert apply_event_defaults("worker") == "unchanged"
    monkeypatch.setenv("POD_IP", "10.1.2.3")
    assert apply_event_defaults("engine_core") == "publisher bind 10.1.2.3, flush-on-reset"
    assert getattr(Scheduler.reset_prefix_cache, engine_config._PATCH_MARK)
    monkeypatch.setenv("LLMD_KV_EVENTS_FLUSH_ON_RESET", "0")
    assert apply_event_defaults("engine_core") == "publisher already, flush-off"


def test_a_failing_hook_never_raises(monkeypatch: pytest.MonkeyPatch, restore_patches: None) -> None:
    monkeypatch.setenv("LLMD_KV_EVENTS", "1")

    def boom() -> bool:
        raise RuntimeError("vLLM moved things around")

    monkeypatch.setattr(engine_config, "_patch_engine_args", boom)
    assert apply_event_defaults("api_server") == "error"
