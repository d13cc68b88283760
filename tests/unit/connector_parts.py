"""Real vLLM objects for the connector's unit tests: ``VllmConfig`` (no model: building a
``ModelConfig`` reads the checkpoint and takes ~20 s), ``Request``, ``KVCacheBlocks``."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from vllm_llmd import plugin

plugin.register()  # vLLM's config refuses an unknown connector name: register ours first

from vllm.config import CacheConfig, KVTransferConfig, VllmConfig  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.core.kv_cache_manager import KVCacheBlocks  # noqa: E402
from vllm.v1.core.kv_cache_utils import KVCacheBlock  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402
from vllm_llmd.connectors.config import LLMDConnectorConfig  # noqa: E402
from vllm_llmd.connectors.scheduler import LLMDConnectorScheduler  # noqa: E402

BLOCK = 32
MAX_MODEL_LEN = 8192


def vllm_config(role: str = "kv_both", block_size: int = BLOCK, engine_id: str | None = None) -> VllmConfig:
    ktc = KVTransferConfig(kv_connector="LLMDConnector", kv_role=role, engine_id=engine_id)
    cfg = VllmConfig(kv_transfer_config=ktc, cache_config=CacheConfig(block_size=block_size))
    # the three ModelConfig attributes the connector reads (vllm/config/model.py), without the
    # ~20 s of loading a checkpoint that a real ModelConfig costs
    model = SimpleNamespace(served_model_name="m", model="m", dtype="float32", max_model_len=MAX_MODEL_LEN)
    object.__setattr__(cfg, "model_config", model)
    return cfg


def scheduler(role: str = "kv_both", groups: int = 1, **extra: Any) -> LLMDConnectorScheduler:
    cfg = LLMDConnectorConfig.from_extra(extra, default_port=0)
    return LLMDConnectorScheduler(vllm_config(role), cfg, num_groups=groups, max_tokens=MAX_MODEL_LEN)


def request(params: Any = None, *, rid: str = "r1", tokens: int = 200, xargs: bool = False) -> Request:
    """A real vLLM request whose ``kv_transfer_params`` came from the body or from ``vllm_xargs``
    (both end up in ``SamplingParams.extra_args``: vllm/entrypoints/openai/completion/protocol.py)."""
    extra = {"kv_transfer_params": params} if params is not None else None
    if xargs and params is not None:
        extra = {"kv_transfer_params": params, "other": 1}
    sp = SamplingParams(max_tokens=4, extra_args=extra)
    return Request(rid, prompt_token_ids=list(range(1, tokens + 1)), sampling_params=sp, pooling_params=None)


def blocks(ids: list[int], cached: int = 0) -> KVCacheBlocks:
    """One KV group: the first ``cached`` blocks are prefix-cache hits (hashed), the rest new."""
    out = [KVCacheBlock(block_id=i) for i in ids]
    for b in out[:cached]:
        b._block_hash = b"cached-%d" % b.block_id  # type: ignore[assignment]
    return KVCacheBlocks(blocks=(out,))


def remote_params(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_engine_id": "engine-p",
        "remote_request_id": "cmpl-p-1",
        "remote_block_ids": [list(range(10, 17))],
        "remote_host": "127.0.0.1",
        "remote_port": 5600,
        "remote_num_tokens": 200,
        "remote_block_size": BLOCK,
        "tp_size": 1,
    }
    base.update(changes)
    return base


def finish(req: Request, computed: int) -> Request:
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    req.num_computed_tokens = computed
    return req
