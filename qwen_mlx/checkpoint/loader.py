"""`load(path)`: a local model folder -> (model, tokenizer).

Reads config.json, the safetensors shards (through their index when there
is one), maps tensor names per family, quantizes the modules that arrive
quantized (mlx-lm's `quantization` block), and casts to the compute dtype.
Only safetensors are read: nothing from a checkpoint is executed or
unpickled.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..model.config import ModelConfig
from ..errors import QwenMLXError, WeightsError
from ..model.experts import SwitchLinear
from ..model.decoder import Model
from ..model.deltanet import GatedDeltaNet
from ..model.norm import RMSNorm
from .weights import check_finite, module_paths, sanitize

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def load(path: str | Path, *, dtype: str | mx.Dtype | None = None,
         rope_scaling: str | Mapping[str, Any] | None = None, rope_factor: float = 4.0,
         max_context: int | None = None,
         shard: Callable[[Model], Any] | None = None) -> tuple[Model, Any]:
    """Load a Qwen model folder (Hugging Face or mlx-lm layout).

    Args:
        path: a local folder with config.json and *.safetensors.
        dtype: compute dtype for the unquantized tensors ("float32",
            "bfloat16", "float16"); default: see `default_dtype`.
        rope_scaling: "yarn" (or "linear", "dynamic") with `rope_factor`, the
            original length taken from the config's max_position_embeddings; or
            a dict that replaces the config's rope scaling, e.g. {"rope_type":
            "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}.
        max_context: the most positions a conversation may use; default: the
            config's max_position_embeddings, times the factor under YaRN.
        shard: one rank's share of a distributed run: called with the model as built
            (quantized as the checkpoint is, before any weight is read), it reshapes
            the model in place and returns a plan whose `take(name, tensor)` gives the
            part of each checkpoint tensor this rank keeps, or None (see
            `qwen_mlx.distributed.plan`). Tensors are then read one at a time, so the
            rank holds its share and at most one whole tensor beyond it.

    Returns:
        (model, tokenizer): the tokenizer is a `QwenTokenizer`, or None when
        the folder has no tokenizer.json.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise QwenMLXError(f"{folder}: no such model folder")
    if max_context is not None and max_context < 2:
        raise QwenMLXError(f"--max-context {max_context} is too small")
    if isinstance(rope_scaling, str):
        rope_scaling = _named_rope_scaling(rope_scaling, rope_factor)
    config = ModelConfig.from_file(folder / "config.json", rope_scaling=rope_scaling)
    weights, origin = read_safetensors(folder)
    compute_dtype = resolve_dtype(dtype, config, weights)
    model = build_model(config, weights, origin, shard=shard)
    set_compute_dtype(model, compute_dtype)
    mx.eval(model.parameters())
    if max_context is not None:
        model.max_context = max_context
    from ..text.tokenizer import check_fits_model

    tokenizer = load_tokenizer(folder)
    check_fits_model(tokenizer, config.vocab_size, str(folder))  # ids past the embedding
    return model, tokenizer


def _named_rope_scaling(kind: str, factor: float) -> dict:
    """--rope-scaling NAME --rope-factor F; YaRN's original length defaults to the
    config's max_position_embeddings during normalization."""
    if kind not in ("yarn", "linear", "dynamic", "default"):
        raise QwenMLXError(f"--rope-scaling {kind} is not supported; choose yarn, linear, "
                           "dynamic or default")
    if kind == "default":
        return {"rope_type": "default"}
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 1):
        raise QwenMLXError(f"rope factor {factor!r} (--rope-factor) must be a number above 1")
    return {"rope_type": kind, "factor": float(factor)}


def build_model(config: ModelConfig, weights: dict[str, mx.array],
                origin: dict[str, str] | None = None, *,
                shard: Callable[[Model], Any] | None = None) -> Model:
    """Build the model for `config` and load checkpoint tensors into it.

    With `shard` (see `load`), `weights` is consumed: emptied, so that a tensor this
    rank does not keep is freed once its share is taken."""
    origin = origin or {}
    mapped = sanitize(weights, config)
    if shard is not None:
        weights.clear()
    weights = mapped
    _check_counts(config, weights)  # before building anything of the config's size
    if shard is not None:
        return _build_share(config, weights, origin, shard)
    model = _build(config, weights, _mtp_layers(weights))
    if model.mtp is not None:
        try:
            _check_weights(model, weights, origin, config)
        except WeightsError as e:
            # The MTP head only serves speculative decoding: never fail a load over it.
            print(f"qwen-mlx: leaving out the checkpoint's multi-token-prediction head "
                  f"(mtp.*), which does not match the config: {e}", file=sys.stderr)
            weights = {k: v for k, v in weights.items() if not k.startswith("mtp.")}
            model = _build(config, weights, 0)
    _check_weights(model, weights, origin, config)
    model.load_weights(list(weights.items()), strict=True)
    return model


