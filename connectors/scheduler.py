"""Scheduler half of ``LLMDConnector`` (runs in the EngineCore process).

Prefill side (``do_remote_decode``): when the one-token prefill finishes, hold its blocks under a
lease (``delay_free``), announce them in KV events, and return the ``kv_transfer_params`` a decode
engine needs. Decode side (``do_remote_prefill``): report the prompt as external tokens loaded
asynchronously, and hand the worker the local/remote block mapping to pull.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVCacheEvent
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash
from vllm_llmd.connectors.config import LLMDConnectorConfig
from vllm_llmd.connectors.metadata import (
    PRODUCER_TAG,
    LLMDConnectorMetadata,
    RecvJob,
    RemotePrefill,
    parse_remote_prefill,
)
from vllm_llmd.connectors.stats import LLMDConnectorStats

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger("vllm.vllm_llmd.connectors")

#: a decode request whose prefill lease ends within this many seconds is prefilled locally: a pull
#: started that late could still be reading when the prefill engine reuses the blocks (this also
#: absorbs small wall-clock differences between the two hosts)
LEASE_MARGIN_SECONDS = 0.5


class LLMDConnectorScheduler:
    def __init__(self, vllm_config: VllmConfig, cfg: LLMDConnectorConfig) -> None:
        ktc = vllm_config.kv_transfer_config
        assert ktc is not None
        self.cfg = cfg
        self.engine_id = str(ktc.engine_id)
        self.block_size = vllm_config.cache_config.block_size
        self.is_producer = ktc.is_kv_producer
        self.is_consumer = ktc.is_kv_consumer
        self.side_channel_host = cfg.side_channel_host
        self.side_channel_port = cfg.side_channel_port  # replaced by the worker's bound port at start-up
        self._recv: list[RecvJob] = []
        self._send: dict[str, float] = {}
        self._held: dict[str, tuple[int, list[int]]] = {}
        self._events: list[KVCacheEvent] = []
        self._stats = LLMDConnectorStats()
        self._gauges_dirty = False

    # ---- start-up ------------------------------------------------------------------------
    def set_side_channel(self, host: str, port: int) -> None:
        self.side_channel_host, self.side_channel_port = host, port

    # ---- decode side ---------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        if not self.is_consumer:
            return 0, False
        try:
            remote = parse_remote_prefill(request.kv_transfer_params)
        except ValueError as exc:
            logger.warning("LLMDConnector: request %s: %s; prefilling locally", request.request_id, exc)
            return 0, False
        if remote is None:
            return 0, False
        if remote.lease_expires_at is not None and time.time() > remote.lease_expires_at - LEASE_MARGIN_SECONDS:
            logger.warning(
                "LLMDConnector: request %s: the prefill engine's lease on its blocks has expired; prefilling locally",
                request.request_id,
            )
            request.kv_transfer_params["do_remote_prefill"] = False  # final: never pull those blocks
            self._stats.add("transfers_failed")
            return 0, False
        if remote.remote_block_size != self.block_size:
            logger.warning(
                "LLMDConnector: request %s: prefill engine block size %d != ours %d; prefilling locally",
                request.request_id,
                remote.remote_block_size,
                self.block_size,
            )
            return 0, False
        count = min(remote.remote_num_tokens, request.num_prompt_tokens) - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        params = request.kv_transfer_params
        if not self.is_consumer or not params or not params.get("do_remote_prefill"):
            return
        try:
            remote = parse_remote_prefill(params)
        except ValueError:
            remote = None
        # one pull per request, whatever happens next
        params["do_remote_prefill"] = False
        if remote is None or remote.remote_block_size != self.block_size:
            return
        if num_external_tokens > 0:
            local = blocks.get_unhashed_block_ids_all_groups()
            computed = [sum(b.block_hash is not None and not b.is_null for b in group) for group in blocks.blocks]
            remote_ids = [
                list(remote.remote_block_ids[g][computed[g] : computed[g] + len(local[g])])
                if g < len(remote.remote_block_ids)
                else []
                for g in range(len(local))
            ]
        else:  # full local prefix hit: nothing to pull, just release the prefill side's lease
            local, remote_ids = [], []
        self._recv.append(RecvJob(request.request_id, remote, [list(g) for g in local], remote_ids))

    # ---- prefill side --------------------------------------------------------------------
    def request_finished(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        params = request.kv_transfer_params
        if not params:
            return False, None
        if params.get("do_remote_prefill") and self.is_consumer:
            # finished (aborted) before it was scheduled: tell the prefill side to release now
            try:
                remote = parse_remote_prefill(params)
            except ValueError:
                remote = None
            params["do_remote_prefill"] = False
            if remote is not None:
                self._recv.append(RecvJob(request.request_id, remote, [], []))
            return False, None
        if not params.get("do_remote_decode") or not self.is_producer:
            return False, None
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED):
            return False, None
        if not any(len(g) for g in block_ids):
            return False, None
        rid = request.request_id
        n_blocks = sum(len(g) for g in block_ids)
        self._send[rid] = self.cfg.lease_seconds
        hashes = self._announce_held(request)
        self._held[rid] = (n_blocks, hashes)
        self._stats.add("leases_started")
        self._stats.add("blocks_leased", n_blocks)
        self._gauges_dirty = True
        remote = RemotePrefill(
            do_remote_prefill=True,
            remote_engine_id=self.engine_id,
            remote_request_id=rid,
            remote_block_ids=[list(g) for g in block_ids],
            remote_host=self.side_channel_host,
            remote_port=self.side_channel_port,
            remote_num_tokens=request.num_computed_tokens,
            remote_block_size=self.block_size,
            lease_seconds=self.cfg.lease_seconds,
            # the worker starts the lease at the next step, so the blocks are held at least this long
            lease_expires_at=time.time() + self.cfg.lease_seconds,
            connector=PRODUCER_TAG,
        )
        return True, remote.as_params()

    def _announce_held(self, request: Request) -> list[int]:
        n_full = min(request.num_computed_tokens // self.block_size, len(request.block_hashes))
        if n_full == 0:
            return []
        hashes = [maybe_convert_block_hash(h) for h in request.block_hashes[:n_full]]
        lora = request.lora_request
        self._events.append(
            BlockStored(
                block_hashes=hashes,
                parent_block_hash=None,
                token_ids=list(request.all_token_ids[: n_full * self.block_size]),
                block_size=self.block_size,
                lora_id=lora.adapter_id if lora else None,
                medium=self.cfg.events_medium,
                lora_name=lora.name if lora else None,
            )
        )
        return hashes

    # ---- every step ----------------------------------------------------------------------
    def build_connector_meta(self) -> LLMDConnectorMetadata:
        meta = LLMDConnectorMetadata(recv=self._recv, send=self._send)
        self._recv, self._send = [], {}
        return meta

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        for rid in output.finished_sending or ():
            held = self._held.pop(rid, None)
            if held is None:
                continue
            self._gauges_dirty = True
            if held[1]:
                self._events.append(BlockRemoved(block_hashes=held[1], medium=self.cfg.events_medium))

    def take_events(self) -> list[KVCacheEvent]:
        events, self._events = self._events, []
        return events

    def get_stats(self) -> LLMDConnectorStats | None:
        if self._gauges_dirty:
            self._stats.set_gauge("held_blocks", sum(n for n, _ in self._held.values()))
            self._stats.set_gauge("held_requests", len(self._held))
            self._gauges_dirty = False
        if self._stats.is_empty():
            return None
        return self._stats.clone_and_reset()

    @property
    def held_requests(self) -> int:
        return len(self._held)
