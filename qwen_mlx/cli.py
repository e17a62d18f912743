"""The `qwen-mlx` command line."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import QwenMLXError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen-mlx",
        description="Run Qwen models (Qwen1 to Qwen3-MoE) locally with MLX.",
    )
    parser.add_argument("--version", action="version", version=f"qwen-mlx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="describe a model folder: family, shapes, RoPE, quantization")
    info.add_argument("model", help="a local model folder (Hugging Face or mlx-lm layout)")
    return parser


def _info(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .config import ModelConfig

    config = ModelConfig.from_file(Path(args.model).expanduser() / "config.json")
    print(config.describe())
    windows = sorted({w for w in config.sliding_windows if w})
    if windows:
        n = sum(1 for w in config.sliding_windows if w)
        print(f"sliding window {windows[0]} on {n} of {config.num_layers} layers")
    if config.quantization:
        print(f"quantized: {config.quantization['bits']} bits, group size "
              f"{config.quantization['group_size']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return {"info": _info}[args.command](args)
    except QwenMLXError as e:
        print(f"qwen-mlx: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
