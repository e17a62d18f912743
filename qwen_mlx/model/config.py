"""One frozen config for every Qwen generation.

`ModelConfig.from_dict` reads any Qwen config.json (Qwen1 remote code,
Qwen1.5/2/2.5, the MoE families, Qwen3, Qwen3-Next, Qwen3.5/3.6 dense and
MoE, and the text half of Qwen2/2.5-VL and Qwen3-VL) in either the published
schema or the one transformers 5 writes, nested (`text_config`) or flat,
applies each family's class defaults (spec §1 of both specs), and validates
what the model needs. The decoder never looks at model_type again: every
difference between the generations is a field here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError

# model_type -> the family whose defaults and rules apply.
FAMILIES = {
    "qwen": "qwen",
    "qwen2": "qwen2",
    "qwen2_moe": "qwen2_moe",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3_moe",
    # Only the language model of the VL checkpoints: for text-only input
    # M-RoPE's three position streams are equal, which is plain 1-D RoPE.
    "qwen2_vl": "qwen2",
    "qwen2_5_vl": "qwen2",
    # The hybrids (Gated DeltaNet + gated attention) and Qwen3-VL's language
    # models; the *_text types are the flat layout transformers writes.
    "qwen3_next": "qwen3_next",
    "qwen3_5": "qwen3_5",
    "qwen3_5_text": "qwen3_5",
    "qwen3_5_moe": "qwen3_5_moe",
    "qwen3_5_moe_text": "qwen3_5_moe",
    "qwen3_vl": "qwen3_vl",
    "qwen3_vl_text": "qwen3_vl",
    "qwen3_vl_moe": "qwen3_vl_moe",
    "qwen3_vl_moe_text": "qwen3_vl_moe",
}
HYBRID_FAMILIES = ("qwen3_next", "qwen3_5", "qwen3_5_moe")
# Families whose published checkpoints nest the language model under text_config.
NESTED_FAMILIES = ("qwen3_5", "qwen3_5_moe", "qwen3_vl", "qwen3_vl_moe")
LAYER_TYPES = {"full_attention": "attention", "linear_attention": "linear"}

ROPE_TYPES = ("default", "linear", "dynamic", "yarn")

# Class defaults that differ per family (spec §1.2); the rest are shared.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2": dict(hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32),
    "qwen2_moe": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=16, num_experts=60,
                      num_experts_per_tok=4, moe_intermediate_size=1408,
                      shared_expert_intermediate_size=5632),
    "qwen3": dict(hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, head_dim=128),
    "qwen3_moe": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
                      num_attention_heads=32, num_key_value_heads=4, num_experts=128,
                      num_experts_per_tok=8, moe_intermediate_size=768,
                      shared_expert_intermediate_size=0),
    # Hybrid spec §1.2-1.6.
    "qwen3_next": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=48,
                       num_attention_heads=16, num_key_value_heads=2, head_dim=256,
                       num_experts=512, num_experts_per_tok=10, moe_intermediate_size=512,
                       shared_expert_intermediate_size=512, norm_topk_prob=True),
    "qwen3_5": dict(vocab_size=248320, hidden_size=4096, intermediate_size=12288,
                    num_hidden_layers=32, num_attention_heads=16, num_key_value_heads=4,
                    head_dim=256),
    "qwen3_5_moe": dict(vocab_size=248320, hidden_size=2048, num_hidden_layers=40,
                        num_attention_heads=16, num_key_value_heads=2, head_dim=256,
                        num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
                        shared_expert_intermediate_size=512),
    "qwen3_vl": dict(hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                     num_attention_heads=32, head_dim=128, max_position_embeddings=128000),
    "qwen3_vl_moe": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                         num_attention_heads=16, num_key_value_heads=16, num_experts=60,
                         num_experts_per_tok=4, moe_intermediate_size=1408,
                         max_position_embeddings=128000, tie_word_embeddings=True),
}
_LINEAR_DEFAULTS: dict[str, Any] = dict(
    linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
    linear_num_key_heads=16, linear_num_value_heads=32, full_attention_interval=4,
)
# rope_theta when a config gives none (transformers' default_theta).
_DEFAULT_THETA = {"qwen3_vl": 500000.0, "qwen3_vl_moe": 500000.0}
# The fraction of each head that rotates when a config gives none.
_DEFAULT_PARTIAL_ROTARY = {f: 0.25 for f in HYBRID_FAMILIES}
_HF_SHARED_DEFAULTS: dict[str, Any] = dict(
    vocab_size=151936, rms_norm_eps=1e-6, max_position_embeddings=32768,
    tie_word_embeddings=False, use_sliding_window=False, sliding_window=4096,
    max_window_layers=28, norm_topk_prob=False, decoder_sparse_step=1,
)
_QWEN1_DEFAULTS: dict[str, Any] = dict(
    vocab_size=151936, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
    kv_channels=128, intermediate_size=22016, layer_norm_epsilon=1e-6,
    max_position_embeddings=8192, rotary_pct=1.0, rotary_emb_base=10000.0,
    use_dynamic_ntk=True, use_logn_attn=True, no_bias=True, tie_word_embeddings=False,
)


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters after normalization (spec §3)."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None


@dataclass(frozen=True)
class DCAConfig:
    """Dual Chunk Attention (Qwen2.5-1M, spec §3.7), from `dual_chunk_attention_config`."""

    chunk_size: int = 8192
    local_size: int = 1024
    # 0: no length scaling; else keys and queries scale by max(1, 0.1 ln(L/L0) + 1).
    original_max_position_embeddings: int = 0

    @property
    def chunk_len(self) -> int:
        """c = chunk_size - local_size: token p lies in chunk p // c."""
        return self.chunk_size - self.local_size


