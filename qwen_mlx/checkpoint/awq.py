"""Activation-aware weight quantization (AWQ), with the scales folded into the model.

For each group of linears that read the same input, a per-input-channel scale
s = mean|x|^α (α searched on a grid) multiplies the weights' columns before
quantization, and its inverse is folded into whatever produced the input, so
the float model computes exactly what it did before:
- q/k/v (or a DeltaNet's in_proj_qkv/z/b/a) after input_layernorm: 1/s goes
  into the norm's stored weight (the hybrids' zero-centred norms are stored as
  1 + w, so scaling the stored weight is exact too);
- gate/up after post_attention_layernorm, or for an MoE block every expert's
  gate/up and the shared expert's: one scale for all of them; the routers read
  that input too and stay in floats, so they get W·diag(s) and route as before;
- o_proj after v_proj: 1/s into v_proj's rows (and bias). A v channel feeds one
  o_proj column per query head of its group, so s is chosen per v channel and
  repeated; attention is linear in v and the hybrids' output gate multiplies
  per channel, so the fold stays exact with gated attention as well;
- down_proj after up_proj (dense MLPs and the shared expert): 1/s into up's rows.
The routed experts' down_proj and a DeltaNet's out_proj have no fold here.

The search runs the model's own modules on calibration tokens, layer by layer,
minimizing the block output's squared error against the float block's; an
optional clipping search then shrinks each group of weights' range where that
lowers the quantized output's error. Statistics are gathered from our own code
calling the layers' parts, so the normal forward is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from ..errors import QwenMLXError
from ..model.decoder import DecoderLayer, Model
from ..model.moe import MLP, SparseMoE

# (bits, group_size) for the weight at a module path, or None: kept in floats.
BitsFor = Callable[[str, int], "tuple[int, int] | None"]

GRID = 20
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
CLIP_TOKENS = 512  # tokens the clipping search looks at per weight
# Tokens each grid point's block runs on (the statistics use every calibration token): on
# the CPU a block over 2,048 tokens costs seconds at real widths, 20 times per group.
SEARCH_TOKENS = 512
DEFAULT_SEQ_LEN = 512
DEFAULT_MAX_TOKENS = 2048


def builtin_calibration_text() -> str:
    """The calibration text shipped with qwen-mlx: English, Chinese and code."""
    return resources.files("qwen_mlx.quality").joinpath("calibration.txt").read_text("utf-8")


def calibration_tokens(tokenizer, path: str | Path | None, vocab_size: int, *,
                       seq_len: int = DEFAULT_SEQ_LEN,
                       max_tokens: int = DEFAULT_MAX_TOKENS) -> mx.array:
    """The calibration text (a file, or the built-in one) as [N, seq_len] token ids."""
    if tokenizer is None:
        raise QwenMLXError("AWQ reads a calibration text, but the model has no tokenizer "
                           "(tokenizer.json); add one to the source folder")
    if path is None:
        text = builtin_calibration_text()
    else:
        try:
            text = Path(path).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise QwenMLXError(f"--calibration {path}: cannot be read as UTF-8 text ({e})") \
                from None
    ids = list(tokenizer.encode(text))[:max_tokens]
    if ids and max(ids) >= vocab_size:
        raise QwenMLXError(f"the tokenizer gives id {max(ids)} for the calibration text, beyond "
                           f"the model's vocab_size {vocab_size}: tokenizer and model differ")
    seq_len = min(seq_len, len(ids))
    if seq_len < 16:
        raise QwenMLXError(f"the calibration text {path or '(built-in)'} gives {len(ids)} "
                           "tokens; AWQ needs at least 16: give a longer text")
    n = len(ids) // seq_len
    return mx.array(ids[: n * seq_len]).reshape(n, seq_len)


@dataclass
class GroupReport:
    """One searched group: the chosen exponent and the block's error before and after."""

    name: str
    alpha: float
    plain_error: float  # the block output's mean squared error with plain quantization
    awq_error: float


@dataclass
class AWQResult:
    """What the search changed, in the model's parameter names (float32)."""

    weights: dict[str, mx.array] = field(default_factory=dict)
    # module path -> the scale its weight's columns were multiplied by
    input_scales: dict[str, mx.array] = field(default_factory=dict)
    groups: list[GroupReport] = field(default_factory=list)
    clipped: list[str] = field(default_factory=list)


