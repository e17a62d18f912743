"""Rotary position embeddings for every Qwen generation (spec §3).

All variants reduce to a vector of inverse frequencies handed to
`mx.fast.rope` (as its `freqs`, the reciprocal), plus, for YaRN, a static
attention factor. The frequencies are built in float32 exactly as
transformers and the Qwen1 remote code build them, so positions far out
rotate by the same angles.

Two variants keep state across forwards, as their references do:
- HF `dynamic` recomputes θ when a forward reaches past the longest length
  seen so far, and restores it for short sequences.
- Qwen1 dynamic NTK picks α once, in the forward that starts with an empty
  cache, and every cached forward after it reuses that α.
The state lives here, on the model, because that is where both references
keep it: a model serves one conversation at a time.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from .config import ModelConfig, RopeConfig


def default_inv_freq(theta: float, dims: int) -> np.ndarray:
    """1/θ^(2i/d) for i < d/2, in float32 as transformers computes it."""
    exponent = np.arange(0, dims, 2, dtype=np.float32) / np.float32(dims)
    return (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)


def yarn_inv_freq(rope: RopeConfig, dims: int) -> np.ndarray:
    """YaRN: keep the fast dimensions, interpolate the slow ones by `factor` (§3.4)."""
    theta, factor = rope.theta, rope.factor
    original = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return dims * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dims // 2, dtype=np.float32) - np.float32(low))
                   / np.float32(high - low), 0, 1).astype(np.float32)
    extrapolation_weight = np.float32(1) - ramp
    pos_freqs = np.power(np.float32(theta), np.arange(0, dims, 2, dtype=np.float32) / np.float32(dims))
    extrapolated = np.float32(1) / pos_freqs
    interpolated = np.float32(1) / (np.float32(factor) * pos_freqs)
    return (interpolated * (np.float32(1) - extrapolation_weight)
            + extrapolated * extrapolation_weight).astype(np.float32)


def yarn_attention_factor(rope: RopeConfig) -> float:
    """The YaRN factor that multiplies cos and sin (so logits scale by its square)."""
    if rope.attention_factor is not None:
        return rope.attention_factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rope.mscale and rope.mscale_all_dim:
        return mscale(rope.factor, rope.mscale) / mscale(rope.factor, rope.mscale_all_dim)
    return mscale(rope.factor)


def dynamic_inv_freq(rope: RopeConfig, dims: int, max_pos: int, seq_len: int) -> np.ndarray:
    """HF `dynamic`: θ' = θ·(factor·L/max_pos − (factor−1))^(d/(d−2)), in float32 (§3.3)."""
    seq_len = max(seq_len, max_pos)
    f = np.float32(rope.factor)
    grown = (f * np.float32(seq_len) / np.float32(max_pos)) - (f - np.float32(1))
    theta = np.float32(rope.theta) * np.power(grown, np.float32(dims / (dims - 2)))
    return default_inv_freq(float(theta), dims)


def ntk_alpha(length: int, seq_length: int) -> int:
    """Qwen1's NTK α for a first forward of `length` tokens (§3.5)."""
    context_value = math.log(length / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


def logn_scale(start: int, length: int, seq_length: int) -> np.ndarray:
    """Qwen1 LogN query factors for positions [start, start+length): ln(p+1)/ln(S) past S."""
    positions = np.arange(start + 1, start + length + 1, dtype=np.float64)
    scale = np.where(positions > seq_length, np.log(positions) / math.log(seq_length), 1.0)
    return scale.astype(np.float32)


class RotaryEmbedding:
    """Per-model rotary state: gives each forward the `freqs` for mx.fast.rope."""

    def __init__(self, config: ModelConfig):
        self.dims = config.rotary_dim
        self.rope = config.rope
        self.max_pos = config.max_position_embeddings
        self.ntk_seq_length = config.ntk_seq_length
        self.logn_seq_length = config.logn_seq_length
        self.attention_factor = 1.0
        rope = config.rope
        if rope.rope_type == "yarn":
            inv = yarn_inv_freq(rope, self.dims)
            self.attention_factor = yarn_attention_factor(rope)
        elif rope.rope_type == "linear":
            inv = default_inv_freq(rope.theta, self.dims) / np.float32(rope.factor)
        else:
            inv = default_inv_freq(rope.theta, self.dims)
        self._original = self._freqs = self._periods(inv)
        self._cached_len = self.max_pos  # HF dynamic: the longest length seen so far
        self._alpha = 1
        self._alpha_freqs: dict[int, mx.array] = {1: self._original}

    @staticmethod
    def _periods(inv_freq: np.ndarray) -> mx.array:
        return mx.array(np.float32(1) / inv_freq)

    def freqs(self, offset: int, length: int) -> mx.array:
        """The frequencies for a forward over positions [offset, offset+length)."""
        if self.rope.rope_type == "dynamic":
            total = offset + length
            if total > self._cached_len:
                self._freqs = self._periods(
                    dynamic_inv_freq(self.rope, self.dims, self.max_pos, total))
                self._cached_len = total
            elif total < self.max_pos and self._cached_len > self.max_pos:
                self._freqs, self._cached_len = self._original, self.max_pos
            return self._freqs
        if self.ntk_seq_length is not None:
            if offset == 0:
                self._alpha = ntk_alpha(length, self.ntk_seq_length)
            if self._alpha not in self._alpha_freqs:
                theta = self.rope.theta * self._alpha ** (self.dims / (self.dims - 2))
                self._alpha_freqs[self._alpha] = self._periods(default_inv_freq(theta, self.dims))
            return self._alpha_freqs[self._alpha]
        return self._freqs

    def query_scale(self, offset: int, length: int) -> mx.array | None:
        """Qwen1 LogN factors shaped [length, 1], or None where they are all 1."""
        s = self.logn_seq_length
        if s is None or offset + length <= s:
            return None
        return mx.array(logn_scale(offset, length, s)[:, None])


def rotate_at(x: mx.array, positions: mx.array, periods: mx.array, dims: int) -> mx.array:
    """NeoX rotation of the first `dims` features of x [..., L, D] by per-token
    `positions` [L] (any order, repeats allowed: Dual Chunk Attention's positions wrap
    and clamp), with `periods` = 1/inv_freq as `mx.fast.rope` takes them."""
    angles = positions.astype(mx.float32)[:, None] / periods[None, :]
    cos, sin = mx.cos(angles).astype(x.dtype), mx.sin(angles).astype(x.dtype)
    half = dims // 2
    x1, x2 = x[..., :half], x[..., half:dims]
    out = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if dims < x.shape[-1]:
        out.append(x[..., dims:])
    return mx.concatenate(out, axis=-1)
