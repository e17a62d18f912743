"""Key/value caches, and the Gated DeltaNet layers' state.

`KVCache` preallocates and grows in steps, so decoding writes in place
instead of concatenating every token. `RotatingKVCache` serves
sliding-window layers and `max_kv_size`: it keeps only the last `window`
positions, so its memory stays bounded however long the conversation runs.

Either can store keys and values quantized (`bits` 4 or 8): the buffers then
hold mx.quantize's (packed, scales, biases) triples. Attention asks for them
as stored (`update(..., packed=True)`) and reads them with
mx.quantized_matmul, so the cache is never dequantized; other callers get
float arrays. Quantization is a storage detail here, which is why it
combines with the rotating cache (mlx-lm's quantized cache cannot rotate).

A rotating cache for `max_kv_size` also keeps the first `sinks` positions
(attention sinks, 4 by default) besides the most recent ones: the first
tokens draw much of every head's attention, and dropping them is what makes
a plain window's output fall apart once the conversation passes it.

`update` stores the new keys and values and returns what attention needs:
the keys and values to attend over and the mask for the new queries
(None, "causal", or a boolean array where True means visible).

`LinearCache` holds a DeltaNet layer's conv state and float32 recurrent
state: constant memory, but it cannot be trimmed. So every cache can
`snapshot()` and later `restore(snapshot)`. Snapshots copy nothing: a
KVCache's is its length (checked on restore against later rewrites of the
positions it covers), a rotating cache's holds views of its ring (MLX
copies the ring only if it is written while a view is alive), and a
linear cache's holds its two state arrays, which it replaces, never edits.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

KV_BITS = (4, 8)


def window_mask(q_start: int, q_len: int, k_start: int, k_len: int, window: int) -> mx.array:
    """Query at position p sees key position j iff p - window < j <= p."""
    q = mx.arange(q_start, q_start + q_len)[:, None]
    k = mx.arange(k_start, k_start + k_len)[None, :]
    return (k <= q) & (k > q - window)


def sink_mask(q_start: int, q_len: int, key_positions: mx.array, window: int,
              sinks: int) -> mx.array:
    """Query at position p sees key position j iff j <= p and (j < sinks or
    p - (window - sinks) < j): the sink positions plus the most recent ones, `window`
    keys in all."""
    q = mx.arange(q_start, q_start + q_len)[:, None]
    k = key_positions[None, :]
    return (k <= q) & ((k < sinks) | (k > q - (window - sinks)))


def attention_mask(length: int, window: int | None = None) -> "str | mx.array | None":
    """The mask for an uncached forward of `length` tokens."""
    if length == 1:
        return None
    if window is None or length <= window:
        return "causal"
    return window_mask(0, length, 0, length, window)


class _Storage:
    """Float or quantized [B, H, N, D] buffers, sliced and joined along N."""

    def __init__(self, bits: int | None = None):
        self.bits = bits

    def pack(self, x: mx.array) -> Any:
        if self.bits is None:
            return x
        group = 64 if x.shape[-1] % 64 == 0 else 32
        return tuple(mx.quantize(x, group_size=group, bits=self.bits))

    def unpack(self, x: Any, dtype: mx.Dtype, packed: bool = False) -> Any:
        """Float [B, H, N, D]; with `packed`, as stored (what quantized attention reads)."""
        if self.bits is None or packed:
            return x
        w, scales, biases = x
        group = w.shape[-1] * 32 // self.bits // scales.shape[-1]
        return mx.dequantize(w, scales, biases, group_size=group, bits=self.bits).astype(dtype)

    @staticmethod
    def zeros_like(packed: Any, n: int) -> Any:
        def one(a):
            return mx.zeros((*a.shape[:2], n, a.shape[3]), a.dtype)
        return tuple(one(a) for a in packed) if isinstance(packed, tuple) else one(packed)

    @staticmethod
    def slice(x: Any, start: int, stop: int) -> Any:
        if isinstance(x, tuple):
            return tuple(a[..., start:stop, :] for a in x)
        return x[..., start:stop, :]

    @staticmethod
    def assign(x: Any, start: int, value: Any) -> None:
        pairs = zip(x, value) if isinstance(x, tuple) else [(x, value)]
        for dst, src in pairs:
            dst[..., start:start + src.shape[2], :] = src

    @staticmethod
    def concat(a: Any, b: Any) -> Any:
        if isinstance(a, tuple):
            return tuple(mx.concatenate([x, y], axis=2) for x, y in zip(a, b))
        return mx.concatenate([a, b], axis=2)

    @staticmethod
    def length(x: Any) -> int:
        return (x[0] if isinstance(x, tuple) else x).shape[2]

    @staticmethod
    def nbytes(x: Any) -> int:
        if x is None:
            return 0
        return sum(a.nbytes for a in x) if isinstance(x, tuple) else x.nbytes

    @staticmethod
    def arrays(x: Any) -> list[mx.array]:
        return list(x) if isinstance(x, tuple) else [x]


class CacheSnapshot:
    """What `restore` needs to put a cache back as it was at `offset`."""

    def __init__(self, offset: int, data: Any = None, seq: int = 0):
        self.offset, self.data, self.seq = offset, data, seq

    @property
    def nbytes(self) -> int:
        """Bytes this snapshot keeps alive beyond the cache itself (an upper bound)."""
        def total(x: Any) -> int:
            if isinstance(x, mx.array):
                return x.nbytes
            return sum(total(y) for y in x) if isinstance(x, (tuple, list)) else 0
        return total(self.data)


class KVCache:
    """A growing cache for full-attention layers."""

    step = 256

    def __init__(self, bits: int | None = None) -> None:
        self.storage = _Storage(bits)
        self.keys: Any = None
        self.values: Any = None
        self.offset = 0
        self._seq = 0  # counts updates, so a snapshot knows what came after it
        self._rewrites: list[tuple[int, int]] = []  # (seq, first position) of writes after a trim
        self._high = 0  # the furthest position written

    @property
    def bits(self) -> int | None:
        return self.storage.bits

    def update(self, keys: mx.array, values: mx.array, packed: bool = False):
        """Append keys/values [B, H, L, D]; return all of them (as stored with `packed`)
        and the mask."""
        s, start, length = self.storage, self.offset, keys.shape[2]
        k, v = s.pack(keys), s.pack(values)
        if self.keys is None or start + length > s.length(self.keys):
            capacity = -(-(start + length) // self.step) * self.step
            grow_k, grow_v = s.zeros_like(k, capacity - start), s.zeros_like(v, capacity - start)
            if self.keys is None:
                self.keys, self.values = grow_k, grow_v
            else:
                self.keys = s.concat(s.slice(self.keys, 0, start), grow_k)
                self.values = s.concat(s.slice(self.values, 0, start), grow_v)
        s.assign(self.keys, start, k)
        s.assign(self.values, start, v)
        self._seq += 1
        if start < self._high:
            self._rewrites.append((self._seq, start))
        self.offset += length
        self._high = max(self._high, self.offset)
        mask = None if length == 1 else "causal"
        return (s.unpack(s.slice(self.keys, 0, self.offset), keys.dtype, packed),
                s.unpack(s.slice(self.values, 0, self.offset), values.dtype, packed), mask)

    def trim(self, n: int) -> bool:
        """Forget the last `n` positions; always possible here."""
        self.offset -= min(n, self.offset)
        return True

    def state(self) -> tuple[Any, Any]:
        """Keys and values in position order, as stored (packed when quantized)."""
        s = self.storage
        if self.keys is None:
            return None, None
        return s.slice(self.keys, 0, self.offset), s.slice(self.values, 0, self.offset)

    def set_state(self, keys: Any, values: Any, offset: int) -> None:
        """Take keys and values as `state()` returns them (a prompt-cache file)."""
        self.keys, self.values, self.offset = keys, values, offset
        self._high = offset
        self._rewrites.clear()

    def snapshot(self) -> CacheSnapshot:
        return CacheSnapshot(self.offset, seq=self._seq)

    def can_restore(self, snap: CacheSnapshot) -> bool:
        """Whether the positions `snap` covers are still as they were."""
        return snap.offset <= self._high and not any(
            seq > snap.seq and start < snap.offset for seq, start in self._rewrites)

    def restore(self, snap: CacheSnapshot) -> bool:
        """Go back (or forward) to `snap`; False if its positions were written over since."""
        if not self.can_restore(snap):
            return False
        self.offset = snap.offset
        return True

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers (allocated, not only filled)."""
        return self.storage.nbytes(self.keys) + self.storage.nbytes(self.values)


