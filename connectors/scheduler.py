"""Scheduler half of ``LLMDConnector`` (runs in the EngineCore process).

Prefill side (``do_remote_decode``): when the one-token prefill finishes, hold its blocks under a
lease (``delay_free``), announce them in KV events, and return the ``kv_transfer_params`` a decode
engine needs. Decode side (``do_remote_prefill``): report the prompt as external tokens loaded
asynchronously, and hand the worker the local/remote block mapping to pull. The two engines' block
sizes may differ: the worker then maps the request's token range onto the prefill engine's blocks
(a cross-layout pull, connectors/xpull.py; whether the two can is agreed in the handshake).

Hostile ``kv_transfer_params``: vLLM puts whatever a client sent (body or ``vllm_xargs``) into
``Request.kv_transfer_params``. :meth:`LLMDConnectorScheduler.admit` (vLLM's ``on_new_request``
hook, called before vLLM's own scheduler reads the params) checks them once with
:func:`vllm_llmd.wire.parse_kv_transfer_params` plus this engine's limits (KV cache groups, max
model length, which peers it may dial; the block size too when ``relayout_buffer_mb`` is 0, as no
re-layout can then bridge another one); params it refuses are replaced by ``None`` with one
(rate-limited) log line, and the request is served like a plain one. Every entry point vLLM calls
goes through the same check and never lets an exception reach the engine core.

Host-staging transports (RBLN): the worker must copy a prefill request's blocks to host memory
before its ``kv_transfer_params`` leave the engine, so the step that completes a ``do_remote_decode``
prompt carries its block ids in ``meta.stage`` (copied in ``wait_for_save``, which runs before vLLM
finishes the request). Only on RBLN engines (vLLM's ``current_platform``), where it is needed.

Size: ~410 lines, over the project's ~400: it is one class, vLLM's scheduler-side connector API
(``vllm/distributed/kv_transfer/kv_connector/v1/base.py``: get_num_new_matched_tokens,
update_state_after_alloc, build_connector_meta, request_finished, on_new_request, take_events,
get_kv_connector_stats), each hook a few lines that delegate to leases.py, tiers/ and peer_serve.py.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVCacheEvent
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash
from vllm_llmd.connectors.config import LLMDConnectorConfig
from vllm_llmd.connectors.metadata import (
    PRODUCER_TAG,
    LLMDConnectorMetadata,
    PeerJob,
    RecvJob,
    RemotePrefill,
)
from vllm_llmd.connectors.stats import SERVE_PREFIX, LLMDConnectorStats

from vllm_llmd.wire.kv_transfer import KVParamsError, PeerLoad, RemoteDecode, parse_kv_transfer_params
from vllm_llmd.wire.logs import LogLimiter

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


def peer_refusal(host: str, allowed: tuple[str, ...]) -> str | None:
    """Why this engine must not dial ``host`` for a pull (``None``: it may). Never an unspecified or
    multicast address; with ``allowed`` set, only hosts in those networks / with those names."""
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        ip = None
    if ip is not None and (ip.is_unspecified or ip.is_multicast):
        return f"remote_host {host} is not a peer address"
    if not allowed:
        return None
    for entry in allowed:
        if entry == host:
            return None
        if ip is not None:
            try:
                if ip in ipaddress.ip_network(entry, strict=False):
                    return None
            except ValueError:
                continue
    return f"remote_host {host} is not in allowed_peers"


class LLMDConnectorScheduler:
    def __init__(
        self, vllm_config: VllmConfig, cfg: LLMDConnectorConfig, num_groups: int = 1, max_tokens: int | None = None
    ) -> None:
        ktc = vllm_config.kv_transfer_config
        assert ktc is not None
        self.cfg = cfg
        self.engine_id = str(ktc.engine_id)
        self.block_size = vllm_config.cache_config.block_size
        self.num_groups = max(1, num_groups)
        mc = getattr(vllm_config, "model_config", None)
        self.max_tokens = max_tokens or int(getattr(mc, "max_model_len", 0) or 1 << 31)
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
        self._refusals = LogLimiter(logger)
        from vllm_llmd.connectors.platform import current_vllm_platform, is_rbln_platform

        platform = current_vllm_platform()
        self.stages = platform is not None and is_rbln_platform(platform)
        #: prefill requests whose prompt is being computed: request, block ids so far (per group)
        self._to_stage: dict[str, tuple[Request, list[list[int]]]] = {}
        #: requests for a remote decode, admitted and not yet finished (``meta.producing``)
        self._producing: set[str] = set()

    # ---- start-up ------------------------------------------------------------------------
    def set_side_channel(self, host: str, port: int) -> None:
        self.side_channel_host, self.side_channel_port = host, port
        # on /metrics as llmd:kv_endpoint_info: how a router names this engine as a peer-load holder
        self._stats.data["endpoint"] = f"{self.engine_id}|{host}:{port}"

    # ---- kv_transfer_params --------------------------------------------------------------
    def _refuse(self, request: Request, why: str) -> None:
        """Serve ``request`` as a plain one: drop its params, say why once (rate-limited), count it."""
        self._refusals.warning(
            "LLMDConnector: request %s: refused kv_transfer_params (%s); serving it locally",
            getattr(request, "request_id", "?"),
            why[:300],
        )
        try:
            request.kv_transfer_params = None
        except Exception:  # pragma: no cover - a request object that refuses the attribute
            pass
        self._stats.add("kv_params_refused")

    def admit(self, request: Request) -> RemotePrefill | RemoteDecode | PeerLoad | None:
        """What ``request.kv_transfer_params`` ask of this engine, checked; refused params become
        ``None`` (a plain request). Never raises."""
        try:
            parsed = parse_kv_transfer_params(request.kv_transfer_params)
            why = None
            if isinstance(parsed, RemotePrefill):
                same = self.block_size if not self.cfg.relayout_buffer_mb else None
                why = parsed.misfit(
                    num_groups=self.num_groups, max_tokens=self.max_tokens, block_size=same
                ) or peer_refusal(parsed.remote_host, self.cfg.allowed_peers)
            elif isinstance(parsed, PeerLoad):
                why = parsed.misfit(block_size=self.block_size, max_tokens=self.max_tokens) or peer_refusal(
                    parsed.peer_host, self.cfg.allowed_peers
                )
                if why is None and parsed.peer_engine_id == self.engine_id:
                    why = "a peer load names this engine itself"
        except KVParamsError as exc:
            parsed, why = None, str(exc)
        except Exception as exc:  # a bug of ours must not take the engine core down
            parsed, why = None, f"{type(exc).__name__}: {exc}"
        if why is not None:
            self._refuse(request, why)
            return None
        return parsed

    def on_new_request(self, request: Request) -> None:
        """vLLM's ``on_new_request``: check the params (:meth:`admit`); a producer notes a request
        for a remote decode, so the worker's UCX progress is awake before its blocks can be read."""
        parsed = self.admit(request)
        if self.is_producer and isinstance(parsed, RemoteDecode):
            self._producing.add(request.request_id)

    def _remote_prefill(self, request: Request) -> RemotePrefill | None:
        parsed = self.admit(request) if self.is_consumer else None
        return parsed if isinstance(parsed, RemotePrefill) and parsed.do_remote_prefill else None

    def _peer_load(self, request: Request) -> PeerLoad | None:
        parsed = self.admit(request) if self.is_consumer else None
        return parsed if isinstance(parsed, PeerLoad) and parsed.do_peer_load else None

    def _peer_blocks(self, request: Request, peer: PeerLoad) -> int:
        """Leading blocks of the prompt to load from the holder: whole blocks it holds, never the
        prompt's last token (the engine computes at least one), at most the blocks hashed so far."""
        usable = min(peer.peer_num_tokens, request.num_prompt_tokens - 1)
        return max(0, min(usable // self.block_size, len(request.block_hashes)))

    # ---- decode side ---------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        remote = self._remote_prefill(request)
        if remote is None:
            peer = self._peer_load(request)
            if peer is None:
                return 0, False
            try:
                count = self._peer_blocks(request, peer) * self.block_size - num_computed_tokens
            except Exception as exc:
                self._refuse(request, f"{type(exc).__name__}: {exc}")
                return 0, False
            return (count, True) if count > 0 else (0, False)
        try:
            if remote.lease_expires_at is not None and time.time() > remote.lease_expires_at - LEASE_MARGIN_SECONDS:
                logger.warning(
                    "LLMDConnector: request %s: the prefill engine's lease on its blocks has expired; "
                    "prefilling locally",
                    request.request_id,
                )
                request.kv_transfer_params["do_remote_prefill"] = False  # final: never pull those blocks
                self._stats.add("transfers_failed")
                return 0, False
            count = min(remote.remote_num_tokens, request.num_prompt_tokens) - num_computed_tokens
        except Exception as exc:
            self._refuse(request, f"{type(exc).__name__}: {exc}")
            return 0, False
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if self.stages and self.is_producer and isinstance(self.admit(request), RemoteDecode):
            self._to_stage.setdefault(request.request_id, (request, []))
        remote = self._remote_prefill(request)
        peer = self._peer_load(request) if remote is None else None
        if peer is not None:
            request.kv_transfer_params["do_peer_load"] = False  # one attempt per request
            if num_external_tokens > 0:
                self._recv.append(self._peer_job(request, peer, blocks, num_external_tokens))
            return
        if remote is None:
            if num_external_tokens > 0:  # cannot happen: we reported none; never leave vLLM waiting
                self._recv.append(RecvJob(request.request_id, None, [], [], refused="no remote prefill"))
            return
        # one pull per request, whatever happens next
        request.kv_transfer_params["do_remote_prefill"] = False
        if num_external_tokens <= 0:  # full local prefix hit: nothing to pull, just release the lease
            self._recv.append(RecvJob(request.request_id, remote, [], []))
            return
        try:
            job = self._recv_job(request.request_id, remote, blocks, num_external_tokens)
        except Exception as exc:
            job = RecvJob(request.request_id, remote, [], [], refused=f"{type(exc).__name__}: {exc}")
        # vLLM now waits for this request's blocks: the worker must answer, even if only "failed"
        self._recv.append(job)

    def _peer_job(self, request: Request, peer: PeerLoad, blocks: KVCacheBlocks, num_external: int) -> RecvJob:
        """Load blocks ``[first, first + n)`` of the prompt (``first``: this engine's own prefix hit)
        from the holder, named by this request's own block hashes."""
        rid = request.request_id
        try:
            local = [list(g) for g in blocks.get_unhashed_block_ids_all_groups()]
            first = sum(b.block_hash is not None and not b.is_null for b in blocks.blocks[0]) if blocks.blocks else 0
            n = num_external // self.block_size
            hashes = [bytes(h) for h in request.block_hashes[first : first + n]]
            refused = None
            if len(local) != 1 or len(local[0]) < n or len(hashes) != n or n * self.block_size != num_external:
                refused = "the allocation does not match the blocks to load"
            job = RecvJob(rid, None, [local[0][:n] if local else []], [], refused=refused, peer=PeerJob(peer, hashes))
        except Exception as exc:
            job = RecvJob(rid, None, [], [], refused=f"{type(exc).__name__}: {exc}", peer=PeerJob(peer, []))
        return job

    def _recv_job(self, rid: str, remote: RemotePrefill, blocks: KVCacheBlocks, num_external: int) -> RecvJob:
        local = [list(g) for g in blocks.get_unhashed_block_ids_all_groups()]
        computed = [sum(b.block_hash is not None and not b.is_null for b in group) for group in blocks.blocks]
        first = computed[0] * self.block_size if computed else 0
        end = first + num_external
        if remote.remote_block_size != self.block_size:
            # a cross-layout pull: the worker maps [first, end) onto the prefill engine's blocks
            need = -(-end // remote.remote_block_size)
            short = [g for g in range(len(local)) if g >= len(remote.remote_block_ids)]
            short += [g for g, ids in enumerate(remote.remote_block_ids) if len(ids) < need]
            refused = f"the prefill engine offers too few blocks in KV group(s) {sorted(set(short))}" if short else None
            return RecvJob(rid, remote, local, [[] for _ in local], refused=refused, first_token=first, end_token=end)
        remote_ids = [
            list(remote.remote_block_ids[g][computed[g] : computed[g] + len(local[g])])
            if g < len(remote.remote_block_ids)
            else []
            for g in range(len(local))
        ]
        short = [g for g in range(len(local)) if len(remote_ids[g]) != len(local[g])]
        refused = f"the prefill engine offers too few blocks in KV group(s) {short}" if short else None
        return RecvJob(rid, remote, local, remote_ids, refused=refused, first_token=first, end_token=end)

    # ---- prefill side --------------------------------------------------------------------
    def request_finished(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        self._producing.discard(request.request_id)
        parsed = self.admit(request)
        if parsed is None:
            return False, None
        if isinstance(parsed, RemotePrefill):
            if parsed.do_remote_prefill and self.is_consumer:
                # finished (aborted) before it was scheduled: tell the prefill side to release now
                request.kv_transfer_params["do_remote_prefill"] = False
                self._recv.append(RecvJob(request.request_id, parsed, [], []))
            return False, None
        if not self.is_producer or not isinstance(parsed, RemoteDecode):
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
        if n_full == 0 or not self.cfg.events_medium:  # no medium: not announced (tiers on, docs/tiers.md)
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
    def build_connector_meta(self, scheduler_output: Any = None) -> LLMDConnectorMetadata:
        meta = LLMDConnectorMetadata(
            recv=self._recv, send=self._send, stage=self._staging(scheduler_output), producing=bool(self._producing)
        )
        self._recv, self._send = [], {}
        return meta

    def _staging(self, so: Any) -> dict[str, list[int]]:
        """Blocks of prefill requests whose prompt this step completes (accumulating each request's
        block ids as vLLM's scheduler output hands them out, as vLLM's NIXL scheduler does)."""
        if not self._to_stage or so is None:
            return {}
        for new in so.scheduled_new_reqs:
            entry = self._to_stage.get(new.req_id)
            if entry is not None:
                entry[1][:] = [list(g) for g in new.block_ids]
        cached = so.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            entry = self._to_stage.get(rid)
            ids = cached.new_block_ids[i]
            if entry is None or ids is None:
                continue
            if rid in cached.resumed_req_ids:
                entry[1][:] = [list(g) for g in ids]
            else:
                for g, more in enumerate(ids):
                    while len(entry[1]) <= g:
                        entry[1].append([])
                    entry[1][g].extend(more)
        out: dict[str, list[int]] = {}
        for rid, (request, ids) in list(self._to_stage.items()):
            n = so.num_scheduled_tokens.get(rid, 0)
            if n and request.num_computed_tokens + n >= request.num_prompt_tokens:
                out[rid] = sorted({b for g in ids for b in g})
                del self._to_stage[rid]
            elif request.is_finished():
                del self._to_stage[rid]
        return out

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

    def count_served(self, counts: dict[str, float]) -> None:
        """What this engine's DRAM tier served peers (connectors/peer_serve.py): ``"<reader>|<what>"``
        counts, on ``/metrics`` as ``llmd:kv_peer_pins`` and ``llmd:kv_peer_served_*`` (stats.py)."""
        for key, n in counts.items():
            self._stats.add(SERVE_PREFIX + key, n)

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
