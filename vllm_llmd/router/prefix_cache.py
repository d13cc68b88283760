"""A prompt-prefix tokenization cache, linear in what it holds and bounded in bytes.

A prompt is cut into fixed ``chunk_chars`` chunks with chained hashes (``key_j`` covers the text up
to the end of chunk ``j``). For a chunk the tokenizer could cut cleanly (:mod:`.tokenize`), the
cache remembers ``key_j -> (entry, tokens before the cut, cut offset)``. One *entry* per remembered
prompt holds that prompt's token ids once (``array('I')``, 4 bytes a token) and is shared by all its
chunk keys, so memory grows with the prompt, not with its square (issue 9, case 1: the earlier
cache kept a full token list per chunk). Entries are evicted least recently used first when the
estimated bytes exceed ``max_bytes``; one entry may take at most a quarter of the budget.
Thread-safe: tokenization runs on worker threads as well as on the event loop.
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence

#: estimated bytes of one remembered chunk key (dict slot, key int, value tuple) and of one entry
BOUNDARY_BYTES = 200
ENTRY_BYTES = 256


class _Entry:
    __slots__ = ("keys", "nbytes", "tokens")

    def __init__(self, tokens: array) -> None:
        self.tokens = tokens
        self.keys: list[int] = []
        self.nbytes = 0


class TokenPrefixCache:
    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._lock = threading.Lock()
        #: chunk key -> (entry, tokens before the cut, char offset of the cut)
        self._bounds: dict[int, tuple[_Entry, int, int]] = {}
        self._lru: OrderedDict[int, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._bounds)

    @property
    def entries(self) -> int:
        return len(self._lru)

    def lookup(self, keys: Sequence[int]) -> tuple[array, int, int] | None:
        """The deepest remembered chunk of ``keys``: (its tokens, char offset, chunk index)."""
        bounds = self._bounds
        with self._lock:
            for j in range(len(keys) - 1, -1, -1):
                hit = bounds.get(keys[j])
                if hit is not None:
                    entry, ntok, off = hit
                    self._lru.move_to_end(id(entry))
                    return entry.tokens[:ntok], off, j
        return None

    def remember(self, tokens: array, cuts: Sequence[tuple[int, int, int]]) -> None:
        """Remember ``(chunk key, tokens before the cut, cut offset)`` for a prompt with ``tokens``;
        keys already remembered keep their older entry."""
        if not cuts or self.max_bytes == 0:
            return
        longest = max(n for _, n, _ in cuts)
        cost = ENTRY_BYTES + tokens.itemsize * longest + BOUNDARY_BYTES * len(cuts)
        if cost > self.max_bytes // 4:
            return
        entry = _Entry(tokens[:longest])
        bounds = self._bounds
        with self._lock:
            for key, ntok, off in cuts:
                if key not in bounds:
                    bounds[key] = (entry, ntok, off)
                    entry.keys.append(key)
            if not entry.keys:
                return
            entry.nbytes = ENTRY_BYTES + tokens.itemsize * longest + BOUNDARY_BYTES * len(entry.keys)
            self._lru[id(entry)] = entry
            self.nbytes += entry.nbytes
            while self.nbytes > self.max_bytes and self._lru:
                _, old = self._lru.popitem(last=False)
                self.nbytes -= old.nbytes
                for key in old.keys:
                    hit = bounds.get(key)
                    if hit is not None and hit[0] is old:
                        del bounds[key]
