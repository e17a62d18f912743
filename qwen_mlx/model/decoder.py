"""The one Qwen decoder.

Every generation, Qwen1 to Qwen3-MoE, is this module tree with a different
`ModelConfig`: biases, QK norm, sliding windows, the MoE block and the
RoPE variant are switched by config fields, never by model_type. Module
names follow mlx-lm's Qwen2/Qwen3 layout (`model.layers.N.self_attn.q_proj`,
`mlp.switch_mlp`, ...), so the folders mlx-lm writes load as they are and
the folders we write load in mlx-lm.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import parallel
from .cache import attention_mask, make_cache
from .config import ModelConfig
from .experts import SwitchGLU
from .parallel import Embedding, Linear
from .rope import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, window: int | None):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.rotary_dim = c.rotary_dim
        self.window = window
        self.q_proj = Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias)
        if c.qk_norm:
            self.q_norm = nn.RMSNorm(c.head_dim, eps=c.rms_norm_eps)
            self.k_norm = nn.RMSNorm(c.head_dim, eps=c.rms_norm_eps)
        self.qk_norm = c.qk_norm

    def __call__(self, x: mx.array, positions: "Positions", cache=None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, L, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, L, self.num_kv_heads, self.head_dim)
        if self.qk_norm:  # Qwen3: per-head RMSNorm before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        q = positions.rotate(q, self.rotary_dim)
        k = positions.rotate(k, self.rotary_dim)
        if positions.query_scale is not None:
            q = q * positions.query_scale.astype(q.dtype)
        if cache is not None:
            k, v, mask = cache.update(k, v)
        else:
            mask = attention_mask(L, self.window)
        out = self._attend(q, k, v, positions.softmax_scale, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def _attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float, mask) -> mx.array:
        """SDPA over [B, heads, L, D]; on the CPU, groups of KV heads attend on separate cores."""
        def heads(kv: slice) -> mx.array:
            group = self.num_heads // self.num_kv_heads
            qs = slice(kv.start * group, kv.stop * group)
            return mx.fast.scaled_dot_product_attention(q[:, qs], k[:, kv], v[:, kv],
                                                        scale=scale, mask=mask)
        work = q.shape[2] * k.shape[2] * q.shape[1] * q.shape[3]
        y = parallel.split(self.num_kv_heads, work, heads, axis=1)
        return heads(slice(0, self.num_kv_heads)) if y is None else y


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Qwen1's w2 is gate, w1 is up."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=bias)
        self.up_proj = Linear(hidden, intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """Top-k routed experts, plus Qwen2-MoE's sigmoid-gated shared expert."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        moe = config.moe
        self.top_k, self.norm_topk_prob = moe.top_k, moe.norm_topk_prob
        self.gate = Linear(config.hidden_size, moe.num_experts, bias=False)
        self.switch_mlp = SwitchGLU(config.hidden_size, moe.intermediate_size, moe.num_experts)
        if moe.shared_intermediate_size:
            self.shared_expert = MLP(config.hidden_size, moe.shared_intermediate_size)
            self.shared_expert_gate = Linear(config.hidden_size, 1, bias=False)
        self.has_shared = bool(moe.shared_intermediate_size)

    def __call__(self, x: mx.array) -> mx.array:
        # Router logits in the model dtype, softmax and renormalization in float32 (spec §2).
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1)
        k = self.top_k
        indices = mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k]
        weights = mx.take_along_axis(probs, indices, axis=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        weights = weights.astype(x.dtype)
        routed = self.switch_mlp(x, indices) * weights[..., None]
        # transformers sums the k weighted expert outputs with a float32 accumulator.
        y = routed.astype(mx.float32).sum(axis=-2).astype(x.dtype)
        if self.has_shared:
            y = y + mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Attention(config, config.sliding_windows[index])
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if config.sparse_layers[index]:
            self.mlp = SparseMoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)

    def __call__(self, x: mx.array, positions: "Positions", cache=None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), positions, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderStack(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, i) for i in range(config.num_layers)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class Positions:
    """What every layer of one forward shares about positions."""

    def __init__(self, offset: int, freqs: mx.array, query_scale: mx.array | None,
                 softmax_scale: float):
        self.offset, self.freqs = offset, freqs
        self.query_scale, self.softmax_scale = query_scale, softmax_scale

    def rotate(self, x: mx.array, dims: int) -> mx.array:
        return mx.fast.rope(x, dims, traditional=False, base=None, scale=1.0,
                            offset=self.offset, freqs=self.freqs)


class Model(nn.Module):
    """A Qwen causal LM: `model(tokens[B, L], cache) -> logits[B, L, V]`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)
        self.max_context = config.native_context  # generation stops here
        # YaRN multiplies cos and sin by its attention factor f, which scales
        # q·k by f². Every Qwen config rotates the whole head, so folding f² into
        # the softmax scale is exact and costs nothing.
        self.softmax_scale = config.head_dim ** -0.5 * self.rotary.attention_factor ** 2

    def make_cache(self, *, kv_bits: int | None = None, max_kv_size: int | None = None) -> list:
        """One cache per layer: rotating for sliding-window layers (and all layers
        when `max_kv_size` is set), growing otherwise; `kv_bits` 4 or 8 quantizes them."""
        return make_cache(self.config.sliding_windows, kv_bits=kv_bits, max_kv_size=max_kv_size)

    def __call__(self, inputs: mx.array, cache: list | None = None, *,
                 prompt_length: int | None = None, last_only: bool = False) -> mx.array:
        """Logits [B, L, V] for tokens [B, L], continuing from `cache` when given.

        `prompt_length`: the whole prompt's length when it is prefilled in
        chunks, so Qwen1's NTK picks its α from the prompt, not the first chunk.
        `last_only`: logits for the last position only ([B, 1, V]); generation
        needs no more, and the vocabulary projection dominates a prefill's cost
        on small models.
        """
        length = inputs.shape[1]
        offset = cache[0].offset if cache else 0
        freqs = self.rotary.freqs(offset, max(length, prompt_length or 0) if offset == 0 else length)
        positions = Positions(offset, freqs, self.rotary.query_scale(offset, length),
                              self.softmax_scale)
        h = self.model.embed_tokens(inputs)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, positions, cache[i] if cache else None)
        if last_only:
            h = h[:, -1:, :]
        h = self.model.norm(h)
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)