@dataclass(frozen=True)
class MoEConfig:
    """Sparse-MoE block parameters shared by every sparse layer."""

    num_experts: int
    top_k: int
    intermediate_size: int
    shared_intermediate_size: int  # 0: no shared expert (Qwen3-MoE)
    norm_topk_prob: bool


@dataclass(frozen=True)
class LinearAttentionConfig:
    """Gated DeltaNet layer shapes (hybrid spec §2.1)."""

    num_key_heads: int  # Hk
    num_value_heads: int  # Hv, a multiple of Hk
    key_head_dim: int  # Dk
    value_head_dim: int  # Dv
    conv_kernel: int  # K

    @property
    def key_dim(self) -> int:
        return self.num_key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:
        return self.num_value_heads * self.value_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim


@dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs, whatever the Qwen generation."""

    model_type: str
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    intermediate_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    rope: RopeConfig
    # Per layer: the window W (query i sees keys i-W < j <= i) or None.
    sliding_windows: tuple[int | None, ...]
    # Per layer: whether the FFN is the sparse MoE block.
    sparse_layers: tuple[bool, ...]
    moe: MoEConfig | None = None
    # Per layer: "attention" (full or windowed softmax attention) or "linear" (Gated DeltaNet).
    layer_kinds: tuple[str, ...] = ()
    linear: LinearAttentionConfig | None = None
    # Gated attention: q_proj also yields a per-head sigmoid gate on the output.
    attention_gate: bool = False
    # Zero-centred norms: checkpoints store w and the norm multiplies by 1 + w.
    zero_centred_norms: bool = False
    # Multi-token-prediction layers the config announces (the checkpoint may lack them).
    mtp_layers: int = 0
    # Ids that only the vision tower can fill (image/video pads, vision start).
    vision_token_ids: tuple[int, ...] = ()
    # Qwen1: the training length S used by dynamic NTK and LogN, or None when off.
    ntk_seq_length: int | None = None
    logn_seq_length: int | None = None
    # Qwen2.5-1M's Dual Chunk Attention, or None (the model can still switch it off).
    dca: DCAConfig | None = None
    # mlx-lm's quantization block: {"group_size", "bits", ["mode"], per-path overrides}.
    quantization: dict | None = None
    torch_dtype: str | None = None
    source: str = "config.json"
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_file(cls, path: str | Path, *, rope_scaling: Mapping | None = None) -> "ModelConfig":
        """Read and normalize a config.json file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: not found; a model folder needs a config.json") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text; a config.json is JSON in UTF-8") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        except RecursionError:
            raise ConfigError(f"{path}: JSON nested too deeply to be a model config") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object at the top level")
        return cls.from_dict(data, source=str(path), rope_scaling=rope_scaling)

    @classmethod
    def from_dict(cls, data: Mapping, *, source: str = "config.json",
                  rope_scaling: Mapping | None = None) -> "ModelConfig":
        """Normalize a config.json dict; `rope_scaling`, if given, replaces the file's."""
        return _normalize(dict(data), source, rope_scaling)

    def __post_init__(self):
        if not self.layer_kinds:
            object.__setattr__(self, "layer_kinds", ("attention",) * self.num_layers)

    @property
    def is_hybrid(self) -> bool:
        """Whether some layers are Gated DeltaNet layers, whose cache cannot be trimmed."""
        return "linear" in self.layer_kinds

    @property
    def native_context(self) -> int:
        """Positions the model handles as configured: YaRN and linear scaling extend it."""
        if self.rope.rope_type == "yarn":
            return int(self.rope.factor * self.rope.original_max_position_embeddings)
        if self.rope.rope_type in ("linear", "dynamic"):
            return int(self.rope.factor * self.max_position_embeddings)
        return self.max_position_embeddings

    def describe(self) -> str:
        """A one-line summary for logs and the CLI."""
        kind = f"{self.moe.num_experts} experts top-{self.moe.top_k}" if self.moe else "dense"
        if self.is_hybrid:
            kind += f", {self.layer_kinds.count('linear')} of {self.num_layers} layers Gated DeltaNet"
        rope = self.rope.rope_type
        if rope != "default":
            rope += f" x{self.rope.factor:g}"
        return (f"{self.model_type}: {self.num_layers} layers, hidden {self.hidden_size}, "
                f"{self.num_heads}/{self.num_kv_heads} heads of {self.head_dim}, {kind}, rope {rope}")