def _build_share(config: ModelConfig, weights: dict, origin: dict,
                 shard: Callable[[Model], Any]) -> Model:
    """One rank's share: the whole model's shapes checked, then only its part read."""
    # The MTP head serves speculative decoding, which a distributed run does not do.
    weights = {k: v for k, v in weights.items() if not k.startswith("mtp.")}
    model = _build(config, weights, 0)
    _check_weights(model, weights, origin, config, finite=False)
    plan = shard(model)
    kept = {}
    for name in list(weights):
        w = weights.pop(name)
        part = plan.take(name, w)
        if part is not None:
            # A slice shares its tensor's buffer: copy it, so the tensor can go.
            part = part if part is w else part * 1
            mx.eval(part)
            kept[name] = part
        del w
    _check_weights(model, kept, origin, config)
    model.load_weights(list(kept.items()), strict=True)
    return model


def _check_counts(config: ModelConfig, weights: dict) -> None:
    """The config's layer, vocabulary and expert counts against the tensors' shapes."""
    layers = {int(m.group(1)) for k in weights if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    if layers and (max(layers) + 1 != config.num_layers or len(layers) != config.num_layers):
        raise WeightsError(
            f"{config.source} says num_hidden_layers {config.num_layers}, but the checkpoint "
            f"holds layers 0-{max(layers)} ({len(layers)} of them); the weights do not match "
            "the config")
    embed = weights.get("model.embed_tokens.weight")
    if embed is not None and embed.shape[0] != config.vocab_size:
        raise WeightsError(
            f"{config.source} says vocab_size {config.vocab_size}, but the checkpoint's "
            f"embedding has {embed.shape[0]} rows; the weights do not match the config")
    if config.moe is not None:
        for name, w in weights.items():
            if ".switch_mlp." in name and name.endswith(".weight") and (
                    w.shape[0] != config.moe.num_experts):
                raise WeightsError(
                    f"{config.source} says num_experts {config.moe.num_experts}, but "
                    f"'{name}' holds {w.shape[0]} experts; the weights do not match the config")


def _build(config: ModelConfig, weights: dict, mtp_layers: int) -> Model:
    model = Model(config, mtp_layers=mtp_layers)
    if config.quantization is not None:
        _quantize_like_checkpoint(model, config, weights)
    return model


def _mtp_layers(weights: dict) -> int:
    """How many MTP decoder layers the checkpoint carries (0: no usable head)."""
    if not any(k.startswith("mtp.") for k in weights):
        return 0
    layers = {int(m.group(1)) for k in weights if (m := re.match(r"mtp\.layers\.(\d+)\.", k))}
    return max(layers) + 1 if layers else 1


def read_safetensors(folder: Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    """Every tensor in the folder's safetensors shards, and the file each came from."""
    weights: dict[str, mx.array] = {}
    origin: dict[str, str] = {}
    for f in list_shards(folder):
        for name, w in read_shard(f).items():
            if name in weights:
                raise WeightsError(f"tensor '{name}' appears in both {origin[name]} and {f.name}")
            weights[name], origin[name] = w, f.name
    return weights, origin


def list_shards(folder: Path) -> list[Path]:
    """The folder's safetensors files, through model.safetensors.index.json when present."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError,
                AttributeError) as e:
            raise WeightsError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = [folder / name for name in names]
        for f in files:
            if not f.exists():
                raise WeightsError(f"{index} names {f.name}, which is missing from {folder}; "
                                   "the download or conversion is incomplete: fetch it again")
        # A hybrid's MTP head, written beside the model's files (not in its index).
        files += sorted(p for p in folder.glob("mtp*.safetensors") if p not in files)
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for pat in _PICKLE_PATTERNS for p in folder.glob(pat))
        if pickles:
            raise WeightsError(
                f"{folder} holds only PyTorch pickle weights ({', '.join(pickles[:3])}); "
                "qwen-mlx never unpickles checkpoints, since that can run code. Use the "
                "safetensors release of this model, or convert it to safetensors first")
        raise WeightsError(f"{folder}: no *.safetensors weight files found")
    return files


def read_shard(path: Path) -> dict[str, mx.array]:
    """One safetensors file's tensors, loaded lazily."""
    try:
        return mx.load(str(path), format="safetensors")
    except Exception as e:  # mlx raises RuntimeError/ValueError for bad files
        raise WeightsError(f"{path}: cannot be read as safetensors ({e}); the file is "
                           "truncated or corrupt: download or convert it again") from None


def _quantize_like_checkpoint(model: Model, config: ModelConfig, weights: dict) -> None:
    """Swap in quantized modules wherever the checkpoint holds quantized weights."""
    q = config.quantization
    overrides = {path: value for key, value in q.items() if isinstance(value, (bool, dict))
                 for path in module_paths(key, config)}

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        if isinstance(overrides.get(path), dict):
            return dict(overrides[path])
        # Recover the packing from the shapes, as mlx-lm does: the top-level
        # default can be wrong for layers a recipe gave other bits.
        scales = weights[f"{path}.scales"]
        in_dims = module.weight.shape[-1]
        bits = weights[f"{path}.weight"].shape[-1] * 32 // in_dims
        mode = q.get("mode", "affine")
        return {"group_size": in_dims // scales.shape[-1], "bits": bits, "mode": mode}

    nn.quantize(model, group_size=q["group_size"], bits=q["bits"],
                mode=q.get("mode", "affine"), class_predicate=predicate)


def _check_weights(model: Model, weights: dict, origin: dict, config: ModelConfig, *,
                   finite: bool = True) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing:
        raise WeightsError(
            f"the checkpoint lacks {len(missing)} tensor(s) that {config.source} calls for, "
            f"e.g. {', '.join(missing[:3])}; the weights do not match the config, or a shard "
            "is missing")
    if extra:
        raise WeightsError(
            f"the checkpoint holds {len(extra)} tensor(s) that {config.source} does not call "
            f"for, e.g. {', '.join(extra[:3])}; the weights do not match the config")
    for name, param in expected.items():
        w = weights[name]
        where = origin.get(name, "the checkpoint")
        if mx.issubdtype(param.dtype, mx.floating) and not mx.issubdtype(w.dtype, mx.floating):
            raise WeightsError(
                f"'{name}' in {where} has dtype {str(w.dtype).rpartition('.')[2]}, but model "
                "weights are floating point: the checkpoint is corrupt or was not saved as a "
                "float model; export it again")
        if finite and mx.issubdtype(w.dtype, mx.floating):
            # NaN or inf in a weight only shows later, as garbage text.
            check_finite(w, f"'{name}' in {where}")
        if tuple(weights[name].shape) != tuple(param.shape):
            where = origin.get(name, "the checkpoint")
            hint = ""
            if ".linear_attn." in name and config.linear is not None:
                lc = config.linear
                hint = (f" (from linear_num_key_heads {lc.num_key_heads}, linear_num_value_heads "
                        f"{lc.num_value_heads}, linear_key_head_dim {lc.key_head_dim}, "
                        f"linear_value_head_dim {lc.value_head_dim}, linear_conv_kernel_dim "
                        f"{lc.conv_kernel}: conv_dim {lc.conv_dim})")
            raise WeightsError(
                f"'{name}' in {where} has shape {list(weights[name].shape)} but "
                f"{config.source} implies {list(param.shape)}{hint}; the weights do not match "
                "the config")


def set_compute_dtype(model: Model, dtype: mx.Dtype) -> None:
    """Cast the float parameters; packed quantized weights stay as they are.

    A DeltaNet's A_log and the zero-centred norms' 1 + w stay float32 (hybrid
    spec §2.2, §3.3): the reference forms both in float32 whatever the dtype.
    """
    keep = []
    for _, module in model.named_modules():
        if isinstance(module, GatedDeltaNet):
            keep.append((module, "A_log"))
        elif isinstance(module, RMSNorm) and model.config.zero_centred_norms:
            keep.append((module, "weight"))
    originals = [(m, k, m[k]) for m, k in keep]
    model.set_dtype(dtype)
    for module, key, value in originals:
        module[key] = value.astype(mx.float32)
        if isinstance(module, RMSNorm):
            module.output_dtype = dtype
    if dtype != mx.float32 and mx.default_device() == mx.cpu:
        # MLX's CPU gather_mm runs in float32 only (mlx 0.32).
        for _, module in model.named_modules():
            if isinstance(module, SwitchLinear):
                module.set_dtype(mx.float32)


def default_dtype(config: ModelConfig, weights: dict[str, mx.array]) -> mx.Dtype:
    """The checkpoint's own float dtype on Metal and CUDA; float32 on the CPU.

    MLX's CPU kernels run bfloat16 much slower than float32. Measured on a
    2-core x86 runner (mlx 0.32.4) with a Qwen3-0.6B-shaped stack (4 layers,
    152k vocab, tied) decoding: unquantized 3.08 tok/s in float32 vs 2.30 in
    bfloat16, and 4-bit 5.05 tok/s with float32 activations vs 0.54 with
    bfloat16 ones, 9.4x. So on the CPU the extra memory buys a large speed-up.
    """
    if mx.default_device() == mx.cpu:
        return mx.float32
    # The stored tensors, not the config: converters (mlx-lm's among them) leave
    # torch_dtype stale when they cast.
    floats = [w for w in weights.values() if mx.issubdtype(w.dtype, mx.floating)]
    if floats:
        return max(floats, key=lambda w: w.size).dtype
    return DTYPES.get(config.torch_dtype, mx.float32)


def resolve_dtype(dtype: str | mx.Dtype | None, config: ModelConfig, weights: dict) -> mx.Dtype:
    if dtype is None:
        return default_dtype(config, weights)
    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise QwenMLXError(f"dtype '{dtype}' is not supported; choose one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_tokenizer(folder: Path):
    """The folder's `QwenTokenizer`, or None when it has no tokenizer.json."""
    if not (folder / "tokenizer.json").exists():
        return None
    from ..text.tokenizer import QwenTokenizer

    return QwenTokenizer.from_folder(folder)
