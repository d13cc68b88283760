"""Shared fixtures. Real vLLM CPU engines are started once per session and shared by every test
that asks for them (they take about a minute to start).

Every test engine runs with ``--enforce-eager``: torch.compile's warm-up doubles a start (one engine of
the tiny model, quiet machine, 2026-12-03: 58 s eager, 112 s compiled) and no test measures speed.

Ordering: a test that kills or restarts engines carries ``@pytest.mark.destructive`` and runs after
every other test (``scope="session"``, the default: it uses the session's shared engines) or after
every other test of its module (``scope="module"``: it uses a module's own engines). See
:func:`pytest_collection_modifyitems`; file names play no part."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from vllm_llmd.testing.engine import EngineProcess, EngineSpec
from vllm_llmd.testing.model import make_test_model

MODEL_NAME = "test-model"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "destructive(scope='session'|'module'): kills or restarts engines others use; runs after the tests "
        "of its scope (tests/conftest.py)",
    )


def _destructive_scope(item: pytest.Item) -> str | None:
    mark = item.get_closest_marker("destructive")
    if mark is None:
        return None
    scope = mark.kwargs.get("scope", "session")
    if scope not in ("session", "module"):
        raise pytest.UsageError(f"{item.nodeid}: destructive(scope={scope!r}) must be 'session' or 'module'")
    return scope


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Destructive tests last: module-scoped ones at the end of their module (so the module's own
    engines are not started twice), session-scoped ones after everything else, in collection order."""
    last = [i for i in items if _destructive_scope(i) == "session"]
    out: list[pytest.Item] = []
    for _module, group in itertools.groupby((i for i in items if _destructive_scope(i) != "session"), _module_of):
        g = list(group)
        out += [i for i in g if _destructive_scope(i) is None] + [i for i in g if _destructive_scope(i) == "module"]
    items[:] = out + last


def _module_of(item: pytest.Item) -> object:
    return getattr(item, "module", None)


@pytest.fixture(scope="session")
def test_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The locally generated tiny model (random weights, local BPE tokenizer)."""
    return make_test_model(tmp_path_factory.mktemp("model") / "tiny", shape="tiny", seed=0)


@dataclass
class EnginePair:
    """Two engines with different block sizes (not pinned: see ``EngineSpec.cpu_core``)."""

    a: EngineProcess  # block size 32
    b: EngineProcess  # block size 64
    trace_dir: Path

    def __iter__(self) -> Iterator[EngineProcess]:
        return iter((self.a, self.b))

    def plugin_roles(self, engine: EngineProcess) -> list[dict[str, object]]:
        path = self.trace_dir / f"{engine.spec.port}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _spec(model: Path, block_size: int, trace_dir: Path, **kw: object) -> EngineSpec:
    spec = EngineSpec(
        model=model, block_size=block_size, served_model_name=MODEL_NAME, extra_args=["--enforce-eager"], **kw
    )
    spec.extra_env["LLMD_PLUGIN_TRACE"] = str(trace_dir / f"{spec.port}.jsonl")
    return spec


@pytest.fixture(scope="session")
def engines(test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnginePair]:
    """Two real vLLM CPU engines (A: block 32; B: block 64), KV events and the
    replay endpoint on, the plugin installed, our connector configured by its registered name."""
    logs = Path(os.environ.get("LLMD_TEST_LOG_DIR") or tmp_path_factory.mktemp("engine-logs"))
    trace_dir = tmp_path_factory.mktemp("plugin-trace")
    connector = {"kv_connector": "LLMDConnector", "kv_role": "kv_both"}
    a = EngineProcess(_spec(test_model_dir, 32, trace_dir, kv_transfer_config=connector), logs / "engine-a.log")
    b = EngineProcess(_spec(test_model_dir, 64, trace_dir, kv_transfer_config=connector), logs / "engine-b.log")
    pair = EnginePair(a, b, trace_dir)
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda e: e.start_ready(), pair))
        yield pair
    finally:
        for e in pair:
            e.stop()


@dataclass
class EnvEventsEngine:
    """An engine started WITHOUT ``--kv-events-config``: KV events come from ``LLMD_KV_EVENTS=1``."""

    engine: EngineProcess
    events_endpoint: str
    replay_endpoint: str
    pod: str  # "127.0.0.1:<port>", what the plugin puts in the topic (from POD_IP)


@pytest.fixture(scope="session")
def env_events_engine(test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvEventsEngine]:
    """One engine (block 128, the CPU default) whose KV events are switched on by the plugin from the
    environment only, as in a Kubernetes pod (``POD_IP`` from the downward API)."""
    from vllm_llmd.testing.engine import free_port

    logs = Path(os.environ.get("LLMD_TEST_LOG_DIR") or tmp_path_factory.mktemp("engine-logs"))
    events_port, replay_port = free_port(), free_port()
    spec = EngineSpec(
        model=test_model_dir,
        block_size=128,
        served_model_name=MODEL_NAME,
        events_port=None,
        replay_port=None,
        extra_args=["--enforce-eager"],
        extra_env={
            "LLMD_KV_EVENTS": "1",
            "LLMD_KV_EVENTS_PORT": str(events_port),
            "LLMD_KV_EVENTS_REPLAY_PORT": str(replay_port),
            "POD_IP": "127.0.0.1",
        },
    )
    engine = EngineProcess(spec, logs / "engine-env-events.log")
    try:
        # a start that hangs (seen rarely, see EngineProcess.start_ready) is retried once
        engine.start_ready()
        yield EnvEventsEngine(
            engine,
            f"tcp://127.0.0.1:{events_port}",
            f"tcp://127.0.0.1:{replay_port}",
            f"127.0.0.1:{spec.port}",
        )
    finally:
        engine.stop()