class RotatingKVCache:
    """A cache that holds at most `window` positions (sliding windows, max_kv_size).

    The first `sinks` positions, once written, stay in slots [0, sinks). While
    fewer than `window` positions are held they sit in order at [0, filled);
    once full, slots [sinks, window) are a ring and `_next` is the slot of the
    oldest position there, the one the next token overwrites.
    """

    step = 256

    def __init__(self, window: int, bits: int | None = None, sinks: int = 0) -> None:
        if not 0 <= sinks < window:
            raise ValueError(f"sinks must lie in [0, window), got {sinks} for window {window}")
        self.window, self.sinks = window, sinks
        self.storage = _Storage(bits)
        self.keys: Any = None
        self.values: Any = None
        self.offset = 0
        self._filled = 0
        self._next = sinks

    @property
    def bits(self) -> int | None:
        return self.storage.bits

    def _in_order(self) -> tuple[Any, Any]:
        s = self.storage
        if self.keys is None:
            return None, None
        k, v = s.slice(self.keys, 0, self._filled), s.slice(self.values, 0, self._filled)
        if self._filled == self.window and self._next != self.sinks:
            n, a, w = self._next, self.sinks, self.window
            k = s.concat(s.concat(s.slice(k, 0, a), s.slice(k, n, w)), s.slice(k, a, n))
            v = s.concat(s.concat(s.slice(v, 0, a), s.slice(v, n, w)), s.slice(v, a, n))
        return k, v

    def _held_positions(self) -> mx.array:
        """The positions `_in_order` returns, in its order."""
        if self.offset <= self.window:
            return mx.arange(self.offset)
        recent = self.window - self.sinks
        return mx.concatenate([mx.arange(self.sinks),
                               mx.arange(self.offset - recent, self.offset)])

    def update(self, keys: mx.array, values: mx.array, packed: bool = False):
        """Add keys/values [B, H, L, D]; return what the new queries attend over (as
        stored with `packed`), and the mask."""
        s = self.storage
        if keys.shape[2] == 1 and self.keys is not None:
            return self._update_one(keys, values, packed)
        start, length = self.offset, keys.shape[2]
        held = self._held_positions() if self.sinks and start > self.window else None
        old_k, old_v = self._in_order()
        all_k, all_v = s.pack(keys), s.pack(values)
        if old_k is not None:
            all_k, all_v = s.concat(old_k, all_k), s.concat(old_v, all_v)
        total = s.length(all_k)
        self.offset += length
        # Keep the sinks and the last `window - sinks` positions: the next query needs no more.
        if total <= self.window:
            self.keys, self.values = all_k, all_v
        else:
            a, recent = self.sinks, self.window - self.sinks
            self.keys = s.concat(s.slice(all_k, 0, a), s.slice(all_k, total - recent, total))
            self.values = s.concat(s.slice(all_v, 0, a), s.slice(all_v, total - recent, total))
        self._filled, self._next = min(total, self.window), self.sinks
        if length == 1:
            mask = None
        elif start + length <= self.window:
            mask = "causal"
        elif self.sinks:
            positions = mx.arange(start + length) if held is None else mx.concatenate(
                [held, mx.arange(start, start + length)])
            mask = sink_mask(start, length, positions, self.window, self.sinks)
        else:
            mask = window_mask(start, length, start + length - total, total, self.window)
        return s.unpack(all_k, keys.dtype, packed), s.unpack(all_v, values.dtype, packed), mask

    def _update_one(self, keys: mx.array, values: mx.array, packed: bool = False):
        s = self.storage
        k, v = s.pack(keys), s.pack(values)
        if self._filled < self.window:
            if self._filled == s.length(self.keys):
                grow = min(self.step, self.window - self._filled)
                self.keys = s.concat(self.keys, s.zeros_like(k, grow))
                self.values = s.concat(self.values, s.zeros_like(v, grow))
            slot = self._filled
            self._filled += 1
        else:
            slot = self._next
            a = self.sinks
            self._next = a + (self._next - a + 1) % (self.window - a)
        s.assign(self.keys, slot, k)
        s.assign(self.values, slot, v)
        self.offset += 1
        # Everything held lies inside the new token's view, so order does not matter.
        return (s.unpack(s.slice(self.keys, 0, self._filled), keys.dtype, packed),
                s.unpack(s.slice(self.values, 0, self._filled), values.dtype, packed), None)

    def trim(self, n: int) -> bool:
        """Forget the last `n` positions, if no position before them was dropped yet."""
        if self._filled != self.offset or n > self.offset:
            return False  # the keys the earlier positions need are gone: re-prefill
        self.offset -= n
        self._filled -= n
        return True

    def state(self) -> tuple[Any, Any]:
        return self._in_order()

    def set_state(self, keys: Any, values: Any, offset: int) -> None:
        """Take keys and values as `state()` returns them (a prompt-cache file)."""
        self.keys, self.values, self.offset = keys, values, offset
        self._filled = 0 if keys is None else self.storage.length(keys)
        self._next = self.sinks

    def snapshot(self) -> CacheSnapshot:
        s = self.storage
        # Views, not the buffers themselves: the ring is written in place.
        views = None if self.keys is None else (s.slice(self.keys, 0, s.length(self.keys)),
                                                s.slice(self.values, 0, s.length(self.values)))
        return CacheSnapshot(self.offset, (views, self._filled, self._next))

    def restore(self, snap: CacheSnapshot) -> bool:
        s = self.storage
        views, self._filled, self._next = snap.data
        # Fresh views again: the ring is written in place, and the snapshot must
        # stay as it is for the next restore.
        self.keys, self.values = (None, None) if views is None else (
            s.slice(views[0], 0, s.length(views[0])), s.slice(views[1], 0, s.length(views[1])))
        self.offset = snap.offset
        return True

    @property
    def nbytes(self) -> int:
        return self.storage.nbytes(self.keys) + self.storage.nbytes(self.values)