_MISSING = object()

# Far beyond any Qwen model, and small enough that nothing built from them can exhaust a
# machine before the weights are checked against them (the loader checks those next).
LIMITS = {
    "num_hidden_layers": 4096, "num_experts": 1 << 16, "num_local_experts": 1 << 16,
    "num_experts_per_tok": 1 << 10, "vocab_size": 1 << 22, "hidden_size": 1 << 16,
    "intermediate_size": 1 << 20, "moe_intermediate_size": 1 << 20,
    "shared_expert_intermediate_size": 1 << 20, "num_attention_heads": 1 << 10,
    "num_key_value_heads": 1 << 10, "head_dim": 1 << 12, "kv_channels": 1 << 12,
    "linear_num_key_heads": 1 << 10, "linear_num_value_heads": 1 << 10,
    "linear_key_head_dim": 1 << 12, "linear_value_head_dim": 1 << 12,
    "linear_conv_kernel_dim": 64, "max_position_embeddings": 1 << 26, "seq_length": 1 << 26,
    "original_max_position_embeddings": 1 << 26, "sliding_window": 1 << 26,
}


class _Reader:
    """Typed access to config keys, with errors that name the key and the file."""

    def __init__(self, data: dict, defaults: dict, source: str):
        self.data, self.defaults, self.source = data, defaults, source

    def get(self, key: str, default: Any = _MISSING) -> Any:
        if key in self.data and self.data[key] is not None:
            return self.data[key]
        if default is not _MISSING:
            return default
        if key in self.defaults:
            return self.defaults[key]
        raise ConfigError(f"{self.source}: required key '{key}' is missing")

    def int(self, key: str, default: Any = _MISSING, *, minimum: int = 1) -> int:
        value = self.get(key, default)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{self.source}: '{key}' must be an integer, got {value!r}")
        if value < minimum:
            raise ConfigError(f"{self.source}: '{key}' must be at least {minimum}, got {value}")
        if key in LIMITS and value > LIMITS[key]:
            raise ConfigError(f"{self.source}: '{key}' is {value}, beyond any model qwen-mlx "
                              f"can run (at most {LIMITS[key]}); the config is corrupt")
        return value

    def float(self, key: str, default: Any = _MISSING, *, positive: bool = False) -> float:
        value = self.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ConfigError(f"{self.source}: '{key}' must be a number, got {value!r}")
        if positive and value <= 0:
            raise ConfigError(f"{self.source}: '{key}' must be above 0, got {value!r}")
        return float(value)

    def bool(self, key: str, default: Any = _MISSING) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.source}: '{key}' must be true or false, got {value!r}")
        return value


