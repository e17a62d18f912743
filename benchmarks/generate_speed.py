#!/usr/bin/env python3
"""qwen-mlx vs mlx-lm on one converted checkpoint, at equal dtype and with each tool's defaults.

A thin use of the `qwen-mlx bench` harness (qwen_mlx/bench.py): the same synthetic
checkpoint and folder for both tools, alternating runs, medians and ratios.
- "equal dtype": both compute in float32;
- "defaults": each tool as a user gets it (qwen-mlx: float32 on the CPU, the
  checkpoint's dtype on a GPU; mlx-lm: the checkpoint's dtype).

    python benchmarks/generate_speed.py [--shape qwen3-0.6b-shape] [--layers 4] [--bits 4]
        [--prompt 128] [--gen 32] [--reps 3] [--skip-defaults] [--work /tmp/gen-bench]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import qwen_mlx
from qwen_mlx.bench import SHAPES, benchmark, synthetic_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="qwen3-0.6b-shape")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gen-bench"))
    ap.add_argument("--skip-defaults", action="store_true",
                    help="only the equal-dtype comparison (mlx-lm's CPU default is very slow)")
    args = ap.parse_args()

    src = args.work / f"{args.shape}-L{args.layers}-src"
    dst = args.work / f"{args.shape}-L{args.layers}-{args.bits}bit"
    if not (src / "config.json").exists():
        synthetic_checkpoint(src, args.shape, args.layers)
    if not (dst / "config.json").exists():
        qwen_mlx.convert(src, dst, quantize=True, bits=args.bits, progress=False)
    settings = {"equal dtype (float32)": "float32"}
    if not args.skip_defaults:
        settings["defaults"] = None
    for name, dtype in settings.items():
        report = benchmark(dst, label=f"{args.shape}, {args.layers} layers, {args.bits}-bit",
                           contexts=[args.prompt], gen=args.gen, reps=args.reps, dtype=dtype)
        print(f"\n## {name}\n\n{report.markdown()}", flush=True)


if __name__ == "__main__":
    main()
