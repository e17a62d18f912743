"""`convert()`: a Hugging Face checkpoint (hub or local) -> an MLX folder.

The output is what mlx-lm writes (its tensor names, `quantization` block and
shard index), so `qwen_mlx.load` and mlx-lm both load it as it is.

The work streams: shards are opened lazily and each tensor is read, mapped,
quantized and buffered on its own, so resident memory stays near one output
shard, not the model's size. Float tensors are checked for NaN and infinite
values as they pass, since quantizing would turn those into ordinary numbers.

Everything is written into a hidden folder beside the target and renamed into
place only once the result has loaded and run a forward pass; on any failure
no partial folder is left behind. The rename never replaces what appeared at
the target meanwhile (unless `force`), a target that is or holds the source
is refused, and a killed conversion's folder is removed by the next one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import secrets
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from ..model.config import ModelConfig
from ..errors import QwenMLXError, WeightsError
from .hub import resolve_model_path
from .loader import DTYPES, list_shards, load, load_tokenizer, read_shard
from .quantize import BITS, GROUP_SIZES, RECIPES, plan, recipe_bits
from .weights import WeightMapper, _is_buffer, detect_layout, is_zero_centred_norm
from .weights import check_finite as _check_finite

try:
    import fcntl
except ImportError:  # Windows: stale partial folders are told apart by their pid alone
    fcntl = None

MAX_SHARD_BYTES = 5 * 2**30
# Tokenizer, generation and chat-template files travel with the weights.
SIDE_FILES = ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
              "special_tokens_map.json", "added_tokens.json", "generation_config.json",
              "chat_template.jinja", "chat_template.json", "qwen.tiktoken"]
TOKENIZER_HINT = ("copy tokenizer.json and tokenizer_config.json (and chat_template.jinja, "
                  "if there is one) from the model's original Hugging Face repo into it")
# Inside a partial folder: who is writing it, locked while that process lives.
OWNER_FILE = ".qwen-mlx-convert.json"
CHECK_PROMPTS = [
    "The capital of France is Paris. The capital of Japan is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "量子计算机利用量子力学的原理来处理信息，",
    "Once upon a time, in a small village by the sea, there lived",
]


class TargetExistsError(QwenMLXError):
    """The output folder exists (or appeared while converting) and force was not given."""


@dataclass
class QuantCheck:
    """How far the converted model's next-token distributions are from the source's."""

    kl_divergence: float  # mean KL(source || converted) in nats per token
    top1_agreement: float  # share of positions whose argmax agrees
    positions: int


@dataclass
class ConvertResult:
    path: Path
    parameters: int
    bits_per_weight: float
    size_bytes: int
    seconds: float
    shards: int
    kept_float: list[str] = field(default_factory=list)
    check: QuantCheck | None = None

    def summary(self) -> str:
        lines = [f"wrote {self.path}",
                 f"  parameters      {self.parameters / 1e6:,.1f} M",
                 f"  bits per weight {self.bits_per_weight:.2f}",
                 f"  size on disk    {_human(self.size_bytes)} in {self.shards} shard(s)",
                 f"  time            {self.seconds:.1f} s"]
        if self.check:
            lines.append(f"  check           KL {self.check.kl_divergence:.5f} nats/token, "
                         f"top-1 agreement {self.check.top1_agreement:.1%} "
                         f"over {self.check.positions} positions")
        return "\n".join(lines)


def convert(hf_path: str | Path, mlx_path: str | Path | None = None, *, quantize: bool = False,
            bits: int = 4, group_size: int = 64, dtype: str | None = None,
            recipe: str | None = None, revision: str | None = None, force: bool = False,
            dequantize: bool = False, check: bool = False, mtp: bool = True,
            awq: bool = False, calibration: str | Path | None = None, awq_clip: bool = False,
            max_shard_bytes: int = MAX_SHARD_BYTES, progress: bool = True,
            log: Callable[[str], None] = print) -> ConvertResult:
    """Convert a Qwen checkpoint into an MLX folder, optionally quantized.

    Args:
        hf_path: a hub repo id ("Qwen/Qwen3-0.6B") or a local folder.
        mlx_path: the output folder; default `./<name>-<4bit|mixed_4_6|bf16|...>`.
        quantize: quantize linear and embedding weights (affine, mlx-lm's format).
        bits, group_size: for `quantize` with the uniform recipe.
        dtype: "float32", "bfloat16" or "float16" for the unquantized tensors;
            default: each tensor keeps its stored dtype.
        recipe: a name from `quantize.RECIPES`; implies `quantize`.
        revision: a hub branch, tag or commit.
        force: replace an existing output folder.
        dequantize: turn a quantized MLX folder back into floats.
        check: report KL divergence and top-1 agreement against the source.
        mtp: keep a hybrid's multi-token-prediction head (`mtp.*`, written to
            mtp.safetensors, which mlx-lm does not read); False drops it.
        awq: activation-aware scales searched on a calibration text and folded into
            the norms and projections before quantizing (see `awq.py`); implies
            `quantize`. It holds the float32 model in memory while searching.
        calibration: the calibration text file for `awq`; default: the built-in one.
        awq_clip: with `awq`, also search a clipping range per weight group.
    """
    started = time.perf_counter()
    if recipe is not None:
        if recipe not in RECIPES:
            raise QwenMLXError(f"unknown recipe '{recipe}'; choose one of: {', '.join(RECIPES)}")
        quantize = True
    rec = RECIPES[recipe or "uniform"]
    if (calibration is not None or awq_clip) and not awq:
        raise QwenMLXError("--calibration and --awq-clip only apply with --awq")
    if awq and dequantize:
        raise QwenMLXError("--awq and --dequantize exclude each other")
    quantize = quantize or awq
    if quantize and dequantize:
        raise QwenMLXError("--quantize and --dequantize exclude each other")
    if bits not in BITS:
        raise QwenMLXError(f"--bits {bits} is not supported; choose one of {BITS}")
    if group_size not in GROUP_SIZES:
        raise QwenMLXError(f"--group-size {group_size} is not supported; choose one of {GROUP_SIZES}")
    if dtype is not None and dtype not in DTYPES:
        raise QwenMLXError(f"--dtype {dtype} is not supported; choose one of: {', '.join(DTYPES)}")

    source = resolve_model_path(hf_path, revision=revision)
    config = ModelConfig.from_file(source / "config.json")
    if dequantize and not config.quantization:
        raise QwenMLXError(f"{source} is not quantized: there is nothing to dequantize")
    if config.quantization and not dequantize:
        raise QwenMLXError(f"{source} is already quantized; pass --dequantize to turn it back "
                           "into floats")

    suffix = (rec.name if rec.high_bits else f"{rec.low_bits or bits}bit") if quantize else (
        dtype or "mlx")
    if awq:
        suffix += "-awq"
    default = (dequantized_name(hf_path, dtype) if dequantize
               else f"{_model_name(hf_path)}-{suffix}")
    target = Path(mlx_path).expanduser() if mlx_path else Path(default)
    protected = _source_folders(source)
    _refuse_source_overlap(target, protected)
    _clean_stale_partials(target, log)
    _check_target(target, force)
    partial = _Partial.create(target)
    tmp = partial.path
    try:
        # Write at least once per input shard's worth of output, so resident
        # memory stays near one input shard plus its output, whatever the model's size.
        files = list_shards(source)
        largest = max(f.stat().st_size for f in files)
        writer = _ShardWriter(tmp, min(max_shard_bytes, max(largest, 64 * 2**20)))
        # The MTP head goes to files of its own: mlx-lm reads model*.safetensors only, and
        # would refuse tensors its model lacks.
        mtp_writer = _ShardWriter(tmp, writer.max_bytes, prefix="mtp") if mtp else None
        replace = None
        if awq:
            from .awq import prepare

            replace = prepare(source, lambda path, in_dims: plan(
                path, in_dims, config, rec, bits, group_size), calibration=calibration,
                clip=awq_clip, progress=progress, log=log)
        stats = _convert_weights(files, config, writer, quantize=quantize, rec=rec, bits=bits,
                                 group_size=group_size, dtype=dtype, dequantize=dequantize,
                                 progress=progress, log=log, mtp_writer=mtp_writer,
                                 replace=replace)
        del replace  # the folded float weights, before the result is loaded
        shards = _write_output("model.safetensors.index.json", target, writer.finish)
        if mtp_writer is not None and (mtp_writer.files or mtp_writer.buffer):
            _write_output("mtp.safetensors", target, mtp_writer.finish)
        out_config = output_config(config, quantization=stats.quantization if quantize else None,
                                   dtype=dtype)
        _write_output("config.json", target,
                      lambda: (tmp / "config.json").write_text(json.dumps(out_config, indent=2)
                                                               + "\n"))
        _copy_side_files(source, tmp, config, target)
        # Float folders validate in their stored dtype (casting a half-precision
        # model to float32 doubles its memory); quantized ones in load's default,
        # since MLX's CPU quantized matmul is many times slower in half precision.
        mx.clear_cache()  # the conversion's buffers, before the result is loaded
        _validate(tmp, None if quantize else (DTYPES[dtype] if dtype else stats.float_dtype))
        result_check = _check(source, tmp) if check else None
        partial.release()
        _write_output("the converted files", target, lambda: _fsync_folder(tmp))
        _move_into_place(tmp, target, force, protected, log)
        with contextlib.suppress(OSError):
            _fsync_dir(target.parent)  # the rename itself, across a power loss
    except QwenMLXError as e:
        partial.discard()
        if str(tmp) in str(e):
            # The partial folder never survives a failure: name the folder the user asked
            # for, and the source's config.json, which the written one comes from.
            message = str(e).replace(str(tmp / "config.json"), str(source / "config.json"))
            raise type(e)(message.replace(str(tmp), str(target))) from None
        raise
    except BaseException:
        partial.discard()
        raise
    finally:
        partial.close()
    if not (target / "tokenizer.json").exists():
        log(f"warning: {source} has no tokenizer (tokenizer.json), so {target} has none "
            f"either and cannot encode text: {TOKENIZER_HINT}")
    size = sum(p.stat().st_size for p in target.glob("*.safetensors"))
    return ConvertResult(
        path=target, parameters=stats.parameters,
        bits_per_weight=8 * size / max(stats.parameters, 1), size_bytes=size,
        seconds=time.perf_counter() - started, shards=shards,
        kept_float=stats.kept_float, check=result_check)


@dataclass
class _Stats:
    parameters: int = 0
    quantization: dict = field(default_factory=dict)
    kept_float: list[str] = field(default_factory=list)
    float_dtype: mx.Dtype | None = None  # of the largest float tensor written
    _largest: int = 0

    def saw_float(self, t: mx.array) -> None:
        if t.size > self._largest:
            self.float_dtype, self._largest = t.dtype, t.size


def _convert_weights(files: list[Path], config: ModelConfig, writer: "_ShardWriter", *, quantize: bool,
                     rec, bits: int, group_size: int, dtype: str | None, dequantize: bool,
                     progress: bool, log, mtp_writer: "_ShardWriter | None" = None,
                     replace: Callable[[str, mx.array], mx.array] | None = None) -> _Stats:
    from huggingface_hub.utils import tqdm

    stats = _Stats()
    default_bits = recipe_bits(rec, bits)
    stats.quantization = {"group_size": group_size, "bits": default_bits, "mode": "affine"}
    cast = DTYPES[dtype] if dtype else None
    shards = [(f, read_shard(f)) for f in files]  # lazy: headers only
    # A hybrid's norms and conv are converted only once: the shapes tell whether the
    # source was converted already (a folder being dequantized).
    layout = detect_layout({n: tuple(t.shape) for _, ts in shards for n, t in ts.items()}, config)
    mapper = WeightMapper(config, keep_qwen1_names=True, layout=layout,
                          keep_grouped=config.family == "qwen3_next")
    dequantizer = _Dequantizer(config) if dequantize else None
    total = sum(len(tensors) for _, tensors in shards)
    dropped_mtp = 0
    with tqdm(total=total, unit="tensor", desc="converting", disable=not progress) as bar:
        for file, tensors in shards:
            bar.set_postfix_str(file.name, refresh=False)
            for name in list(tensors):
                w = tensors.pop(name)  # drop our reference once it is consumed
                origin = f"tensor '{name}' in {file}"
                if mx.issubdtype(w.dtype, mx.floating) and not _dropped(mapper, name):
                    # Before quantizing, which would turn NaN and inf into ordinary numbers.
                    _check_finite(w, origin)
                for out_name, t in mapper.add(name, w):
                    if replace is not None:
                        t = replace(out_name, t)  # AWQ's folded (and clipped) weights
                    out = writer
                    if out_name.startswith("mtp."):
                        if mtp_writer is None:
                            dropped_mtp += 1
                            continue
                        out = mtp_writer
                    if is_zero_centred_norm(out_name) and t.dtype != w.dtype:
                        # 1 + w in the checkpoint's dtype, as mlx-lm stores it: a float32
                        # norm would turn mlx-lm's half-precision activations to float32.
                        t = t.astype(w.dtype)
                    # A_log stays float32 whatever --dtype says (hybrid spec §7).
                    t_cast = None if out_name.endswith(".A_log") else cast
                    if dequantizer is not None:
                        for n, d in dequantizer.add(out_name, t):
                            _emit_float(out, stats, n, d, t_cast, origin)
                    elif quantize and _is_matrix(out_name, t):
                        path = out_name[: -len(".weight")]
                        spec = plan(path, t.shape[-1], config, rec, bits, group_size)
                        if spec is None:
                            if not path.endswith((".mlp.gate", ".shared_expert_gate")):
                                stats.kept_float.append(path)
                            _emit_float(out, stats, out_name, t, cast, origin)
                            continue
                        _emit_quantized(out, stats, path, t, spec, cast, origin)
                        if spec[0] != default_bits:
                            stats.quantization[path] = {"group_size": spec[1], "bits": spec[0]}
                    else:
                        _emit_float(out, stats, out_name, t, t_cast, origin)
                bar.update(1)
    mapper.finish()
    if dropped_mtp:
        log(f"note: left out the multi-token-prediction head ({dropped_mtp} mtp.* tensors), "
            "as --no-mtp asks")
    if dequantizer is not None:
        dequantizer.finish()
    if stats.kept_float:
        log(f"note: {len(stats.kept_float)} weight(s) kept in floats because group size "
            f"{group_size} does not divide their input width, e.g. {stats.kept_float[0]}")
    return stats


def _is_matrix(name: str, t: mx.array) -> bool:
    # A DeltaNet's depthwise conv weight is 3-D but no matmul: it stays in floats.
    return (name.endswith(".weight") and t.ndim >= 2 and mx.issubdtype(t.dtype, mx.floating)
            and not name.endswith("conv1d.weight"))


def _dropped(mapper: WeightMapper, name: str) -> bool:
    """Tensors the mapper discards unread: buffers and a VL checkpoint's vision tower."""
    return _is_buffer(name) or (mapper.is_vl and name.startswith(
        ("visual.", "model.visual.", "vision_tower.")))


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).rpartition(".")[2]