def _normalize(data: dict, source: str, rope_override: Mapping | None) -> ModelConfig:
    model_type = data.get("model_type")
    if model_type is None:
        raise ConfigError(f"{source}: required key 'model_type' is missing")
    if not isinstance(model_type, str):
        raise ConfigError(f"{source}: 'model_type' must be a name such as \"qwen3\", "
                          f"got {model_type!r}")
    family = FAMILIES.get(model_type)
    if family is None:
        raise ConfigError(
            f"{source}: model_type '{model_type}' is not a Qwen model qwen-mlx supports "
            f"(supported: {', '.join(FAMILIES)})")
    raw = dict(data)
    text_config = data.get("text_config")
    if text_config is not None and not isinstance(text_config, dict):
        raise ConfigError(f"{source}: 'text_config' must be an object, got {text_config!r}")
    if model_type in ("qwen2_vl", "qwen2_5_vl") and text_config:
        # transformers 5 nests the language model's keys; older files keep them on top.
        data = {**data, **text_config}
    elif family in NESTED_FAMILIES and text_config:
        data = _merge_nested(data, text_config)
    if rope_override is not None:
        if family == "qwen":
            raise ConfigError(
                f"{source}: Qwen1 checkpoints extend their context with dynamic NTK and LogN "
                "(use_dynamic_ntk, use_logn_attn); a rope_scaling override does not apply to them")
        data = {**data, "rope_scaling": dict(rope_override), "rope_parameters": None}
    quantization = _quantization(data, source)
    torch_dtype = data.get("torch_dtype") or data.get("dtype")
    if family == "qwen":
        return _qwen1(data, raw, source, quantization, torch_dtype)
    return _hf(data, raw, family, source, quantization, torch_dtype)


def _merge_nested(data: dict, text: dict) -> dict:
    """The language model's keys of a nested (text_config + vision_config) config.

    The *ForConditionalGeneration model ties its head by the top-level
    tie_word_embeddings (class default false), whatever text_config says;
    the vision token ids and mlx-lm's quantization block live on top too.
    """
    merged = {k: v for k, v in data.items() if k not in ("text_config", "vision_config")}
    merged.update({k: v for k, v in text.items() if k != "model_type"})
    merged["tie_word_embeddings"] = data.get("tie_word_embeddings", False)
    return merged


def _quantization(data: dict, source: str) -> dict | None:
    q = data.get("quantization")
    if q is None:
        q = data.get("quantization_config")
        if q is not None and not isinstance(q, dict):
            raise ConfigError(f"{source}: 'quantization_config' must be an object, got {q!r}")
        if q is not None and "quant_method" in q:
            raise ConfigError(
                f"{source}: this checkpoint is quantized with '{q['quant_method']}' "
                "(quantization_config), which qwen-mlx cannot load; use the unquantized "
                "checkpoint and quantize it with `qwen-mlx convert -q`")
    if q is None:
        return None
    if not isinstance(q, dict) or "bits" not in q or "group_size" not in q:
        raise ConfigError(f"{source}: 'quantization' must hold 'bits' and 'group_size', got {q!r}")
    return dict(q)


