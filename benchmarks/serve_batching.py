#!/usr/bin/env python3
"""Continuous batching: aggregate decode tok/s at 1, 2, 4 and 8 concurrent streams, against
the same requests served one at a time (qwen-mlx serve's scheduler, without HTTP).

A synthetic checkpoint of real widths and few layers (qwen_mlx.bench), random prompts,
every request decoding exactly --gen tokens (no end-of-text: the text pipeline is given a
tokenizer without one). "decode tok/s" counts generated tokens over the time spent in the
scheduler's decode steps; "wall tok/s" over the whole run, prefill included.

    python benchmarks/serve_batching.py [--shape qwen3-0.6b-shape] [--layers 4]
        [--prompt 64] [--gen 32] [--streams 1 2 4 8] [--work /tmp/serve-bench]
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import numpy as np

from qwen_mlx.bench import SHAPES, synthetic_checkpoint
from qwen_mlx.checkpoint.loader import load
from qwen_mlx.generate.sampling import Sampler, SamplingParams
from qwen_mlx.serve.batching import Finished, Job, Scheduler


class _Detok:
    def add_token(self, token: int) -> str:
        return ""

    def finalize(self) -> str:
        return ""


class _NoEosTokenizer:
    """Just what a Job's text pipeline reads, with no end-of-text id."""

    eos_token_ids: list[int] = []
    im_start_id = None

    def detokenizer(self) -> _Detok:
        return _Detok()

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""


def run(model, prompts: list[list[int]], gen: int, batch: int) -> dict[str, float]:
    sched = Scheduler(model, max_batch=batch, cache_memory=0)
    decode_time = [0.0]
    decode = sched._decode

    def timed() -> None:
        t = time.perf_counter()
        decode()
        decode_time[0] += time.perf_counter() - t

    sched._decode = timed
    done = threading.Semaphore(0)
    tokens = [0]

    def emit(item) -> None:
        if isinstance(item, Finished):
            tokens[0] += item.completion_tokens
            done.release()

    rows = model.config.vocab_size
    sched.start()
    start = time.perf_counter()
    for ids in prompts:
        sched.submit(Job(ids, sampler=lambda: Sampler(SamplingParams(temperature=0.0), rows),
                         max_tokens=gen, stop=[], tokenizer=_NoEosTokenizer(),
                         tool_parser=None, logprobs=None, emit=emit))
    for _ in prompts:
        done.acquire()
    wall = time.perf_counter() - start
    sched.stop()
    return {"tokens": tokens[0], "decode_tps": tokens[0] / decode_time[0],
            "wall_tps": tokens[0] / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="qwen3-0.6b-shape")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--work", type=Path, default=Path("/tmp/serve-bench"))
    args = ap.parse_args()
    src = args.work / f"{args.shape}-L{args.layers}-src"
    if not (src / "config.json").exists():
        synthetic_checkpoint(src, args.shape, args.layers)
    model, _ = load(src, dtype=args.dtype)
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    run(model, [rng.integers(0, vocab, 8).tolist()], 4, 1)  # warm up
    print(f"## {args.shape}, {args.layers} layers, {args.dtype}, prompt {args.prompt}, "
          f"gen {args.gen}\n")
    print("| streams | one at a time: decode tok/s | batched: decode tok/s | ratio "
          "| one at a time: wall tok/s | batched: wall tok/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    for n in args.streams:
        prompts = [rng.integers(0, vocab, args.prompt).tolist() for _ in range(n)]
        serial = run(model, prompts, args.gen, 1)
        batched = run(model, prompts, args.gen, n)
        assert serial["tokens"] == batched["tokens"] == n * args.gen
        print(f"| {n} | {serial['decode_tps']:.1f} | {batched['decode_tps']:.1f} | "
              f"{batched['decode_tps'] / serial['decode_tps']:.2f}x | "
              f"{serial['wall_tps']:.1f} | {batched['wall_tps']:.1f} | "
              f"{batched['wall_tps'] / serial['wall_tps']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