def _emit_float(writer, stats: _Stats, name: str, t: mx.array, cast, origin: str) -> None:
    if not mx.issubdtype(t.dtype, mx.floating):
        # Every unquantized weight of a Qwen model is floating point: an integer one
        # would be cast or run as garbage.
        shown = origin if name in origin else f"{origin} (as '{name}')"
        raise WeightsError(
            f"{shown} has dtype {_dtype_name(t.dtype)}, but model weights are floating point "
            "(float32, bfloat16 or float16): the checkpoint is corrupt or was not saved as a "
            "float model; export it again")
    if cast is not None and cast != t.dtype:
        t = t.astype(cast)
        _check_finite(t, origin, f"does not fit {_dtype_name(cast)} (choose a wider --dtype): "
                                 "the cast gives")
    stats.saw_float(t)
    if not name.endswith(("scales", "biases")):
        stats.parameters += t.size
    writer.add(name, t)


def _emit_quantized(writer, stats: _Stats, path: str, t: mx.array, spec, cast,
                    origin: str) -> None:
    if cast is not None:
        t = t.astype(cast)
    stats.parameters += t.size
    w, scales, biases = mx.quantize(t, group_size=spec[1], bits=spec[0])
    # Values beyond the scales' dtype give infinite scales: the weights would decode as garbage.
    for part, values in (("scales", scales), ("biases", biases)):
        _check_finite(values, origin, f"does not quantize in {_dtype_name(values.dtype)} "
                                      f"(choose a wider --dtype): its {part} get")
    stats.saw_float(scales)
    writer.add(f"{path}.weight", w)
    writer.add(f"{path}.scales", scales)
    writer.add(f"{path}.biases", biases)


