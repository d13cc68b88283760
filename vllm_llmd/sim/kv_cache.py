"""The KV block allocator of one simulated engine: vLLM 0.32's block pool with prefix caching,
for a model with one full-attention KV cache group (what every dense decoder has).

Follows, function by function:

* ``vllm/v1/core/kv_cache_utils.py``: ``FreeKVCacheBlockQueue`` (free blocks in eviction order:
  ``popleft_n`` takes from the front, ``append_n`` adds at the back, ``prepend_n`` at the front,
  ``remove`` from the middle; at start the queue is ordered by block id and block 0 is taken as
  the null block);
* ``vllm/v1/core/block_pool.py``: ``BlockHashToBlockMap`` (no de-duplication: two blocks may be
  cached under one hash), ``BlockPool.cache_full_blocks`` (one ``BlockStored`` per call, parent =
  hash of the block before the first new one), ``get_new_blocks`` (evicts the cached blocks it
  pops: one ``BlockRemoved`` per hash), ``touch``, ``free_blocks`` (uncached blocks to the front,
  cached ones to the back: LRU), ``reset_prefix_cache`` (refused while blocks are in use, else
  ``AllBlocksCleared``), ``get_usage``;
* ``vllm/v1/core/single_type_kv_cache_manager.py`` (``FullAttentionManager``):
  ``find_longest_cache_hit``, ``get_num_blocks_to_allocate``, ``allocate_new_blocks``,
  ``cache_blocks``, ``free`` (blocks freed in reverse order so a chain's tail is evicted first);
* ``vllm/v1/core/kv_cache_manager.py``: ``get_computed_blocks`` (at most ``num_tokens - 1``
  tokens can hit: the last one is recomputed for its logits) and ``allocate_slots`` (with
  ``full_sequence_must_fit``, the admission gate ``scheduler_reserve_full_isl`` turns on).

Not simulated: sliding-window, Mamba and hybrid groups, partial-block hits (a hash block size
smaller than the block size), KV connectors, speculative decoding, LoRA and multimodal keys.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from vllm_llmd.sim.hashing import BlockHasher, event_extra_keys
from vllm_llmd.wire import MEDIUM_GPU, AllBlocksCleared, BlockRemoved, BlockStored


def cdiv(a: int, b: int) -> int:
    return -(a // -b)


@dataclass(slots=True, eq=False)
class Block:
    block_id: int
    ref_cnt: int = 0
    #: full digest of the prefix up to the end of this block, while the block is cached
    block_hash: bytes | None = None
    is_null: bool = False


class FreeBlockQueue:
    """Free blocks in eviction order (front = evicted first), O(1) remove from the middle."""

    def __init__(self, blocks: Iterable[Block]) -> None:
        self._q: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in blocks)

    def __len__(self) -> int:
        return len(self._q)

    def popleft_n(self, n: int) -> list[Block]:
        if n > len(self._q):
            raise ValueError(f"cannot take {n} of {len(self._q)} free blocks")
        return [self._q.popitem(last=False)[1] for _ in range(n)]

    def append_n(self, blocks: Sequence[Block]) -> None:
        for b in blocks:
            self._q[b.block_id] = b

    def prepend_n(self, blocks: Sequence[Block]) -> None:
        for b in reversed(blocks):
            self._q[b.block_id] = b
            self._q.move_to_end(b.block_id, last=False)

    def remove(self, block: Block) -> None:
        del self._q[block.block_id]

    def order(self) -> list[int]:
        """Block ids front to back (tests)."""
        return list(self._q)


Event = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass
class BlockPool:
    """``num_blocks`` blocks (block 0 is vLLM's null block, never handed out)."""

    num_blocks: int
    hasher: BlockHasher
    enable_events: bool = True
    medium: str = MEDIUM_GPU
    blocks: list[Block] = field(init=False)
    events: list[Event] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.num_blocks < 2:
            raise ValueError("num_blocks must be at least 2 (block 0 is the null block)")
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.null_block = self.free_queue.popleft_n(1)[0]
        self.null_block.is_null = True
        # hash -> block, or {block_id: block} when several blocks hold the same hash
        self._cached: dict[bytes, Block | dict[int, Block]] = {}

    # ---- the hash map (BlockHashToBlockMap) ------------------------------------------------------
    def get_cached_block(self, block_hash: bytes) -> Block | None:
        blocks = self._cached.get(block_hash)
        if blocks is None or isinstance(blocks, Block):
            return blocks
        return next(iter(blocks.values()))

    def _insert(self, block_hash: bytes, block: Block) -> None:
        cur = self._cached.get(block_hash)
        if cur is None:
            self._cached[block_hash] = block
        elif isinstance(cur, Block):
            self._cached[block_hash] = {cur.block_id: cur, block.block_id: block}
        else:
            cur[block.block_id] = block

    def _pop(self, block_hash: bytes, block_id: int) -> Block | None:
        cur = self._cached.pop(block_hash, None)
        if cur is None:
            return None
        if isinstance(cur, Block):
            if cur.block_id == block_id:
                return cur
            self._cached[block_hash] = cur
            return None
        blk = cur.pop(block_id, None)
        if cur:
            self._cached[block_hash] = cur
        return blk

    @property
    def num_cached_hashes(self) -> int:
        return len(self._cached)

    # ---- BlockPool ---------------------------------------------------------------------------------
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def usage(self) -> float:
        total = self.num_blocks - 1
        return 1.0 - len(self.free_queue) / total if total else 0.0

    def cache_full_blocks(
        self,
        token_ids: Sequence[int],
        block_hashes: Sequence[bytes],
        blocks: Sequence[Block],
        num_cached_blocks: int,
        num_full_blocks: int,
        cache_salt: str | None = None,
    ) -> None:
        if num_cached_blocks >= num_full_blocks:
            return
        ext = self.hasher.external
        new_hashes = []
        for i in range(num_cached_blocks, num_full_blocks):
            blk = blocks[i]
            if blk.is_null:
                continue
            h = block_hashes[i]
            if blk.block_hash is not None:
                # promotion of an already hashed block does not happen with one full-attention group
                self._emit_removed(self._remove_hash(blk))
            if blk.block_hash != h:
                blk.block_hash = h
                self._insert(h, blk)
            new_hashes.append(ext(h))
        if not self.enable_events:
            return
        bs = self.hasher.block_size
        parent = ext(block_hashes[num_cached_blocks - 1]) if num_cached_blocks else None
        self.events.append(
            BlockStored(
                block_hashes=new_hashes,
                parent_block_hash=parent,
                token_ids=list(token_ids[num_cached_blocks * bs : num_full_blocks * bs]),
                block_size=bs,
                lora_id=None,
                medium=self.medium,
                lora_name=None,
                extra_keys=event_extra_keys(num_full_blocks - num_cached_blocks, num_cached_blocks == 0, cache_salt),
                group_idx=0,
                kv_cache_spec_kind="full_attention",
            )
        )

    def _remove_hash(self, block: Block) -> list[bytes]:
        h = block.block_hash
        if h is None:
            return []
        removed = [h] if self._pop(h, block.block_id) is not None else []
        block.block_hash = None
        return removed

    def _emit_removed(self, hashes: list[bytes]) -> None:
        if not self.enable_events:
            return
        for h in hashes:
            self.events.append(BlockRemoved(block_hashes=[self.hasher.external(h)], medium=self.medium, group_idx=0))

    def get_new_blocks(self, n: int) -> list[Block]:
        ret = self.free_queue.popleft_n(n)
        for b in ret:
            self._emit_removed(self._remove_hash(b))
            assert b.ref_cnt == 0
            b.ref_cnt = 1
        return ret

    def touch(self, blocks: Sequence[Block]) -> None:
        for b in blocks:
            if b.ref_cnt == 0 and not b.is_null:
                self.free_queue.remove(b)
            b.ref_cnt += 1

    def free_blocks(self, ordered: Iterable[Block]) -> None:
        """Free in eviction priority order (first = evicted first)."""
        first: list[Block] = []
        last: list[Block] = []
        for b in ordered:
            b.ref_cnt -= 1
            if b.ref_cnt == 0 and not b.is_null:
                (first if b.block_hash is None else last).append(b)
        self.free_queue.prepend_n(first)
        self.free_queue.append_n(last)

    def reset_prefix_cache(self) -> bool:
        if self.num_blocks - self.num_free_blocks() != 1:
            return False
        self._cached = {}
        for b in self.blocks:
            b.block_hash = None
        if self.enable_events:
            self.events.append(AllBlocksCleared())
        return True

    def take_events(self) -> list[Event]:
        ev, self.events = self.events, []
        return ev


class KVCacheManager:
    """One full-attention group on a :class:`BlockPool` (``KVCacheManager`` + ``FullAttentionManager``)."""

    def __init__(self, pool: BlockPool, max_model_len: int) -> None:
        self.pool = pool
        self.block_size = pool.hasher.block_size
        self.max_model_len = max_model_len
        self.req_blocks: dict[str, list[Block]] = {}
        self.num_cached_block: dict[str, int] = {}

    def find_longest_cache_hit(self, block_hashes: Sequence[bytes], max_length: int) -> list[Block]:
        hit: list[Block] = []
        for h in block_hashes[: max_length // self.block_size]:
            b = self.pool.get_cached_block(h)
            if b is None:
                break
            hit.append(b)
        return hit

    def get_computed_blocks(self, block_hashes: Sequence[bytes], num_tokens: int) -> tuple[list[Block], int]:
        """Cached leading blocks of a new request and the tokens they cover (``num_tokens - 1`` at most)."""
        hit = self.find_longest_cache_hit(block_hashes, num_tokens - 1)
        return hit, len(hit) * self.block_size

    def _num_blocks_to_allocate(self, req_id: str, num_tokens: int, new_computed: Sequence[Block]) -> int:
        required = cdiv(num_tokens, self.block_size)
        have = len(self.req_blocks.get(req_id, ()))
        if req_id in self.num_cached_block:
            return max(required - have, 0)
        new = max(required - (len(new_computed) + have), 0)
        return new + sum(1 for b in new_computed if b.ref_cnt == 0 and not b.is_null)

    def allocate_slots(
        self,
        req_id: str,
        token_ids: Sequence[int],
        block_hashes: Sequence[bytes],
        num_computed_tokens: int,
        num_new_tokens: int,
        new_computed_blocks: Sequence[Block] = (),
        full_sequence_must_fit: bool = False,
        cache_salt: str | None = None,
    ) -> bool:
        """Give ``req_id`` slots for ``num_new_tokens`` more tokens and cache its newly full blocks;
        ``False`` (nothing changed) when the free blocks do not suffice."""
        num_tokens = len(token_ids)
        local = num_computed_tokens + len(new_computed_blocks) * self.block_size
        total = min(local, self.max_model_len)
        free = self.pool.num_free_blocks()
        if full_sequence_must_fit:
            full = min(num_tokens, self.max_model_len)
            if self._num_blocks_to_allocate(req_id, full, new_computed_blocks) > free:
                return False
        need_slot = min(total + num_new_tokens, self.max_model_len)
        if self._num_blocks_to_allocate(req_id, need_slot, new_computed_blocks) > free:
            return False
        blocks = self.req_blocks.setdefault(req_id, [])
        if new_computed_blocks:
            self.pool.touch(new_computed_blocks)
            blocks.extend(new_computed_blocks)
            self.num_cached_block[req_id] = len(blocks)
        n_new = cdiv(need_slot, self.block_size) - len(blocks)
        if n_new > 0:
            blocks.extend(self.pool.get_new_blocks(n_new))
        # cache_blocks: full blocks up to the tokens computed after this step
        cached = self.num_cached_block.get(req_id, 0)
        full_blocks = min(total + num_new_tokens, num_tokens) // self.block_size
        if cached < full_blocks:
            self.pool.cache_full_blocks(token_ids, block_hashes, blocks, cached, full_blocks, cache_salt)
            self.num_cached_block[req_id] = full_blocks
        return True

    def free(self, req_id: str) -> None:
        blocks = self.req_blocks.pop(req_id, [])
        self.num_cached_block.pop(req_id, None)
        self.pool.free_blocks(reversed(blocks))

    def num_hashed_tokens(self, req_id: str) -> int:
        """``estimate_cached_tokens``: tokens covered by the request's cached blocks."""
        return self.num_cached_block.get(req_id, 0) * self.block_size

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