def fake_quantize(w: mx.array, bits: int, group_size: int) -> mx.array:
    """What a weight reads back as after affine quantization (mx.quantize's)."""
    wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    return mx.dequantize(wq, scales, biases, group_size=group_size, bits=bits).astype(w.dtype)


@dataclass
class _Linear:
    path: str
    module: nn.Module
    spec: "tuple[int, int] | None"  # None: stays in floats (a router), scaled exactly


@dataclass
class _Group:
    name: str
    x: mx.array  # the group's input, [..., C]
    linears: list[_Linear]
    block: Callable[[mx.array], mx.array]  # the block whose output the search compares
    fold: Callable[[mx.array], None]  # divides the producer of x by s
    expand: Callable[[mx.array], mx.array] = lambda s: s  # s per producer channel -> per column
    stat: mx.array | None = None  # mean |x| per producer channel; default: over x's columns
    per_token: bool = True  # the block treats tokens independently (not attention)


def search(model: Model, tokens: mx.array, bits_for: BitsFor, *, clip: bool = False,
           grid: int = GRID, progress: bool = True) -> AWQResult:
    """Search AWQ scales on `tokens` [N, L], fold them into `model` (a float model, changed
    in place) and, with `clip`, clip its weights; returns what changed."""
    from huggingface_hub.utils import tqdm

    result = AWQResult()
    positions = model.positions(0, tokens.shape[1])
    h = model.model.embed_tokens(tokens).astype(mx.float32)
    layers = model.model.layers
    with tqdm(total=len(layers), unit="layer", desc="AWQ search", disable=not progress) as bar:
        for i, layer in enumerate(layers):
            prefix = f"model.layers.{i}"
            changed = _layer(layer, prefix, h, positions, bits_for, grid, clip, result)
            for path in changed:
                module = _module(model, path)
                for key, value in module.parameters().items():
                    if isinstance(value, mx.array):
                        result.weights[f"{path}.{key}"] = value
            h = layer(h, positions)
            mx.eval(h, *result.weights.values())
            bar.update(1)
    return result


def _module(model: nn.Module, path: str) -> nn.Module:
    m = model
    for part in path.split("."):
        m = m[int(part)] if part.isdigit() else m[part]
    return m


