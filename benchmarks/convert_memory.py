#!/usr/bin/env python3
"""Peak resident memory and time of a conversion, qwen-mlx vs mlx-lm, same source.

Builds the harness's synthetic Qwen3-1.7B-shaped bfloat16 checkpoint (random
weights, cut to 8 layers, ~1.4 GB in 4 shards) unless --source is given, then
converts it in fresh processes with each tool, float and 4-bit, and prints
peak RSS and seconds.

    python benchmarks/convert_memory.py [--source FOLDER] [--work /tmp/convert-bench]
    python benchmarks/convert_memory.py --shape qwen3.5-35b-a3b-shape-small --layers 2

A hybrid shape is written as published (nested, Qwen3.5-MoE's fused experts).
"""

from __future__ import annotations

import argparse
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

BUILD_SOURCE = r"""
import pathlib, sys
from qwen_mlx.bench import synthetic_checkpoint
synthetic_checkpoint(pathlib.Path(sys.argv[1]), sys.argv[2], layers=int(sys.argv[3]), shards=4)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/convert-bench"))
    ap.add_argument("--shape", default="qwen3-1.7b-shape", help="the harness's synthetic shape")
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    src = args.source or args.work / "source"
    if args.source is None and not (src / "config.json").exists():
        # In a child process: a child's peak RSS starts from its parent's at fork.
        subprocess.run([sys.executable, "-c", BUILD_SOURCE, str(src), args.shape,
                        str(args.layers)], check=True)
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
