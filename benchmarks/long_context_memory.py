#!/usr/bin/env python3
"""Peak memory of a long prefill against context length, before and after issue 15.

A Qwen2.5-7B-Instruct-1M-shaped model (hidden 3584, 28 query and 4 KV heads of
128, rope θ 1e7, DCA config as published) with random weights, cut to --layers
layers and, since neither bounds the cache nor attention, a --vocab and --mlp
width of 1024 so the CPU finishes. Each point runs in a fresh process: prefill
in chunks of --chunk through the model's cache (float, 8-bit or 4-bit KV), and
reports MLX's peak memory and the cache's bytes.

"before" runs the model code of --before-commit (extracted with git archive into
a temporary folder): it dequantizes the whole cache every chunk and lets the
fused kernel build a chunk x context score matrix. "after" runs this tree:
quantized caches read with mx.quantized_matmul, float attention in key blocks
past an 8 MiB score budget, and mx.clear_cache between chunks.

    python benchmarks/long_context_memory.py --contexts 2048 4096 8192
    python benchmarks/long_context_memory.py --plot benchmarks/results/long_context_memory.png

The cache grows linearly, so points past the measured ones are extrapolated:
peak(n) = base + n x (cache bytes per position), from the measured slope.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SHAPE = dict(model_type="qwen2", hidden_size=3584, num_attention_heads=28,
             num_key_value_heads=4, rope_theta=10000000.0, rms_norm_eps=1e-5,
             max_position_embeddings=1010000, tie_word_embeddings=False,
             dual_chunk_attention_config={"chunk_size": 262144, "local_size": 8192,
                                          "original_max_position_embeddings": 262144})

RUN = r"""
import json, sys, time
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from qwen_mlx.model.config import ModelConfig
from qwen_mlx.model.decoder import Model
cfg, n, bits, chunk, clear, dtype = json.loads(sys.argv[1])
model = Model(ModelConfig.from_dict(cfg))
model.set_dtype(getattr(mx, dtype))
mx.eval(model.parameters())
cache = model.make_cache(kv_bits=bits)
mx.reset_peak_memory()
base = mx.get_active_memory()
ids = mx.random.randint(0, cfg["vocab_size"], (1, n))
t = time.perf_counter()
for a in range(0, n, chunk):
    model(ids[:, a:a + chunk], cache=cache, last_only=True)
    mx.eval([x for c in cache for part in c.state() for x in
             (part if isinstance(part, tuple) else (part,))])
    if clear:
        mx.clear_cache()
print(json.dumps({"peak": mx.get_peak_memory(), "base": base,
                  "cache": sum(c.nbytes for c in cache), "seconds": time.perf_counter() - t}))
"""


def point(pythonpath: str, cfg: dict, n: int, bits, chunk: int, clear: bool,
          dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", RUN, json.dumps([cfg, n, bits, chunk, clear,
                                                                 dtype])],
                         env={"PYTHONPATH": pythonpath, "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--extrapolate", type=int, nargs="+", default=[32768, 131072, 1048576])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--mlp", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--before-commit", default="65e71fa")
    ap.add_argument("--json", type=Path, help="write the measurements here")
    ap.add_argument("--plot", type=Path, help="PNG of peak memory against context")
    args = ap.parse_args()
    cfg = dict(SHAPE, num_hidden_layers=args.layers, vocab_size=args.vocab,
               intermediate_size=args.mlp)
    results = []
    with tempfile.TemporaryDirectory() as before:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before_commit,
                                  "qwen_mlx"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", before], input=archive, check=True)
        site = [p for p in sys.path if p.endswith("site-packages")]
        for version, path, clear in (("before", before, False), ("after", str(ROOT), True)):
            for bits in (None, 8, 4):
                for n in args.contexts:
                    r = point(":".join([path, *site]), cfg, n, bits, args.chunk, clear,
                              args.dtype)
                    r.update(version=version, bits=bits or 16, context=n)
                    results.append(r)
                    print(f"{version:6} kv {bits or 'float':>5}  {n:>7} tokens  peak "
                          f"{r['peak'] / 2**20:8.1f} MiB  cache {r['cache'] / 2**20:7.1f} "
                          f"MiB  {r['seconds']:6.1f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    extrapolated = extrapolate(results, args.extrapolate)
    for version, bits, n, peak in extrapolated:
        print(f"{version:6} kv {bits:>5}  {n:>7} tokens  peak {peak / 2**20:8.1f} MiB "
              "(extrapolated)")
    if args.plot:
        plot(results, extrapolated, args.plot, args)
    return 0


def extrapolate(results: list[dict], contexts: list[int]) -> list[tuple]:
    """Linear in the context from the last two measured points of each series."""
    out = []
    for version in ("before", "after"):
        for bits in (16, 8, 4):
            pts = sorted((r["context"], r["peak"]) for r in results
                         if r["version"] == version and r["bits"] == bits)
            if len(pts) < 2:
                continue  # one measured context: nothing to draw a line through
            (n0, p0), (n1, p1) = pts[-2], pts[-1]
            slope = (p1 - p0) / (n1 - n0)
            out += [(version, bits, n, p1 + slope * (n - n1)) for n in contexts if n > n1]
    return out


def plot(results, extrapolated, path: Path, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {16: "tab:blue", 8: "tab:orange", 4: "tab:green"}
    for version, style in (("before", "--"), ("after", "-")):
        for bits in (16, 8, 4):
            pts = sorted((r["context"], r["peak"] / 2**30) for r in results
                         if r["version"] == version and r["bits"] == bits)
            ext = sorted((n, p / 2**30) for v, b, n, p in extrapolated
                         if v == version and b == bits)
            label = f"{version}, {'float16' if bits == 16 else f'{bits}-bit'} KV"
            ax.plot(*zip(*pts), style, marker="o", color=colors[bits], label=label)
            if ext:
                ax.plot(*zip(*([pts[-1]] + ext)), style, color=colors[bits], alpha=0.35)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("context (tokens); faded: extrapolated")
    ax.set_ylabel("peak MLX memory (GiB)")
    ax.set_title(f"Prefill peak memory, Qwen2.5-7B-1M attention, {args.layers} layer(s), "
                 f"chunk {args.chunk}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