class LinearCache:
    """A Gated DeltaNet layer's state: the last K-1 conv inputs [B, K-1, C] and the
    float32 recurrent state S [B, Hv, Dk, Dv]. Its size does not grow with the context."""

    bits = None

    def __init__(self) -> None:
        self.conv_state: mx.array | None = None
        self.recurrent_state: mx.array | None = None
        self.offset = 0
        # Set by speculative decoding: a multi-token update then also keeps what `keep`
        # needs, (conv state before it, its conv inputs, the state after each token).
        self.keep_steps = False
        self.steps: tuple[mx.array, mx.array, mx.array] | None = None

    def keep(self, n: int) -> bool:
        """Keep only the first `n` tokens of the last multi-token update (recorded with
        `keep_steps`); False when there is no such record to go back in."""
        if self.steps is None:
            return False
        prev, inputs, states = self.steps
        T = inputs.shape[1]
        if not 1 <= n <= T:
            return False
        if n < T:
            K1 = prev.shape[1]
            window = mx.concatenate([prev, inputs[:, :n]], axis=1)
            self.conv_state = window[:, window.shape[1] - K1:]
            self.recurrent_state = states[:, :, n - 1]
            self.offset -= T - n
        self.steps = None
        return True

    def trim(self, n: int) -> bool:
        """The recurrence cannot be undone: only trimming nothing succeeds (use snapshots)."""
        return n == 0

    def state(self) -> tuple[Any, Any]:
        return self.conv_state, self.recurrent_state

    def set_state(self, conv_state: Any, recurrent_state: Any, offset: int) -> None:
        self.conv_state, self.recurrent_state, self.offset = conv_state, recurrent_state, offset
        self.steps = None

    def snapshot(self) -> CacheSnapshot:
        return CacheSnapshot(self.offset, (self.conv_state, self.recurrent_state))

    def restore(self, snap: CacheSnapshot) -> bool:
        (self.conv_state, self.recurrent_state), self.offset = snap.data, snap.offset
        self.steps = None
        return True

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state() if a is not None)


