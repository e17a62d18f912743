"""The one Qwen decoder.

Every generation, Qwen1 to Qwen3.5/3.6 and Qwen3-Next, is this module tree
with a different `ModelConfig`: biases, QK norm, sliding windows, the layer
kind (softmax attention or Gated DeltaNet), gated attention, the MoE block
and the RoPE variant are switched by config fields, never by model_type.
Module names follow mlx-lm's layout (`model.layers.N.self_attn.q_proj`,
`linear_attn.in_proj_qkv`, `mlp.switch_mlp`, ...), so the folders mlx-lm
writes load as they are and the folders we write load in mlx-lm.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn

from ..errors import QwenMLXError
from .attention import Attention, Positions
from .cache import SINKS, BatchKVCache, BatchLinearCache, KVCache, LinearCache, make_cache
from .config import ModelConfig
from .dca import DCAPositions
from .deltanet import GatedDeltaNet
from .moe import MLP, SparseMoE
from .norm import RMSNorm
from .parallel import Embedding, Linear
from .rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int, *, sparse: bool | None = None,
                 kind: str | None = None):
        super().__init__()
        self.kind = kind or config.layer_kinds[index]
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.kind == "linear":
            self.linear_attn = GatedDeltaNet(config)
        else:
            self.self_attn = Attention(config, config.sliding_windows[index])
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if config.sparse_layers[index] if sparse is None else sparse:
            self.mlp = SparseMoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)

    def __call__(self, x: mx.array, positions: Positions, cache=None) -> mx.array:
        if self.kind == "linear":
            h = x + self.linear_attn(self.input_layernorm(x), cache)
        else:
            h = x + self.self_attn(self.input_layernorm(x), positions, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderStack(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, i) for i in range(config.num_layers)]
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class MTP(nn.Module):
    """The multi-token-prediction head of Qwen3-Next and Qwen3.5/3.6 (hybrid spec §5):
    fc over [norm(embedding of t+1); norm(hidden at t)], then full-attention decoder
    layers of the trunk's kind, then a norm; the trunk's embedding and head are shared.
    Loaded when the checkpoint carries `mtp.*`, for speculative decoding."""

    def __init__(self, config: ModelConfig, num_layers: int):
        super().__init__()
        H = config.hidden_size
        self.fc = Linear(2 * H, H, bias=False)
        self.pre_fc_norm_embedding = RMSNorm(H, eps=config.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(H, eps=config.rms_norm_eps)
        sparse = config.moe is not None and any(config.sparse_layers)
        self.layers = [DecoderLayer(config, config.num_layers - 1, sparse=sparse, kind="attention")
                       for _ in range(num_layers)]
        self.norm = RMSNorm(H, eps=config.rms_norm_eps)

    def __call__(self, hidden: mx.array, embedded: mx.array, positions: Positions,
                 cache: list | None = None) -> mx.array:
        """The hidden states [B, L, H] that predict the tokens two ahead: `hidden` is the
        trunk's final (normed) hidden state at positions p, `embedded` the embeddings of the
        tokens at p + 1; the pair sits at position p, as vLLM places it."""
        x = self.fc(mx.concatenate([self.pre_fc_norm_embedding(embedded),
                                    self.pre_fc_norm_hidden(hidden)], axis=-1))
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, cache[i] if cache else None)
        return self.norm(x)


class Model(nn.Module):
    """A Qwen causal LM: `model(tokens[B, L], cache) -> logits[B, L, V]`."""

    def __init__(self, config: ModelConfig, *, mtp_layers: int = 0):
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = MTP(config, mtp_layers) if mtp_layers else None
        self.rotary = RotaryEmbedding(config)
        self.max_context = config.native_context  # generation stops here
        # YaRN multiplies cos and sin by its attention factor f, which scales
        # q·k by f². Every Qwen config with YaRN rotates the whole head, so
        # folding f² into the softmax scale is exact and costs nothing.
        self.softmax_scale = config.head_dim ** -0.5 * self.rotary.attention_factor ** 2
        # Dual Chunk Attention: on when the config carries it (dca.set_dca switches it).
        self.dca = config.dca
        # Per layer: the attention window (the config's sliding windows, or Qwen1's
        # layer-wise windows once long_context.set_qwen1_window sets them).
        self.windows = config.sliding_windows

    def make_cache(self, *, kv_bits: int | None = None, max_kv_size: int | None = None,
                   sinks: int = SINKS) -> list:
        """One cache per layer: a LinearCache for Gated DeltaNet layers, rotating for
        sliding-window layers (and all attention layers when `max_kv_size` is set, keeping
        the first `sinks` positions too), growing otherwise; `kv_bits` 4 or 8 quantizes
        the KV caches (attention then reads them quantized)."""
        if self.dca is not None and max_kv_size is not None:
            raise QwenMLXError("Dual Chunk Attention needs every position's keys, so "
                               "max_kv_size cannot be set; switch DCA off to use it")
        if sinks < 0:
            raise QwenMLXError(f"sinks must be 0 or more, got {sinks}")
        return make_cache(self.windows, kv_bits=kv_bits, max_kv_size=max_kv_size,
                          kinds=self.config.layer_kinds, sinks=sinks)

    def make_mtp_cache(self, *, kv_bits: int | None = None) -> list:
        """One growing KV cache per MTP layer (an MTP layer attends over all positions)."""
        if self.mtp is None:
            return []
        return make_cache((None,) * len(self.mtp.layers), kv_bits=kv_bits)

    def positions(self, offset: "int | mx.array", length: int,
                  prompt_length: int | None = None) -> Positions:
        """What the layers of a forward over `length` tokens from `offset` share; an
        int32 array [B] of offsets (a batch cache's) gives each row its own positions."""
        if isinstance(offset, mx.array):
            if not self.can_batch:
                raise QwenMLXError("this model's RoPE depends on the sequence length "
                                   "(dynamic NTK or LogN): its rows cannot decode in a batch")
            return Positions(offset, self.rotary.freqs(0, 1), None, self.softmax_scale)
        freqs = self.rotary.freqs(offset, max(length, prompt_length or 0) if offset == 0 else length)
        dca = None
        if self.dca is not None:
            total = max(offset + length, prompt_length or 0)
            dca = DCAPositions(self.dca, offset, length, total, freqs)
        return Positions(offset, freqs, self.rotary.query_scale(offset, length), self.softmax_scale,
                         dca)

    @property
    def can_batch(self) -> bool:
        """Whether rows at different positions can decode in one forward: the RoPE keeps
        no per-sequence state (not Qwen1's NTK/LogN, not HF dynamic) and no layer has a
        sliding window, and Dual Chunk Attention is off."""
        c = self.config
        return (self.dca is None and c.rope.rope_type != "dynamic"
                and self.rotary.ntk_seq_length is None
                and self.rotary.logn_seq_length is None
                and not any(w for w in self.windows))

    def batch_cache(self, cache: list) -> list:
        """A one-row batch cache (for `Model.__call__` on [B, 1] tokens) holding what the
        single-row `cache` holds; batch caches join with `extend`, leave with `filter` and
        give a row back as a single-row cache with `extract`."""
        if not self.can_batch:
            raise QwenMLXError("this model cannot decode rows in a batch (see can_batch)")
        c = self.config
        dtype = self.model.norm.weight.dtype
        out = []
        for layer in cache:
            if isinstance(layer, LinearCache):
                lc = c.linear
                out.append(BatchLinearCache.from_cache(
                    layer, (1, lc.conv_kernel - 1, lc.conv_dim),
                    (1, lc.num_value_heads, lc.key_head_dim, lc.value_head_dim), dtype))
            elif isinstance(layer, KVCache):
                out.append(BatchKVCache.from_cache(layer, c.num_kv_heads, c.head_dim, dtype))
            else:
                raise QwenMLXError(f"a {type(layer).__name__} cannot join a batch")
        return out

    def head(self, h: mx.array) -> mx.array:
        """The vocabulary projection of final (normed) hidden states."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def mtp_forward(self, hidden: mx.array, next_tokens: mx.array, cache: list, *,
                    last_only: bool = False) -> tuple[mx.array, mx.array]:
        """(logits, hidden) of the MTP block (hybrid spec §5) for pairs of the trunk's
        hidden states at positions p and the tokens at p + 1; its cache's offset is p.
        `last_only`: both for the last pair only (earlier pairs only fill the cache, and
        the vocabulary projection is the dearest part of a draft)."""
        if self.mtp is None:
            raise QwenMLXError("this model has no MTP block (mtp.* weights)")
        offset = cache[0].offset if cache else 0
        h = self.mtp(hidden, self.model.embed_tokens(next_tokens),
                     self.positions(offset, next_tokens.shape[1]), cache)
        if last_only:
            h = h[:, -1:]
        return self.head(h), h

    def check_prompt(self, ids: Sequence[int]) -> None:
        """Refuse ids only the vision tower could give meaning to (it is not loaded)."""
        vision = set(self.config.vision_token_ids).intersection(ids)
        if vision:
            raise QwenMLXError(
                f"the prompt holds vision token id(s) {sorted(vision)} (image or video "
                "placeholders); qwen-mlx runs the language model only, so images and video "
                "cannot be given: send text")

    def __call__(self, inputs: mx.array, cache: list | None = None, *,
                 prompt_length: int | None = None, last_only: bool = False,
                 return_hidden: bool = False) -> "mx.array | tuple[mx.array, mx.array]":
        """Logits [B, L, V] for tokens [B, L], continuing from `cache` when given.

        `prompt_length`: the whole prompt's length when it is prefilled in
        chunks, so Qwen1's NTK picks its α from the prompt, not the first chunk.
        `last_only`: logits for the last position only ([B, 1, V]); generation
        needs no more, and the vocabulary projection dominates a prefill's cost
        on small models.
        `return_hidden`: also return the final normed hidden states of every
        position (what the MTP block reads), as (logits, hidden).
        """
        offset = cache[0].offset if cache else 0
        positions = self.positions(offset, inputs.shape[1], prompt_length)
        h = self.model.embed_tokens(inputs)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, positions, cache[i] if cache else None)
        if return_hidden:  # every position's hidden state, the logits as asked
            h = self.model.norm(h)
            return self.head(h[:, -1:, :] if last_only else h), h
        if last_only:
            h = h[:, -1:, :]
        return self.head(self.model.norm(h))
