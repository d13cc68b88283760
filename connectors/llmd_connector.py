"""``LLMDConnector``: the single connector name vllm-llmd registers for every platform.

This first version is the connector's shell: it satisfies vLLM's V1 connector API and loads
nothing from anywhere (every request is computed locally). The prefill/decode transfer over NIXL
(and the RBLN path) replaces the bodies of these methods behind the same name.

Shape follows vLLM 0.32's ``KVConnectorBase_V1`` (vllm/distributed/kv_transfer/kv_connector/v1/
base.py): three-argument constructor with ``kv_cache_config``; ``SupportsHMA`` so vLLM keeps the
hybrid KV cache manager on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig


class LLMDConnectorMetadata(KVConnectorMetadata):
    """Per-step scheduler → worker message (empty in the shell)."""


class LLMDConnector(KVConnectorBase_V1, SupportsHMA):
    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)

    # ---- worker side -------------------------------------------------------------------------
    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        return None

    # ---- scheduler side ----------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        return 0, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        return None

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return LLMDConnectorMetadata()

    def request_finished_all_groups(
        self, request: Any, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        return False, None
