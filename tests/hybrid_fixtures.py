"""Tiny random checkpoints of the hybrid and VL Qwen generations, and their transformers oracle.

Each case is built with transformers 5.24 on torch (CPU, float32), saved with
`save_pretrained`, then post-processed into the layout of the published releases
(spec qwen-hybrid.md §10): legacy config keys, fused or transposed experts and `mtp.*`
tensors. The in-memory transformers model is the oracle; `hf_logits(folder, ids)`
reloads a folder to show that transformers reads the rewritten files the same way.

transformers and torch are test-only oracles: nothing under qwen_mlx/ imports them.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file

# Spec §10 sizes. Every width differs from every other one (H 64, dense MLP 80, experts
# I 48 so 2I 96, shared expert 40, vocab 272), so a transposed or mis-split tensor cannot
# pass by shape.
VOCAB = 272
TEXT = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6, max_position_embeddings=512)
LINEAR = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
              linear_value_head_dim=16, linear_conv_kernel_dim=4)
DENSE_I = 80
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48)
SHARED_I = 40
# A one-block vision tower, so the nested checkpoints carry `model.visual.*` weights.
VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
              spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
              num_position_embeddings=16)
# Rotary dims: hybrids 0.25 * 32 = 8 (4 frequencies), VL 32 (16 frequencies).
HYBRID_MROPE = dict(mrope_section=[2, 1, 1], mrope_interleaved=True)
VL_MROPE = dict(mrope_section=[6, 5, 5], mrope_interleaved=True)

SEQ_LEN = 160
# Prefill 70, then a continuation of 37, then single steps: both splits sit off the
# 64-token chunk grid of the chunked DeltaNet form (spec §2.3).
SPLITS = (70, 37)


@dataclass
class HybridCase:
    """One built fixture: its folder, the in-memory transformers oracle and a token sequence."""

    name: str
    folder: Path
    hf: torch.nn.Module
    ids: np.ndarray  # [1, SEQ_LEN]
    has_mtp: bool
    _full: np.ndarray | None = field(default=None, repr=False)
    _steps: list[np.ndarray] | None = field(default=None, repr=False)

    def full_logits(self) -> np.ndarray:
        """transformers' full-forward logits [1, L, V], computed once."""
        if self._full is None:
            self._full = hf_logits(self.hf, self.ids)
        return self._full

    def incremental_logits(self) -> list[np.ndarray]:
        """transformers' logits per call of `chunks(ids)` with its cache, computed once."""
        if self._steps is None:
            self._steps = hf_incremental_logits(self.hf, self.ids)
        return self._steps


def chunks(ids: np.ndarray, splits: tuple[int, ...] = SPLITS) -> list[np.ndarray]:
    """Split [1, L] ids into the prefill, the continuation, then single tokens."""
    out, start = [], 0
    for n in splits:
        out.append(ids[:, start:start + n])
        start += n
    out.extend(ids[:, t:t + 1] for t in range(start, ids.shape[1]))
    return out


# --- transformers oracle ---------------------------------------------------------------

@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: its depthwise conv1d spins for ~10 ms a call on two
    contended threads, which made a 55-call decode take 15 s instead of 0.3 s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_num_threads(before)


def load_hf(folder: Path) -> torch.nn.Module:
    """Reload a saved folder with the transformers class its config.json names."""
    arch = json.loads((Path(folder) / "config.json").read_text())["architectures"][0]
    cls = getattr(transformers, arch)
    return cls.from_pretrained(str(folder), dtype=torch.float32).eval()