def _qwen1(data: dict, raw: dict, source: str, quantization, torch_dtype) -> ModelConfig:
    r = _Reader(data, _QWEN1_DEFAULTS, source)
    hidden = r.int("hidden_size")
    heads = r.int("num_attention_heads")
    kv_channels = r.int("kv_channels")
    if hidden % heads:
        raise ConfigError(f"{source}: hidden_size {hidden} is not divisible by "
                          f"num_attention_heads {heads}")
    if kv_channels * heads != hidden:
        # c_attn is split in chunks of hidden_size, so the projection width must equal it.
        raise ConfigError(f"{source}: kv_channels x num_attention_heads = {kv_channels * heads} "
                          f"must equal hidden_size {hidden} for Qwen1's fused c_attn")
    rotary_pct = r.float("rotary_pct")
    rotary_dim = kv_channels if rotary_pct == 1 else int(kv_channels * rotary_pct)
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > hidden // heads:
        raise ConfigError(f"{source}: rotary_pct {rotary_pct} gives rotary dim {rotary_dim}; "
                          "it must be even and at most the head dim")
    intermediate = r.int("intermediate_size", minimum=2)
    if intermediate % 2:
        raise ConfigError(f"{source}: Qwen1's intermediate_size {intermediate} must be even "
                          "(w1 and w2 each output half of it)")
    use_ntk = r.bool("use_dynamic_ntk")
    use_logn = r.bool("use_logn_attn")
    seq_length = r.int("seq_length") if (use_ntk or use_logn) else None
    no_bias = r.bool("no_bias")
    layers = r.int("num_hidden_layers")
    return ModelConfig(
        model_type="qwen", family="qwen",
        vocab_size=r.int("vocab_size"), hidden_size=hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads, rotary_dim=rotary_dim,
        intermediate_size=intermediate // 2,
        rms_norm_eps=r.float("layer_norm_epsilon", positive=True),
        max_position_embeddings=r.int("max_position_embeddings"),
        tie_word_embeddings=r.bool("tie_word_embeddings"),
        qkv_bias=True, o_bias=not no_bias, mlp_bias=not no_bias, qk_norm=False,
        rope=RopeConfig(theta=r.float("rotary_emb_base")),
        sliding_windows=(None,) * layers, sparse_layers=(False,) * layers,
        ntk_seq_length=seq_length if use_ntk else None,
        logn_seq_length=seq_length if use_logn else None,
        quantization=quantization, torch_dtype=torch_dtype, source=source, raw=raw,
    )


