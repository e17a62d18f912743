"""Independent NumPy reference for the Qwen1 (remote ``QWenLMHeadModel``) forward pass.

Written from ``docs/qwen-architecture.md`` (§1.1, §2, §3.1, §3.5, §3.6, §4), not from
``qwen_mlx``. It computes in float64 by default so that it can serve as an oracle for
float32 implementations.

Supported:
  * embedding, pre-norm decoder layers (RMSNorm ``ln_1``/``ln_2``), final ``ln_f``, untied
    (or tied) ``lm_head`` without bias;
  * fused ``c_attn`` [3H, H] + bias split into q/k/v rows [0,H) / [H,2H) / [2H,3H);
    head dim = hidden/heads; no GQA; scale 1/sqrt(head_dim);
  * NeoX (rotate-half) RoPE on the leading ``d`` dims of every head,
    d = kv_channels if rotary_pct == 1 else int(kv_channels * rotary_pct);
  * Qwen1 dynamic NTK: alpha fixed at the first uncached forward (empty cache) from that
    forward's length, base' = base * alpha ** (d / (d - 2)); reused by later cached forwards;
  * Qwen1 LogN: after RoPE, the query at absolute position p is scaled by
    ln(p + 1) / ln(S) when p + 1 > S (only when the total key length exceeds S);
  * MLP c_proj(w1(x) * silu(w2(x))), biases only when ``no_bias`` is false;
  * a simple KV cache (``make_cache``) so that prefill + token-by-token decode can be
    compared step by step.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

__all__ = [
    "Qwen1RefConfig",
    "Qwen1RefCache",
    "Qwen1Reference",
    "ntk_alpha",
    "ntk_base",
    "logn_scale",
    "rotary_dim",
]


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


@dataclass
class Qwen1RefConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_channels: int
    intermediate_size: int
    seq_length: int
    layer_norm_epsilon: float = 1e-6
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000.0
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    no_bias: bool = True
    tie_word_embeddings: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen1RefConfig":
        defaults = dict(
            vocab_size=151936,
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            kv_channels=128,
            intermediate_size=22016,
            layer_norm_epsilon=1e-6,
            rotary_pct=1.0,
            rotary_emb_base=10000.0,
            use_dynamic_ntk=True,
            use_logn_attn=True,
            no_bias=True,
            tie_word_embeddings=False,
        )
        kw = {}
        for name in cls.__dataclass_fields__:
            if name in d:
                kw[name] = d[name]
            elif name in defaults:
                kw[name] = defaults[name]
            else:
                raise KeyError(f"Qwen1 config needs {name!r}")
        return cls(**kw)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def rotary_dim(kv_channels: int, rotary_pct: float) -> int:
    """d = kv_channels if rotary_pct == 1 else int(kv_channels * rotary_pct)."""
    if rotary_pct == 1:
        return int(kv_channels)
    return int(kv_channels * rotary_pct)


# ---------------------------------------------------------------------------
# Positional helpers (§3.1, §3.5, §3.6)
# ---------------------------------------------------------------------------


def ntk_alpha(length: int, seq_length: int) -> int:
    """alpha = max(2 ** ceil(log2(L / S) + 1) - 1, 1)."""
    context_value = math.log2(length / seq_length) + 1
    alpha = 2 ** math.ceil(context_value) - 1
    return int(max(alpha, 1))


def ntk_base(base: float, alpha: float, d: int) -> float:
    """theta' = base * alpha ** (d / (d - 2))."""
    return float(base) * float(alpha) ** (d / (d - 2))


def logn_scale(positions: np.ndarray, seq_length: int) -> np.ndarray:
    """ln(p + 1) / ln(S) where p + 1 > S, else 1 (p is the 0-based absolute position)."""
    p1 = np.asarray(positions, dtype=np.float64) + 1.0
    out = np.ones_like(p1)
    m = p1 > seq_length
    out[m] = np.log(p1[m]) / math.log(seq_length)
    return out


def _inv_freq(base: float, d: int) -> np.ndarray:
    return 1.0 / (base ** (np.arange(0, d, 2, dtype=np.float64) / d))


def _rotate_half(x: np.ndarray) -> np.ndarray:
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def _apply_rope(x: np.ndarray, positions: np.ndarray, base: float, d: int) -> np.ndarray:
    """x: [B, nh, L, D]; rotate the leading d dims of every head (NeoX style)."""
    inv = _inv_freq(base, d)  # [d/2]
    ang = positions.astype(np.float64)[:, None] * inv[None, :]  # [L, d/2]
    emb = np.concatenate([ang, ang], axis=-1)  # [L, d]
    cos = np.cos(emb).astype(x.dtype)
    sin = np.sin(emb).astype(x.dtype)
    xr, xp = x[..., :d], x[..., d:]
    xr = xr * cos + _rotate_half(xr) * sin
    return np.concatenate([xr, xp], axis=-1)


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(var + eps) * w


def _linear(x: np.ndarray, w: np.ndarray, b: Optional[np.ndarray] = None) -> np.ndarray:
    y = x @ w.T
    if b is not None:
        y = y + b
    return y


# ---------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------


@dataclass
class Qwen1RefCache:
    num_layers: int
    keys: List[Optional[np.ndarray]] = field(default_factory=list)
    values: List[Optional[np.ndarray]] = field(default_factory=list)
    alpha: Optional[float] = None  # fixed at the first (uncached) forward
    offset: int = 0

    def __post_init__(self):
        if not self.keys:
            self.keys = [None] * self.num_layers
            self.values = [None] * self.num_layers


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