class _Dequantizer:
    """Collects each quantized module's weight, scales (and affine biases), then emits floats."""

    def __init__(self, config: ModelConfig):
        self.q = config.quantization
        self.pending: dict[str, dict[str, mx.array]] = {}
        # Affine scales carry the model's dtype; other modes' scales are uint8, so
        # their floats take the config's dtype.
        self.dtype = DTYPES.get(config.torch_dtype or "", mx.bfloat16)

    def _params(self, path: str) -> tuple[int, str]:
        override = self.q.get(path)
        params = override if isinstance(override, dict) else self.q
        return params.get("bits", self.q["bits"]), params.get("mode", self.q.get("mode", "affine"))

    def add(self, name: str, t: mx.array) -> list[tuple[str, mx.array]]:
        path, _, kind = name.rpartition(".")
        if kind not in ("weight", "scales", "biases") or (
                kind == "weight" and t.dtype != mx.uint32 and path not in self.pending):
            return [(name, t)]
        parts = self.pending.setdefault(path, {})
        parts[kind] = t
        bits, mode = self._params(path)
        needed = {"weight", "scales", "biases"} if mode == "affine" else {"weight", "scales"}
        if not needed <= parts.keys():
            return []
        del self.pending[path]
        in_dims = parts["weight"].shape[-1] * 32 // bits
        group = in_dims // parts["scales"].shape[-1]
        w = mx.dequantize(parts["weight"], parts["scales"], parts.get("biases"),
                          group_size=group, bits=bits, mode=mode,
                          dtype=None if mode == "affine" else self.dtype)
        return [(f"{path}.weight", w)]

    def finish(self) -> None:
        if self.pending:
            path, parts = next(iter(self.pending.items()))
            missing = {"weight", "scales", "biases"} - parts.keys()
            raise WeightsError(f"quantized '{path}' lacks its {', '.join(sorted(missing))}")