def _hf(data: dict, raw: dict, family: str, source: str, quantization, torch_dtype) -> ModelConfig:
    hybrid = family in HYBRID_FAMILIES
    defaults = {**_HF_SHARED_DEFAULTS, **(_LINEAR_DEFAULTS if hybrid else {}),
                **_HF_DEFAULTS[family]}
    r = _Reader(data, defaults, source)
    hidden = r.int("hidden_size")
    heads = r.int("num_attention_heads")
    layers = r.int("num_hidden_layers")
    if family in ("qwen2_moe", "qwen3_moe", "qwen3_vl_moe") or hybrid:
        kv_heads = r.int("num_key_value_heads")
    else:
        kv_heads = r.int("num_key_value_heads", heads)
    if heads % kv_heads:
        raise ConfigError(f"{source}: num_attention_heads {heads} is not a multiple of "
                          f"num_key_value_heads {kv_heads}")
    if family in ("qwen3", "qwen3_vl") or hybrid:
        head_dim = r.int("head_dim")
    elif "head_dim" in data and data["head_dim"] is not None:
        head_dim = r.int("head_dim")
    else:
        if hidden % heads:
            raise ConfigError(f"{source}: hidden_size {hidden} is not divisible by "
                              f"num_attention_heads {heads}; set head_dim")
        head_dim = hidden // heads
    rope_params = data.get("rope_parameters") or {}
    if not isinstance(rope_params, dict):
        raise ConfigError(f"{source}: 'rope_parameters' must be an object, got {rope_params!r}")
    partial = rope_params.get("partial_rotary_factor", data.get("partial_rotary_factor"))
    if partial is None:
        partial = _DEFAULT_PARTIAL_ROTARY.get(family, 1.0)
    if not isinstance(partial, (int, float)) or isinstance(partial, bool) or not 0 < partial <= 1:
        raise ConfigError(f"{source}: 'partial_rotary_factor' must be a number in (0, 1], "
                          f"got {partial!r}")
    rotary_dim = int(head_dim * partial)
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ConfigError(f"{source}: partial_rotary_factor {partial} gives rotary dim "
                          f"{rotary_dim}; it must be even and at most head_dim {head_dim}")

    if family == "qwen2":
        qkv_bias, o_bias = True, False
    elif family == "qwen2_moe":
        qkv_bias, o_bias = r.bool("qkv_bias", True), False
    else:
        qkv_bias = o_bias = r.bool("attention_bias", False)

    max_pos = r.int("max_position_embeddings")
    rope = _rope(data, max_pos, source, _DEFAULT_THETA.get(family, 10000.0))
    if rope.rope_type == "yarn" and rotary_dim != head_dim:
        # The model folds YaRN's attention factor into the softmax scale, which
        # is exact only when every dimension of the head is rotated.
        raise ConfigError(f"{source}: YaRN with partial_rotary_factor {partial} (rotary dim "
                          f"{rotary_dim} of {head_dim}) is not supported yet; run without "
                          "rope scaling")
    moe, sparse = None, (False,) * layers
    if family in ("qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe", "qwen3_vl_moe"):
        moe, sparse = _moe(r, data, family, layers, source)
    kinds, linear = ("attention",) * layers, None
    if hybrid:
        kinds = _layer_kinds(r, data, layers, source)
        linear = _linear(r, source)
    # The dense MLP's width: Qwen3.5-MoE has none (every layer is sparse).
    intermediate = (r.int("intermediate_size", 0, minimum=0) if family == "qwen3_5_moe"
                    else r.int("intermediate_size"))

    return ModelConfig(
        model_type=data["model_type"], family=family,
        vocab_size=r.int("vocab_size"), hidden_size=hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, rotary_dim=rotary_dim,
        intermediate_size=intermediate,
        rms_norm_eps=r.float("rms_norm_eps", positive=True),
        max_position_embeddings=max_pos,
        tie_word_embeddings=r.bool("tie_word_embeddings"),
        qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=False,
        qk_norm=family in ("qwen3", "qwen3_moe", "qwen3_vl", "qwen3_vl_moe") or hybrid,
        rope=rope,
        sliding_windows=(_sliding_windows(r, data, family, layers, source)
                         if family not in ("qwen3_vl", "qwen3_vl_moe") and not hybrid
                         else (None,) * layers),
        sparse_layers=sparse, moe=moe,
        layer_kinds=kinds, linear=linear, attention_gate=hybrid, zero_centred_norms=hybrid,
        mtp_layers=_mtp_layers(r) if hybrid else 0,
        vision_token_ids=_vision_token_ids(data, source) if family in NESTED_FAMILIES else (),
        dca=_dca(data, source),
        quantization=quantization, torch_dtype=torch_dtype, source=source, raw=raw,
    )


