#!/usr/bin/env python3
"""The README's attention-map pictures, from a tiny random Qwen3.5 checkpoint (the test
fixture: three Gated DeltaNet layers, then one gated softmax-attention layer) with the
tests' tiny tokenizer and a ChatML template, through `qwen-mlx attention`'s code.

    python benchmarks/attention_map.py [--out benchmarks/results/linux-cpu]

Writes attention-map.png (the mean over the softmax layers and heads) and
attention-map-deltanet.png (layer 0's effective attention, mean over heads).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

PROMPT = "hello world, the quick brown fox"


def main() -> None:
    from conftest import write_tiny_tokenizer
    from hybrid_fixtures import build_case
    from qwen_mlx.quality import cli

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/linux-cpu")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="attention-map-"))
    try:
        case = build_case("qwen3_5-flat", work / "Qwen3.5-tiny")
        write_tiny_tokenizer(case.folder, vocab=272, chat_template="qwen3")
        parser = argparse.ArgumentParser(prog="qwen-mlx")
        cli.add_parser(parser.add_subparsers(dest="command"))
        common = ["attention", str(case.folder), PROMPT, "--system", "be brief"]
        cli.run(parser.parse_args(common + ["-o", str(args.out / "attention-map.png")]))
        cli.run(parser.parse_args(common + ["--layer", "0", "-o",
                                            str(args.out / "attention-map-deltanet.png")]))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