class Qwen1Reference:
    """NumPy Qwen1 forward. ``weights`` uses the Qwen1 checkpoint names (§4)."""

    def __init__(self, config, weights: Dict[str, np.ndarray], dtype=np.float64):
        if isinstance(config, dict):
            config = Qwen1RefConfig.from_dict(config)
        self.cfg = config
        self.dtype = dtype
        c = config
        assert c.kv_channels * c.num_attention_heads == c.hidden_size, "P must equal H"
        self.d = rotary_dim(c.kv_channels, c.rotary_pct)
        self.w = {k: np.asarray(v, dtype=dtype) for k, v in weights.items()}

    # -- construction ------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: str, dtype=np.float64) -> "Qwen1Reference":
        from safetensors.numpy import load_file

        with open(os.path.join(folder, "config.json")) as f:
            cfg = json.load(f)
        weights: Dict[str, np.ndarray] = {}
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                weights.update(load_file(os.path.join(folder, name)))
        return cls(cfg, weights, dtype=dtype)

    def make_cache(self) -> Qwen1RefCache:
        return Qwen1RefCache(self.cfg.num_hidden_layers)

    # -- helpers -----------------------------------------------------------
    def _get(self, name: str, optional: bool = False) -> Optional[np.ndarray]:
        if name in self.w:
            return self.w[name]
        if optional:
            return None
        raise KeyError(name)

    def _bias(self, name: str) -> Optional[np.ndarray]:
        # no_bias removes biases from attn.c_proj and the MLP linears.
        if self.cfg.no_bias:
            return None
        return self._get(name)

    # -- forward -----------------------------------------------------------
    def __call__(
        self,
        ids,
        cache: Optional[Qwen1RefCache] = None,
        alpha_override: Optional[float] = None,
        disable_logn: bool = False,
        base_override: Optional[float] = None,
    ) -> np.ndarray:
        """ids: [L] or [B, L] ints -> logits [B, L, V] (float64 by default).

        ``alpha_override`` forces a NTK alpha, ``disable_logn`` turns LogN off and
        ``base_override`` forces the RoPE base (all three only for sensitivity checks).
        """
        c = self.cfg
        ids = np.asarray(ids)
        if ids.ndim == 1:
            ids = ids[None]
        B, L = ids.shape
        offset = cache.offset if cache is not None else 0

        # NTK alpha: chosen once at the first uncached forward from its length.
        if alpha_override is not None:
            alpha = float(alpha_override)
        elif not c.use_dynamic_ntk:
            alpha = 1.0
        elif cache is None or offset == 0:
            alpha = float(ntk_alpha(L, c.seq_length))
        else:
            assert cache.alpha is not None
            alpha = cache.alpha
        if cache is not None and offset == 0:
            cache.alpha = alpha
        base = ntk_base(c.rotary_emb_base, alpha, self.d) if alpha != 1 else float(c.rotary_emb_base)
        if base_override is not None:
            base = float(base_override)

        positions = np.arange(offset, offset + L)
        kv_len = offset + L
        nh, D, H = c.num_attention_heads, c.head_dim, c.hidden_size

        if c.use_logn_attn and not disable_logn and kv_len > c.seq_length:
            qscale = logn_scale(positions, c.seq_length).astype(self.dtype)[None, None, :, None]
        else:
            qscale = None

        # causal mask for queries at absolute positions [offset, offset+L) over [0, kv_len)
        kpos = np.arange(kv_len)
        mask = np.where(kpos[None, :] <= positions[:, None], 0.0, -np.inf).astype(self.dtype)

        h = self._get("transformer.wte.weight")[ids]  # [B, L, H]
        for i in range(c.num_hidden_layers):
            p = f"transformer.h.{i}."
            x = _rms_norm(h, self._get(p + "ln_1.weight"), c.layer_norm_epsilon)
            qkv = _linear(x, self._get(p + "attn.c_attn.weight"), self._get(p + "attn.c_attn.bias"))
            q, k, v = qkv[..., :H], qkv[..., H : 2 * H], qkv[..., 2 * H : 3 * H]

            def heads(t):
                return t.reshape(B, L, nh, D).transpose(0, 2, 1, 3)  # [B, nh, L, D]

            q, k, v = heads(q), heads(k), heads(v)
            q = _apply_rope(q, positions, base, self.d)
            k = _apply_rope(k, positions, base, self.d)
            if qscale is not None:
                q = q * qscale

            if cache is not None:
                if cache.keys[i] is not None:
                    k = np.concatenate([cache.keys[i], k], axis=2)
                    v = np.concatenate([cache.values[i], v], axis=2)
                cache.keys[i], cache.values[i] = k, v

            scores = (q @ k.transpose(0, 1, 3, 2)) / math.sqrt(D) + mask
            scores = scores - scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs = probs / probs.sum(axis=-1, keepdims=True)
            o = (probs @ v).transpose(0, 2, 1, 3).reshape(B, L, H)
            o = _linear(o, self._get(p + "attn.c_proj.weight"), self._bias(p + "attn.c_proj.bias"))
            h = h + o

            x = _rms_norm(h, self._get(p + "ln_2.weight"), c.layer_norm_epsilon)
            a1 = _linear(x, self._get(p + "mlp.w1.weight"), self._bias(p + "mlp.w1.bias"))
            a2 = _linear(x, self._get(p + "mlp.w2.weight"), self._bias(p + "mlp.w2.bias"))
            m = _linear(a1 * _silu(a2), self._get(p + "mlp.c_proj.weight"), self._bias(p + "mlp.c_proj.bias"))
            h = h + m

        h = _rms_norm(h, self._get("transformer.ln_f.weight"), c.layer_norm_epsilon)
        if c.tie_word_embeddings:
            lm = self._get("transformer.wte.weight")
        else:
            lm = self._get("lm_head.weight")
        logits = h @ lm.T

        if cache is not None:
            cache.offset = kv_len
        return logits
