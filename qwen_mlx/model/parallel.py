"""Matmuls that use every CPU core.

MLX's CPU backend runs one matmul on one thread, so on mlx[cpu] a forward
pass would keep a single core busy while the others idle. Each CPU stream
runs on its own thread, so the layers here (and attention's KV-head groups
and the MoE experts, through `split`) divide a matmul's output into one
share per core, compute the shares on separate streams at once and join
them. Every output element is the same dot product as before. On Metal and
CUDA one kernel already fills the device; there nothing is split.

The classes keep mlx.nn's parameter names, so checkpoints are unchanged.
`QWEN_MLX_THREADS=N` sets the number of cores used (1 turns splitting off).
"""

from __future__ import annotations

import os
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from ..errors import QwenMLXError

# Below this many weights per matmul, handing work to other threads costs
# more than it saves (a 4-bit 512x1024 decode matmul still gains: 0.43 -> 0.32 ms).
MIN_PARALLEL_WEIGHTS = 256 * 1024
MAX_STREAMS = 8
# From this many input rows (a prefill chunk) the CPU multiplies faster by
# dequantizing a weight slice and using its float matmul than with quantized_matmul
# (1024x1024, 512 rows: 133 vs 184 ms).
DEQUANTIZE_ROWS = 256
# ... up to this many weights per slice: the float copy is transient, but a whole
# vocabulary head's would be hundreds of MB.
DEQUANTIZE_MAX = 32 * 1024 * 1024

_streams: list | None = None


def cpu_count() -> int:
    """QWEN_MLX_THREADS, else the cores this process may run on (a container's
    limit, not the host's)."""
    if (wanted := os.environ.get("QWEN_MLX_THREADS")) is not None:
        if not wanted.strip().isdigit() or int(wanted) < 1:
            raise QwenMLXError(f"QWEN_MLX_THREADS={wanted!r}: give a whole number of CPU "
                               "threads, such as 4 (1 uses a single core)")
        return int(wanted)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def cpu_streams() -> list:
    """One CPU stream per core when the default device is the CPU; else none.

    Thread-local streams: an MLX stream only runs on the thread that made it,
    and callers (the chat UI, a server) may generate on any thread.
    """
    global _streams
    if mx.default_device() != mx.cpu:
        return []
    if _streams is None:
        n = min(cpu_count(), MAX_STREAMS)
        _streams = [mx.new_thread_local_stream(mx.cpu) for _ in range(n)] if n > 1 else []
    return _streams


def split(count: int, weights: int, fn: Callable[[slice], mx.array],
          axis: int = -1) -> mx.array | None:
    """`fn(part)` for each core's share of range(count), run at once and joined on
    `axis`; None when the work is too small to gain or there is one core.
    When `fn` returns a tuple, each of its arrays is joined on `axis`."""
    streams = cpu_streams()
    if len(streams) < 2 or weights < MIN_PARALLEL_WEIGHTS or count < len(streams):
        return None
    n = len(streams)
    bounds = [count * i // n for i in range(n + 1)]
    parts = []
    for i, stream in enumerate(streams):
        with mx.stream(stream):
            parts.append(fn(slice(bounds[i], bounds[i + 1])))
    if isinstance(parts[0], tuple):
        return tuple(mx.concatenate(list(p), axis=axis) for p in zip(*parts))
    return mx.concatenate(parts, axis=axis)


def _quantized(x: mx.array, layer, rows: slice) -> mx.array:
    w, scales, biases = layer["weight"][rows], layer["scales"][rows], layer.get("biases")
    biases = None if biases is None else biases[rows]
    if x.size // x.shape[-1] >= DEQUANTIZE_ROWS and w.size * 32 // layer.bits <= DEQUANTIZE_MAX:
        return x @ mx.dequantize(w, scales, biases, layer.group_size, layer.bits,
                                 mode=layer.mode).astype(x.dtype).T
    return mx.quantized_matmul(x, w, scales=scales, biases=biases, transpose=True,
                               group_size=layer.group_size, bits=layer.bits, mode=layer.mode)


def _weights(layer) -> tuple[int, int]:
    rows, packed = layer["weight"].shape
    return rows, rows * packed * 32 // layer.bits


class QuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        y = split(*_weights(self), lambda s: _quantized(x, self, s))
        if y is None:
            return super().__call__(x)
        return y + self["bias"] if "bias" in self else y


class Linear(nn.Linear):
    def __call__(self, x: mx.array) -> mx.array:
        rows, cols = self["weight"].shape
        y = split(rows, rows * cols, lambda s: x @ self["weight"][s].T)
        if y is None:
            return super().__call__(x)
        return y + self["bias"] if "bias" in self else y

    def to_quantized(self, group_size: int | None = None, bits: int | None = None,
                     mode: str = "affine", quantize_input: bool = False):
        if quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        return QuantizedLinear.from_linear(self, group_size, bits, mode)


class QuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        y = split(*_weights(self), lambda s: _quantized(x, self, s))
        return super().as_linear(x) if y is None else y


class Embedding(nn.Embedding):
    def as_linear(self, x: mx.array) -> mx.array:
        rows, cols = self.weight.shape
        y = split(rows, rows * cols, lambda s: x @ self.weight[s].T)
        return super().as_linear(x) if y is None else y

    def to_quantized(self, group_size: int | None = None, bits: int | None = None,
                     mode: str = "affine", quantize_input: bool = False):
        if quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        return QuantizedEmbedding.from_embedding(self, group_size, bits, mode)