class _ShardWriter:
    """Buffers evaluated tensors and writes safetensors shards of at most `max_bytes`."""

    def __init__(self, folder: Path, max_bytes: int, prefix: str = "model"):
        self.folder, self.max_bytes, self.prefix = folder, max_bytes, prefix
        self.buffer: dict[str, mx.array] = {}
        self.buffered = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, t: mx.array) -> None:
        mx.eval(t)  # materialize now, so the source tensor can be freed
        if self.buffer and self.buffered + t.nbytes > self.max_bytes:
            self._flush()
        self.buffer[name] = t
        self.buffered += t.nbytes

    def _flush(self) -> None:
        path = self.folder / f"{self.prefix}-part-{len(self.files):05d}.safetensors"
        try:
            mx.save_safetensors(str(path), self.buffer, metadata={"format": "mlx"})
        except RuntimeError as e:
            free = shutil.disk_usage(self.folder).free
            if free < self.buffered:
                raise QwenMLXError(
                    f"no space left on the device holding {self.folder.parent}: writing a "
                    f"{_human(self.buffered)} shard failed with {_human(free)} free; free some "
                    "space or choose another output folder") from None
            raise QwenMLXError(f"writing {path} failed: {e}") from None
        self.files.append((path, list(self.buffer)))
        self.total += self.buffered
        self.buffer, self.buffered = {}, 0
        # MLX keeps freed buffers for reuse; handing them back keeps the resident size
        # near one shard in and one out, not the sum of every shard so far.
        mx.clear_cache()

    def finish(self) -> int:
        """Flush, give the shards mlx-lm's names and write the index; returns the shard count."""
        if self.buffer:
            self._flush()
        n = len(self.files)
        weight_map = {}
        for i, (path, names) in enumerate(self.files, 1):
            p = self.prefix
            final = f"{p}.safetensors" if n == 1 else f"{p}-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return n


