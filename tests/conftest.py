"""Shared fixtures: tiny random Qwen checkpoints built with transformers.

transformers and torch are test-only oracles: nothing under qwen_mlx/ imports them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from hypothesis import settings

# The same examples on every run: a property test that passes here passes in CI, and a
# failure found by a wider search is added as an explicit case rather than met at random.
settings.register_profile("qwen-mlx", derandomize=True, database=None)
settings.load_profile("qwen-mlx")

CONFIG_CLASSES = {
    "qwen2": transformers.Qwen2Config,
    "qwen2_moe": transformers.Qwen2MoeConfig,
    "qwen3": transformers.Qwen3Config,
    "qwen3_moe": transformers.Qwen3MoeConfig,
}

# Small enough for MLX's reference-BLAS CPU kernels, wide enough that GQA,
# head_dim != hidden/heads and several layers are all exercised.
TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
TINY_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)


def widen_init(model, seed: int = 0) -> None:
    """Re-draw every weight from N(0, 0.08) (norms near 1) so a wrong detail shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if "norm" in name and p.dim() == 1:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.08 * noise)


def to_old_schema(folder: Path) -> dict:
    """Rewrite a transformers-5 config.json into the published checkpoints' schema."""
    path = Path(folder) / "config.json"
    cfg = json.loads(path.read_text())
    rope = dict(cfg.pop("rope_parameters", None) or {})
    cfg["rope_theta"] = rope.pop("rope_theta", 10000.0)
    rope_type = rope.pop("rope_type", "default")
    rope.pop("type", None)
    if rope_type != "default":
        # Published Qwen2.5 configs say "type"; Qwen3's say "rope_type".
        key = "type" if cfg["model_type"].startswith("qwen2") else "rope_type"
        cfg["rope_scaling"] = {key: rope_type, **rope}
    else:
        cfg["rope_scaling"] = None
    if "num_local_experts" in cfg:
        cfg["num_experts"] = cfg.pop("num_local_experts")
    cfg.pop("layer_types", None)
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    path.write_text(json.dumps(cfg, indent=2))
    return cfg


def build_checkpoint(folder: Path, family: str, *, schema: str = "new", seed: int = 0,
                     **overrides):
    """Save a tiny random transformers model of `family`; returns (hf_model, folder)."""
    kwargs = dict(TINY)
    if family.endswith("moe"):
        kwargs.update(TINY_MOE)
    if family.startswith("qwen3"):
        kwargs["head_dim"] = 24  # != hidden/heads, as in real Qwen3 checkpoints
    kwargs.update(overrides)
    config = CONFIG_CLASSES[family](**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    widen_init(model, seed)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.save_pretrained(folder)
    if schema == "old":
        to_old_schema(folder)
    return model, Path(folder)


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def hf_incremental_logits(model, ids: np.ndarray, prefill: int) -> np.ndarray:
    """Prefill `prefill` tokens, then decode the rest one by one through HF's cache."""
    out = []
    with torch.no_grad():
        r = model(torch.tensor(ids[:, :prefill]), use_cache=True)
        out.append(r.logits.float().numpy())
        past = r.cache  # transformers 5.24 renamed past_key_values (removed in 5.40)
        for t in range(prefill, ids.shape[1]):
            r = model(torch.tensor(ids[:, t:t + 1]), cache=past, use_cache=True)
            past = r.cache
            out.append(r.logits.float().numpy())
    return np.concatenate(out, axis=1)


def mlx_incremental_logits(model, ids: np.ndarray, prefill: int) -> np.ndarray:
    import mlx.core as mx

    cache = model.make_cache()
    out = [np.array(model(mx.array(ids[:, :prefill]), cache=cache))]
    for t in range(prefill, ids.shape[1]):
        out.append(np.array(model(mx.array(ids[:, t:t + 1]), cache=cache)))
    return np.concatenate(out, axis=1)


TEMPLATES = Path(__file__).parent / "fixtures" / "templates"


def write_tiny_tokenizer(folder: Path, *, vocab: int = 300, chat_template: str | None = None,
                         generation_config: dict | None = None) -> None:
    """A tiny byte-level BPE tokenizer with Qwen's control tokens and Qwen3's think tags.

    `chat_template` names a file under tests/fixtures/templates ("qwen3", "qwen2_5").
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab - 2, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ["the quick brown fox jumps over the lazy dog. ",
            "hello world, this is a tiny tokenizer for the qwen mlx tests. ",
            "def main():\n    return 42\n", "user assistant system\n"] * 8
    tok.train_from_iterator(text, trainer)
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False),
                    AddedToken("</think>", special=False, normalized=False)])
    assert tok.get_vocab_size() <= vocab
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = (TEMPLATES / f"{chat_template}.jinja").read_text()
    fast.save_pretrained(str(folder))
    if generation_config is not None:
        (Path(folder) / "generation_config.json").write_text(json.dumps(generation_config))
