"""Long contexts: Qwen1's layer-wise window attention, and what a context will cost.

Qwen1 (the Qwen technical report, Bai et al. 2023, §2.3 "Context Length
Extension") pairs dynamic NTK and LogN with layer-wise window attention:
"lower layers being more sensitive in context length extension ... we assign
different window sizes to each layer, using shorter windows for lower layers
and longer windows for higher layers". The report gives no numbers and the
released code has no such switch, so it is opt-in here, and the default rule is
ours, stated exactly: with S the training length (`seq_length`), C the context
limit and n layers, layer i attends within

    W_i = round(S + (C - S) * i / (n - 1)),

so layer 0 stays within the trained length, the windows widen linearly with
depth, and the top layer (W = C) attends to the whole context. Off, Qwen1 is
exact.

`context_info` is what a context meter shows: whether Dual Chunk Attention or
YaRN is active, what the KV cache needs at the context limit, and whether a
prompt would fit in the machine's memory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import QwenMLXError
from . import blocked
from .cache import KVCache

GiB = 1 << 30


def qwen1_windows(model) -> tuple[int | None, ...]:
    """The default layer-wise windows (the module docstring's rule) for a Qwen1 model."""
    c = model.config
    n = c.num_layers
    S = int(c.raw.get("seq_length") or c.max_position_embeddings)
    C = model.max_context
    if C <= S or n == 1:
        return (None,) * n
    windows = [round(S + (C - S) * i / (n - 1)) for i in range(n)]
    return tuple(None if w >= C else w for w in windows)


def set_qwen1_window(model, windows: "bool | Sequence[int | None]" = True) -> None:
    """Qwen1 layer-wise window attention: True for the default windows, a list of one
    window (or None: full attention) per layer, False to switch it off. Affects
    forwards and caches made after the call."""
    c = model.config
    if c.family != "qwen":
        raise QwenMLXError(f"{c.source}: layer-wise window attention is a Qwen1 setting; "
                           f"this is a {c.model_type} model (its windows come from its config)")
    if windows is True:
        chosen = qwen1_windows(model)
    elif windows is False:
        chosen = (None,) * c.num_layers
    else:
        chosen = tuple(windows)
        if len(chosen) != c.num_layers or any(
                w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 1)
                for w in chosen):
            raise QwenMLXError(f"qwen1_window: give one window (a positive integer, or None "
                               f"for full attention) per layer, {c.num_layers} in all; "
                               f"got {list(chosen)!r}")
    model.windows = chosen
    for layer, w in zip(model.model.layers, chosen):
        layer.self_attn.window = w


@dataclass(frozen=True)
class ContextInfo:
    """What a context meter shows (see `context_info`)."""

    dca: bool
    dca_chunk: int | None
    yarn_factor: float | None
    context_limit: int
    cache_bytes_at_limit: int
    weights_bytes: int
    memory_bytes: int
    prefill_bytes: int

    def needed(self, cache_bytes: int) -> int:
        """Weights, a cache of `cache_bytes` and one prefill chunk's temporaries."""
        return self.weights_bytes + cache_bytes + self.prefill_bytes

    def describe(self) -> str:
        """One line, e.g. 'DCA on (chunk 262144) · KV cache at 1010000 tokens: 55.5 GiB'."""
        parts = []
        if self.dca:
            parts.append(f"DCA on (chunk {self.dca_chunk})")
        if self.yarn_factor:
            parts.append(f"YaRN x{self.yarn_factor:g}")
        parts.append(f"KV cache at {self.context_limit} tokens: "
                     f"{self.cache_bytes_at_limit / GiB:.1f} GiB")
        parts.append(f"memory {self.memory_bytes / GiB:.0f} GiB")
        return " · ".join(parts)


def machine_memory() -> int:
    """Bytes of memory MLX can use: Metal's recommended working set, else physical RAM."""
    info = mx.device_info()
    for key in ("max_recommended_working_set_size", "memory_size"):
        if info.get(key):
            return int(info[key])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cache_bytes(model, tokens: int, *, kv_bits: int | None = None,
                max_kv_size: int | None = None) -> int:
    """Bytes the caches `model.make_cache(kv_bits, max_kv_size)` hold after `tokens`
    positions (growing caches allocate in steps, which this counts)."""
    c = model.config
    item = model.model.norm.weight.dtype.size
    D, H = c.head_dim, c.num_kv_heads
    if kv_bits is None:
        per_position = 2 * H * D * item
    else:
        group = 64 if D % 64 == 0 else 32
        per_position = 2 * H * (D * kv_bits // 8 + 2 * (D // group) * item)
    total = 0
    for i, kind in enumerate(c.layer_kinds):
        if kind == "linear":
            lc = c.linear
            total += ((lc.conv_kernel - 1) * lc.conv_dim * item
                      + lc.num_value_heads * lc.key_head_dim * lc.value_head_dim * 4)
            continue
        limits = [x for x in (model.windows[i], max_kv_size) if x]
        held = min([tokens, *limits])
        if not limits:
            held = -(-held // KVCache.step) * KVCache.step
        total += held * per_position
    return total


def context_info(model, *, kv_bits: int | None = None, max_kv_size: int | None = None,
                 prefill_chunk: int = 512) -> ContextInfo:
    """Whether DCA or YaRN is active, what the cache needs at the context limit, the
    weights, the machine's memory and a bound on one prefill chunk's temporaries."""
    c = model.config
    weights = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
    item = model.model.norm.weight.dtype.size
    # One chunk's activations (the MLP's are the widest) and the attention score blocks.
    width = max(c.hidden_size * 4, (c.intermediate_size or c.hidden_size) * 3)
    prefill = prefill_chunk * width * item + 3 * blocked.SCORE_BUDGET
    return ContextInfo(
        dca=model.dca is not None, dca_chunk=model.dca.chunk_size if model.dca else None,
        yarn_factor=c.rope.factor if c.rope.rope_type == "yarn" else None,
        context_limit=model.max_context,
        cache_bytes_at_limit=cache_bytes(model, model.max_context, kv_bits=kv_bits,
                                         max_kv_size=max_kv_size),
        weights_bytes=weights, memory_bytes=machine_memory(), prefill_bytes=prefill)


def memory_warning(model, tokens: int, *, kv_bits: int | None = None,
                   max_kv_size: int | None = None, prefill_chunk: int = 512) -> str | None:
    """A warning when weights + the cache for `tokens` positions + one prefill chunk's
    temporaries exceed the machine's memory; None when they fit."""
    info = context_info(model, kv_bits=kv_bits, max_kv_size=max_kv_size,
                        prefill_chunk=prefill_chunk)
    cache = cache_bytes(model, tokens, kv_bits=kv_bits, max_kv_size=max_kv_size)
    need = info.needed(cache)
    if need <= info.memory_bytes:
        return None
    hint = "" if kv_bits == 4 else "; --kv-bits 4 or 8 shrinks the cache"
    return (f"{tokens} tokens need about {need / GiB:.1f} GiB (weights "
            f"{info.weights_bytes / GiB:.1f}, KV cache {cache / GiB:.1f}), more than this "
            f"machine's {info.memory_bytes / GiB:.1f} GiB{hint}, or set --max-kv-size")