class _Capture(nn.Module):
    """Stands in for a linear during the search and records its input."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.seen: mx.array | None = None

    def __call__(self, x: mx.array, *args) -> mx.array:
        self.seen = x
        return self.inner(x, *args)


def _captured(parent: nn.Module, name: str, run: Callable[[], object]) -> mx.array:
    """The input `parent.name` receives while `run` runs."""
    inner = parent[name]
    spy = _Capture(inner)
    setattr(parent, name, spy)
    try:
        run()
    finally:
        setattr(parent, name, inner)
    if spy.seen is None:
        raise QwenMLXError(f"AWQ: {name} was not called")
    return spy.seen


def _layer(layer: DecoderLayer, prefix: str, h: mx.array, positions, bits_for: BitsFor,
           grid: int, clip: bool, result: AWQResult) -> set[str]:
    """Search, fold (and clip) one decoder layer; returns the module paths it changed."""
    changed: set[str] = set()

    def lin(path: str, module) -> _Linear:
        return _Linear(path, module, bits_for(path, module["weight"].shape[-1]))

    def norm_fold(norm, path):
        def fold(s):
            norm.weight = norm["weight"] / s.astype(norm["weight"].dtype)
            changed.add(path)
        return fold

    # 1. The token mixer's input projections, after input_layernorm.
    x = layer.input_layernorm(h)
    norm_path = f"{prefix}.input_layernorm"
    if layer.kind == "linear":
        la, p = layer.linear_attn, f"{prefix}.linear_attn"
        group = _Group(f"{p}.in_proj_*", x, [lin(f"{p}.{n}", la[n]) for n in
                                             ("in_proj_qkv", "in_proj_z", "in_proj_b",
                                              "in_proj_a")],
                       lambda t: la(t), norm_fold(layer.input_layernorm, norm_path),
                       per_token=False)
        _search_group(group, grid, result, changed)
    else:
        attn, p = layer.self_attn, f"{prefix}.self_attn"
        group = _Group(f"{p}.q/k/v_proj", x, [lin(f"{p}.{n}_proj", attn[f"{n}_proj"])
                                              for n in "qkv"],
                       lambda t: attn(t, positions), norm_fold(layer.input_layernorm, norm_path),
                       per_token=False)
        _search_group(group, grid, result, changed)
        # 2. o_proj, folded into v_proj's rows.
        x = layer.input_layernorm(h)
        o_in = _captured(attn, "o_proj", lambda: mx.eval(attn(x, positions)))
        _search_group(_v_o_group(attn, p, o_in, lin, changed), grid, result, changed)

    # 3. The feed-forward block's input projections, after post_attention_layernorm.
    h_mid = h + _mixer(layer, layer.input_layernorm(h), positions)
    x = layer.post_attention_layernorm(h_mid)
    mlp, p = layer.mlp, f"{prefix}.mlp"
    post = norm_fold(layer.post_attention_layernorm, f"{prefix}.post_attention_layernorm")
    if isinstance(mlp, SparseMoE):
        linears = [lin(f"{p}.switch_mlp.{n}", mlp.switch_mlp[n]) for n in ("gate_proj", "up_proj")]
        linears.append(_Linear(f"{p}.gate", mlp.gate, None))  # the router: exact, in floats
        if mlp.has_shared:
            linears += [lin(f"{p}.shared_expert.{n}", mlp.shared_expert[n])
                        for n in ("gate_proj", "up_proj")]
            linears.append(_Linear(f"{p}.shared_expert_gate", mlp.shared_expert_gate, None))
        _search_group(_Group(f"{p} experts' gate/up", x, linears, lambda t: mlp(t), post),
                      grid, result, changed)
    else:
        _search_group(_Group(f"{p}.gate/up_proj", x, [lin(f"{p}.{n}", mlp[n]) for n in
                                                      ("gate_proj", "up_proj")],
                             lambda t: mlp(t), post), grid, result, changed)

    # 4. down_proj, folded into up_proj's rows (dense MLPs and the shared expert).
    x = layer.post_attention_layernorm(h_mid)
    dense = [(mlp, p)] if isinstance(mlp, MLP) else (
        [(mlp.shared_expert, f"{p}.shared_expert")] if mlp.has_shared else [])
    for m, mp in dense:
        _search_group(_up_down_group(m, mp, x, lin, changed), grid, result, changed)

    if clip:
        _clip_layer(layer, prefix, h, positions, bits_for, result, changed)
    return changed


def _mixer(layer: DecoderLayer, x: mx.array, positions) -> mx.array:
    return layer.linear_attn(x) if layer.kind == "linear" else layer.self_attn(x, positions)


def _v_o_group(attn, p: str, o_in: mx.array, lin, changed: set[str]) -> _Group:
    group = attn.num_heads // attn.num_kv_heads
    D = attn.head_dim

    def expand(s_v: mx.array) -> mx.array:
        # o column h·D + d reads v channel (h // group)·D + d.
        return mx.repeat(s_v.reshape(attn.num_kv_heads, 1, D), group, axis=1).reshape(-1)

    # The per-v-channel statistic: the mean over the query heads that read the channel.
    stat = mx.abs(o_in).reshape(-1, attn.num_kv_heads, group, D).mean(axis=(0, 2)).reshape(-1)
    return _Group(f"{p}.o_proj", o_in, [lin(f"{p}.o_proj", attn.o_proj)],
                  lambda t: attn.o_proj(t), _rows_fold(attn.v_proj, f"{p}.v_proj", changed),
                  expand=expand, stat=stat)


def _up_down_group(mlp: MLP, p: str, x: mx.array, lin, changed: set[str]) -> _Group:
    d_in = nn.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
    return _Group(f"{p}.down_proj", d_in, [lin(f"{p}.down_proj", mlp.down_proj)],
                  lambda t: mlp.down_proj(t), _rows_fold(mlp.up_proj, f"{p}.up_proj", changed))


def _rows_fold(linear, path: str, changed: set[str]) -> Callable[[mx.array], None]:
    """Divides the output rows (and bias) of the linear that produces a group's input."""
    def fold(s: mx.array) -> None:
        linear.weight = linear["weight"] / s[:, None]
        if "bias" in linear:
            linear.bias = linear["bias"] / s
        changed.add(path)
    return fold


