"""The index's own block keys: a chained xxh3-64 over token ids, independent of engine hashes.

``root = xxh3_64("llmd-kv" | model | salt)``; ``key_i = xxh3_64(tokens_i as uint32 LE, seed=key_{i-1})``
over canonical blocks of ``block_size`` tokens (a partial tail block gets no key). Blocks that
carry multimodal / prompt-embeds extra keys mix those in as ``xxh3_64(tokens_i | 0xff | extra,
seed=key_{i-1})``, so they never alias text-only prompts.

``model`` is the served model name, or the LoRA adapter name when the request uses one (as llm-d
does); ``salt`` is the request's ``cache_salt``. Different models, adapters or salts give disjoint
key chains from the first block on.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import xxhash

_h = xxhash.xxh3_64_intdigest
TOKEN_BYTES = 4  # token ids are hashed as uint32


def root_key(model: str, salt: str | None = None) -> int:
    tail = b"\x00" if salt is None else b"\x01" + salt.encode("utf-8", "surrogatepass")
    return _h(b"llmd-kv\x00" + model.encode("utf-8", "surrogatepass") + b"\x00" + tail)


def token_bytes(token_ids: Sequence[int]) -> bytes:
    """Token ids as uint32 little-endian bytes (``OverflowError`` / ``TypeError`` on bad ids)."""
    if isinstance(token_ids, bytes | bytearray):
        return bytes(token_ids)
    astype = getattr(token_ids, "astype", None)  # a numpy array: no per-token Python work at all
    if astype is not None:
        return bytes(astype("<u4").tobytes())
    return array("I", token_ids).tobytes()


def chain_keys(parent: int, data: bytes, block_size: int) -> list[int]:
    """Keys of the full canonical blocks in ``data`` (token bytes), chained from ``parent``."""
    step = block_size * TOKEN_BYTES
    out: list[int] = []
    append = out.append
    key = parent
    for i in range(0, len(data) - step + 1, step):
        key = _h(data[i : i + step], key)
        append(key)
    return out


def mixed_key(parent: int, block: bytes, extra: bytes) -> int:
    """Key of a canonical block whose tokens come with extra keys (multimodal, prompt embeds)."""
    return _h(block + b"\xff" + extra, parent)


def prompt_keys(block_size: int, model: str, token_ids: Sequence[int], salt: str | None = None) -> list[int]:
    """Keys of a prompt's full canonical blocks."""
    n = len(token_ids) - len(token_ids) % block_size
    if n <= 0:
        return []
    return chain_keys(root_key(model, salt), token_bytes(token_ids[:n]), block_size)