def hf_logits(folder_or_model: Path | str | torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    """transformers' float32 logits [B, L, V] for a full forward of `ids` [B, L]."""
    model = folder_or_model
    if not isinstance(model, torch.nn.Module):
        model = load_hf(Path(model))
    with one_thread():
        return model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def hf_incremental_logits(model: torch.nn.Module, ids: np.ndarray,
                          splits: tuple[int, ...] = SPLITS) -> list[np.ndarray]:
    """One logits array per chunk of `chunks(ids, splits)`, run through transformers' cache."""
    out, cache = [], None
    with one_thread():
        for chunk in chunks(ids, splits):
            # transformers 5.24 deprecates `past_key_values=` for `cache=`; the output
            # attribute is `cache` too.
            r = model(input_ids=torch.tensor(chunk, dtype=torch.long), cache=cache,
                      use_cache=True)
            cache = r.cache
            out.append(r.logits.float().numpy())
    return out


# --- building --------------------------------------------------------------------------

def widen_init(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter so a missing or doubled (1+w) norm shift shows in the logits.

    transformers starts the (1+w) norms at 0 and the gated norm at 1; those values hide
    the shift. Matrices get N(0, 0.08); every 1-D parameter a non-trivial random value.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
            elif name.endswith("A_log"):
                # A log-uniform in [0.1, 8]: slow heads carry state across the splits and
                # chunk borders, fast ones test the decay.
                lo, hi = math.log(0.1), math.log(8.0)
                p.copy_(lo + (hi - lo) * torch.rand(p.shape, generator=gen))
            elif name.endswith("dt_bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen) - 1.0)
            else:  # norms (incl. q/k norm and the gated norm) and biases
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def _build(cls, config, folder: Path, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = cls(config).eval()
    widen_init(model, seed)
    model.save_pretrained(str(folder))
    return model


def edit_config(folder: Path, edit: Callable[[dict], None]) -> None:
    """Rewrite folder/config.json through `edit`, which changes the dict in place."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg, indent=2))


def edit_weights(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Rewrite the folder's one safetensors file through `edit`, which changes the dict."""
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == 1, files  # tiny models fit one shard
    tensors = load_file(str(files[0]))
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(files[0]),
              metadata={"format": "pt"})


def _text_cfg(cfg: dict) -> dict:
    return cfg.get("text_config", cfg)


def to_published_next(cfg: dict) -> None:
    """Qwen3-Next's published config.json: legacy top-level rope keys, no layer_types."""
    rope = cfg.pop("rope_parameters")
    assert rope["rope_type"] == "default", rope
    cfg["rope_theta"] = rope["rope_theta"]
    cfg["partial_rotary_factor"] = rope["partial_rotary_factor"]
    cfg["rope_scaling"] = None
    cfg["full_attention_interval"] = 4
    del cfg["layer_types"]
    cfg["use_sliding_window"] = False
    cfg["sliding_window"] = None
    cfg["torch_dtype"] = cfg.pop("dtype")
    assert "num_experts" in cfg


def add_published_hybrid_keys(cfg: dict) -> None:
    """The extra, non-field keys of a published Qwen3.5 text_config (spec §1.3)."""
    text = _text_cfg(cfg)
    text.update(full_attention_interval=4, attn_output_gate=True, mamba_ssm_dtype="float32",
                mtp_num_hidden_layers=1, mtp_use_dedicated_embeddings=False)


def to_published_vl_text(cfg: dict) -> None:
    """Qwen3-VL's published text_config: legacy rope_theta plus a rope_scaling with M-RoPE."""
    text = cfg["text_config"]
    rope = text.pop("rope_parameters")
    text["rope_theta"] = rope.pop("rope_theta")
    text["rope_scaling"] = rope
    assert "tie_word_embeddings" not in text  # the top-level value governs (spec §1.5)


def mtp_tensors(hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int,
                seed: int) -> dict[str, torch.Tensor]:
    """A random one-layer MTP block with a dense MLP, named as in the Qwen3.5 releases (§5)."""
    gen = torch.Generator().manual_seed(seed)

    def mat(rows: int, cols: int) -> torch.Tensor:
        return 0.08 * torch.randn(rows, cols, generator=gen)

    def vec(n: int) -> torch.Tensor:
        return 0.3 * torch.randn(n, generator=gen)

    h, q, kv = hidden, heads * head_dim, kv_heads * head_dim
    out = {"mtp.fc.weight": mat(h, 2 * h), "mtp.pre_fc_norm_embedding.weight": vec(h),
           "mtp.pre_fc_norm_hidden.weight": vec(h), "mtp.norm.weight": vec(h)}
    layer = {"input_layernorm.weight": vec(h), "post_attention_layernorm.weight": vec(h),
             "self_attn.q_proj.weight": mat(2 * q, h), "self_attn.k_proj.weight": mat(kv, h),
             "self_attn.v_proj.weight": mat(kv, h), "self_attn.o_proj.weight": mat(h, q),
             "self_attn.q_norm.weight": vec(head_dim), "self_attn.k_norm.weight": vec(head_dim),
             "mlp.gate_proj.weight": mat(intermediate, h),
             "mlp.up_proj.weight": mat(intermediate, h),
             "mlp.down_proj.weight": mat(h, intermediate)}
    out.update({f"mtp.layers.0.{k}": v for k, v in layer.items()})
    return out


def _add_mtp(tensors: dict[str, torch.Tensor], seed: int) -> None:
    tensors.update(mtp_tensors(TEXT["hidden_size"], TEXT["num_attention_heads"],
                               TEXT["num_key_value_heads"], TEXT["head_dim"], DENSE_I, seed))


def fuse_experts(tensors: dict[str, torch.Tensor], num_experts: int) -> None:
    """Per-expert `experts.{e}.{gate,up,down}_proj.weight` -> fused [E, 2I, H] and [E, H, I]."""
    prefixes = sorted({k.split(".experts.")[0] for k in tensors if ".experts.0.gate_proj" in k})
    assert prefixes, "no per-expert tensors to fuse"
    for p in prefixes:
        def take(e: int, proj: str) -> torch.Tensor:
            return tensors.pop(f"{p}.experts.{e}.{proj}.weight")

        gate_up, down = [], []
        for e in range(num_experts):
            gate_up.append(torch.cat([take(e, "gate_proj"), take(e, "up_proj")], dim=0))
            down.append(take(e, "down_proj"))
        tensors[f"{p}.experts.gate_up_proj"] = torch.stack(gate_up)
        tensors[f"{p}.experts.down_proj"] = torch.stack(down)
    assert not any(".experts.0." in k for k in tensors)


def transpose_experts(tensors: dict[str, torch.Tensor]) -> None:
    """Fused [E, 2I, H] / [E, H, I] -> Qwen3-VL-MoE's published [E, H, 2I] / [E, I, H]."""
    names = [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert names
    for k in names:
        tensors[k] = tensors[k].transpose(1, 2)


def _next_config(theta: float, **extra) -> transformers.Qwen3NextConfig:
    return transformers.Qwen3NextConfig(
        **TEXT, **LINEAR, **MOE, intermediate_size=DENSE_I,
        shared_expert_intermediate_size=SHARED_I, norm_topk_prob=True,
        rope_parameters=dict(rope_type="default", rope_theta=theta, partial_rotary_factor=0.25),
        **extra)


def _build_next_transformers(folder: Path, seed: int):
    # Layer 1 takes the dense MLP (mlp_only_layers), so the qwen3_next dense path shows too.
    return _build(transformers.Qwen3NextForCausalLM,
                  _next_config(1e6, mlp_only_layers=[1]), folder, seed), False


def _build_next_published(folder: Path, seed: int):
    model = _build(transformers.Qwen3NextForCausalLM, _next_config(5e6), folder, seed)
    edit_config(folder, to_published_next)
    return model, False


def _q35_text(theta: float, mrope: bool, tie: bool) -> dict:
    rope = dict(rope_type="default", rope_theta=theta, partial_rotary_factor=0.25)
    if mrope:
        rope.update(HYBRID_MROPE)
    return dict(**TEXT, **LINEAR, rope_parameters=rope, tie_word_embeddings=tie)


def _build_q35_nested(tie: bool) -> Callable:
    def build(folder: Path, seed: int):
        text = dict(_q35_text(1e7, True, tie), intermediate_size=DENSE_I)
        config = transformers.Qwen3_5Config(text_config=text, vision_config=VISION,
                                            tie_word_embeddings=tie)
        model = _build(transformers.Qwen3_5ForConditionalGeneration, config, folder, seed)
        edit_config(folder, add_published_hybrid_keys)
        edit_weights(folder, lambda t: _add_mtp(t, seed + 1))
        return model, True
    return build


def _build_q35_flat(folder: Path, seed: int):
    config = transformers.Qwen3_5TextConfig(**_q35_text(1e6, False, False),
                                            intermediate_size=DENSE_I)
    model = _build(transformers.Qwen3_5ForCausalLM, config, folder, seed)
    edit_weights(folder, lambda t: _add_mtp(t, seed + 1))
    return model, True


def _build_q35_moe(fused: bool) -> Callable:
    def build(folder: Path, seed: int):
        text = dict(_q35_text(1e7, True, False), **MOE,
                    shared_expert_intermediate_size=SHARED_I)
        config = transformers.Qwen3_5MoeConfig(text_config=text, vision_config=VISION)
        model = _build(transformers.Qwen3_5MoeForConditionalGeneration, config, folder, seed)
        edit_config(folder, add_published_hybrid_keys)
        names = load_file(str(folder / "model.safetensors")).keys()
        # transformers 5.24 writes qwen3_5_moe per-expert (spec §10 trap 1).
        assert any(".mlp.experts.0.gate_proj.weight" in k for k in names)
        if fused:
            edit_weights(folder, lambda t: fuse_experts(t, MOE["num_experts"]))
        return model, False
    return build


def _build_vl(folder: Path, seed: int):
    text = dict(TEXT, intermediate_size=DENSE_I,
                rope_parameters=dict(rope_type="default", rope_theta=5e6, **VL_MROPE))
    config = transformers.Qwen3VLConfig(text_config=text, vision_config=dict(
        VISION, deepstack_visual_indexes=[0]), tie_word_embeddings=True)
    model = _build(transformers.Qwen3VLForConditionalGeneration, config, folder, seed)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert "lm_head.weight" not in load_file(str(folder / "model.safetensors"))
    edit_config(folder, to_published_vl_text)
    return model, False


def _build_vl_moe(folder: Path, seed: int):
    text = dict(TEXT, **MOE, intermediate_size=DENSE_I,
                rope_parameters=dict(rope_type="default", rope_theta=1e6, **VL_MROPE))
    config = transformers.Qwen3VLMoeConfig(text_config=text, vision_config=dict(
        VISION, deepstack_visual_indexes=[0]))
    model = _build(transformers.Qwen3VLMoeForConditionalGeneration, config, folder, seed)
    # transformers 5.24 saves [E, 2I, H]; the releases are transposed (spec §10 trap 2).
    gate_up = load_file(str(folder / "model.safetensors"))[
        "model.language_model.layers.0.mlp.experts.gate_up_proj"]
    assert tuple(gate_up.shape) == (8, 96, 64)
    # The text config says tie true, the top level false: the top level wins (trap 4).
    assert model.lm_head.weight is not model.model.language_model.embed_tokens.weight
    edit_weights(folder, transpose_experts)
    return model, False


# name -> builder(folder, seed) -> (transformers model, has_mtp)
BUILDERS: dict[str, Callable[[Path, int], tuple[torch.nn.Module, bool]]] = {
    "qwen3_next-transformers": _build_next_transformers,
    "qwen3_next-published": _build_next_published,
    "qwen3_5-nested-untied": _build_q35_nested(False),
    "qwen3_5-nested-tied": _build_q35_nested(True),
    "qwen3_5-flat": _build_q35_flat,
    "qwen3_5_moe-fused": _build_q35_moe(True),
    "qwen3_5_moe-per-expert": _build_q35_moe(False),
    "qwen3_vl-tied": _build_vl,
    "qwen3_vl_moe-transposed": _build_vl_moe,
}
CASE_NAMES = tuple(BUILDERS)


def build_case(name: str, folder: Path, seed: int = 0) -> HybridCase:
    """Build case `name` into `folder` (created) and return it with a random token sequence."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with one_thread():
        model, has_mtp = BUILDERS[name](folder, seed)
    ids = np.random.RandomState(1234 + seed).randint(0, VOCAB, size=(1, SEQ_LEN))
    assert math.isfinite(float(np.abs(hf_logits(model, ids[:, :8])).max()))
    return HybridCase(name=name, folder=folder, hf=model, ids=ids, has_mtp=has_mtp)


def build_case_with_tokenizer(name: str, folder: Path, chat_template: str | None = None,
                              ) -> HybridCase:
    """`build_case`, plus conftest's tiny tokenizer (inside the fixtures' vocabulary), so
    generation, chat sessions and converters (mlx-lm's needs one) can run on it."""
    from conftest import write_tiny_tokenizer

    case = build_case(name, folder)
    write_tiny_tokenizer(case.folder, vocab=VOCAB, chat_template=chat_template)
    return case


class CaseCache:
    """Builds each case at most once per session, under a tmp_path_factory folder."""

    def __init__(self, tmp_path_factory) -> None:
        self._factory = tmp_path_factory
        self._cases: dict[str, HybridCase] = {}

    def get(self, name: str) -> HybridCase:
        if name not in self._cases:
            self._cases[name] = build_case(name, self._factory.mktemp(name))
        return self._cases[name]