def _dca(data: dict, source: str) -> DCAConfig | None:
    """vLLM's `dual_chunk_attention_config` keys and defaults; the sparse-prefill keys
    (`sparse_attention_*`) only pick approximate indices, and are ignored."""
    block = data.get("dual_chunk_attention_config")
    if block is None:
        return None
    if not isinstance(block, dict):
        raise ConfigError(f"{source}: 'dual_chunk_attention_config' must be an object, "
                          f"got {block!r}")
    r = _Reader(block, {"chunk_size": 8192, "local_size": 1024,
                        "original_max_position_embeddings": 0},
                f"{source}: dual_chunk_attention_config")
    dca = DCAConfig(chunk_size=r.int("chunk_size", minimum=2),
                    local_size=r.int("local_size", minimum=0),
                    original_max_position_embeddings=r.int(
                        "original_max_position_embeddings", minimum=0))
    if dca.chunk_len < 1:
        raise ConfigError(f"{source}: dual_chunk_attention_config has chunk_size "
                          f"{dca.chunk_size} and local_size {dca.local_size}; chunk_size must "
                          "be larger than local_size")
    return dca


def _layer_kinds(r: _Reader, data: dict, layers: int, source: str) -> tuple[str, ...]:
    """`layer_types` when given, else every `full_attention_interval`-th layer is full (§1.1)."""
    layer_types = data.get("layer_types")
    if layer_types is None:
        interval = r.int("full_attention_interval")
        return tuple("attention" if (i + 1) % interval == 0 else "linear" for i in range(layers))
    if not isinstance(layer_types, list) or len(layer_types) != layers:
        raise ConfigError(f"{source}: 'layer_types' must list one entry for each of the "
                          f"{layers} layers (num_hidden_layers), got {layer_types!r}")
    unknown = sorted({str(t) for t in layer_types if t not in LAYER_TYPES})
    if unknown:
        raise ConfigError(f"{source}: 'layer_types' holds {', '.join(map(repr, unknown))}; "
                          f"qwen-mlx knows {', '.join(map(repr, LAYER_TYPES))}")
    return tuple(LAYER_TYPES[t] for t in layer_types)


def _linear(r: _Reader, source: str) -> LinearAttentionConfig:
    hk, hv = r.int("linear_num_key_heads"), r.int("linear_num_value_heads")
    if hv % hk:
        raise ConfigError(f"{source}: linear_num_value_heads {hv} must be a multiple of "
                          f"linear_num_key_heads {hk} (each key head serves a group of "
                          "value heads)")
    return LinearAttentionConfig(
        num_key_heads=hk, num_value_heads=hv, key_head_dim=r.int("linear_key_head_dim"),
        value_head_dim=r.int("linear_value_head_dim"),
        conv_kernel=r.int("linear_conv_kernel_dim"))


def _mtp_layers(r: _Reader) -> int:
    if r.data.get("mtp_num_hidden_layers") is not None:
        return r.int("mtp_num_hidden_layers", minimum=0)
    return r.int("num_nextn_predict_layers", 0, minimum=0)


def _vision_token_ids(data: dict, source: str) -> tuple[int, ...]:
    ids = []
    for key in ("image_token_id", "video_token_id", "vision_start_token_id"):
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{source}: '{key}' must be a token id, got {value!r}")
        ids.append(value)
    return tuple(ids)


def _moe(r: _Reader, data: dict, family: str, layers: int, source: str):
    if data.get("num_experts") is None and data.get("num_local_experts") is not None:
        num_experts = r.int("num_local_experts", minimum=0)
    else:
        num_experts = r.int("num_experts", minimum=0)
    top_k = r.int("num_experts_per_tok")
    if num_experts and top_k > num_experts:
        raise ConfigError(f"{source}: num_experts_per_tok {top_k} exceeds num_experts {num_experts}")
    step = 1 if family == "qwen3_5_moe" else r.int("decoder_sparse_step")
    # Qwen3.5-MoE makes every layer sparse; its configs may still carry the key.
    only = [] if family == "qwen3_5_moe" else (data.get("mlp_only_layers") or [])
    if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
        raise ConfigError(f"{source}: 'mlp_only_layers' must be a list of layer indices, got {only!r}")
    sparse = tuple(i not in only and num_experts > 0 and (i + 1) % step == 0 for i in range(layers))
    with_shared = family in ("qwen2_moe", "qwen3_next", "qwen3_5_moe")
    shared = r.int("shared_expert_intermediate_size", minimum=0) if with_shared else 0
    # Qwen3.5-MoE and Qwen3-VL-MoE reuse a router that always renormalizes its top k.
    forced = family in ("qwen3_5_moe", "qwen3_vl_moe")
    moe = MoEConfig(num_experts=num_experts, top_k=top_k,
                    intermediate_size=r.int("moe_intermediate_size"),
                    shared_intermediate_size=shared,
                    norm_topk_prob=True if forced else r.bool("norm_topk_prob"))
    return (moe if any(sparse) else None), sparse