def _search_group(group: _Group, grid: int, result: AWQResult, changed: set[str]) -> None:
    """Pick α on the grid for one group, then fold its scale in."""
    stat = group.stat
    if stat is None:
        stat = mx.abs(group.x.astype(mx.float32)).reshape(-1, group.x.shape[-1]).mean(axis=0)
    quantized = [g for g in group.linears if g.spec is not None]
    if not quantized:
        return
    x = _search_sample(group.x.astype(mx.float32), group.per_token)
    reference = group.block(x)
    originals = [g.module["weight"] for g in group.linears]
    stat = mx.maximum(stat, 1e-8)
    best = (float("inf"), 0.0, None)
    plain = None
    try:
        for step in range(grid):
            alpha = step / grid
            s = stat ** alpha
            s = s / mx.sqrt(s.max() * s.min())
            cols = group.expand(s)
            for g, w in zip(group.linears, originals):
                if g.spec is not None:
                    g.module.weight = fake_quantize(w * cols, *g.spec) / cols
            err = mx.mean((group.block(x) - reference) ** 2).item()
            if step == 0:
                plain = err
            if err < best[0]:
                best = (err, alpha, s)
    finally:
        for g, w in zip(group.linears, originals):
            g.module.weight = w
    err, alpha, s = best
    result.groups.append(GroupReport(group.name, alpha, plain, err))
    if alpha == 0.0:
        return  # s would be a constant: nothing to fold
    cols = group.expand(s)
    for g in group.linears:
        g.module.weight = g.module["weight"] * cols.astype(g.module["weight"].dtype)
        result.input_scales[g.path] = cols
        changed.add(g.path)
    group.fold(s)
    mx.eval([g.module["weight"] for g in group.linears])


