"""Key/value caches.

`KVCache` preallocates and grows in steps, so decoding writes in place
instead of concatenating every token. `RotatingKVCache` serves
sliding-window layers: it keeps only the last `window` positions, so its
memory stays bounded by the window however long the conversation runs.

`update` stores the new keys and values and returns what attention needs:
the keys and values to attend over and the mask for the new queries
(None, "causal", or a boolean array where True means visible).
"""

from __future__ import annotations

import mlx.core as mx

def window_mask(q_start: int, q_len: int, k_start: int, k_len: int, window: int) -> mx.array:
    """Query at position p sees key position j iff p - window < j <= p."""
    q = mx.arange(q_start, q_start + q_len)[:, None]
    k = mx.arange(k_start, k_start + k_len)[None, :]
    return (k <= q) & (k > q - window)


def attention_mask(length: int, window: int | None = None) -> "str | mx.array | None":
    """The mask for an uncached forward of `length` tokens."""
    if length == 1:
        return None
    if window is None or length <= window:
        return "causal"
    return window_mask(0, length, 0, length, window)


class KVCache:
    """A growing cache for full-attention layers."""

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update(self, keys: mx.array, values: mx.array):
        """Append keys/values [B, H, L, D]; return all of them and the mask."""
        start, length = self.offset, keys.shape[2]
        if self.keys is None or start + length > self.keys.shape[2]:
            self._grow(keys, values, start + length)
        self.keys[..., start:start + length, :] = keys
        self.values[..., start:start + length, :] = values
        self.offset += length
        mask = None if length == 1 else "causal"
        return self.keys[..., :self.offset, :], self.values[..., :self.offset, :], mask

    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        B, H, _, Dk = keys.shape
        Dv = values.shape[3]
        capacity = ((needed + self.step - 1) // self.step) * self.step
        extra = capacity - (0 if self.keys is None else self.offset)
        new_k = mx.zeros((B, H, extra, Dk), keys.dtype)
        new_v = mx.zeros((B, H, extra, Dv), values.dtype)
        if self.keys is None:
            self.keys, self.values = new_k, new_v
        else:
            self.keys = mx.concatenate([self.keys[..., :self.offset, :], new_k], axis=2)
            self.values = mx.concatenate([self.values[..., :self.offset, :], new_v], axis=2)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class RotatingKVCache:
    """A cache for sliding-window layers that holds at most `window` positions.

    While fewer than `window` positions are held they sit in order at
    [0, filled); once full, the buffer is a ring and `_next` is the slot of
    the oldest position, the one the next token overwrites.
    """

    step = 256

    def __init__(self, window: int) -> None:
        self.window = window
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0
        self._filled = 0
        self._next = 0

    def _in_order(self) -> tuple[mx.array | None, mx.array | None]:
        if self.keys is None:
            return None, None
        k, v = self.keys[..., :self._filled, :], self.values[..., :self._filled, :]
        if self._filled == self.window and self._next:
            k = mx.concatenate([k[..., self._next:, :], k[..., :self._next, :]], axis=2)
            v = mx.concatenate([v[..., self._next:, :], v[..., :self._next, :]], axis=2)
        return k, v

    def update(self, keys: mx.array, values: mx.array):
        """Add keys/values [B, H, L, D]; return what the new queries attend over, and the mask."""
        if keys.shape[2] == 1 and self.keys is not None:
            return self._update_one(keys, values)
        start, length = self.offset, keys.shape[2]
        old_k, old_v = self._in_order()
        if old_k is not None:
            keys = mx.concatenate([old_k, keys], axis=2)
            values = mx.concatenate([old_v, values], axis=2)
        total = keys.shape[2]
        self.offset += length
        # Keep only the last `window` positions: the next query needs no more.
        keep = min(self.window, total)
        self.keys, self.values = keys[..., total - keep:, :], values[..., total - keep:, :]
        self._filled, self._next = keep, 0
        if length == 1:
            mask = None
        elif start + length <= self.window:
            mask = "causal"
        else:
            mask = window_mask(start, length, start + length - total, total, self.window)
        return keys, values, mask

    def _update_one(self, keys: mx.array, values: mx.array):
        if self._filled < self.window:
            if self._filled == self.keys.shape[2]:
                grow = min(self.step, self.window - self._filled)
                B, H, _, Dk = keys.shape
                self.keys = mx.concatenate(
                    [self.keys, mx.zeros((B, H, grow, Dk), keys.dtype)], axis=2)
                self.values = mx.concatenate(
                    [self.values, mx.zeros((B, H, grow, values.shape[3]), values.dtype)], axis=2)
            slot = self._filled
            self._filled += 1
        else:
            slot = self._next
            self._next = (self._next + 1) % self.window
        self.keys[..., slot:slot + 1, :] = keys
        self.values[..., slot:slot + 1, :] = values
        self.offset += 1
        # Everything held lies inside the new token's window, so order does not matter.
        return self.keys[..., :self._filled, :], self.values[..., :self._filled, :], None

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes
