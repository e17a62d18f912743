#!/usr/bin/env python3
"""Peak resident memory and time of a conversion, qwen-mlx vs mlx-lm, same source.

Builds a synthetic Qwen3-shaped float16 checkpoint (hidden 2048, 8 layers,
~1 GB in 4 shards) unless --source is given, then converts it in fresh
processes with each tool, float and 4-bit, and prints peak RSS and seconds.

    python benchmarks/convert_memory.py [--source FOLDER] [--work /tmp/convert-bench]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RUN = r"""
import resource, shutil, sys, time
tool, mode, src, out = sys.argv[1:5]
shutil.rmtree(out, ignore_errors=True)
t = time.perf_counter()
if tool == "qwen-mlx":
    import qwen_mlx
    qwen_mlx.convert(src, out, quantize=mode == "4bit", progress=False, log=lambda s: None)
else:
    from mlx_lm import convert
    convert(src, out, quantize=mode == "4bit")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter() - t)
"""


def make_source(folder: Path, layers: int = 8, hidden: int = 2048, inter: int = 6144,
                vocab: int = 32000, shards: int = 4) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    heads, kv, hd = 16, 8, 128
    (folder / "config.json").write_text(json.dumps(dict(
        model_type="qwen3", hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=hd, vocab_size=vocab, tie_word_embeddings=False, torch_dtype="float16",
        rope_theta=1e6, max_position_embeddings=4096, rms_norm_eps=1e-6)))
    rng = np.random.default_rng(0)

    def r(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    t = {"model.embed_tokens.weight": r(vocab, hidden), "lm_head.weight": r(vocab, hidden),
         "model.norm.weight": np.ones(hidden, np.float16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": r(heads * hd, hidden),
                  p + "self_attn.k_proj.weight": r(kv * hd, hidden),
                  p + "self_attn.v_proj.weight": r(kv * hd, hidden),
                  p + "self_attn.o_proj.weight": r(hidden, heads * hd),
                  p + "self_attn.q_norm.weight": np.ones(hd, np.float16),
                  p + "self_attn.k_norm.weight": np.ones(hd, np.float16),
                  p + "mlp.gate_proj.weight": r(inter, hidden),
                  p + "mlp.up_proj.weight": r(inter, hidden),
                  p + "mlp.down_proj.weight": r(hidden, inter),
                  p + "input_layernorm.weight": np.ones(hidden, np.float16),
                  p + "post_attention_layernorm.weight": np.ones(hidden, np.float16)})
    names, weight_map = list(t), {}
    per = -(-len(names) // shards)
    for k in range(shards):
        fn = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: t[n] for n in names[k * per:(k + 1) * per]}
        save_file(part, folder / fn, metadata={"format": "pt"})
        weight_map.update({n: fn for n in part})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/convert-bench"))
    args = ap.parse_args()
    src = args.source or args.work / "source"
    if args.source is None and not (src / "config.json").exists():
        make_source(src)
    shards = sorted(src.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in shards)
    print(f"source {total / 2**20:.0f} MB in {len(shards)} shards, "
          f"largest {max(p.stat().st_size for p in shards) / 2**20:.0f} MB")
    for mode in ("float", "4bit"):
        row = {}
        for tool in ("qwen-mlx", "mlx-lm"):
            out = subprocess.run([sys.executable, "-c", RUN, tool, mode, str(src),
                                  str(args.work / f"{tool}-{mode}")],
                                 capture_output=True, text=True, check=True)
            rss, secs = map(float, out.stdout.split()[-2:])
            row[tool] = (rss, secs)
            print(f"{mode:6} {tool:9} peak RSS {rss:7.0f} MB  {secs:6.1f} s")
        print(f"{mode:6} qwen-mlx/mlx-lm peak RSS ratio {row['qwen-mlx'][0] / row['mlx-lm'][0]:.2f}")


if __name__ == "__main__":
    main()
