"""`qwen-mlx perplexity` and `qwen-mlx attention`, and convert's AWQ flags.

The main CLI wires them: `add_parser(subparsers)` adds both subcommands and
`run(args)` runs whichever was chosen; `add_awq_arguments(convert_parser)` and
`awq_options(args)` give convert its --awq, --calibration and --awq-clip.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

COMMANDS = ("perplexity", "attention")


def add_parser(subparsers) -> None:
    """Add the `perplexity` and `attention` subcommands."""
    p = subparsers.add_parser(
        "perplexity", help="perplexity (and KL against a reference model) over a text file",
        description="Score a UTF-8 text file in sliding windows: perplexity with a 95%% "
                    "confidence interval (standard error over chunks), and with --reference "
                    "the mean KL(reference || model) per token.")
    p.add_argument("model", help="model folder or hub repo id")
    p.add_argument("--file", required=True, help="the text to score (UTF-8)")
    p.add_argument("--context", type=int, default=512,
                   help="tokens per window (default 512)")
    p.add_argument("--stride", type=int, default=None,
                   help="new tokens scored per window, below --context (default: context - 1, "
                        "windows sharing one token; smaller gives each token more context)")
    p.add_argument("--reference", help="a reference model (e.g. the float source of a "
                                       "quantized MODEL) for the mean KL divergence")
    p.add_argument("--max-tokens", type=int, help="score only the text's first N tokens")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: float32 on the CPU, as stored elsewhere)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    a = subparsers.add_parser(
        "attention", help="attention maps of a prompt as PNG heatmaps",
        description="Draw where each token attends, per layer and head or averaged, with the "
                    "decoded tokens on the axes (special tokens such as <|im_start|> in red). "
                    "Gated DeltaNet layers show their recurrence's effective attention. "
                    "Needs matplotlib (pip install 'qwen-mlx[plots]').")
    a.add_argument("model", help="model folder or hub repo id")
    a.add_argument("prompt", help="the prompt (a user message through the chat template, "
                                  "unless --raw)")
    a.add_argument("--raw", action="store_true", help="encode the prompt as plain text")
    a.add_argument("--system", help="a system message before the prompt")
    a.add_argument("--layer", default="mean",
                   help="a layer index, or 'mean' over the softmax-attention layers (default)")
    a.add_argument("--head", default="mean", help="a head index, or 'mean' (default)")
    a.add_argument("--per-layer", action="store_true",
                   help="one PNG per layer (FILE-layerN.png) instead of one")
    a.add_argument("-o", "--out", default="attention.png", help="PNG path (default "
                                                                "./attention.png)")


def add_awq_arguments(p: argparse.ArgumentParser) -> None:
    """convert's AWQ flags."""
    p.add_argument("--awq", action="store_true",
                   help="activation-aware scaling (AWQ) from a calibration text, folded into "
                        "the norms and projections, before quantizing (implies --quantize)")
    p.add_argument("--calibration", metavar="FILE",
                   help="calibration text for --awq (default: the built-in English, Chinese "
                        "and code text)")
    p.add_argument("--awq-clip", action="store_true",
                   help="with --awq, also search each weight group's clipping range")


def awq_options(args: argparse.Namespace) -> dict:
    """convert()'s keyword arguments for the AWQ flags."""
    return {"awq": args.awq, "calibration": args.calibration, "awq_clip": args.awq_clip}


def _index(value: str, what: str) -> "int | str":
    from ..errors import QwenMLXError

    if value == "mean":
        return value
    try:
        return int(value)
    except ValueError:
        raise QwenMLXError(f"--{what} {value!r}: give an index or 'mean'") from None


def run(args: argparse.Namespace) -> int:
    """Run `perplexity` or `attention`; returns the exit status."""
    return {"perplexity": _perplexity, "attention": _attention}[args.command](args)


def _perplexity(args: argparse.Namespace) -> int:
    import json

    from .perplexity import perplexity_file

    result = perplexity_file(args.model, args.file, context=args.context, stride=args.stride,
                             reference=args.reference, max_tokens=args.max_tokens,
                             dtype=args.dtype, progress=sys.stderr.isatty())
    if args.json:
        data = dict(vars(result))
        data["interval"] = result.interval
        print(json.dumps(data, indent=2))
    else:
        print(result.summary())
    return 0


def _attention(args: argparse.Namespace) -> int:
    from ..checkpoint.hub import resolve_model_path
    from ..checkpoint.loader import load
    from .attention_maps import DELTANET_NOTE, attention_maps, prompt_ids, save_png

    layer, head = _index(args.layer, "layer"), _index(args.head, "head")
    folder = resolve_model_path(args.model)
    model, tokenizer = load(folder)
    ids = prompt_ids(tokenizer, args.prompt, chat=not args.raw, system=args.system)
    if args.per_layer:
        wanted = None
    elif layer == "mean":  # the mean is over softmax layers: no DeltaNet map is needed
        wanted = [i for i, kind in enumerate(model.config.layer_kinds) if kind == "attention"]
    else:
        wanted = [layer]
    maps = attention_maps(model, tokenizer, ids, layers=wanted)
    out = Path(args.out)
    title = f"{Path(str(args.model)).name}: {len(ids)} tokens"
    if args.per_layer:
        for m in maps.layers:
            path = save_png(maps, out.with_name(f"{out.stem}-layer{m.index}{out.suffix or '.png'}"),
                            layer=m.index, head=head, title=title)
            print(path)
    else:
        print(save_png(maps, out, layer=layer, head=head, title=title))
    if any(m.kind == "linear" for m in maps.layers) or model.config.is_hybrid:
        print(f"note: {DELTANET_NOTE}", file=sys.stderr)
    return 0