SINKS = 4  # attention sinks a max_kv_size cache keeps by default


def make_cache(windows: "tuple[int | None, ...]", *, kv_bits: int | None = None,
               max_kv_size: int | None = None, kinds: "tuple[str, ...] | None" = None,
               sinks: int = SINKS) -> list:
    """One cache per layer: a LinearCache for Gated DeltaNet layers ("linear" in
    `kinds`); rotating where a layer has a window or max_kv_size is set. Where
    max_kv_size (not the layer's own window) bounds the cache, it also keeps the first
    `sinks` positions (at most half of max_kv_size); a window layer stays exact."""
    caches = []
    for i, w in enumerate(windows):
        if kinds is not None and kinds[i] == "linear":
            caches.append(LinearCache())
            continue
        limit = min(x for x in (w, max_kv_size) if x) if (w or max_kv_size) else None
        if not limit:
            caches.append(KVCache(kv_bits))
            continue
        capped = max_kv_size is not None and (not w or max_kv_size < w)
        keep = min(sinks, limit // 2) if capped else 0
        caches.append(RotatingKVCache(limit, kv_bits, sinks=keep))
    return caches


def cache_arrays(cache: list) -> list[mx.array]:
    """Every array a model's cache holds (quantized triples flattened), e.g. to evaluate."""
    return [a for c in cache for part in c.state() if part is not None
            for a in (part if isinstance(part, tuple) else (part,))]


def snapshot_cache(cache: list) -> list[CacheSnapshot]:
    """A snapshot of every layer's cache (cheap: see the module docstring)."""
    return [c.snapshot() for c in cache]


def restore_cache(cache: list, snapshots: list[CacheSnapshot]) -> bool:
    """Put every layer back as its snapshot was; False, with the cache unchanged,
    when some layer's positions were written over since."""
    if len(cache) != len(snapshots) or any(
            isinstance(c, KVCache) and not c.can_restore(s) for c, s in zip(cache, snapshots)):
        return False
    for c, s in zip(cache, snapshots):
        c.restore(s)
    return True



# ------------------------------------------------------------------ batches
#
# Continuous batching (qwen-mlx serve) decodes many conversations in one forward. Each
# joins with the single-row cache its own prefill filled and leaves with one again, so
# everything above works on single rows and only the decode step sees a batch. A batch
# cache's `offset` is an int32 array [B] of each row's position (RoPE takes it as is).


class BatchKVCache:
    """Keys and values of B rows [B, H, N, D], right-aligned: every row writes its next
    token in the same column `idx`, and row i's positions fill columns [starts[i], idx),
    so a row that joins shorter than the others is padded on the left, where the mask
    hides it. Float storage only (a quantized single-row cache is not batched)."""

    step = 256
    bits = None

    def __init__(self, keys: mx.array, values: mx.array, starts: list[int], idx: int) -> None:
        self.keys, self.values, self.starts, self.idx = keys, values, list(starts), idx

    @classmethod
    def from_cache(cls, cache: "KVCache", heads: int, head_dim: int,
                   dtype: mx.Dtype) -> "BatchKVCache":
        """One row holding a growing single-row cache's positions; an empty cache becomes
        a row of zero width [1, heads, 0, head_dim]."""
        if cache.bits is not None:
            raise ValueError("a quantized KV cache cannot join a batch")
        n = cache.offset
        if cache.keys is None or n == 0:
            empty = mx.zeros((1, heads, 0, head_dim), dtype)
            return cls(empty, empty, [0], 0)
        return cls(cache.keys[..., :n, :], cache.values[..., :n, :], [0], n)

    @property
    def offset(self) -> mx.array:
        return mx.array([self.idx - s for s in self.starts], dtype=mx.int32)

    @property
    def size(self) -> int:
        return len(self.starts)

    def update(self, keys: mx.array, values: mx.array, packed: bool = False):
        """Write one new position per row [B, H, 1, D]; all keys, values and the row mask
        (float storage: `packed` changes nothing)."""
        if keys.shape[2] != 1:
            raise ValueError("a batch cache takes one token per row (prefill each row alone)")
        if self.idx + 1 > self.keys.shape[2]:
            B, H, _, D = keys.shape
            zk = mx.zeros((B, H, self.step, D), keys.dtype)
            zv = mx.zeros((B, H, self.step, values.shape[3]), values.dtype)
            self.keys = mx.concatenate([self.keys[..., :self.idx, :], zk], axis=2)
            self.values = mx.concatenate([self.values[..., :self.idx, :], zv], axis=2)
        self.keys[..., self.idx:self.idx + 1, :] = keys
        self.values[..., self.idx:self.idx + 1, :] = values
        self.idx += 1
        mask = None
        if any(self.starts):
            cols = mx.arange(self.idx)[None, :]
            mask = (cols >= mx.array(self.starts)[:, None])[:, None, None, :]
        return self.keys[..., :self.idx, :], self.values[..., :self.idx, :], mask

    def _padded(self, idx: int) -> tuple[mx.array, mx.array]:
        """keys and values [B, H, idx, D], shifted right so that this batch's `idx` is `idx`."""
        pad = [(0, 0), (0, 0), (idx - self.idx, 0), (0, 0)]
        k, v = self.keys[..., :self.idx, :], self.values[..., :self.idx, :]
        return (mx.pad(k, pad), mx.pad(v, pad)) if idx > self.idx else (k, v)

    def extend(self, other: "BatchKVCache") -> None:
        """Append `other`'s rows, padding the shorter side on the left."""
        idx = max(self.idx, other.idx)
        (k1, v1), (k2, v2) = self._padded(idx), other._padded(idx)
        self.starts = ([s + idx - self.idx for s in self.starts]
                       + [s + idx - other.idx for s in other.starts])
        self.keys = mx.concatenate([k1, k2], axis=0)
        self.values = mx.concatenate([v1, v2], axis=0)
        self.idx = idx

    def filter(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order, at least one), dropping the columns no kept
        row uses."""
        self.starts = [self.starts[i] for i in rows]
        index = mx.array(rows)
        cut = min(self.starts)
        self.keys = self.keys[index, :, cut:self.idx, :]
        self.values = self.values[index, :, cut:self.idx, :]
        self.starts = [s - cut for s in self.starts]
        self.idx -= cut

    def extract(self, row: int) -> "KVCache":
        """A growing single-row cache holding row `row`'s positions (a copy)."""
        out = KVCache()
        s = self.starts[row]
        if self.idx > s:
            k = mx.contiguous(self.keys[row:row + 1, :, s:self.idx, :])
            v = mx.contiguous(self.values[row:row + 1, :, s:self.idx, :])
            out.set_state(k, v, self.idx - s)
        return out

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def state(self) -> tuple[Any, Any]:
        return self.keys, self.values


class BatchLinearCache:
    """The DeltaNet states of B rows, stacked ([B, K-1, C] and [B, Hv, Dk, Dv]). A decode
    step updates every row by its own token, so rows need no alignment or mask."""

    bits = None
    keep_steps = False  # GatedDeltaNet reads these; a batch never verifies drafts
    steps = None

    def __init__(self, conv_state: mx.array, recurrent_state: mx.array,
                 offset: mx.array) -> None:
        self.conv_state, self.recurrent_state, self._offset = conv_state, recurrent_state, offset

    @property
    def offset(self) -> mx.array:
        # A new array each time: GatedDeltaNet's `offset += T` updates an mx.array in
        # place, and the forward's positions hold the array they were given.
        return self._offset + 0

    @offset.setter
    def offset(self, value: mx.array) -> None:
        self._offset = value

    @classmethod
    def from_cache(cls, cache: "LinearCache", conv_shape: tuple[int, ...],
                   state_shape: tuple[int, ...], dtype: mx.Dtype) -> "BatchLinearCache":
        """One row of a single-row cache; zero states (a row whose prefill ran no token)
        take `conv_shape` [1, K-1, C] in `dtype` and `state_shape` [1, Hv, Dk, Dv]."""
        conv = cache.conv_state if cache.conv_state is not None else mx.zeros(conv_shape, dtype)
        state = (cache.recurrent_state if cache.recurrent_state is not None
                 else mx.zeros(state_shape, mx.float32))
        return cls(conv, state, mx.array([cache.offset], dtype=mx.int32))

    @property
    def size(self) -> int:
        return self.conv_state.shape[0]

    def extend(self, other: "BatchLinearCache") -> None:
        self.conv_state = mx.concatenate([self.conv_state, other.conv_state], axis=0)
        self.recurrent_state = mx.concatenate([self.recurrent_state, other.recurrent_state],
                                              axis=0)
        self._offset = mx.concatenate([self._offset, other._offset])

    def filter(self, rows: list[int]) -> None:
        index = mx.array(rows)
        self.conv_state, self.recurrent_state = self.conv_state[index], self.recurrent_state[index]
        self._offset = self._offset[index]

    def extract(self, row: int) -> "LinearCache":
        out = LinearCache()
        out.set_state(mx.contiguous(self.conv_state[row:row + 1]),
                      mx.contiguous(self.recurrent_state[row:row + 1]),
                      int(self._offset[row].item()))
        return out

    @property
    def nbytes(self) -> int:
        return self.conv_state.nbytes + self.recurrent_state.nbytes

    def state(self) -> tuple[Any, Any]:
        return self.conv_state, self.recurrent_state
