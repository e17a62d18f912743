"""RMSNorm as each Qwen generation computes it.

Up to Qwen3 and in Qwen3-VL the norm casts to the model dtype, then
multiplies by w. The hybrids' zero-centred norms multiply by 1 + w in
float32 and cast once (hybrid spec §3.3); the loader stores 1 + w (as
mlx-lm's folders do) and keeps it in float32, so the product is formed in
float32 whatever the compute dtype. The DeltaNet's gated norm is the plain
kind, times SiLU of its gate in float32 (§2.2 step 6).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class RMSNorm(nn.Module):
    """`mx.fast.rms_norm`. The loader keeps a zero-centred norm's 1 + w in float32 and
    sets `output_dtype` to the compute dtype: the product is formed in float32, then
    cast once, as the reference does."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps
        self.output_dtype = None

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.fast.rms_norm(x, self["weight"], self.eps)  # promotes to the wider dtype
        return y if self.output_dtype is None else y.astype(self.output_dtype)


class GatedRMSNorm(nn.Module):
    """y = (w · norm(o)) · SiLU(z): normalized in float32, times w in the model dtype,
    the gate's product in float32."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array, gate: mx.array) -> mx.array:
        dtype = x.dtype
        normed = mx.fast.rms_norm(x.astype(mx.float32), None, self.eps).astype(dtype)
        y = (self["weight"] * normed).astype(mx.float32)
        return (y * nn.silu(gate.astype(mx.float32))).astype(dtype)