def output_config(config: ModelConfig, *, quantization: dict | None, dtype: str | None) -> dict:
    """The source config in the published schema, explicit where mlx-lm's defaults differ."""
    out = dict(config.raw)
    out.pop("auto_map", None)  # remote code: never needed, never run
    if config.is_hybrid:
        return _hybrid_config(config, out, quantization=quantization, dtype=dtype)
    if config.family in ("qwen3_vl", "qwen3_vl_moe"):
        # Only the language model was converted: Qwen3-VL's is a plain Qwen3 (MoE) model
        # for text (interleaved M-RoPE equals 1-D RoPE there), with its own θ and tie.
        text = out.pop("text_config", None) or {}
        out = {k: v for k, v in {**out, **text}.items()
               if not k.startswith(("vision", "image", "video")) and k != "rope_scaling"}
        moe = config.family == "qwen3_vl_moe"
        out.update(model_type="qwen3_moe" if moe else "qwen3",
                   architectures=["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"])
        out.pop("dtype", None)
        if config.torch_dtype:
            out["torch_dtype"] = config.torch_dtype
    if config.model_type in ("qwen2_vl", "qwen2_5_vl"):
        # Only the language model was converted: it is a plain Qwen2 model.
        text = out.pop("text_config", None) or {}
        out = {k: v for k, v in {**out, **text}.items()
               if not k.startswith(("vision", "image", "video")) and k != "rope_scaling"}
        out.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    if config.family != "qwen":
        out.pop("rope_parameters", None)
        out.pop("num_local_experts", None)
        rope = config.rope
        out["rope_theta"] = rope.theta
        out["rope_scaling"] = None
        if rope.rope_type != "default":
            scaling: dict[str, Any] = {"rope_type": rope.rope_type, "type": rope.rope_type,
                                       "factor": rope.factor}
            if rope.rope_type == "yarn":
                scaling.update(original_max_position_embeddings=rope.original_max_position_embeddings,
                               beta_fast=rope.beta_fast, beta_slow=rope.beta_slow)
                for key in ("attention_factor", "mscale", "mscale_all_dim"):
                    if getattr(rope, key) is not None:
                        scaling[key] = getattr(rope, key)
                if not rope.truncate:
                    scaling["truncate"] = False
            out["rope_scaling"] = scaling
        out.update(tie_word_embeddings=config.tie_word_embeddings,
                   num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
                   rms_norm_eps=config.rms_norm_eps,
                   max_position_embeddings=config.max_position_embeddings)
        if config.family.endswith("moe"):
            m = config.raw
            out["num_experts"] = config.moe.num_experts if config.moe else (
                m.get("num_experts") or m.get("num_local_experts") or 0)
            if config.moe:
                out.update(num_experts_per_tok=config.moe.top_k,
                           moe_intermediate_size=config.moe.intermediate_size,
                           norm_topk_prob=config.moe.norm_topk_prob)
            # mlx-lm requires these keys, which HF configs may leave to class defaults.
            out["decoder_sparse_step"] = m.get("decoder_sparse_step") or 1
            out["mlp_only_layers"] = m.get("mlp_only_layers") or []
            if config.family == "qwen2_moe" and config.moe:
                out["shared_expert_intermediate_size"] = config.moe.shared_intermediate_size
    for key in ("quantization", "quantization_config"):
        out.pop(key, None)
    if quantization is not None:
        out["quantization"] = dict(quantization)
        out["quantization_config"] = dict(quantization)  # mlx-lm writes both
    if dtype is not None:
        out["torch_dtype"] = dtype
        out.pop("dtype", None)
    return out


def _hybrid_config(config: ModelConfig, out: dict, *, quantization: dict | None,
                   dtype: str | None) -> dict:
    """Qwen3-Next and Qwen3.5/3.6 configs with every value explicit that mlx-lm reads
    differently or needs: mlx-lm takes θ and the rotary fraction from rope_parameters
    for qwen3_5 and from top-level keys for qwen3_next, ties by text_config, and places
    full layers by full_attention_interval only (so layer_types is written too)."""
    nested = isinstance(out.get("text_config"), dict)
    text = dict(out["text_config"]) if nested else out
    c, lc = config, config.linear
    rope = {"rope_type": "default", "rope_theta": c.rope.theta,
            "partial_rotary_factor": c.rotary_dim / c.head_dim}
    old = text.get("rope_parameters") or {}
    for key in ("mrope_section", "mrope_interleaved"):
        if key in old:
            rope[key] = old[key]
    text.update(
        rope_parameters=rope, rope_theta=c.rope.theta, partial_rotary_factor=rope[
            "partial_rotary_factor"], rope_scaling=None, tie_word_embeddings=c.tie_word_embeddings,
        hidden_size=c.hidden_size, num_hidden_layers=c.num_layers, vocab_size=c.vocab_size,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
        linear_num_key_heads=lc.num_key_heads, linear_num_value_heads=lc.num_value_heads,
        linear_key_head_dim=lc.key_head_dim, linear_value_head_dim=lc.value_head_dim,
        linear_conv_kernel_dim=lc.conv_kernel,
        layer_types=["full_attention" if k == "attention" else "linear_attention"
                     for k in c.layer_kinds])
    full = [i for i, k in enumerate(c.layer_kinds) if k == "attention"]
    text["full_attention_interval"] = full[0] + 1 if full else c.num_layers + 1
    if c.intermediate_size:
        text["intermediate_size"] = c.intermediate_size
    if c.moe:
        m = c.moe
        text.update(num_experts=m.num_experts, num_experts_per_tok=m.top_k,
                    moe_intermediate_size=m.intermediate_size,
                    shared_expert_intermediate_size=m.shared_intermediate_size,
                    norm_topk_prob=m.norm_topk_prob,
                    decoder_sparse_step=1,  # the dense layers are all listed below
                    mlp_only_layers=[i for i, sparse in enumerate(c.sparse_layers) if not sparse])
    text.pop("num_local_experts", None)
    if nested:
        out["text_config"] = text
        out["tie_word_embeddings"] = c.tie_word_embeddings
        out.pop("vision_config", None)  # the vision tower was left out
    elif out.get("model_type") in ("qwen3_5_text", "qwen3_5_moe_text"):
        # mlx-lm knows no *_text type, but reads a flat config named like the nested one.
        out["model_type"] = out["model_type"][: -len("_text")]
    for key in ("quantization", "quantization_config"):
        out.pop(key, None)
    if quantization is not None:
        out["quantization"] = dict(quantization)
        out["quantization_config"] = dict(quantization)
    if dtype is not None:
        out["torch_dtype"] = dtype
        out.pop("dtype", None)
    return out


