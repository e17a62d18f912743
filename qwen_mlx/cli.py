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
    add_convert_arguments(sub.add_parser(
        "convert", help="convert a hub repo or local checkpoint into an MLX folder, optionally quantized",
        description="Convert a Qwen checkpoint (a hub repo id or a local folder) into an MLX "
                    "folder that qwen-mlx and mlx-lm both load, optionally quantized on this "
                    "machine."))
    info = sub.add_parser("info", help="describe a model folder: family, shapes, RoPE, quantization")
    info.add_argument("model", help="a local model folder (Hugging Face or mlx-lm layout)")
    return parser


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    """The converter's flags, shared by `qwen-mlx convert` and convert.py."""
    from .quantize import BITS, GROUP_SIZES, RECIPES

    p.add_argument("source", help="hub repo id (e.g. Qwen/Qwen3-0.6B) or local folder")
    p.add_argument("-o", "--mlx-path", help="output folder (default: ./<name>-<4bit|mixed_4_6|...>)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    p.add_argument("--bits", type=int, default=None, choices=BITS,
                   help="bits per weight for --quantize (default 4)")
    p.add_argument("--group-size", type=int, default=64, choices=GROUP_SIZES,
                   help="weights per quantization group (default 64)")
    p.add_argument("--recipe", choices=list(RECIPES),
                   help="; ".join(f"{r.name}: {r.description}" for r in RECIPES.values())
                   + " (implies --quantize)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the unquantized tensors (default: as stored)")
    p.add_argument("--dequantize", action="store_true",
                   help="turn a quantized MLX folder back into floats")
    p.add_argument("--revision", help="hub branch, tag or commit")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--check", action="store_true",
                   help="report KL divergence and top-1 agreement against the source")


def run_convert(args: argparse.Namespace) -> int:
    from .converter import convert
    from .quantize import RECIPES

    if args.bits is not None and args.recipe and RECIPES[args.recipe].low_bits:
        raise QwenMLXError(f"--recipe {args.recipe} sets the bits itself; drop --bits")
    result = convert(args.source, args.mlx_path, quantize=args.quantize or args.bits is not None,
                     bits=args.bits or 4, group_size=args.group_size, dtype=args.dtype,
                     recipe=args.recipe, revision=args.revision, force=args.force,
                     dequantize=args.dequantize, check=args.check)
    print(result.summary())
    return 0


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
        return {"convert": run_convert, "info": _info}[args.command](args)
    except QwenMLXError as e:
        print(f"qwen-mlx: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
