"""Quantization recipes: which weights get how many bits.

A recipe maps each weight's module path to (bits, group_size) or None (kept
in floats). Affine quantization as mlx-lm writes it, so its folders and ours
are interchangeable:
- `uniform` (the default): every linear and embedding weight at `--bits`.
- `mixed_4_6` / `mixed_3_6`: 4 (or 3) bits, with 6 for the embeddings and
  lm_head, and for v_proj and down_proj in the sensitive layers (the first
  and last eighth of the stack and every third layer between), the layers
  where low bits cost the most accuracy.
Routers (`mlp.gate`, `shared_expert_gate`) always stay in floats: Qwen
advises against quantizing them, and they are a tiny share of the weights.
The Gated DeltaNet's β and decay projections (`in_proj_b`, `in_proj_a`, or
Qwen3-Next's `in_proj_ba`) get at least 8 bits: low bits there garble the
recurrent state (hybrid spec §7); its conv, A_log, dt_bias and norms are
never quantized (they are not matrices).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..model.config import ModelConfig

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    low_bits: int | None = None  # None: the --bits the user chose
    high_bits: int | None = None  # None: no layer gets more


RECIPES = {
    r.name: r for r in (
        Recipe("uniform", "every linear and embedding weight at --bits (default 4)"),
        Recipe("mixed_4_6", "4 bits; 6 for embeddings, lm_head and the sensitive layers' "
                            "v_proj/down_proj", 4, 6),
        Recipe("mixed_3_6", "3 bits; 6 for embeddings, lm_head and the sensitive layers' "
                            "v_proj/down_proj", 3, 6),
    )
}

_LAYER = re.compile(r"\.(?:layers|h)\.(\d+)\.")


def role(path: str) -> str:
    """What a weight does: embed, lm_head, router, v, down or other."""
    if path.endswith(("embed_tokens", "transformer.wte")):
        return "embed"
    if path == "lm_head":
        return "lm_head"
    if path.endswith((".mlp.gate", ".shared_expert_gate")):
        return "router"
    if path.endswith((".in_proj_a", ".in_proj_b", ".in_proj_ba")):
        return "decay"
    if path.endswith(".v_proj"):
        return "v"
    if path.endswith("down_proj") or re.search(r"\.h\.\d+\.mlp\.c_proj$", path):
        return "down"  # Qwen1's mlp.c_proj is its down projection
    return "other"


def is_sensitive(layer: int, num_layers: int) -> bool:
    """First and last eighth of the stack, and every third layer between."""
    eighth = num_layers // 8
    return layer < eighth or layer >= 7 * num_layers // 8 or (layer - eighth) % 3 == 2


def plan(path: str, in_dims: int, config: ModelConfig, recipe: Recipe, bits: int,
         group_size: int) -> tuple[int, int] | None:
    """(bits, group_size) for the weight at module `path`, or None to keep it in floats."""
    kind = role(path)
    if kind == "router" or in_dims % group_size:
        return None
    if kind == "decay":
        return max(8, bits, recipe.low_bits or 0), group_size
    if recipe.high_bits is None:
        return bits, group_size
    if kind in ("embed", "lm_head"):
        return recipe.high_bits, group_size
    m = _LAYER.search("." + path)
    if kind in ("v", "down") and m and is_sensitive(int(m.group(1)), config.num_layers):
        return recipe.high_bits, group_size
    return recipe.low_bits, group_size


def recipe_bits(recipe: Recipe, bits: int) -> int:
    """The bits most weights get: the top-level `bits` of the quantization block."""
    return recipe.low_bits or bits
