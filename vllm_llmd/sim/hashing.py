"""Prefix-cache block hashes exactly as vLLM 0.32 computes and publishes them.

Follows ``vllm/utils/hashing.py`` (``sha256``, ``sha256_cbor``, ``xxhash``, ``xxhash_cbor``) and
``vllm/v1/core/kv_cache_utils.py``:

* ``init_none_hash``/``resolve_none_hash_seed``: the chain's root ``NONE_HASH = hash_fn(seed)``,
  seed = ``PYTHONHASHSEED`` if set, else ``"vllm-none-hash"`` for the sha256 variants, else (xxhash
  variants) 32 random bytes in hex, i.e. not reproducible across processes;
* ``hash_block_tokens``: ``hash_fn((parent or NONE_HASH, tuple(block_tokens), extra_keys))`` over
  full blocks only, chained with the parent's full digest;
* ``generate_block_hash_extra_keys``: ``(("cache_salt", salt),)`` on the first block of a salted
  request, ``None`` otherwise (LoRA, multimodal and prompt-embeds keys are not simulated);
* ``maybe_convert_block_hash``: events carry ``int.from_bytes(digest, "big") & (2**64 - 1)`` when
  ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`` is 1 (the default), the raw digest otherwise;
* ``to_event_extra_keys``: a salt is published untagged, ``(salt,)``.

vLLM's default algorithm in 0.32 is ``sha256`` (``CacheConfig.prefix_caching_hash_algo``).
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any, Literal

HashAlgo = Literal["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"]
HASH_ALGOS: tuple[str, ...] = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
DEFAULT_NONE_HASH_SEED = "vllm-none-hash"
_U64 = (1 << 64) - 1


def _pickled(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _cbor(obj: Any) -> bytes:
    import cbor2

    return bytes(cbor2.dumps(obj, canonical=True))


def _xxh128(data: bytes) -> bytes:
    import xxhash

    return bytes(xxhash.xxh3_128_digest(data))


def get_hash_fn(algo: str) -> Callable[[Any], bytes]:
    """The hash function of vLLM's ``--prefix-caching-hash-algo`` ``algo``."""
    if algo == "sha256":
        return lambda obj: hashlib.sha256(_pickled(obj)).digest()
    if algo == "sha256_cbor":
        return lambda obj: hashlib.sha256(_cbor(obj)).digest()
    if algo == "xxhash":
        return lambda obj: _xxh128(_pickled(obj))
    if algo == "xxhash_cbor":
        return lambda obj: _xxh128(_cbor(obj))
    raise ValueError(f"unknown prefix caching hash algorithm {algo!r}; one of {', '.join(HASH_ALGOS)}")


def resolve_seed(algo: str, seed: str | None = None) -> str:
    """The NONE_HASH seed: ``seed`` (what ``PYTHONHASHSEED`` would be) if given, else the
    environment's ``PYTHONHASHSEED``, else vLLM's fixed seed (sha256 variants) or random bytes."""
    if seed is None:
        seed = os.environ.get("PYTHONHASHSEED")
    if seed is not None:
        return seed
    if algo.startswith("xxhash"):
        return os.urandom(32).hex()
    return DEFAULT_NONE_HASH_SEED


class BlockHasher:
    """Chained block hashes of one engine (one algorithm, one seed, one block size)."""

    def __init__(self, block_size: int, algo: str = "sha256", seed: str | None = None, int_hashes: bool = True):
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.block_size = block_size
        self.algo = algo
        self.hash_fn = get_hash_fn(algo)
        self.seed = resolve_seed(algo, seed)
        self.none_hash = self.hash_fn(self.seed)
        self.int_hashes = int_hashes

    def extend(self, hashes: list[bytes], token_ids: Sequence[int], cache_salt: str | None = None) -> list[bytes]:
        """Append the hashes of the newly full blocks of ``token_ids`` to ``hashes`` (in place,
        as ``Request.block_hashes`` grows in vLLM) and return the new ones."""
        bs = self.block_size
        start = len(hashes) * bs
        new: list[bytes] = []
        parent = hashes[-1] if hashes else self.none_hash
        while start + bs <= len(token_ids):
            extra = (("cache_salt", cache_salt),) if (start == 0 and cache_salt) else None
            parent = self.hash_fn((parent, tuple(token_ids[start : start + bs]), extra))
            new.append(parent)
            start += bs
        hashes.extend(new)
        return new

    def block_hashes(self, token_ids: Sequence[int], cache_salt: str | None = None) -> list[bytes]:
        return self.extend([], token_ids, cache_salt)

    def external(self, digest: bytes) -> int | bytes:
        """The form published in KV events (``maybe_convert_block_hash``)."""
        if not self.int_hashes:
            return digest
        return int.from_bytes(digest, "big") & _U64


def event_extra_keys(num_blocks: int, first_block: bool, cache_salt: str | None) -> list[tuple[Any, ...] | None]:
    """``BlockStored.extra_keys`` for ``num_blocks`` blocks (``to_event_extra_keys``)."""
    keys: list[tuple[Any, ...] | None] = [None] * num_blocks
    if first_block and cache_salt and num_blocks:
        keys[0] = (cache_salt,)
    return keys
