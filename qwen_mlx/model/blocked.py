"""Attention in key blocks merged by log-sum-exp, over float or quantized keys.

The queries of one forward attend over one or more key ranges ("parts"), each
with its own queries: one part for plain attention, three for Dual Chunk
Attention (intra, successive, inter; spec §3.7). Every key block of every part
gives scores, and a running (max, sum, weighted values) state merges them
exactly, so the result is one softmax over the union of the parts, while the
temporaries stay bounded by queries x block keys, never queries x context.

Quantized keys and values (mx.quantize's (packed, scales, biases) triples, as
the caches store them) are read with `mx.quantized_matmul` for q·kᵀ and p·v, as
mlx-lm's quantized_scaled_dot_product_attention does, so a 4- or 8-bit cache
is never dequantized, not even one block of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

# Bytes of float32 scores one key block may hold (8 MiB): a few such blocks are
# live at once, and they bound attention's temporaries.
SCORE_BUDGET = 1 << 23
MIN_BLOCK = 256
# Keys per block over a quantized cache: where quantized_matmul has no fused kernel (the
# CPU) it dequantizes its operand, so this bounds that copy too.
QUANTIZED_BLOCK = 4096


@dataclass
class Part:
    """Queries [B, Hq, L, D] (already multiplied by the softmax scale) over keys
    [start, stop). `mask`: None (every key of the range is visible), "causal" (query i
    sees key j iff j <= q_start + i, keys numbered from 0) or a boolean array [L, N]
    over all the keys (True: visible)."""

    queries: mx.array
    start: int
    stop: int
    mask: Any = None
    q_start: int = 0


def _layout(x: Any, bits: int | None) -> tuple[int, int]:
    """(feature width, quantization group) of float or quantized [.., N, D] buffers."""
    if bits is None:
        return x.shape[-1], 0
    w, scales, _ = x
    dims = w.shape[-1] * 32 // bits
    return dims, dims // scales.shape[-1]


def _slice(x: Any, start: int, stop: int) -> Any:
    if isinstance(x, tuple):
        return tuple(a[..., start:stop, :] for a in x)
    return x[..., start:stop, :]


def _expand(x: Any) -> Any:
    """[B, Hkv, N, D] -> [B, Hkv, 1, N, D], to broadcast over the query heads of a group."""
    if isinstance(x, tuple):
        return tuple(mx.expand_dims(a, -3) for a in x)
    return mx.expand_dims(x, -3)


def _scores(q: mx.array, k: Any, bits: int | None, group: int) -> mx.array:
    if bits is None:
        return q @ k.swapaxes(-1, -2)
    return mx.quantized_matmul(q, *k, transpose=True, group_size=group, bits=bits)


def _weighted(p: mx.array, v: Any, bits: int | None, group: int) -> mx.array:
    if bits is None:
        return p.astype(v.dtype) @ v
    return mx.quantized_matmul(p.astype(v[1].dtype), *v, transpose=False,
                               group_size=group, bits=bits)


def attend(parts: list[Part], keys: Any, values: Any, *, bits: int | None = None,
           block: int | None = None) -> mx.array:
    """softmax over the union of the parts' keys, times the values: [B, Hq, L, Dv] in the
    queries' dtype. Keys/values are [B, Hkv, N, D] float arrays, or with `bits` the
    quantized triples a cache stores."""
    q0 = parts[0].queries
    B, Hq, L, D = q0.shape
    Hkv = (keys[0] if isinstance(keys, tuple) else keys).shape[1]
    G = Hq // Hkv
    _, group = _layout(keys, bits)
    Dv, v_group = _layout(values, bits)
    if block is None:
        block = max(MIN_BLOCK, SCORE_BUDGET // (4 * B * Hq * L))
        if bits is not None:
            block = min(block, QUANTIZED_BLOCK)
    kx, vx = _expand(keys), _expand(values)
    m = mx.full((B, Hkv, G, L, 1), -mx.inf, dtype=mx.float32)
    total = mx.zeros((B, Hkv, G, L, 1), dtype=mx.float32)
    acc = mx.zeros((B, Hkv, G, L, Dv), dtype=mx.float32)
    rows = None
    for part in parts:
        q = part.queries.reshape(B, Hkv, G, L, D)
        for start in range(part.start, part.stop, block):
            stop = min(start + block, part.stop)
            visible = None
            if isinstance(part.mask, str):
                last = part.q_start + L - 1
                if start > last:
                    break  # no query reaches these keys
                if stop - 1 > part.q_start:  # some key lies after some query
                    if rows is None:
                        rows = mx.arange(L)[:, None]
                    visible = mx.arange(start, stop)[None, :] <= rows + part.q_start
            elif part.mask is not None:
                visible = part.mask[..., start:stop]
            s = _scores(q, _slice(kx, start, stop), bits, group).astype(mx.float32)
            if visible is not None:
                s = mx.where(visible, s, -mx.inf)
            m_new = mx.maximum(m, s.max(axis=-1, keepdims=True))
            # Rows that have seen no visible key yet keep zero weights, not NaN.
            safe = mx.where(m_new == -mx.inf, 0.0, m_new)
            p = mx.exp(s - safe)
            correction = mx.exp(m - safe)
            total = total * correction + p.sum(axis=-1, keepdims=True)
            acc = acc * correction + _weighted(p, _slice(vx, start, stop), bits,
                                               v_group).astype(mx.float32)
            m = m_new
    out = acc / total
    return out.reshape(B, Hq, L, Dv).astype(q0.dtype)


def attention(q: mx.array, keys: Any, values: Any, scale: float, mask: Any,
              bits: int | None = None) -> mx.array:
    """Plain attention of the last L positions (q [B, Hq, L, D]) over keys as a cache
    returns them, with the cache's mask (None, "causal" or a boolean [L, N] array)."""
    n = (keys[0] if isinstance(keys, tuple) else keys).shape[2]
    L = q.shape[2]
    return attend([Part(q * mx.array(scale, dtype=q.dtype), 0, n, mask, n - L)], keys, values,
                  bits=bits)
