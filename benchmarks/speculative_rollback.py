"""Two ways to drop rejected drafts from a hybrid's DeltaNet layers, timed on one shape.

(a) keep: the verify runs the recurrence token by token and keeps each state
    (LinearCache.keep_steps), so the rollback picks one: what qwen-mlx does.
(b) replay: the verify runs the chunked form; the rollback restores the snapshot taken
    before it and runs the accepted tokens again.

    python benchmarks/speculative_rollback.py [--shape qwen3.5-0.8b-shape] [--layers 8]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from qwen_mlx.bench import synthetic_checkpoint
from qwen_mlx.checkpoint.converter import convert
from qwen_mlx.checkpoint.loader import load
from qwen_mlx.model.cache import LinearCache, cache_arrays, restore_cache, snapshot_cache


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3.5-0.8b-shape")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--work", default=str(Path.home() / ".cache/qwen-mlx/bench"))
    args = ap.parse_args()
    work = Path(args.work)
    source = work / f"{args.shape}-L{args.layers}"
    if not (source / "config.json").exists():
        synthetic_checkpoint(source, args.shape, args.layers)
    folder = work / f"{source.name}-4bit-g64"
    if not (folder / "config.json").exists():
        convert(source, folder, quantize=True, bits=4, group_size=64)
    model, _ = load(folder, dtype="float32")
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 1000, args.context).tolist()
    print(f"{args.shape}, {args.layers} layers, 4-bit, float32, {args.context}-token context")
    print("| drafts k | accepted | keep: verify + rollback ms | replay: verify + rollback ms |")
    print("|---|---|---|---|")
    for k in (1, 3, 5):
        fed = rng.integers(0, 1000, k + 1).tolist()
        for accepted in sorted({0, k // 2}):
            keep = accepted + 1
            times = {"keep": [], "replay": []}
            for rep in range(args.reps + 1):
                for how in ("keep", "replay"):
                    cache = model.make_cache()
                    model(mx.array(prompt)[None], cache=cache, last_only=True)
                    mx.eval(cache_arrays(cache))
                    linear = [c for c in cache if isinstance(c, LinearCache)]
                    snaps = snapshot_cache(cache)
                    t = time.perf_counter()
                    for c in linear:
                        c.keep_steps = how == "keep"
                    mx.eval(model(mx.array(fed)[None], cache=cache))
                    for c in linear:
                        c.keep_steps = False
                    if how == "keep":
                        for c in cache:
                            c.keep(keep) if isinstance(c, LinearCache) else c.trim(k + 1 - keep)
                    else:
                        restore_cache(cache, snaps)
                        model(mx.array(fed[:keep])[None], cache=cache, last_only=True)
                    mx.eval(cache_arrays(cache))
                    if rep:  # the first round warms up
                        times[how].append(time.perf_counter() - t)
            print(f"| {k} | {accepted} | {1000 * np.median(times['keep']):.1f} | "
                  f"{1000 * np.median(times['replay']):.1f} |", flush=True)


if __name__ == "__main__":
    main()
