"""Softmax attention, for every Qwen generation.

GQA through `mx.fast.scaled_dot_product_attention`, optional q/k/v/o biases,
Qwen3's per-head QK norm before RoPE, sliding windows through the cache's
mask, partial rotary through `mx.fast.rope(dims=...)`, and the hybrids'
gated attention: q_proj yields each head's query and then its gate
(interleaved per head, hybrid spec §3.1), and the merged output is
multiplied by sigmoid(gate) before o_proj.

A quantized cache hands back its stored triples and attention reads them
with `mx.quantized_matmul` in key blocks (`blocked`); so does a long float
attention on the CPU, where the fused kernel would build the whole score
matrix. Dual Chunk Attention (`dca`) takes over when the forward's positions
reach past the first chunk.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..errors import QwenMLXError
from . import blocked, parallel
from .cache import RotatingKVCache, attention_mask
from .config import ModelConfig
from .norm import RMSNorm
from .parallel import Linear


class Positions:
    """What every layer of one forward shares about positions."""

    def __init__(self, offset: int, freqs: mx.array, query_scale: mx.array | None,
                 softmax_scale: float, dca=None):
        self.offset, self.freqs = offset, freqs
        self.query_scale, self.softmax_scale = query_scale, softmax_scale
        self.dca = dca  # a dca.DCAPositions when Dual Chunk Attention is on

    def rotate(self, x: mx.array, dims: int) -> mx.array:
        return mx.fast.rope(x, dims, traditional=False, base=None, scale=1.0,
                            offset=self.offset, freqs=self.freqs)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, window: int | None):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.rotary_dim = c.rotary_dim
        self.window = window
        self.gated = c.attention_gate
        q_width = c.num_heads * c.head_dim * (2 if self.gated else 1)
        self.q_proj = Linear(c.hidden_size, q_width, bias=c.qkv_bias)
        self.k_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps)
        self.qk_norm = c.qk_norm

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array | None]:
        """Queries, keys and values [B, heads, L, D] before RoPE (QK norm applied), and the
        output gate [B, L, heads, D] of gated attention (else None)."""
        B, L, _ = x.shape
        q = self.q_proj(x)
        gate = None
        if self.gated:
            q = q.reshape(B, L, self.num_heads, 2 * self.head_dim)
            q, gate = q[..., :self.head_dim], q[..., self.head_dim:]
        q = q.reshape(B, L, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, L, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, L, self.num_kv_heads, self.head_dim)
        if self.qk_norm:  # Qwen3 and the hybrids: per-head RMSNorm before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        return q, k, v, gate

    def rotate(self, q: mx.array, k: mx.array, positions: Positions
               ) -> tuple[mx.array, mx.array]:
        """RoPE on the rotary dims of q and k, then Qwen1's LogN query scale."""
        q = positions.rotate(q, self.rotary_dim)
        k = positions.rotate(k, self.rotary_dim)
        if positions.query_scale is not None:
            q = q * positions.query_scale.astype(q.dtype)
        return q, k

    def __call__(self, x: mx.array, positions: Positions, cache=None) -> mx.array:
        B, L, _ = x.shape
        q, k, v, gate = self.project(x)
        dca = positions.dca
        if dca is not None and not dca.plain:
            out = self._dual_chunk(q, k, v, positions, cache)
        else:
            q, k = self.rotate(q, k, positions)
            bits = None
            if cache is not None:
                k, v, mask = cache.update(k, v, packed=True)
                bits = cache.bits
            else:
                mask = attention_mask(L, self.window)
            out = self._attend(q, k, v, positions.softmax_scale, mask, bits)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        if self.gated:
            out = out * mx.sigmoid(gate.reshape(B, L, -1))
        return self.o_proj(out)

    def _dual_chunk(self, q: mx.array, k: mx.array, v: mx.array, positions: Positions,
                    cache) -> mx.array:
        dca = positions.dca
        if isinstance(cache, RotatingKVCache) or self.window:
            raise QwenMLXError("Dual Chunk Attention needs every position's keys: it cannot "
                               "run with max_kv_size or sliding windows (switch DCA off with "
                               "qwen_mlx.model.dca.set_dca(model, False))")
        k = dca.rotate_keys(k, self.rotary_dim)  # cached rotated by p mod c, and scaled
        bits = None
        if cache is not None:
            k, v, _ = cache.update(k, v, packed=True)
            bits = cache.bits
        return dca.attend(q, k, v, positions.softmax_scale, self.rotary_dim, bits)

    def _attend(self, q: mx.array, k, v, scale: float, mask, bits: int | None = None
                ) -> mx.array:
        """Attention over [B, heads, L, D]: quantized keys through `blocked`; float keys
        through SDPA, except on the CPU where its score matrix would pass the budget;
        there, groups of KV heads attend on separate cores."""
        if bits is not None or (
                q.shape[2] > 1 and mx.default_device() == mx.cpu
                and 4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] > blocked.SCORE_BUDGET):
            return blocked.attention(q, k, v, scale, mask, bits)
        def heads(kv: slice) -> mx.array:
            group = self.num_heads // self.num_kv_heads
            qs = slice(kv.start * group, kv.stop * group)
            return mx.fast.scaled_dot_product_attention(q[:, qs], k[:, kv], v[:, kv],
                                                        scale=scale, mask=mask)
        work = q.shape[2] * k.shape[2] * q.shape[1] * q.shape[3]
        y = parallel.split(self.num_kv_heads, work, heads, axis=1)
        return heads(slice(0, self.num_kv_heads)) if y is None else y
