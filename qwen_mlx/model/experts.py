"""Stacked MoE experts run through `mx.gather_mm` / `mx.gather_qmm`.

Expert weights are stacked as [E, out, in], the layout mlx-lm writes under
`switch_mlp`, so one gathered matmul runs every token's chosen experts.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from . import parallel

# Below this many (token, expert) pairs the gather is cheap enough unsorted;
# above it, sorting by expert lets each expert's weights be read once.
SORT_THRESHOLD = 64


class SwitchLinear(nn.Module):
    """E linear layers without bias, stored as one [E, out, in] weight."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        scale = math.sqrt(1 / input_dims)
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        # The loader keeps these weights in float32 on the CPU, whose gather_mm
        # supports nothing else; the casts are no-ops everywhere else.
        y = mx.gather_mm(x.astype(self.weight.dtype), self.weight.swapaxes(-1, -2),
                         rhs_indices=indices, sorted_indices=sorted_indices)
        return y.astype(x.dtype)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine", **_):
        return QuantizedSwitchLinear(self.weight, group_size, bits, mode)


class QuantizedSwitchLinear(nn.Module):
    """`SwitchLinear` with quantized weights, for `mx.gather_qmm`."""

    def __init__(self, weight: mx.array, group_size: int = 64, bits: int = 4,
                 mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.weight, self.scales, *biases = mx.quantize(weight, group_size, bits, mode=mode)
        if biases:
            self.biases = biases[0]
        self.freeze()

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(x, self["weight"], self["scales"], self.get("biases"),
                             rhs_indices=indices, transpose=True, group_size=self.group_size,
                             bits=self.bits, mode=self.mode, sorted_indices=sorted_indices)


class SwitchGLU(nn.Module):
    """Each token's top-k experts: down(silu(gate(x)) * up(x)), width `hidden_dims`."""

    def __init__(self, input_dims: int, hidden_dims: int, num_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(input_dims, hidden_dims, num_experts)
        self.up_proj = SwitchLinear(input_dims, hidden_dims, num_experts)
        self.down_proj = SwitchLinear(hidden_dims, input_dims, num_experts)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x [..., H], indices [..., k] -> each chosen expert's output [..., k, H]."""
        k = indices.shape[-1]
        x = mx.expand_dims(x, (-2, -3))
        if indices.size >= SORT_THRESHOLD:
            flat = indices.flatten()
            order = mx.argsort(flat)
            x, idx = x.flatten(0, -3)[order // k], flat[order]
            # Each core takes a contiguous run of the sorted pairs, so mostly its own experts.
            y = parallel.split(idx.size, self._work(idx.size),
                               lambda s: self._experts(x[s], idx[s], True), axis=0)
            if y is None:
                y = self._experts(x, idx, True)
            y = mx.unflatten(y[mx.argsort(order)], 0, indices.shape)
        else:
            # Decoding: each core runs some of the token's k experts.
            y = parallel.split(k, self._work(indices.size),
                               lambda s: self._experts(x, indices[..., s], False), axis=-3)
            if y is None:
                y = self._experts(x, indices, False)
        return y.squeeze(-2)

    def _experts(self, x: mx.array, idx: mx.array, sorted_indices: bool) -> mx.array:
        h = nn.silu(self.gate_proj(x, idx, sorted_indices)) * self.up_proj(x, idx, sorted_indices)
        return self.down_proj(h, idx, sorted_indices)

    def _work(self, pairs: int) -> int:
        """Weights the chosen experts hold: decides whether splitting across cores pays."""
        intermediate, hidden = self.gate_proj["weight"].shape[1], self.down_proj["weight"].shape[1]
        return pairs * 3 * intermediate * hidden
