#!/usr/bin/env python3
"""AWQ against plain quantization: KL to the float model, per family and bits.

Random tiny checkpoints (the test fixtures: transformers on torch) with outlier
channels injected into the activations — a few channels of every
input_layernorm and post_attention_layernorm weight multiplied by --outlier —
so that, as in trained models, a few input channels dominate the linears'
outputs. Each is converted with `qwen_mlx.convert` twice at the same bits and
group size, plainly and with `awq=True` (the built-in calibration text), and
both are scored against the float source on an evaluation text that shares
nothing with the calibration text: mean KL(float || quantized) per token and
perplexity, through `qwen_mlx.quality.perplexity`.

    python benchmarks/awq_quality.py [--bits 4 3] [--families qwen3 qwen3_5 ...]
        [--group-size 32] [--clip] [--out benchmarks/results/linux-cpu/awq-quality]

`--cost SHAPE [--layers N]` measures instead what AWQ costs: seconds and peak
resident memory of plain 4-bit and AWQ conversions of a synthetic checkpoint at a
real width (qwen_mlx.bench.synthetic_checkpoint, bfloat16, plus the tests' tiny
tokenizer for the calibration text), each in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

EVAL_TEXT = (
    "A map is a promise that the ground will look a certain way. Hikers learn to read the "
    "contour lines before they learn the names of the peaks, because the lines tell them "
    "where the path will be steep. 今天下午我们去图书馆借了三本书，一本关于天文，一本关于历史，"
    "还有一本小说。\nfor name, score in sorted(scores.items(), key=lambda kv: -kv[1]):\n"
    "    print(f'{name:>10} {score:6.2f}')\n"
    "The committee will vote on the proposal next week, after the public comments close. "
) * 3

# family -> how to build it: ("conftest", family) or ("hybrid", fixture case name)
FAMILIES = {
    "qwen2": ("conftest", "qwen2"),
    "qwen2_moe": ("conftest", "qwen2_moe"),
    "qwen3": ("conftest", "qwen3"),
    "qwen3_moe": ("conftest", "qwen3_moe"),
    "qwen3_next": ("hybrid", "qwen3_next-transformers"),
    "qwen3_5": ("hybrid", "qwen3_5-flat"),
    "qwen3_5_moe": ("hybrid", "qwen3_5_moe-fused"),
}
_NORM = re.compile(r"(input_layernorm|post_attention_layernorm|ln_1|ln_2)\.weight$")


def inject_outliers(folder: Path, factor: float, count: int = 4, seed: int = 0) -> None:
    """Multiply `count` channels of every pre-projection norm by `factor` (the same
    channels in every layer, as trained models' outlier features are)."""
    from safetensors.numpy import load_file, save_file

    cfg = json.loads((folder / "config.json").read_text())
    text = cfg.get("text_config") or cfg
    zero_centred = text["model_type"].startswith(("qwen3_5", "qwen3_next"))
    rng = np.random.default_rng(seed)
    channels = rng.choice(text["hidden_size"], count, replace=False)
    for path in sorted(folder.glob("model*.safetensors")):
        tensors = load_file(str(path))
        for name, w in tensors.items():
            if _NORM.search(name) and not name.startswith("mtp."):
                w = w.astype(np.float32)
                if zero_centred:  # stored w for 1 + w
                    w[channels] = (1.0 + w[channels]) * factor - 1.0
                else:
                    w[channels] *= factor
                tensors[name] = w
        save_file(tensors, str(path), metadata={"format": "pt"})


def build(family: str, folder: Path, outlier: float) -> Path:
    from conftest import build_checkpoint, write_tiny_tokenizer

    kind, name = FAMILIES[family]
    if kind == "conftest":
        _, folder = build_checkpoint(folder, name, vocab_size=300)
        write_tiny_tokenizer(folder, vocab=300)
    else:
        from hybrid_fixtures import build_case_with_tokenizer

        folder = build_case_with_tokenizer(name, folder).folder
    inject_outliers(folder, outlier)
    return folder


def score(source: Path, converted: Path, context: int) -> tuple[float, float]:
    from qwen_mlx.checkpoint.loader import load
    from qwen_mlx.quality.perplexity import perplexity

    reference, tokenizer = load(source, dtype="float32")
    model, _ = load(converted, dtype="float32")
    r = perplexity(model, tokenizer.encode(EVAL_TEXT), context=context, reference=reference,
                   progress=False)
    return r.kl, r.perplexity


def run(families: list[str], bits_list: list[int], group_size: int, outlier: float,
        clip: bool, work: Path) -> list[dict]:
    import qwen_mlx
    from qwen_mlx.checkpoint.loader import load
    from qwen_mlx.quality.perplexity import perplexity

    rows = []
    for family in families:
        source = build(family, work / family, outlier)
        ref, tok = load(source, dtype="float32")
        float_ppl = perplexity(ref, tok.encode(EVAL_TEXT), context=128, progress=False).perplexity
        for bits in bits_list:
            row = {"family": family, "bits": bits, "group_size": group_size,
                   "float_ppl": float_ppl}
            for label, extra in (("plain", {}), ("awq", {"awq": True, "awq_clip": clip})):
                out = work / f"{family}-{bits}-{label}"
                qwen_mlx.convert(source, out, quantize=True, bits=bits, group_size=group_size,
                                 progress=False, log=lambda s: None, force=True, **extra)
                row[f"{label}_kl"], row[f"{label}_ppl"] = score(source, out, 128)
                shutil.rmtree(out)
            row["kl_ratio"] = row["plain_kl"] / row["awq_kl"]
            rows.append(row)
            print(f"{family:12} {bits}-bit  KL plain {row['plain_kl']:.5f}  awq "
                  f"{row['awq_kl']:.5f}  ({row['kl_ratio']:.2f}x lower)  ppl float "
                  f"{float_ppl:.3f} plain {row['plain_ppl']:.3f} awq {row['awq_ppl']:.3f}",
                  flush=True)
    return rows


def markdown(rows: list[dict], clip: bool, outlier: float) -> str:
    lines = [f"AWQ{' + clip' if clip else ''} vs plain affine quantization, group size "
             f"{rows[0]['group_size']}, tiny random models with outlier channels x{outlier:g}; "
             "KL(float || quantized) in nats/token on an evaluation text unrelated to the "
             "calibration text.", "",
             "| family | bits | KL plain | KL AWQ | KL ratio | ppl float | ppl plain | ppl AWQ |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['bits']} | {r['plain_kl']:.4f} | {r['awq_kl']:.4f} "
                     f"| {r['kl_ratio']:.2f}x | {r['float_ppl']:.2f} | {r['plain_ppl']:.2f} | "
                     f"{r['awq_ppl']:.2f} |")
    return "\n".join(lines) + "\n"


COST_RUN = r"""
import resource, shutil, sys, time
mode, src, out = sys.argv[1:4]
shutil.rmtree(out, ignore_errors=True)
import qwen_mlx
t = time.perf_counter()
qwen_mlx.convert(src, out, quantize=True, awq=mode == "awq", progress=False, log=lambda s: None)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter() - t)
"""


def cost(shape: str, layers: int, work: Path) -> list[dict]:
    import subprocess

    from conftest import write_tiny_tokenizer
    from qwen_mlx.bench import synthetic_checkpoint

    source = work / shape
    synthetic_checkpoint(source, shape, layers=layers)
    write_tiny_tokenizer(source, vocab=300)
    rows = []
    for mode in ("plain", "awq"):
        done = subprocess.run([sys.executable, "-c", COST_RUN, mode, str(source),
                               str(work / mode)], capture_output=True, text=True, check=True)
        rss, seconds = map(float, done.stdout.split()[-2:])
        rows.append({"shape": shape, "layers": layers, "mode": mode, "peak_rss_mb": rss,
                     "seconds": seconds})
        print(f"{shape} x{layers} layers  {mode:5}  {seconds:7.1f} s  peak RSS {rss:7.0f} MB",
              flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 3])
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--outlier", type=float, default=20.0)
    ap.add_argument("--clip", action="store_true")
    ap.add_argument("--out", type=Path,
                    default=ROOT / "benchmarks/results/linux-cpu/awq-quality")
    ap.add_argument("--cost", metavar="SHAPE", help="measure time and memory on this "
                                                   "synthetic shape instead (qwen3-0.6b-shape)")
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="awq-quality-"))
    if args.cost:
        try:
            rows = cost(args.cost, args.layers, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        out = args.out.with_name("awq-cost.json")
        out.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {out}")
        return
    try:
        rows = run(args.families, args.bits, args.group_size, args.outlier, args.clip, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, args.clip, args.outlier))
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