def _sliding_windows(r: _Reader, data: dict, family: str, layers: int, source: str):
    # HF turns the window off (None, or 0 for qwen2_moe) unless use_sliding_window is set,
    # whatever layer_types says.
    window = r.int("sliding_window", minimum=0) if r.bool("use_sliding_window") else None
    if not window:
        return (None,) * layers
    layer_types = data.get("layer_types")
    if layer_types is not None:
        if (not isinstance(layer_types, list) or len(layer_types) != layers
                or any(t not in ("full_attention", "sliding_attention") for t in layer_types)):
            raise ConfigError(
                f"{source}: 'layer_types' must list 'full_attention' or 'sliding_attention' "
                f"for each of the {layers} layers, got {layer_types!r}")
        windowed = [t == "sliding_attention" for t in layer_types]
    else:
        max_window_layers = r.int("max_window_layers", minimum=0)
        if family == "qwen2_moe":
            windowed = [i % 2 == 0 and i < max_window_layers for i in range(layers)]
        elif family == "qwen3_moe":
            windowed = [True] * layers
        else:
            windowed = [i >= max_window_layers for i in range(layers)]
    return tuple(window if w else None for w in windowed)


def _rope(data: dict, max_pos: int, source: str, default_theta: float = 10000.0) -> RopeConfig:
    params = data.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: 'rope_parameters' must be an object, got {params!r}")
    scaling = data.get("rope_scaling") or {}
    if not isinstance(scaling, dict):
        raise ConfigError(f"{source}: 'rope_scaling' must be an object, got {scaling!r}")
    p = {**params, **scaling}  # the legacy rope_scaling wins, as in transformers
    rope_type = p.get("rope_type") or p.get("type") or "default"
    if rope_type == "mrope":  # Qwen2-VL: equal to 1-D RoPE for text
        rope_type = "default"
    # Interleaved M-RoPE (mrope_section, Qwen3-VL/3.5) is also 1-D RoPE for text (§3.4).
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"{source}: rope type '{rope_type}' is not supported "
                          f"(supported: {', '.join(ROPE_TYPES)})")
    theta = p.get("rope_theta", data.get("rope_theta"))
    theta = default_theta if theta is None else theta
    r = _Reader(p, {}, f"{source} (rope)")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not (
            math.isfinite(theta) and theta > 1):
        raise ConfigError(f"{source}: 'rope_theta' must be a number above 1, got {theta!r}")
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    original = None
    if rope_type == "yarn":
        original = r.int("original_max_position_embeddings", max_pos)
        factor = r.float("factor", max_pos / original)
    else:
        factor = r.float("factor")
    if factor <= 0 or (rope_type == "dynamic" and factor < 1):
        raise ConfigError(f"{source}: rope factor {factor} is out of range for '{rope_type}'")

    def opt(key: str) -> float | None:
        return r.float(key) if p.get(key) is not None else None

    return RopeConfig(
        rope_type=rope_type, theta=float(theta), factor=factor,
        original_max_position_embeddings=original,
        beta_fast=r.float("beta_fast", 32.0, positive=True),
        beta_slow=r.float("beta_slow", 1.0, positive=True),
        truncate=bool(p.get("truncate", True)),
        attention_factor=opt("attention_factor"), mscale=opt("mscale"),
        mscale_all_dim=opt("mscale_all_dim"),
    )
