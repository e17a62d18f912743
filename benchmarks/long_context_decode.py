#!/usr/bin/env python3
"""Decode speed at a long context over a quantized KV cache: reading it with
mx.quantized_matmul (this tree) against dequantizing all of it every token (the
model code of --before-commit, extracted with git archive).

The model is benchmarks/long_context_memory.py's Qwen2.5-7B-1M attention shape cut
to --layers layers; its cache is filled with --context random positions (what
the keys hold does not change the cost), then --steps tokens are decoded and
the median seconds per token are printed with attention's temporaries (what a decode
step adds beyond the live cache, less what it adds at 1000 positions), with float KV
for reference.

    python benchmarks/long_context_decode.py --context 32768
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from long_context_memory import ROOT, SHAPE  # noqa: E402

RUN = r"""
import json, statistics, sys, time
import mlx.core as mx
from qwen_mlx.model.config import ModelConfig
from qwen_mlx.model.decoder import Model
cfg, n, bits, steps, dtype = json.loads(sys.argv[1])
model = Model(ModelConfig.from_dict(cfg))
model.set_dtype(getattr(mx, dtype))
mx.eval(model.parameters())
cache = model.make_cache(kv_bits=bits)
H, D = cfg["num_key_value_heads"], cfg["hidden_size"] // cfg["num_attention_heads"]
tok = mx.array([[1]])


def fill(upto):
    while cache[0].offset < upto:
        m = min(4096, upto - cache[0].offset)
        for c in cache:
            c.update(mx.random.normal((1, H, m, D)).astype(getattr(mx, dtype)),
                     mx.random.normal((1, H, m, D)).astype(getattr(mx, dtype)))
        mx.eval([x for c in cache for p in c.state() for x in (p if isinstance(p, tuple) else (p,))])


def decode(steps):
    times, extra = [], 0
    for i in range(steps):
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        t = time.perf_counter()
        mx.eval(model(tok, cache=cache))
        times.append(time.perf_counter() - t)
        extra = max(extra, mx.get_peak_memory() - base)
    return times, extra


# Stop short of a multiple of the cache's growth step, so no decode step regrows it.
fill(1000)
_, small = decode(2)
fill(n - steps - 4)
times, extra = decode(steps + 2)
# The memory a decode step adds at n beyond what it adds at 1000 positions: attention's
# share (the layer's own temporaries are the same at both).
print(json.dumps({"median": statistics.median(times[2:]), "peak": extra - small}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12)
    # MLX's CPU kernels compute float16 slowly (~2 s a token here), which would hide
    # attention's cost: float32 on the CPU, float16/bfloat16 on Metal.
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--before-commit", default="65e71fa")
    args = ap.parse_args()
    cfg = dict(SHAPE, num_hidden_layers=args.layers, vocab_size=1024, intermediate_size=1024)
    site = [p for p in sys.path if p.endswith("site-packages")]
    rows = {}
    with tempfile.TemporaryDirectory() as before:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before_commit,
                                  "qwen_mlx"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", before], input=archive, check=True)
        for bits in (None, 8, 4):
            for version, path in (("before", before), ("after", str(ROOT))):
                out = subprocess.run(
                    [sys.executable, "-c", RUN, json.dumps([cfg, args.context, bits,
                                                            args.steps, args.dtype])],
                    env={"PYTHONPATH": ":".join([path, *site]), "PATH": "/usr/bin:/bin"},
                    capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows[version, bits] = r
                print(f"kv {bits or 'float':>5}  {version:6}  {r['median'] * 1000:8.2f} ms/token"
                      f"  attention temporaries {r['peak'] / 2**20:7.1f} MiB", flush=True)
            b, a = rows["before", bits]["median"], rows["after", bits]["median"]
            print(f"kv {bits or 'float':>5}  after/before time {a / b:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