def _copy_side_files(source: Path, dst: Path, config: ModelConfig, target: Path) -> None:
    qwen1_tiktoken = source / "qwen.tiktoken"
    for name in SIDE_FILES:
        if (source / name).exists():
            if config.family == "qwen" and name == "tokenizer_config.json" and (
                    not (source / "tokenizer.json").exists()):
                continue  # Qwen1's points at remote code; we write our own below
            _write_output(name, target, lambda: shutil.copy2(source / name, dst / name))
    if not (source / "tokenizer.json").exists() and qwen1_tiktoken.exists():
        from ..text.tiktoken import write_qwen1_tokenizer

        _write_output("tokenizer.json", target, lambda: write_qwen1_tokenizer(
            qwen1_tiktoken, dst, model_max_length=config.raw.get("seq_length")))


def _write_output(name: str, target: Path, write: Callable[[], Any]) -> Any:
    """Run `write`, turning an OSError into a message naming the file and the target."""
    try:
        return write()
    except OSError as e:
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise QwenMLXError(
                f"no space left on the device holding {target.parent} while writing {name}: "
                "free some space or choose another output folder; nothing was written") from None
        raise QwenMLXError(f"cannot write {name} for {target}: {e.strerror or e}; nothing "
                           "was written") from None


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's files and entries to the disk, so a rename publishes whole files."""
    for path in folder.iterdir():
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    if os.name == "nt":
        return  # folders cannot be opened for fsync there
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _validate(folder: Path, dtype: mx.Dtype | None) -> None:
    """Load the result and run one forward pass before it replaces anything."""
    try:
        model, _ = load(folder, dtype=dtype)
    except QwenMLXError as e:
        raise type(e)(f"{folder}: the converted model does not load, so nothing was written "
                      f"there: {e}") from None
    logits = model(mx.array([[0, 1, 2]]))
    mx.eval(logits)
    if not bool(mx.all(mx.isfinite(logits)).item()):
        raise QwenMLXError("the converted model gives non-finite logits; the source weights "
                           "may be corrupt, or the dtype too narrow (try --dtype float32)")


def _check(source: Path, converted: Path) -> QuantCheck:
    """KL divergence and top-1 agreement of next-token distributions on a few prompts."""
    prompts = _check_prompts(source)
    ref_model, _ = load(source, dtype="float32")
    reference = [_log_softmax(ref_model(mx.array([p]))) for p in prompts]
    del ref_model
    model, _ = load(converted, dtype="float32")
    kl_sum, agree, count = 0.0, 0, 0
    for p, ref in zip(prompts, reference):
        got = _log_softmax(model(mx.array([p])))
        kl = (np.exp(ref) * (ref - got)).sum(axis=-1)
        kl_sum += float(kl.sum())
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        count += ref.shape[0]
    return QuantCheck(kl_divergence=kl_sum / count, top1_agreement=agree / count, positions=count)


def _check_prompts(source: Path) -> list[list[int]]:
    tokenizer = load_tokenizer(source)
    config = ModelConfig.from_file(source / "config.json")
    if tokenizer is not None:
        prompts = [tokenizer.encode(text) for text in CHECK_PROMPTS]
        if all(prompts) and max(max(p) for p in prompts) < config.vocab_size:
            return prompts
    rng = np.random.default_rng(0)  # no usable tokenizer: random token ids
    return [rng.integers(0, config.vocab_size, 24).tolist() for _ in CHECK_PROMPTS]


