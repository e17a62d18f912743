"""What one rank keeps of each parameter, and the module surgery both modes share.

A `Plan` maps a parameter name to the slices this rank keeps (ranges on one axis,
joined), or says the rank drops it or zeroes it; anything else is replicated. The
same plan slices the parameters of a model already in memory and, in the loader, the
checkpoint tensors as they are read (`qwen_mlx.checkpoint.loader.load(shard=...)`), so
a rank never holds more than its share beyond one tensor in flight.

Modules are sharded from outside the model code: their parameters are replaced by
slices and their class by a subclass that adds the communication (`swap`), so the
parameter names, and the checkpoint's, are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import QwenMLXError

Ranges = tuple[tuple[int, int], ...]


@dataclass
class Plan:
    """Per-parameter instructions for one rank; see the module docstring."""

    slices: dict[str, tuple[int, Ranges]] = field(default_factory=dict)
    drop: set[str] = field(default_factory=set)
    drop_prefixes: list[str] = field(default_factory=list)
    zero: set[str] = field(default_factory=set)

    def dropped(self, name: str) -> bool:
        return name in self.drop or name.startswith(tuple(self.drop_prefixes))

    def take(self, name: str, w: mx.array) -> mx.array | None:
        """This rank's part of parameter `name` (None: not kept here)."""
        if self.dropped(name):
            return None
        if name in self.zero:
            return mx.zeros_like(w)
        if name not in self.slices:
            return w
        axis, ranges = self.slices[name]
        parts = [_index(w, axis, a, b) for a, b in ranges]
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=axis)


def _index(w: mx.array, axis: int, a: int, b: int) -> mx.array:
    index = [slice(None)] * w.ndim
    index[axis] = slice(a, b)
    return w[tuple(index)]


def owned(x: mx.array, source: mx.array) -> mx.array:
    """`x` in a buffer of its own: a slice shares its source's buffer, which would keep
    the whole tensor resident."""
    return x if x is source else x * 1


def apply(module: nn.Module, path: str, plan: Plan) -> None:
    """Replace `module`'s own parameters (at model path `path`) by what `plan` keeps."""
    for key, value in list(module.items()):
        if isinstance(value, mx.array):
            kept = plan.take(f"{path}.{key}", value)
            if kept is None:
                del module[key]
            else:
                module[key] = kept


def parameter_names(module: nn.Module, path: str) -> list[str]:
    return [f"{path}.{k}" for k, _ in tree_flatten(module.parameters())]


def split_out(plan: Plan, module: nn.Module, path: str, ranges: Ranges) -> None:
    """Keep output rows `ranges` (weight, scales, biases and bias alike) of a linear or
    stacked-expert module, on axis 0 of every parameter."""
    for key, value in list(module.items()):
        if isinstance(value, mx.array):
            plan.slices[f"{path}.{key}"] = (0, ranges)
    apply(module, path, plan)


def split_in(plan: Plan, module: nn.Module, path: str, ranges: Ranges, rank: int,
             where: str) -> None:
    """Keep input columns `ranges` of a linear module whose outputs the ranks then sum;
    its bias is added once (rank 0). Quantized weights split on group boundaries only."""
    weight = module["weight"]
    in_dims = weight.shape[-1]
    bits = getattr(module, "bits", None)
    if "scales" in module:
        in_dims = weight.shape[-1] * 32 // bits
        group = module.group_size
        for a, b in ranges:
            if a % group or b % group:
                raise QwenMLXError(
                    f"{where}: {path} is quantized in groups of {group} inputs, but this "
                    f"rank's share starts or ends at input {a if a % group else b}, inside a "
                    "group; use fewer ranks, pipeline mode, or a checkpoint quantized with a "
                    "smaller group size")
    for key, value in list(module.items()):
        if not isinstance(value, mx.array):
            continue
        name = f"{path}.{key}"
        if key == "bias":
            if rank:
                plan.zero.add(name)
            continue
        per = value.shape[-1] / in_dims  # columns of this tensor per input
        plan.slices[name] = (-1, tuple((int(a * per), int(b * per)) for a, b in ranges))
    apply(module, path, plan)


def drop_module(plan: Plan, parent: nn.Module, key: str, path: str,
                replacement: nn.Module) -> None:
    """Drop every parameter under `path` and put `replacement` where the module was."""
    plan.drop_prefixes.append(path + ".")
    setattr(parent, key, replacement)


class Idle(nn.Module):
    """What a rank holds in place of a block it does not run: its output is zero."""

    def __call__(self, x: mx.array, *args, **kwargs) -> mx.array:
        return mx.zeros_like(x)


_SUBCLASSES: dict[tuple[type, type], type] = {}


def swap(module: nn.Module, mixin: type, **attrs) -> nn.Module:
    """Give `module` the class `mixin` + its own class (made once per pair), and `attrs`."""
    base = type(module)
    if issubclass(base, mixin):
        base = base.__mro__[2]  # already swapped: swap the original class again
    key = (mixin, base)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"{mixin.__name__}{base.__name__}", (mixin, base), {})
    module.__class__ = _SUBCLASSES[key]
    for k, v in attrs.items():
        object.__setattr__(module, k, v)
    return module


def even_ranges(count: int, size: int, rank: int, what: str, where: str) -> tuple[int, int]:
    """Rank `rank`'s contiguous share of `count` items; they must divide evenly."""
    if count % size:
        raise QwenMLXError(f"{where}: {what} ({count}) does not divide by the {size} ranks; "
                           f"use a number of ranks that divides {count}, or pipeline mode")
    n = count // size
    return rank * n, (rank + 1) * n


def head_range(count: int, size: int, rank: int, what: str, where: str) -> tuple[int, int]:
    """The heads of a kind (KV heads, DeltaNet key heads) this rank needs when the heads
    that read them are split evenly: a share when they divide by the ranks, else the
    one head its share reads (replicated on size/count ranks)."""
    if count % size == 0:
        return rank * count // size, (rank + 1) * count // size
    if size % count == 0:
        h = rank * count // size
        return h, h + 1
    raise QwenMLXError(f"{where}: {what} ({count}) and the {size} ranks do not divide one "
                       "another; use a number of ranks that divides it or is a multiple of it, "
                       "or pipeline mode")
