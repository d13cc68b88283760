"""KV connectors and their transports, shipped as ``vllm_llmd.connectors``.

This module is imported by vLLM's API-server process when it resolves a connector name, so it
must stay light: the connector class is loaded on first attribute access.

Use either the registered name (the plugin registers it)::

    --kv-transfer-config '{"kv_connector": "LLMDConnector", "kv_role": "kv_both"}'

or the module path (no plugin needed)::

    --kv-transfer-config '{"kv_connector": "LLMDConnector", "kv_role": "kv_both",
                           "kv_connector_module_path": "vllm_llmd.connectors"}'
"""

from __future__ import annotations

from typing import Any

__all__ = ["LLMDConnector"]


def __getattr__(name: str) -> Any:
    if name == "LLMDConnector":
        from vllm_llmd.connectors.llmd_connector import LLMDConnector

        return LLMDConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