def _log_softmax(logits: mx.array) -> np.ndarray:
    x = np.array(logits[0].astype(mx.float32), dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass
class _SourceFolders:
    """Where a source lives, resolved: what no target may be, hold, or (roots) lie in."""

    roots: list[Path]  # the source folder, and a hub repo's whole cache folder
    files: list[Path]  # other folders its files live in (through links)


def _source_folders(source: Path) -> _SourceFolders:
    """The source folder and every folder its files live in.

    A hub snapshot's files are links into the cache's blobs, so that folder counts,
    and the repo's cache folder (blobs, refs and snapshots) is a root as a whole.
    """
    real = source.resolve()
    roots = [real]
    if real.parent.name == "snapshots":
        roots.append(real.parent.parent)
    files = {f.resolve().parent for f in source.iterdir() if f.is_file()} - set(roots)
    return _SourceFolders(roots, sorted(files))


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _refuse_source_overlap(target: Path, where: _SourceFolders) -> None:
    """Refuse a target that is the source, holds it or its files, or lies inside it.

    Links are followed; a folder inside one the source's files merely link into is fine.
    """
    real = target.resolve()
    everything = [*where.roots, *where.files]
    # By identity, not by name: symlinks, bind mounts and case-insensitive names agree.
    for folder in everything:
        if _same(real, folder):
            what = "is the source folder" if folder == where.roots[0] else (
                "holds the source's files")
            raise QwenMLXError(f"{target} {what} ({folder}); choose another output folder")
    for folder in everything:
        if any(_same(real, up) for up in folder.parents):
            raise QwenMLXError(f"{target} contains the source ({folder}): replacing it would "
                               "delete the source; choose an output folder outside it")
    for folder in where.roots:
        if any(_same(up, folder) for up in real.parents):
            raise QwenMLXError(f"{target} is inside the source folder {folder}; choose an "
                               "output folder outside it")


def _check_target(target: Path, force: bool) -> None:
    if target.is_symlink() or target.exists():
        if not target.is_dir():
            raise QwenMLXError(f"{target} exists and is not a folder")
        if not force:
            raise TargetExistsError(f"{target} already exists; pass --force to replace it")
        if os.path.ismount(target):
            raise QwenMLXError(f"{target} is a mount point, which cannot be replaced: convert "
                               f"into a folder inside it instead, e.g. {target / target.name}")


class _Partial:
    """The hidden folder a conversion writes into, beside the target.

    It holds OWNER_FILE, recording the process and locked while it lives, so the
    next conversion into the same target can tell a killed one's leftovers from a
    running one's and remove only the former.
    """

    def __init__(self, path: Path, fd: int | None):
        self.path, self._fd = path, fd

    @classmethod
    def create(cls, target: Path) -> "_Partial":
        parent = target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            for _ in range(100):
                path = parent / f".{target.name}.{secrets.token_hex(4)}.partial"
                try:
                    os.mkdir(path, 0o777)  # honours the umask, where mkdtemp gives 0o700
                    break
                except FileExistsError:
                    continue
            else:
                raise QwenMLXError(f"cannot find a free temporary name in {parent}")
        except OSError as e:
            raise QwenMLXError(f"cannot create the output folder {target}: {e.strerror or e} "
                               f"(in {parent}); choose another output folder") from None
        try:
            return cls(path, _write_owner(path, target))
        except OSError as e:
            shutil.rmtree(path, ignore_errors=True)
            raise QwenMLXError(f"cannot write into {parent} ({e.strerror or e}); choose "
                               "another output folder") from None

    def release(self) -> None:
        """Remove the owner record, which must not travel into the target."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path / OWNER_FILE)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the lock
            self._fd = None


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux), which tells a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _write_owner(folder: Path, target: Path) -> int:
    """Write and lock the owner record; the lock is held until the returned fd closes."""
    record = {"pid": os.getpid(), "host": socket.gethostname(), "target": target.name,
              "started": _process_start(os.getpid())}
    tmp = folder / (OWNER_FILE + ".tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps(record).encode())
    # Renamed in only once locked: a record that can be locked belongs to a dead process.
    os.rename(tmp, folder / OWNER_FILE)
    return fd


def _owner_alive(fd: int, record: dict) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False  # the lock dies with its process, whatever became of the pid
    if record.get("host") != socket.gethostname():
        return True  # another machine's process: we cannot tell
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return False
    except (OSError, KeyError, TypeError, ValueError):
        return True
    return _process_start(int(record["pid"])) in (None, record.get("started"))


def _clean_stale_partials(target: Path, log: Callable[[str], None]) -> None:
    """Remove partial folders left by killed conversions into `target`; say so."""
    # The random part is 8 characters: mkdtemp's alphabet (older versions) or hex.
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.(partial|old)")
    try:
        entries = [p for p in target.parent.iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        return
    for folder in entries:
        if folder.name.endswith(".old"):
            # Only where renames cannot exchange: --force moved the old folder aside and
            # was stopped before deleting it. It may be the only copy: never removed here.
            log(f"note: {folder} holds the folder an interrupted --force conversion was "
                f"replacing; delete it, or move it back to {target}")
            continue
        if folder.is_symlink() or not folder.is_dir():
            continue
        try:
            fd = os.open(folder / OWNER_FILE, os.O_RDWR)
        except FileNotFoundError:
            log(f"note: {folder} looks left over from an interrupted conversion (it names no "
                f"owner); remove it if no conversion into {target} is running")
            continue
        except OSError:
            continue
        try:
            try:
                record = json.loads(os.read(fd, 4096) or b"{}")
            except ValueError:
                record = {}
            if not isinstance(record, dict) or record.get("target", target.name) != target.name:
                continue
            if _owner_alive(fd, record):
                continue  # a conversion into the same target is running now
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                log(f"removed {folder}: a conversion into {target} (process "
                    f"{record.get('pid', '?')}) stopped before finishing")
        finally:
            os.close(fd)


# renameat2(2) on Linux, renamex_np(2) on macOS: renames that never replace by accident.
_AT_FDCWD = -100
_RENAME_FLAGS = {"linux": {"noreplace": 1, "exchange": 2},
                 "darwin": {"noreplace": 0x4, "exchange": 0x2}}


@functools.lru_cache(maxsize=1)
def _rename_call():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if sys.platform.startswith("linux"):
            return "linux", libc.renameat2
        if sys.platform == "darwin":
            return "darwin", libc.renamex_np
    except (OSError, AttributeError):
        pass
    return None


def _atomic_rename(src: Path, dst: Path, mode: str) -> bool:
    """Rename `src` to `dst` with `mode` ("noreplace" or "exchange") in one system call.

    Returns False where the system or the file system cannot; raises OSError
    (FileExistsError for "noreplace" onto anything) otherwise.
    """
    call = _rename_call()
    if call is None:
        return False
    kind, fn = call
    a, b = os.fsencode(src), os.fsencode(dst)
    flags = _RENAME_FLAGS[kind][mode]
    rc = fn(_AT_FDCWD, a, _AT_FDCWD, b, flags) if kind == "linux" else fn(a, b, flags)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename the folder `src` to `dst`; FileExistsError if anything is at `dst`."""
    if _atomic_rename(src, dst, "noreplace"):
        return
    if os.name == "nt":
        os.rename(src, dst)  # never replaces on Windows
        return
    # POSIX rename(2) would replace an empty folder: claim the name with mkdir,
    # which fails on anything there, then rename over our own empty claim.
    os.mkdir(dst)
    try:
        os.rename(src, dst)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.rmdir(dst)  # only while it is still our empty claim
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(e.errno, e.strerror, str(dst)) from None
        raise


def _move_into_place(tmp: Path, target: Path, force: bool, protected: _SourceFolders,
                     log: Callable[[str], None]) -> None:
    """Rename the finished folder to `target`, never replacing what `force` does not allow."""
    try:
        try:
            _rename_noreplace(tmp, target)
            return
        except FileExistsError:
            if not force:
                raise TargetExistsError(
                    f"{target} already exists: it appeared while converting (another "
                    "conversion into it?) and was left as it is; pass --force to replace it, "
                    "or choose another output folder") from None
        # What is there now may not be what was checked at the start.
        _refuse_source_overlap(target, protected)
        _check_target(target, force=True)
        if _atomic_rename(tmp, target, "exchange"):
            _remove_replaced(tmp, log)  # tmp now holds the replaced folder
            return
        old = target.with_name(f".{target.name}.{secrets.token_hex(4)}.old")
        os.rename(target, old)
        try:
            _rename_noreplace(tmp, target)
        except BaseException:
            try:
                _rename_noreplace(old, target)
            except OSError:
                raise QwenMLXError(f"{target} changed while it was being replaced; the folder "
                                   f"it held is kept at {old}") from None
            raise
        _remove_replaced(old, log)
    except FileExistsError:
        raise QwenMLXError(f"{target} reappeared while it was being replaced (another "
                           "conversion into it?); it was left as it is") from None
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise QwenMLXError(f"{target} is a mount point or in use, so it cannot be "
                               "replaced: convert into a folder inside it, or another "
                               "one") from None
        raise QwenMLXError(f"cannot move the converted model into {target}: "
                           f"{e.strerror or e}; nothing was written") from None


def _remove_replaced(path: Path, log: Callable[[str], None]) -> None:
    """Delete the folder --force replaced (a replaced link only loses the link)."""
    if path.is_symlink():
        path.unlink()
        return
    errors: list[str] = []
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=lambda fn, p, exc: errors.append(f"{p}: {exc}"))
    else:
        shutil.rmtree(path, onerror=lambda fn, p, exc: errors.append(f"{p}: {exc[1]}"))
    if errors:
        log(f"warning: the replaced folder's old files could not all be removed ({errors[0]}); "
            f"delete {path} by hand")


# How quantized folders are named: Qwen3-0.6B-4bit, -8bit-g64, -mixed_4_6, -MLX-4bit.
_QUANTIZED_SUFFIX = re.compile(r"(-mlx)?-([2-8]bits?|mixed_\d+_\d+|mxfp4|nvfp4)(-g\d+)?(-mlx)?$",
                               re.IGNORECASE)


def dequantized_name(source: str, dtype: str | None = None) -> str:
    """The default --dequantize output: ./X-float (or ./X-bfloat16 with --dtype) for X-4bit."""
    name = _model_name(source)
    return f"{_QUANTIZED_SUFFIX.sub('', name) or name}-{dtype or 'float'}"


def _model_name(source: str | Path) -> str:
    return Path(str(source).rstrip("/")).name or "model"


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"
