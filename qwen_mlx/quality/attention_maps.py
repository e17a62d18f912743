"""Attention maps of a prompt, per layer and head, and their PNG heatmaps.

Captured only on request: `capture` runs the model's layers itself (embedding,
then per layer the norm, the attention's own q/k projections, QK norm, RoPE
through `Model.positions`), forms softmax(q·kᵀ·scale) under the causal (and
sliding-window) mask, then runs the layer's ordinary forward to go on. The
normal forward is not touched, so it keeps its speed.

Gated DeltaNet layers have no softmax, but their output is still a weighted
sum of the (convolved) values: with S_t = e^{g_t}(I - β_t k_t k_tᵀ) S_{t-1} +
β_t k_t v_tᵀ and o_t = S_tᵀ q_t, unrolling gives o_t = Σ_{s≤t} A[t, s] v_s with
A[t, s] = β_s k_sᵀ M_{s+1} ⋯ M_t q_t, M_j = e^{g_j}(I - β_j k_j k_jᵀ). That A is
the layer's exact "effective attention" for a prompt run from an empty state:
signed and unnormalized (rows do not sum to 1), and it covers the recurrence
only, not the short causal conv before it, which mixes each position with the
three before it. It is computed on request too (O(L²·d) per head).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import numpy as np

from ..errors import QwenMLXError

DELTANET_NOTE = ("Gated DeltaNet layers have no softmax attention; their map is the "
                 "recurrence's effective attention A[t, s] (o_t = Σ A[t, s]·v_s), signed and "
                 "unnormalized, over the values after the layer's short causal conv")


@dataclass
class LayerMap:
    index: int
    kind: str  # "attention" (softmax probabilities) or "linear" (effective attention)
    weights: np.ndarray  # [heads, L, L] float32, row = query position, column = key


@dataclass
class AttentionMaps:
    ids: list[int]
    labels: list[str]  # each token decoded, whitespace made visible
    special: list[bool]  # control tokens such as <|im_start|>
    layers: list[LayerMap] = field(default_factory=list)

    def select(self, layer: "int | str" = "mean", head: "int | str" = "mean") -> np.ndarray:
        """One [L, L] map: a layer (index) or the mean over the softmax-attention
        layers ("mean"), then a head (index) or the mean over heads ("mean")."""
        if layer == "mean":
            chosen = [m for m in self.layers if m.kind == "attention"]
            if not chosen:
                raise QwenMLXError("this model has no softmax-attention layer to average; "
                                   "pick a layer with --layer N (" + DELTANET_NOTE + ")")
            stack = np.stack([_head(m, head) for m in chosen])
            return stack.mean(axis=0)
        return _head(self.layer(int(layer)), head)

    def layer(self, index: int) -> LayerMap:
        for m in self.layers:
            if m.index == index:
                return m
        have = [m.index for m in self.layers]
        raise QwenMLXError(f"layer {index} was not captured; the model's layers are "
                           f"{have[0]}-{have[-1]}" if have else "no layer was captured")


def _head(m: LayerMap, head: "int | str") -> np.ndarray:
    if head == "mean":
        return m.weights.mean(axis=0)
    h = int(head)
    if not 0 <= h < m.weights.shape[0]:
        raise QwenMLXError(f"head {h} does not exist: layer {m.index} has "
                           f"{m.weights.shape[0]} heads (0-{m.weights.shape[0] - 1})")
    return m.weights[h]


def capture(model, ids: Sequence[int], *, layers: Sequence[int] | None = None) -> list[LayerMap]:
    """The maps of the layers `layers` (default: all) for the prompt `ids`."""
    tokens = mx.array([list(ids)])
    L = tokens.shape[1]
    wanted = set(range(len(model.model.layers)) if layers is None else layers)
    for i in wanted:
        if not 0 <= i < len(model.model.layers):
            raise QwenMLXError(f"layer {i} does not exist: the model has "
                               f"{len(model.model.layers)} layers (0-{len(model.model.layers) - 1})")
    positions = model.positions(0, L)
    h = model.model.embed_tokens(tokens)
    out = []
    for i, layer in enumerate(model.model.layers):
        if i in wanted:
            x = layer.input_layernorm(h)
            if layer.kind == "linear":
                out.append(LayerMap(i, "linear", effective_attention(layer.linear_attn, x)[0]))
            else:
                out.append(LayerMap(i, "attention", np.array(
                    attention_probs(layer.self_attn, x, positions)[0])))
        if i >= max(wanted):
            break
        h = layer(h, positions)
    return out


def attention_probs(attn, x: mx.array, positions) -> mx.array:
    """softmax(q·kᵀ·scale) [B, heads, L, L] in float32, as `Attention` forms q and k."""
    L = x.shape[1]
    q, k, _, _ = attn.project(x)
    q, k = attn.rotate(q, k, positions)
    k = mx.repeat(k, attn.num_heads // attn.num_kv_heads, axis=1)
    scores = (q.astype(mx.float32) @ k.astype(mx.float32).swapaxes(-1, -2)) * positions.softmax_scale
    qi = mx.arange(L)[:, None]
    kj = mx.arange(L)[None, :]
    visible = kj <= qi
    if attn.window is not None:
        visible = visible & (kj > qi - attn.window)
    return mx.softmax(mx.where(visible, scores, -mx.inf), axis=-1)


def deltanet_inputs(la, x: mx.array):
    """q, k (normalized, q scaled, repeated per value head), v, g, β of a Gated DeltaNet
    for an uncached input, as its forward forms them: [B, Hv, L, D] and [B, Hv, L]."""
    q, k, v, g, beta, _, _ = la.rule_inputs(x)
    return q, k, v, g, beta


def effective_attention(la, x: mx.array) -> np.ndarray:
    """A [B, Hv, L, L] with o_t = Σ_s A[t, s]·v_s for the delta rule from an empty state."""
    q, k, _, g, beta = (np.array(t) for t in deltanet_inputs(la, x))
    B, H, L, _ = q.shape
    A = np.zeros((B, H, L, L), np.float32)
    # w[t] holds M_{s+1} ⋯ M_t q_t while s walks down from the last position.
    w = np.zeros_like(q)
    for s in range(L - 1, -1, -1):
        w[:, :, s] = q[:, :, s]
        ks = k[:, :, s]  # [B, H, Dk]
        dots = np.einsum("bhtd,bhd->bht", w, ks)
        A[:, :, :, s] = beta[:, :, s, None] * dots
        w = np.exp(g[:, :, s])[..., None, None] * (
            w - beta[:, :, s, None, None] * dots[..., None] * ks[:, :, None, :])
    A *= np.tril(np.ones((L, L), bool))
    return A


def token_labels(tokenizer, ids: Sequence[int]) -> tuple[list[str], list[bool]]:
    """Each token decoded on its own (whitespace made visible), and which are special."""
    special = set(getattr(tokenizer, "special_ids", ()) or ())
    labels = []
    for i in ids:
        text = tokenizer.decode([i], skip_special_tokens=False) if tokenizer else str(i)
        text = text.replace("\n", "\\n").replace("\t", "\\t")
        labels.append(text if text.strip() else text.replace(" ", "␣") or f"<{i}>")
    return labels, [i in special for i in ids]


def attention_maps(model, tokenizer, ids: Sequence[int], *,
                   layers: Sequence[int] | None = None) -> AttentionMaps:
    """Every requested layer's map for the prompt `ids`, with its token labels."""
    if len(ids) < 1:
        raise QwenMLXError("the prompt is empty: attention maps need at least one token")
    labels, special = token_labels(tokenizer, ids)
    return AttentionMaps(list(ids), labels, special, capture(model, ids, layers=layers))


