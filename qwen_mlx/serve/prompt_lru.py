"""The server's prompt cache: recent conversations' caches, least recently used out first.

An entry is the token ids a single-row cache holds and that cache. A request takes the
entry sharing the longest start with its prompt: a softmax-attention layer keeps any
prefix of its positions, but a Gated DeltaNet state (and a rotating window) only the
whole entry, so for hybrids the scheduler also stores the state where the next turn's
prompt will part from this one (hybrid spec §7). Memory is bounded by `max_bytes`.
Only the scheduler's MLX thread touches it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np

from ..model.cache import KVCache, LinearCache, RotatingKVCache, cache_arrays


def _prefix_only(cache: list) -> bool:
    """Whether every layer can go back to any earlier position (plain KV caches)."""
    return all(isinstance(c, KVCache) for c in cache)


def cache_nbytes(cache: list) -> int:
    """Bytes the arrays of a cache hold (views counted at their own size)."""
    return sum(a.nbytes for a in cache_arrays(cache))


def copy_prefix(cache: list, n: int) -> list:
    """A new single-row cache holding the first `n` positions of `cache`; the arrays are
    shared, and every cache class replaces its arrays rather than editing them where a
    copy could see it (KVCache writes into a slice, which is a new array)."""
    out = []
    for c in cache:
        if isinstance(c, KVCache):
            new = KVCache(c.bits)
            if n and c.keys is not None:
                new.set_state(c.storage.slice(c.keys, 0, n), c.storage.slice(c.values, 0, n), n)
        elif isinstance(c, LinearCache):
            if n != c.offset:
                raise ValueError("a DeltaNet state cannot be cut")
            new = LinearCache()
            new.set_state(c.conv_state, c.recurrent_state, c.offset)
        elif isinstance(c, RotatingKVCache):
            if n != c.offset:
                raise ValueError("a rotating cache is reused whole")
            new = RotatingKVCache(c.window, c.bits, sinks=c.sinks)
            k, v = c.state()
            new.set_state(k, v, c.offset)
        else:
            raise TypeError(f"cannot copy a {type(c).__name__}")
        out.append(new)
    return out


class PromptLRU:
    """Caches of recent prompts and replies, at most `max_bytes` in all."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], tuple[np.ndarray, list, int]] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: Sequence[int]) -> tuple[list | None, int]:
        """(a cache holding the longest reusable start of `ids`, its length); (None, 0)
        when nothing is reusable. At least the last id is always left to run."""
        want = np.asarray(ids, dtype=np.int64)
        limit = len(want) - 1
        best, best_n = None, 0
        for key, (arr, cache, _) in self._entries.items():
            m = min(len(arr), len(want))
            diff = np.nonzero(arr[:m] != want[:m])[0]
            common = int(diff[0]) if len(diff) else m
            if _prefix_only(cache):
                n = min(common, limit)
            else:
                n = len(arr) if common == len(arr) and len(arr) <= limit else 0
            if n > best_n:
                best, best_n = key, n
        if best is None:
            self.misses += 1
            return None, 0
        self.hits += 1
        self._entries.move_to_end(best)
        return copy_prefix(self._entries[best][1], best_n), best_n

    def insert(self, ids: Sequence[int], cache: list) -> bool:
        """Keep `cache` (holding exactly `ids`); False when it alone is over the bound."""
        key = tuple(int(i) for i in ids)
        if not key or cache[0].offset != len(key):
            return False
        size = cache_nbytes(cache)
        if size > self.max_bytes:
            return False
        self._drop(key)
        if _prefix_only(cache):
            # Entries this one extends can serve nothing it cannot.
            for other in [k for k, (_, c, _) in self._entries.items()
                          if _prefix_only(c) and len(k) <= len(key) and key[:len(k)] == k]:
                self._drop(other)
        self._entries[key] = (np.asarray(key, dtype=np.int64), cache, size)
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
        return True

    def _drop(self, key: tuple[int, ...]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry[2]

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0