def _search_sample(x: mx.array, per_token: bool) -> mx.array:
    """About SEARCH_TOKENS of the group's input: evenly spaced tokens, or for a block
    that mixes positions, whole sequences."""
    if per_token:
        flat = x.reshape(-1, x.shape[-1])
        step = max(1, flat.shape[0] // SEARCH_TOKENS)
        return flat[::step][:SEARCH_TOKENS][None]
    return x[:max(1, SEARCH_TOKENS // x.shape[1])]


def _clip_layer(layer: DecoderLayer, prefix: str, h: mx.array, positions, bits_for: BitsFor,
                result: AWQResult, changed: set[str]) -> None:
    """Clip the (scaled) dense weights whose quantized output error that lowers.

    q and k are left alone, as in the AWQ paper (their error is amplified by the
    softmax); a DeltaNet's projections too (its recurrence compounds their error),
    and the routed experts (each sees a token subset the router picks)."""
    x = layer.input_layernorm(h)
    targets: list[tuple[str, nn.Module, mx.array]] = []
    if layer.kind == "attention":
        attn, p = layer.self_attn, f"{prefix}.self_attn"
        targets.append((f"{p}.v_proj", attn.v_proj, x))
        o_in = _captured(attn, "o_proj", lambda: mx.eval(attn(x, positions)))
        targets.append((f"{p}.o_proj", attn.o_proj, o_in))
    h_mid = h + _mixer(layer, x, positions)
    x2 = layer.post_attention_layernorm(h_mid)
    mlp, p = layer.mlp, f"{prefix}.mlp"
    dense = [(mlp, p)] if isinstance(mlp, MLP) else (
        [(mlp.shared_expert, f"{p}.shared_expert")] if mlp.has_shared else [])
    for m, mp in dense:
        targets += [(f"{mp}.gate_proj", m.gate_proj, x2), (f"{mp}.up_proj", m.up_proj, x2)]
        targets.append((f"{mp}.down_proj", m.down_proj,
                        nn.silu(m.gate_proj(x2)) * m.up_proj(x2)))
    for path, module, inp in targets:
        spec = bits_for(path, module["weight"].shape[-1])
        if spec is None:
            continue
        module.weight = clip_weight(module["weight"], inp, *spec)
        result.clipped.append(path)
        changed.add(path)


def clip_weight(w: mx.array, x: mx.array, bits: int, group_size: int,
                ratios=CLIP_GRID) -> mx.array:
    """`w` [out, in] with each (row, group)'s range clipped to the fraction of its
    largest magnitude that gives the quantized group's output on `x` the least error."""
    out_dims, in_dims = w.shape
    n = in_dims // group_size
    xs = x.reshape(-1, in_dims).astype(mx.float32)
    step = max(1, xs.shape[0] // CLIP_TOKENS)
    xs = xs[::step][:CLIP_TOKENS].reshape(-1, n, group_size)  # [T, n, g]
    w32 = w.astype(mx.float32)
    rows = []
    chunk = max(1, 2**24 // max(1, xs.shape[0] * n))  # rows per pass, bounding [T, rows, n]
    for start in range(0, out_dims, chunk):
        wg = w32[start:start + chunk].reshape(-1, n, group_size)  # [o, n, g]
        reference = mx.einsum("tng,ong->ton", xs, wg)
        top = mx.abs(wg).max(axis=-1, keepdims=True)  # [o, n, 1]
        best_err = mx.full(top.shape[:2], float("inf"))
        best_max = top[..., 0]
        for r in ratios:
            m = top * r
            q = fake_quantize(mx.clip(wg, -m, m).reshape(-1, in_dims), bits, group_size)
            err = ((mx.einsum("tng,ong->ton", xs, q.reshape(wg.shape)) - reference) ** 2
                   ).mean(axis=0)
            better = err < best_err
            best_err = mx.where(better, err, best_err)
            best_max = mx.where(better, m[..., 0], best_max)
            mx.eval(best_err, best_max)
        rows.append(mx.clip(wg, -best_max[..., None], best_max[..., None]).reshape(-1, in_dims))
    return mx.concatenate(rows, axis=0).astype(w.dtype)


def prepare(source: Path, bits_for: BitsFor, *, calibration: str | Path | None = None,
            clip: bool = False, progress: bool = True,
            log: Callable[[str], None] = print) -> Callable[[str, mx.array], mx.array]:
    """Load `source` in float32, search and fold AWQ scales on the calibration text, and
    return what the converter calls on each output tensor (its name in the output layout,
    the tensor) to get the folded one."""
    from .loader import load

    model, tokenizer = load(source, dtype="float32")
    tokens = calibration_tokens(tokenizer, calibration, model.config.vocab_size)
    result = search(model, tokens, bits_for, clip=clip, progress=progress)
    searched = [g for g in result.groups if g.plain_error > 0]
    if searched:
        gain = sum(g.plain_error / max(g.awq_error, 1e-30) for g in searched) / len(searched)
        log(f"AWQ: {len(searched)} groups searched on {tokens.size} calibration tokens; "
            f"block output error {gain:.2f}x lower than plain quantization on average"
            + (f"; {len(result.clipped)} weights clipped" if clip else ""))
    return _Replacer(model.config, result)


class _Replacer:
    """Maps the converter's output names onto the folded weights (Qwen1's fused c_attn
    and Qwen3-Next's grouped projections included)."""

    def __init__(self, config, result: AWQResult):
        self.config, self.result = config, result

    def __call__(self, name: str, t: mx.array) -> mx.array:
        from .weights import QWEN1_C_ATTN, GROUPED_LINEAR, qwen1_name

        weights = self.result.weights
        if self.config.family == "qwen":
            m = QWEN1_C_ATTN.match(name)
            if m:
                layer, suffix = m.groups()
                H = self.config.hidden_size
                parts = [weights.get(f"model.layers.{layer}.self_attn.{p}.{suffix}")
                         for p in ("q_proj", "k_proj", "v_proj")]
                if all(p is None for p in parts):
                    return t
                parts = [t[i * H:(i + 1) * H] if p is None else p.astype(t.dtype)
                         for i, p in enumerate(parts)]
                return mx.concatenate(parts, axis=0)
            name = qwen1_name(name)
        m = GROUPED_LINEAR.match(name)
        if m:
            # A row permutation of in_proj_qkv/z (b/a): the columns' scale applies as it is.
            s = self.result.input_scales.get(f"{m.group(1)}.in_proj_qkv")
            if s is None or m.group(3) != "weight":
                return t
            return (t.astype(mx.float32) * s).astype(t.dtype)
        w = weights.get(name)
        if w is None:
            return t
        if tuple(w.shape) != tuple(t.shape):
            raise QwenMLXError(f"AWQ: '{name}' has shape {list(t.shape)} in the output but "
                               f"{list(w.shape)} in the model")
        return w.astype(t.dtype)