def save_png(maps: AttentionMaps, path: str | Path, *, layer: "int | str" = "mean",
             head: "int | str" = "mean", title: str | None = None) -> Path:
    """A heatmap of `maps.select(layer, head)`, tokens on both axes (special ones in red),
    written atomically to `path`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise QwenMLXError("attention heatmaps need matplotlib: pip install "
                           "'qwen-mlx[plots]' (or pip install matplotlib)") from None
    grid = maps.select(layer, head)
    L = grid.shape[0]
    linear = layer != "mean" and maps.layer(int(layer)).kind == "linear"
    size = min(24.0, max(5.0, 0.22 * L + 2.5))
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    masked = np.ma.masked_where(~np.tril(np.ones((L, L), bool)), grid)
    if linear:
        bound = float(np.abs(grid).max()) or 1.0
        im = ax.imshow(masked, cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest")
    else:
        from matplotlib.colors import PowerNorm

        im = ax.imshow(masked, cmap="viridis", norm=PowerNorm(0.5, 0, max(grid.max(), 1e-9)),
                       interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02,
                 label="effective attention" if linear else "attention probability")
    font = max(4.0, min(9.0, 300.0 / max(L, 1)))
    ax.set_xticks(range(L), maps.labels, rotation=90, fontsize=font)
    ax.set_yticks(range(L), maps.labels, fontsize=font)
    for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
        for label, is_special in zip(ticks, maps.special):
            if is_special:
                label.set_color("crimson")
                label.set_fontweight("bold")
    for j, is_special in enumerate(maps.special):
        if is_special:  # the column keys attend to: where special tokens draw attention
            ax.axvline(j, color="crimson", lw=0.4, alpha=0.5)
    ax.set_xlabel("key (attended) token")
    ax.set_ylabel("query token")
    which = "mean over softmax layers" if layer == "mean" else f"layer {layer}"
    which += ", mean over heads" if head == "mean" else f", head {head}"
    ax.set_title((title + "\n" if title else "") + which + (
        "\n(Gated DeltaNet: effective attention of the recurrence)" if linear else ""),
        fontsize=10)
    fig.tight_layout()
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    except OSError as e:
        raise QwenMLXError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return path


def prompt_ids(tokenizer, prompt: str, *, chat: bool = True, system: str | None = None) -> list[int]:
    """The prompt's ids: as a user turn through the chat template (the default, when the
    tokenizer has one), else the plain text."""
    if tokenizer is None:
        raise QwenMLXError("the model has no tokenizer (tokenizer.json), so the prompt cannot "
                           "be encoded; add one to the model folder")
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        try:
            return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        except QwenMLXError:
            if system:
                raise
    return list(tokenizer.encode(prompt))


__all__ = ["AttentionMaps", "LayerMap", "DELTANET_NOTE", "attention_maps", "attention_probs",
           "capture", "effective_attention", "prompt_ids", "save_png", "token_labels"]
