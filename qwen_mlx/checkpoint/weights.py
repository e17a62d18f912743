"""Checkpoint tensor names -> our module names (spec §4).

Our names are mlx-lm's Qwen2/Qwen3 names, so Hugging Face Qwen1.5/2/2.5/3
checkpoints and mlx-lm folders mostly pass through. What changes per family:
- Qwen1: `transformer.h.N.*` renamed; the fused `c_attn` split into q/k/v.
- MoE: `experts.{e}.*_proj` (or transformers 5's fused `experts.gate_up_proj`)
  stacked into `switch_mlp.*_proj` as [E, out, in].
- Qwen2/2.5-VL, Qwen3-VL and the nested Qwen3.5 layout: the language model's
  prefix stripped, the vision tower skipped.
- The hybrids (hybrid spec §4.3): zero-centred norms stored as 1 + w (in
  float32), the conv weight moved to MLX's [C, K, 1], and Qwen3-Next's
  grouped in_proj_qkvz / in_proj_ba permuted into Qwen3.5's four projections;
  all of it only for checkpoints in the Hugging Face layout (`detect_layout`),
  since mlx-lm's folders hold these already converted. `mtp.*` is kept.
Buffers that are not weights (`rotary_emb.inv_freq`, Qwen1's mask buffers)
are dropped, and so is a tied checkpoint's redundant `lm_head`.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict

import mlx.core as mx

from ..model.config import ModelConfig
from ..errors import WeightsError

_QWEN1_RENAMES = [
    (re.compile(r"^transformer\.wte\."), "model.embed_tokens."),
    (re.compile(r"^transformer\.ln_f\."), "model.norm."),
    (re.compile(r"^transformer\.h\.(\d+)\.ln_1\."), r"model.layers.\1.input_layernorm."),
    (re.compile(r"^transformer\.h\.(\d+)\.ln_2\."), r"model.layers.\1.post_attention_layernorm."),
    (re.compile(r"^transformer\.h\.(\d+)\.attn\.c_proj\."), r"model.layers.\1.self_attn.o_proj."),
    # Qwen1's w2 is the SiLU (gate) branch and w1 the linear (up) branch.
    (re.compile(r"^transformer\.h\.(\d+)\.mlp\.w2\."), r"model.layers.\1.mlp.gate_proj."),
    (re.compile(r"^transformer\.h\.(\d+)\.mlp\.w1\."), r"model.layers.\1.mlp.up_proj."),
    (re.compile(r"^transformer\.h\.(\d+)\.mlp\.c_proj\."), r"model.layers.\1.mlp.down_proj."),
]
QWEN1_C_ATTN = re.compile(r"^transformer\.h\.(\d+)\.attn\.c_attn\.(\w+)$")
_EXPERT = re.compile(r"^(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(\w+)$")
_FUSED_EXPERTS = re.compile(r"^(.*\.mlp)\.experts\.(gate_up_proj|down_proj)$")
_VL_PREFIXES = [("model.language_model.", "model."), ("language_model.model.", "model."),
                ("language_model.lm_head.", "lm_head.")]
_NESTED_FAMILIES = ("qwen3_5", "qwen3_5_moe", "qwen3_vl", "qwen3_vl_moe", "qwen3_next")
# Zero-centred norms (every hybrid norm but the DeltaNet's gated one), hybrid spec §3.3.
_ZERO_CENTRED = re.compile(r"(^|\.)(input_layernorm|post_attention_layernorm|q_norm|k_norm|"
                           r"pre_fc_norm_embedding|pre_fc_norm_hidden)\.weight$|"
                           r"^(model|mtp)\.norm\.weight$")
GROUPED_LINEAR = re.compile(r"^(.*\.linear_attn)\.(in_proj_qkvz|in_proj_ba)\.(\w+)$")


def is_zero_centred_norm(name: str) -> bool:
    """Whether `name` is a norm weight the hybrids store zero-centred (w for 1 + w)."""
    return bool(_ZERO_CENTRED.search(name))


def detect_layout(shapes: dict[str, tuple[int, ...]], config: ModelConfig) -> str:
    """"hf" when a hybrid checkpoint still needs the (1+w) shift and the conv axis
    moved, "mlx" when it was converted already (mlx-lm's or ours).

    The conv weight tells them apart, as in mlx-lm: [C, 1, K] as published,
    [C, K, 1] once converted. Without linear layers, a converted folder has
    mlx-lm's `language_model.` prefix or a quantization block.
    """
    for name, shape in shapes.items():
        if name.endswith("linear_attn.conv1d.weight") and len(shape) == 3:
            return "hf" if shape[-1] != 1 else "mlx"
    if config.quantization is not None or any(n.startswith("language_model.") for n in shapes):
        return "mlx"
    return "hf"


def _is_buffer(name: str) -> bool:
    parts = name.split(".")
    return name.endswith("rotary_emb.inv_freq") or parts[-2:] in (["attn", "masked_bias"],
                                                                   ["attn", "bias"])


def qwen1_name(name: str) -> str:
    """Our module path for a Qwen1 (or mlx-lm Qwen1) tensor or module path."""
    for pattern, repl in _QWEN1_RENAMES:
        if pattern.match(name):
            return pattern.sub(repl, name)
    return name


def module_paths(path: str, config: ModelConfig) -> list[str]:
    """Our module path(s) for a checkpoint's module path (Qwen1's c_attn becomes three)."""
    if config.family != "qwen":
        return [path]
    m = QWEN1_C_ATTN.match(path + ".weight")
    if m:
        return [f"model.layers.{m.group(1)}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    return [qwen1_name(path + ".")[:-1]]


class WeightMapper:
    """Maps checkpoint tensors onto model names as they stream in, shard by shard.

    Experts are stacked as soon as a layer's last expert arrives, so a
    converter holds at most one layer's experts beyond the shard in hand.
    `keep_qwen1_names` leaves Qwen1's own names (and fused c_attn) alone: the
    layout mlx-lm writes and reads for model_type "qwen".
    """

    def __init__(self, config: ModelConfig, *, keep_qwen1_names: bool = False,
                 layout: str = "hf", keep_grouped: bool = False):
        self.config = config
        self.rename_qwen1 = config.family == "qwen" and not keep_qwen1_names
        self.is_vl = (config.model_type in ("qwen2_vl", "qwen2_5_vl")
                      or config.family in _NESTED_FAMILIES)
        # A Hugging Face hybrid checkpoint: shift its norms and move its conv axis.
        self.convert_hybrid = config.is_hybrid and layout == "hf"
        self.shift_norms = config.zero_centred_norms and layout == "hf"
        # The converter writes Qwen3-Next's grouped projections as they are (mlx-lm's layout).
        self.keep_grouped = keep_grouped
        self.skipped_vision = 0
        self._experts: dict[tuple, dict[int, mx.array]] = defaultdict(dict)

    def add(self, name: str, w: mx.array) -> list[tuple[str, mx.array]]:
        """The output tensors that `name` completes (often just itself renamed)."""
        config = self.config
        if _is_buffer(name):
            return []
        if self.is_vl:
            if name.startswith(("visual.", "model.visual.", "vision_tower.")):
                self.skipped_vision += 1
                return []
            for old, new in _VL_PREFIXES:
                if name.startswith(old):
                    name = new + name[len(old):]
                    break
        if config.tie_word_embeddings and name.startswith("lm_head."):
            return []  # tied: the embedding is the head
        if self.rename_qwen1:
            m = QWEN1_C_ATTN.match(name)
            if m:
                return _split_c_attn(m.group(1), m.group(2), w, config)
            name = qwen1_name(name)
        if self.shift_norms and _ZERO_CENTRED.search(name) and w.ndim == 1:
            # Formed in float32, as the reference forms 1 + w.
            return [(name, w.astype(mx.float32) + 1.0)]
        if self.convert_hybrid and name.endswith("linear_attn.conv1d.weight") and w.ndim == 3:
            lc = config.linear
            if lc is not None and tuple(w.shape) != (lc.conv_dim, 1, lc.conv_kernel):
                raise WeightsError(
                    f"'{name}' has shape {list(w.shape)} but {config.source} implies "
                    f"[{lc.conv_dim}, 1, {lc.conv_kernel}] (conv_dim = 2 x linear_num_key_heads "
                    f"{lc.num_key_heads} x linear_key_head_dim {lc.key_head_dim} + "
                    f"linear_num_value_heads {lc.num_value_heads} x linear_value_head_dim "
                    f"{lc.value_head_dim}; linear_conv_kernel_dim {lc.conv_kernel}); the "
                    "weights do not match the config")
            return [(name, w.moveaxis(2, 1))]  # [C, 1, K] -> MLX's [C, K, 1]
        m = GROUPED_LINEAR.match(name)
        if m and config.linear is not None and not self.keep_grouped:
            return _ungroup(m.group(1), m.group(2), m.group(3), w, config)
        m = _EXPERT.match(name)
        if m:
            prefix, e, proj, suffix = m.groups()
            if config.moe and int(e) >= config.moe.num_experts:
                raise WeightsError(f"{name}: expert {e} is out of range for num_experts "
                                   f"{config.moe.num_experts} in {config.source}")
            group = self._experts[(prefix, proj, suffix)]
            group[int(e)] = w
            if config.moe and len(group) == config.moe.num_experts:
                del self._experts[(prefix, proj, suffix)]
                return [(f"{prefix}.switch_mlp.{proj}.{suffix}", _stack(group))]
            return []
        m = _FUSED_EXPERTS.match(name)
        if m:
            return _unfuse_experts(m.group(1), m.group(2), w, config)
        return [(name, w)]

    def finish(self) -> None:
        """Fail on experts that never completed; report the skipped vision tower."""
        for (prefix, proj, suffix), group in self._experts.items():
            count = self.config.moe.num_experts if self.config.moe else 0
            missing = [e for e in range(max(count, max(group) + 1)) if e not in group]
            raise WeightsError(
                f"{prefix}.experts.{missing[0] if missing else 0}.{proj}.{suffix} is missing from "
                f"the checkpoint ({len(missing)} of {count} experts lack it)")
        if self.skipped_vision:
            print(f"qwen-mlx: skipping the vision tower ({self.skipped_vision} tensors); "
                  "only the language model is loaded", file=sys.stderr)


def sanitize(weights: dict[str, mx.array], config: ModelConfig) -> dict[str, mx.array]:
    """Map a whole checkpoint's tensors onto the model's parameter names."""
    layout = detect_layout({k: tuple(v.shape) for k, v in weights.items()}, config)
    mapper = WeightMapper(config, layout=layout)
    out: dict[str, mx.array] = {}
    for name, w in weights.items():
        out.update(mapper.add(name, w))
    mapper.finish()
    return out


def _stack(group: dict[int, mx.array]) -> mx.array:
    return mx.stack([group[e] for e in range(len(group))])


def _split_c_attn(layer: str, suffix: str, w: mx.array, config: ModelConfig) -> list:
    # Rows [0,H) are q, [H,2H) k, [2H,3H) v; for a quantized c_attn the packed
    # weight, scales and biases split along the same rows.
    h = config.hidden_size
    if w.shape[0] != 3 * h:
        raise WeightsError(f"transformer.h.{layer}.attn.c_attn.{suffix} has {w.shape[0]} rows; "
                           f"hidden_size {h} in {config.source} implies {3 * h}")
    return [(f"model.layers.{layer}.self_attn.{proj}.{suffix}", w[i * h:(i + 1) * h])
            for i, proj in enumerate(("q_proj", "k_proj", "v_proj"))]


def _unfuse_experts(prefix: str, kind: str, w: mx.array, config: ModelConfig) -> list:
    # transformers 5's in-memory layout: gate_up_proj [E, 2I, H] (gate rows
    # first) and down_proj [E, H, I].
    inter = config.moe.intermediate_size if config.moe else w.shape[1] // 2
    if kind == "gate_up_proj":
        if w.shape[-1] == 2 * inter and w.shape[1] != 2 * inter:
            w = w.swapaxes(1, 2)
        return [(f"{prefix}.switch_mlp.gate_proj.weight", w[:, :inter]),
                (f"{prefix}.switch_mlp.up_proj.weight", w[:, inter:])]
    if w.shape[1] == inter and w.shape[2] != inter:
        w = w.swapaxes(1, 2)
    return [(f"{prefix}.switch_mlp.down_proj.weight", w)]


def _ungroup(prefix: str, kind: str, suffix: str, w: mx.array, config: ModelConfig) -> list:
    """Qwen3-Next's projections grouped by key head -> Qwen3.5's (hybrid spec §2.1).

    Rows of in_proj_qkvz are, per key head j, [q_j | k_j | v and z of value heads
    j·r .. j·r+r-1]; in_proj_ba's are [b | a] of those heads. A row permutation,
    so the packed weight, scales and biases of a quantized folder move alike.
    """
    lc = config.linear
    hk, dk, dv = lc.num_key_heads, lc.key_head_dim, lc.value_head_dim
    r = lc.num_value_heads // hk
    rest = w.shape[1:]
    per_head = 2 * dk + 2 * r * dv if kind == "in_proj_qkvz" else 2 * r
    if w.shape[0] != hk * per_head:
        raise WeightsError(
            f"{prefix}.{kind}.{suffix} has {w.shape[0]} rows; linear_num_key_heads {hk}, "
            f"linear_key_head_dim {dk}, linear_value_head_dim {dv} and linear_num_value_heads "
            f"{lc.num_value_heads} in {config.source} imply {hk * per_head}")
    g = w.reshape(hk, per_head, *rest)
    if kind == "in_proj_ba":
        return [(f"{prefix}.in_proj_b.{suffix}", g[:, :r].reshape(-1, *rest)),
                (f"{prefix}.in_proj_a.{suffix}", g[:, r:].reshape(-1, *rest))]
    q, k = g[:, :dk], g[:, dk:2 * dk]
    v, z = g[:, 2 * dk:2 * dk + r * dv], g[:, 2 * dk + r * dv:]
    qkv = mx.concatenate([t.reshape(-1, *rest) for t in (q, k, v)], axis=0)
    return [(f"{prefix}.in_proj_qkv.{suffix}", qkv),
            (f"{prefix}.in_proj_z.{suffix}", z.reshape(-1, *rest))]


# Checked in slices of this many values, so the check's temporary stays small beside a
# large embedding.
FINITE_CHUNK = 1 << 22


def check_finite(t: mx.array, origin: str, problem: str | None = None) -> None:
    """Refuse a float tensor holding NaN or infinite values, naming it and its file.

    `problem` replaces the default diagnosis (a corrupt checkpoint) when the values
    were finite in the source and became infinite here.
    """
    flat = t.reshape(-1)
    starts = range(0, flat.size, FINITE_CHUNK)
    # x * 0 is 0 for every finite x and NaN for NaN and ±inf, so one sum tells; it costs
    # about 40% of all(isfinite(x)) on the CPU (measured, mlx 0.32.4) and cannot overflow.
    if all(mx.sum(flat[i:i + FINITE_CHUNK] * 0).item() == 0 for i in starts):
        return
    bad = sum(int(mx.sum(mx.logical_not(mx.isfinite(flat[i:i + FINITE_CHUNK]))).item())
              for i in starts)
    raise WeightsError(f"{origin} " + (problem or "holds") + f" {bad} NaN or infinite "
                       f"value(s) among {flat.size}" + (
                           "" if problem else ": the checkpoint is corrupt; download or "
                           "export it again"))
