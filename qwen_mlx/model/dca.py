"""Dual Chunk Attention (Qwen2.5-7B/14B-Instruct-1M; spec §3.7, after vLLM).

With c = chunk_size - local_size, token p lies in chunk p // c. Keys are
rotated by p mod c (and multiplied by the length factor) before they are
cached, so the cache holds them ready and decode reads them as they are. A
query in chunk m attends over three key ranges, each with its own rotation:

- intra: chunk m, causally, query rotated by p mod c;
- successive: all of chunk m-1, query rotated by min(p mod c + c, chunk_size);
- inter: chunks 0 .. m-2, query rotated by the constant min(2c - 1, chunk_size).

The three partial attentions are merged exactly by log-sum-exp (`blocked.attend`:
one softmax over their union). With original_max_position_embeddings L0 > 0 the
length factor f = max(1, 0.1 ln(L / L0) + 1), L the sequence length of the forward,
multiplies the keys before caching and the queries, so logits scale by f².

Below c positions (with f = 1) every key lies in the query's own chunk and is rotated
by its true position: DCA is plain attention there, and the model takes the plain
(fused) path.
"""

from __future__ import annotations

import math

import mlx.core as mx

from ..errors import QwenMLXError
from . import blocked
from .config import DCAConfig
from .rope import rotate_at

# Take the plain attention path while every position lies in chunk 0 and f == 1 (exact:
# see the module docstring). Tests turn it off to run the DCA path there too.
PLAIN_BELOW_CHUNK = True


def length_factor(dca: DCAConfig, length: int) -> float:
    """f = max(1, 0.1 ln(L/L0) + 1), or 1 without scaling (L0 = 0)."""
    L0 = dca.original_max_position_embeddings
    if L0 <= 0 or length <= 0:
        return 1.0
    return max(1.0, 0.1 * math.log(length / L0) + 1.0)


class DCAPositions:
    """The positions one forward over [offset, offset + length) shares across layers."""

    def __init__(self, dca: DCAConfig, offset: int, length: int, total: int,
                 periods: mx.array):
        self.config, self.offset, self.length, self.periods = dca, offset, length, periods
        c = dca.chunk_len
        self.factor = length_factor(dca, total)
        self.plain = PLAIN_BELOW_CHUNK and offset + length <= c and self.factor == 1.0
        p = mx.arange(offset, offset + length) % c
        self.keys = p
        self.intra = p
        self.succ = mx.minimum(p + c, dca.chunk_size)
        self.inter = mx.full((length,), min(2 * c - 1, dca.chunk_size), dtype=p.dtype)

    def segments(self) -> list[tuple[int, int, int]]:
        """(first, stop, chunk) of this forward's queries, split where chunks change."""
        c, out = self.config.chunk_len, []
        a = 0
        while a < self.length:
            m = (self.offset + a) // c
            b = min(self.length, (m + 1) * c - self.offset)
            out.append((a, b, m))
            a = b
        return out

    def rotate_keys(self, k: mx.array, dims: int) -> mx.array:
        k = rotate_at(k, self.keys, self.periods, dims)
        return k * self.factor if self.factor != 1.0 else k

    def attend(self, q: mx.array, keys, values, scale: float, dims: int,
               bits: int | None = None) -> mx.array:
        """q [B, Hq, L, D] unrotated; keys (rotated, scaled) and values of every position
        0 .. offset + L - 1, float or quantized with `bits`."""
        c = self.config.chunk_len
        s = mx.array(scale * self.factor, dtype=q.dtype)
        rotated = {name: rotate_at(q, getattr(self, name), self.periods, dims) * s
                   for name in ("intra", "succ", "inter")}
        outs = []
        for a, b, m in self.segments():
            sl = slice(a, b)
            parts = [blocked.Part(rotated["intra"][:, :, sl], m * c, self.offset + b,
                                  "causal", self.offset + a)]
            if m >= 1:
                parts.append(blocked.Part(rotated["succ"][:, :, sl], (m - 1) * c, m * c))
            if m >= 2:
                parts.append(blocked.Part(rotated["inter"][:, :, sl], 0, (m - 1) * c))
            outs.append(blocked.attend(parts, keys, values, bits=bits))
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)


def set_dca(model, enabled: bool) -> None:
    """Switch Dual Chunk Attention on or off for a model whose config carries
    `dual_chunk_attention_config` (it is on after loading). Off, the model runs plain
    full attention with its RoPE, as transformers does. Caches filled in the other mode
    hold keys rotated the other way: start a new cache after switching."""
    if enabled and model.config.dca is None:
        raise QwenMLXError(f"{model.config.source}: this model has no "
                           "dual_chunk_attention_config, so Dual Chunk Attention cannot be "
                           "switched on")
    model.dca = model.config.dca if enabled else None
