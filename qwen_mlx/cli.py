"""The `qwen-mlx` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import struct
import sys
from pathlib import Path
from typing import Iterator

from . import __version__
from .errors import QwenMLXError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen-mlx",
        description="Run Qwen models (Qwen1 to Qwen3.5/3.6 and Qwen3-Next) locally with MLX.",
    )
    parser.add_argument("--version", action="version", version=f"qwen-mlx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chat = sub.add_parser(
        "chat", help="chat in the terminal (the default model is downloaded and converted once)",
        description="Open the chat UI. --model takes an MLX or Hugging Face folder or a hub "
                    "repo id; a hub model that is not in MLX form is converted to 4-bit once "
                    "and cached.")
    chat.add_argument("-m", "--model", help="model folder or hub repo id (default: Qwen/Qwen3.5-0.8B)")
    chat.add_argument("--revision", help="hub branch, tag or commit")
    chat.add_argument("--rope-scaling", choices=["yarn"],
                      help="extend the context with YaRN (best only for long inputs)")
    chat.add_argument("--rope-factor", type=finite_float, default=4.0)
    chat.add_argument("--max-context", type=int, help="context limit in tokens")
    add_convert_arguments(sub.add_parser(
        "convert", help="convert a hub repo or local checkpoint into an MLX folder, optionally quantized",
        description="Convert a Qwen checkpoint (a hub repo id or a local folder) into an MLX "
                    "folder that qwen-mlx and mlx-lm both load, optionally quantized on this "
                    "machine."))
    add_generate_arguments(sub.add_parser(
        "generate", help="generate a reply to one prompt, streamed, with speed stats",
        description="Generate text from a prompt given as an argument, on stdin or in a file."))
    bench = sub.add_parser(
        "bench", help="measure prefill, decode, TTFT and memory, side by side with mlx-lm",
        description="Benchmark a model (folder, hub id or --shape) on this machine, against "
                    "mlx-lm on the same converted weights when it is installed.")
    bench.add_argument("model", nargs="?", help="model folder or hub repo id")
    bench.add_argument("--shape", help="a synthetic shape with random weights instead: "
                                       "qwen3-0.6b-shape, qwen3-30b-a3b-shape-small, tiny-shape")
    bench.add_argument("--layers", type=int,
                       help="layers of the synthetic shape, from 1 to its full depth "
                            "(default: 4, or all when it has fewer)")
    bench.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 5, 6, 8])
    bench.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128])
    bench.add_argument("--contexts", default="128,1024", help="prompt lengths, comma-separated")
    bench.add_argument("--gen", type=int, default=32, help="tokens to generate per run")
    bench.add_argument("--reps", type=int, default=3)
    bench.add_argument("--defaults", action="store_true",
                       help="each tool's default dtype instead of float32 for both")
    bench.add_argument("--no-peers", action="store_true", help="do not run mlx-lm")
    bench.add_argument("--quality", action="store_true",
                       help="also KL and top-1 agreement against the float model for 3, 4 and "
                            "8 bits and the mixed recipes (needs a float source)")
    spec = bench.add_mutually_exclusive_group()
    spec.add_argument("--speculative", choices=["mtp"],
                      help="measure speculative decoding with the MTP block (a random one "
                           "when the checkpoint has none) instead")
    spec.add_argument("--draft-model", metavar="PATH|HUB_ID|layers:N",
                      help="measure speculative decoding with this draft instead; layers:N "
                           "drafts with the target's first N layers and damps the rest (see "
                           "--damp), so that draft and target agree by construction")
    bench.add_argument("--num-draft-tokens", type=int, help="drafts per step")
    bench.add_argument("--damp", default="0.05,0.2,0.5,1",
                       help="with --draft-model layers:N, the factors the later layers' outputs "
                            "are scaled by, one row each (default 0.05,0.2,0.5,1)")
    bench.add_argument("--out", default="bench-results",
                       help="folder for bench.json, bench.md and bench.png (default: "
                            "./bench-results, in the current folder)")
    bench.add_argument("--work", default=None,
                       help="folder for the synthetic checkpoints and converted models, "
                            "which are kept for the next run (default: ~/.cache/qwen-mlx/bench)")
    bench.add_argument("--clean", action="store_true",
                       help="remove the synthetic checkpoints and converted models from the "
                            "work folder: alone, at once; with a model or --shape, after the run")
    from .quality.cli import add_parser as add_quality_parsers
    from .serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub)
    add_quality_parsers(sub)
    info = sub.add_parser("info", help="describe a model folder: family, shapes, context, "
                                       "vocabulary, dtype, parameters, quantization")
    info.add_argument("model", help="a local model folder (Hugging Face or mlx-lm layout)")
    parser.subcommands = sub.choices  # for a wrong flag: that command's usage
    return parser


def finite_float(text: str) -> float:
    """argparse type: a finite number, so the flag (not a config file) is blamed for nan."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    """The converter's flags, shared by `qwen-mlx convert` and convert.py."""
    from .checkpoint.quantize import BITS, GROUP_SIZES, RECIPES

    p.add_argument("source", help="hub repo id (e.g. Qwen/Qwen3-0.6B) or local folder")
    p.add_argument("-o", "--mlx-path", help="output folder (default: ./<name>-<4bit|mixed_4_6|"
                                            "...>; with --dequantize, ./<name>-float)")
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
    p.add_argument("--no-mtp", dest="mtp", action="store_false",
                   help="leave out a Qwen3.5/3.6/Next checkpoint's multi-token-prediction "
                        "head (kept by default, in mtp.safetensors, for speculative decoding)")
    from .quality.cli import add_awq_arguments

    add_awq_arguments(p)


def run_convert(args: argparse.Namespace) -> int:
    from .checkpoint.converter import convert
    from .checkpoint.quantize import RECIPES
    from .quality.cli import awq_options

    if args.bits is not None and args.recipe and RECIPES[args.recipe].low_bits:
        raise QwenMLXError(f"--recipe {args.recipe} sets the bits itself; drop --bits")
    result = convert(args.source, args.mlx_path, quantize=args.quantize or args.bits is not None,
                     bits=args.bits or 4, group_size=args.group_size, dtype=args.dtype,
                     recipe=args.recipe, revision=args.revision, force=args.force,
                     dequantize=args.dequantize, check=args.check, mtp=args.mtp,
                     **awq_options(args))
    print(result.summary())
    return 0


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="the prompt; '-' or none reads stdin")
    p.add_argument("-m", "--model", required=True, help="model folder or hub repo id")
    p.add_argument("-f", "--file", help="read the prompt from this file")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=True,
                      help="wrap the prompt in the chat template (default)")
    mode.add_argument("--raw", dest="chat", action="store_false",
                      help="feed the prompt to the model as it is")
    p.add_argument("-s", "--system", help="system prompt (chat mode)")
    think = p.add_mutually_exclusive_group()
    think.add_argument("--think", dest="enable_thinking", action="store_true", default=None,
                       help="thinking on (Qwen3; the default)")
    think.add_argument("--no-think", dest="enable_thinking", action="store_false",
                       help="thinking off")
    p.add_argument("--hide-thinking", action="store_true", help="print only the answer")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--temperature", type=float, help="0 means greedy (default: the checkpoint's)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--presence-penalty", type=float)
    p.add_argument("--frequency-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--kv-bits", type=int, choices=[4, 8], help="quantize the KV cache")
    p.add_argument("--max-kv-size", type=int, help="keep at most this many positions (rotating)")
    p.add_argument("--prefill-step-size", "--prefill-chunk", dest="prefill_step_size", type=int,
                   default=512, help="prompt tokens per prefill forward (default 512): its "
                                     "temporaries, not the context, bound prefill memory")
    add_long_context_arguments(p)
    p.add_argument("--rope-scaling", choices=["yarn", "linear", "dynamic", "default"],
                   help="extend the context (YaRN is what Qwen recommends)")
    p.add_argument("--rope-factor", type=finite_float, default=4.0)
    p.add_argument("--max-context", type=int, help="context limit in tokens")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prompt-cache", help="a cache file: reused when it matches the prompt's "
                                          "start, and saved after generating")
    p.add_argument("--revision", help="hub branch, tag or commit")
    spec = p.add_mutually_exclusive_group()
    spec.add_argument("--draft-model", metavar="PATH|HUB_ID",
                      help="speculative decoding with a small model of the same tokenizer "
                           "(e.g. Qwen/Qwen3-0.6B for Qwen3-8B)")
    spec.add_argument("--speculative", choices=["mtp"],
                      help="speculative decoding with the checkpoint's own MTP block "
                           "(Qwen3.5/3.6, Qwen3-Next)")
    p.add_argument("--num-draft-tokens", type=int,
                   help="drafts per step (default: 3 for a draft model, 2 for mtp)")
    from .distributed.cli import add_arguments as add_distributed_arguments

    add_distributed_arguments(p)


def add_long_context_arguments(p: argparse.ArgumentParser) -> None:
    """--dca and --qwen1-window, for generate."""
    p.add_argument("--dca", choices=["on", "off"],
                   help="Dual Chunk Attention (Qwen2.5-1M): on by itself when the config has "
                        "dual_chunk_attention_config; off runs plain attention")
    p.add_argument("--qwen1-window", nargs="?", const="default", metavar="W0,W1,...",
                   help="Qwen1 only: layer-wise window attention, lower layers within shorter "
                        "windows (the default rule, or one window per layer, 'none' for full)")


def apply_long_context(model, args: argparse.Namespace) -> None:
    """What --dca and --qwen1-window ask of a loaded model."""
    from .model.dca import set_dca
    from .model.long_context import set_qwen1_window

    if getattr(args, "dca", None):
        set_dca(model, args.dca == "on")
    spec = getattr(args, "qwen1_window", None)
    if spec:
        if spec == "default":
            set_qwen1_window(model, True)
        else:
            try:
                windows = [None if w.strip() == "none" else int(w) for w in spec.split(",")]
            except ValueError:
                raise QwenMLXError(f"--qwen1-window {spec!r}: give one window per layer, "
                                   "like 256,512,none") from None
            set_qwen1_window(model, windows)


def _read_prompt(args: argparse.Namespace) -> str:
    """The prompt's text, refused when it is empty or only white space."""
    text = _read_prompt_text(args)
    if not text.strip():
        where = (f"the file {args.file}" if args.file else
                 "the argument" if args.prompt not in (None, "-") else "stdin")
        raise QwenMLXError(f"the prompt is empty ({where}): give some text as an argument, "
                           "with --file, or on stdin")
    return text


def _read_prompt_text(args: argparse.Namespace) -> str:
    source = args.file or "stdin"
    try:
        if args.file:
            return Path(args.file).read_text(encoding="utf-8")
        if args.prompt not in (None, "-"):
            return args.prompt.encode("utf-8", "surrogateescape").decode("utf-8")
        if sys.stdin.isatty() and args.prompt is None:
            raise QwenMLXError("no prompt: give one as an argument, with --file, or on stdin")
        return sys.stdin.buffer.read().decode("utf-8")
    except OSError as e:
        raise QwenMLXError(f"{source}: cannot read the prompt ({e.strerror})") from None
    except UnicodeError:
        raise QwenMLXError(f"the prompt ({args.file or 'argument or stdin'}) is not valid UTF-8")


SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                  "presence_penalty", "frequency_penalty", "seed")


@contextlib.contextmanager
def _as_flags(names: tuple[str, ...]) -> Iterator[None]:
    """Re-raise a QwenMLXError that starts with one of `names` (top_p) as its flag (--top-p):
    the user typed the flag, so the message names it."""
    try:
        yield
    except QwenMLXError as e:
        text = str(e)
        name = next((n for n in names if re.match(rf"{n}\b", text)), None)
        if name is None:
            raise
        raise QwenMLXError("--" + name.replace("_", "-") + text[len(name):]) from None


def check_max_context(folder: Path, max_context: int | None, rope_scaling: str | None,
                      rope_factor: float) -> None:
    """Refuse a --max-context beyond what the model handles with its RoPE as it will run
    (positions past it come out garbled), saying which YaRN factor would cover it."""
    import math

    if max_context is None:
        return
    if max_context < 2:
        raise QwenMLXError(f"--max-context must be at least 2 positions, got {max_context}")
    from .checkpoint.loader import _named_rope_scaling
    from .model.config import ModelConfig

    override = _named_rope_scaling(rope_scaling, rope_factor) if rope_scaling else None
    config = ModelConfig.from_file(folder / "config.json", rope_scaling=override)
    native = config.native_context
    if max_context <= native:
        return
    if config.family == "qwen":
        raise QwenMLXError(f"--max-context {max_context:,} is above this model's context of "
                           f"{native:,} positions (Qwen1 extends its own context with dynamic "
                           "NTK up to max_position_embeddings); give at most that")
    base = config.rope.original_max_position_embeddings or config.max_position_embeddings
    factor = max(2, math.ceil(max_context / base))
    rope = config.rope.rope_type
    now = f" with {rope} x{config.rope.factor:g}" if rope != "default" else ""
    raise QwenMLXError(f"--max-context {max_context:,} is above this model's context of "
                       f"{native:,} positions{now}; extend it with --rope-scaling yarn "
                       f"--rope-factor {factor} ({factor * base:,} positions), or give at most "
                       f"{native:,}")


def run_generate(args: argparse.Namespace) -> int:
    import time

    from .checkpoint.hub import resolve_model_path
    from .checkpoint.loader import load
    from .generate.generation import check_cache_options, reuse_cache, stream_generate
    from .generate.prompt_cache import (check_writable, model_fingerprint, open_prompt_cache,
                                        write_prompt_cache)
    from .generate.sampling import SamplingParams
    from .generate.speculative import check_num_draft, load_draft

    for name in ("max_tokens", "prefill_step_size", "max_kv_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise QwenMLXError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    # The flags' own checks (NaN penalties, a negative seed), before a model loads; the
    # checkpoint's defaults fill in whatever is not given.
    given = {k: getattr(args, k) for k in SAMPLING_FLAGS}
    with _as_flags(SAMPLING_FLAGS):
        SamplingParams(**{k: v for k, v in given.items() if v is not None}).validate()
    if args.num_draft_tokens is not None:
        if not (args.draft_model or args.speculative):
            raise QwenMLXError("--num-draft-tokens needs --draft-model or --speculative mtp")
        with _as_flags(("num_draft_tokens",)):
            check_num_draft(args.num_draft_tokens)
    text = _read_prompt(args)
    if args.prompt_cache:
        check_writable(args.prompt_cache)  # now, not after the text is printed
    folder = resolve_model_path(args.model, revision=args.revision)
    check_max_context(folder, args.max_context, args.rope_scaling, args.rope_factor)
    started = time.perf_counter()
    options = dict(dtype=args.dtype, rope_scaling=args.rope_scaling,
                   rope_factor=args.rope_factor, max_context=args.max_context)
    if args.distributed:
        from .distributed.cli import check_arguments, setup

        check_arguments(args)  # before loading: what the other ranks cannot share
        loaded = setup(folder, args.distributed, backend=args.distributed_backend, **options)
        if loaded is None:
            return 0  # a follower: it ran rank 0's forwards until rank 0 ended
        model, tokenizer = loaded
    else:
        model, tokenizer = load(folder, **options)
    if tokenizer is None:
        from .checkpoint.converter import TOKENIZER_HINT

        if (folder / "qwen.tiktoken").is_file():
            raise QwenMLXError(f"{folder} has no tokenizer.json: convert it with `qwen-mlx "
                               "convert`, which writes one from its qwen.tiktoken")
        raise QwenMLXError(f"{folder} has no tokenizer.json, and converting does not make one: "
                           f"{TOKENIZER_HINT}")
    with _as_flags(("kv_bits", "max_kv_size")):
        check_cache_options(model, args.kv_bits, args.max_kv_size)
    apply_long_context(model, args)
    draft = load_draft(args.draft_model, dtype=args.dtype) if args.draft_model else None
    load_time = time.perf_counter() - started
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": text})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                            enable_thinking=args.enable_thinking)
    else:
        ids = tokenizer.encode(text, special=True)
    options = dict(kv_bits=args.kv_bits, max_kv_size=args.max_kv_size)
    cached: list[int] = []
    if args.prompt_cache:
        fingerprint = model_fingerprint(model, folder)
        cache, cached, notice = open_prompt_cache(args.prompt_cache, model,
                                                  fingerprint=fingerprint, **options)
        if notice:
            print(f"qwen-mlx: warning: {notice}", file=sys.stderr)
    else:
        cache = model.make_cache(**options)
    cached, new = reuse_cache(cache, cached, ids)
    from .model.long_context import context_info, memory_warning

    info = context_info(model, kv_bits=args.kv_bits, max_kv_size=args.max_kv_size,
                        prefill_chunk=args.prefill_step_size)
    if info.dca or info.yarn_factor:
        print(f"qwen-mlx: {info.describe()}", file=sys.stderr)
    warning = memory_warning(model, len(ids) + args.max_tokens, kv_bits=args.kv_bits,
                             max_kv_size=args.max_kv_size, prefill_chunk=args.prefill_step_size)
    if warning:
        print(f"qwen-mlx: warning: {warning}", file=sys.stderr)
    if draft is not None and cached:
        raise QwenMLXError("--draft-model cannot continue a --prompt-cache file (the draft "
                           "has no cache of its own there): leave one of them out")
    color = sys.stdout.isatty()
    phase, last, generated = None, None, []
    for r in stream_generate(
            model, tokenizer, new, prompt_cache=cache, max_tokens=args.max_tokens,
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            min_p=args.min_p, repetition_penalty=args.repetition_penalty,
            presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
            seed=args.seed, stop=args.stop, prefill_step_size=args.prefill_step_size,
            enable_thinking=args.enable_thinking, tokens_out=generated, draft_model=draft,
            speculative=args.speculative, num_draft_tokens=args.num_draft_tokens):
        if r.phase == "thinking" and args.hide_thinking:
            last = r
            continue
        if r.phase != phase and r.text:
            if phase is not None:
                sys.stdout.write("\n\n")
            phase = r.phase
        if r.text:
            dim = color and r.phase == "thinking"
            sys.stdout.write(f"\x1b[2m{r.text}\x1b[0m" if dim else r.text)
            sys.stdout.flush()
        last = r
    sys.stdout.write("\n")
    if args.prompt_cache:
        held = (cached + new + generated)[: cache[0].offset]
        write_prompt_cache(args.prompt_cache, cache, held, fingerprint=fingerprint, **options)
    if last is not None:
        print(f"load {load_time:.1f} s | prompt {last.prompt_tokens} tokens"
              f" ({last.cached_tokens} cached), TTFT {last.ttft:.2f} s, "
              f"{last.prompt_tps:.1f} tok/s | generation {last.generation_tokens} tokens, "
              f"{last.generation_tps:.1f} tok/s ({last.finish_reason}){_drafts(last)} | "
              f"peak memory {last.peak_memory:.2f} GB", file=sys.stderr)
    return 0


def _drafts(r) -> str:
    """The speculative figures of a reply, for the stats line."""
    if not r.draft_tokens:
        return ""
    return (f", drafts {r.draft_tokens}, accepted {r.accepted_tokens} "
            f"({100 * r.acceptance_rate:.0f}%)")


def run_chat(args: argparse.Namespace) -> int:
    from .checkpoint.models import DEFAULT_MODEL, prepare_model

    # Without a terminal the UI can neither draw nor read keys (and would spin).
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise QwenMLXError("chat needs a terminal (stdin and stdout); for a reply without "
                           "one, use `qwen-mlx generate -m MODEL PROMPT`")
    if args.rope_scaling:
        from .checkpoint.loader import _named_rope_scaling

        _named_rope_scaling(args.rope_scaling, args.rope_factor)  # a bad --rope-factor, now
    folder = prepare_model(args.model, revision=args.revision)
    # What the window would only report after opening: no config, no tokenizer, a
    # context it cannot reach.
    from .model.config import ModelConfig
    from .text.tokenizer import QwenTokenizer

    ModelConfig.from_file(folder / "config.json")
    QwenTokenizer.from_folder(folder)
    if args.max_context is not None:
        from tui.paths import resolve_data_dir
        from tui.store import ChatStore

        # The window applies YaRN from its saved settings unless the flags say otherwise.
        saved, _ = ChatStore(resolve_data_dir()).load_settings()
        rope, factor = ((args.rope_scaling, args.rope_factor) if args.rope_scaling
                        else (saved.rope_scaling, saved.rope_factor))
        check_max_context(folder, args.max_context, rope, factor)
    source = args.model or DEFAULT_MODEL
    name = folder.name if Path(source).expanduser().exists() else source
    from tui.app import run_chat as run_app

    run_app(folder, rope_scaling=args.rope_scaling, rope_factor=args.rope_factor,
            max_context=args.max_context, model_name=name)
    return 0


# What `bench` writes into its work folder: synthetic shapes (NAME-L4), converted
# models (NAME-4bit-g64) and --quality's conversions (NAME-quality-uniform-4-64).
_BENCH_FOLDER = re.compile(r".+-(L\d+|\d+bit-g\d+|quality-\w+-\d+-\d+)")


def clean_bench(work: Path) -> list[tuple[str, int]]:
    """Remove the folders `bench` wrote into `work` (nothing else): their names and bytes."""
    removed = []
    if not work.is_dir():
        return removed
    for entry in sorted(work.iterdir()):
        if (_BENCH_FOLDER.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink()
                and (entry / "config.json").is_file()):
            size = sum(p.stat().st_size for p in entry.rglob("*")
                       if p.is_file() and not p.is_symlink())
            try:
                shutil.rmtree(entry)
            except OSError as e:
                raise QwenMLXError(f"{entry}: cannot remove it ({e.strerror}); delete it by "
                                   "hand") from None
            removed.append((entry.name, size))
    try:
        work.rmdir()  # only when nothing else is left in it
    except OSError:
        pass
    return removed


def run_bench(args: argparse.Namespace) -> int:
    from .bench import SHAPES, benchmark, plot, synthetic_checkpoint
    from .checkpoint.converter import convert
    from .checkpoint.models import cache_dir

    work = Path(args.work).expanduser() if args.work else cache_dir() / "bench"
    if args.clean and not (args.model or args.shape):
        return _report_clean(work)
    try:
        contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    except ValueError:
        raise QwenMLXError(f"--contexts {args.contexts!r}: give numbers like 128,1024") from None
    if not contexts or min(contexts) < 2:
        raise QwenMLXError(f"--contexts {args.contexts!r}: each prompt length must be at least "
                           "2 tokens, as in 128,1024")
    if args.gen < 2:
        raise QwenMLXError(f"--gen must be at least 2 (decode speed needs two tokens), "
                           f"got {args.gen}")
    if args.reps < 1:
        raise QwenMLXError(f"--reps must be at least 1, got {args.reps}")
    if bool(args.model) == bool(args.shape):
        raise QwenMLXError("give a model folder or hub id, or --shape NAME (one of them)")
    if args.shape in SHAPES:
        full = SHAPES[args.shape]["num_hidden_layers"]
        if args.layers is None:
            args.layers = min(4, full)
        elif not 1 <= args.layers <= full:
            raise QwenMLXError(f"--layers must be from 1 to {full} ({args.shape} has {full} "
                               f"layers), got {args.layers}")
    out = Path(args.out)
    print(f"qwen-mlx bench: results go to {out.resolve()}; synthetic checkpoints and "
          f"converted models are kept in {work} for the next run ("
          + ("removed after this one" if args.clean else "`qwen-mlx bench --clean` removes them")
          + ")", file=sys.stderr, flush=True)
    if args.shape:
        source = work / f"{args.shape}-L{args.layers}"
        if not (source / "config.json").exists():
            synthetic_checkpoint(source, args.shape, args.layers)
        label = f"{args.shape}, {args.layers} layers"
    else:
        from .checkpoint.hub import resolve_model_path

        source = resolve_model_path(args.model)
        label = args.model
    from .model.config import ModelConfig

    folder = source
    if ModelConfig.from_file(source / "config.json").quantization is None:
        folder = work / f"{source.name}-{args.bits}bit-g{args.group_size}"
        if not (folder / "config.json").exists():
            convert(source, folder, quantize=True, bits=args.bits, group_size=args.group_size)
    if args.speculative or args.draft_model:
        return _speculative_bench(args, folder, contexts[0], out)
    report = benchmark(folder, label=f"{label}, {args.bits}-bit", contexts=contexts,
                       gen=args.gen, reps=args.reps, dtype=None if args.defaults else "float32",
                       peers=not args.no_peers,
                       log=lambda m: print(m, file=sys.stderr, flush=True))
    if args.quality:
        if folder == source:
            raise QwenMLXError("--quality compares against a float model: give a float "
                               "checkpoint or --shape, not an already quantized folder")
        from .bench import quantization_quality

        g = args.group_size
        # Bits and recipes at the chosen group size; 4 bits at every group size.
        choices = [("uniform", 3, g), *(("uniform", 4, size) for size in sorted({32, 64, 128, g})),
                   ("mixed_4_6", 4, g), ("uniform", 8, g)]
        report.quality = quantization_quality(
            source, work, choices, log=lambda m: print(m, file=sys.stderr, flush=True))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(report.to_json())
    (out / "bench.md").write_text(report.markdown() + "\n")
    plotted = plot(report, out / "bench.png")
    print(report.markdown())
    print(f"\nwrote {out / 'bench.json'}, {out / 'bench.md'}"
          + (f", {out / 'bench.png'}" if plotted else " (pip install matplotlib for plots)"),
          file=sys.stderr)
    if args.clean:
        _report_clean(work)
    return 0


def _speculative_bench(args: argparse.Namespace, folder: Path, context: int, out: Path) -> int:
    from .bench_speculative import markdown, speculative_benchmark
    from .generate.speculative import check_num_draft

    if args.num_draft_tokens is not None:
        with _as_flags(("num_draft_tokens",)):
            check_num_draft(args.num_draft_tokens)
    try:
        factors = [float(f) for f in args.damp.split(",") if f.strip()]
    except ValueError:
        raise QwenMLXError(f"--damp {args.damp!r}: give factors like 0.05,0.2,1") from None
    if not factors or not all(0 < f <= 1 for f in factors):
        raise QwenMLXError(f"--damp {args.damp!r}: each factor must be above 0 and at most 1")
    report = speculative_benchmark(
        folder, draft=args.draft_model, speculative=args.speculative,
        num_draft=args.num_draft_tokens, factors=factors, context=context, gen=args.gen,
        reps=args.reps, dtype=None if args.defaults else "float32", peers=not args.no_peers,
        bits=args.bits, group_size=args.group_size,
        log=lambda m: print(m, file=sys.stderr, flush=True))
    out.mkdir(parents=True, exist_ok=True)
    (out / "speculative.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (out / "speculative.md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {out / 'speculative.json'}, {out / 'speculative.md'}", file=sys.stderr)
    return 0


def _report_clean(work: Path) -> int:
    removed = clean_bench(work)
    if removed:
        freed = sum(size for _, size in removed)
        print(f"removed {len(removed)} folder{'s' if len(removed) != 1 else ''} "
              f"({freed / 1e6:,.1f} MB) from {work}: {', '.join(n for n, _ in removed)}",
              file=sys.stderr)
    else:
        print(f"nothing to remove: {work} holds no synthetic checkpoints or converted models",
              file=sys.stderr)
    return 0


def _info(args: argparse.Namespace) -> int:
    from .checkpoint.hub import is_repo_id
    from .model.config import ModelConfig

    folder = Path(args.model).expanduser()
    if not folder.exists():
        if is_repo_id(args.model):
            raise QwenMLXError(f"info needs a local folder, and {args.model} is not one (it "
                               "looks like a hub repo id): download or convert it first, e.g. "
                               f"`qwen-mlx convert {args.model}`, and give that folder")
        raise QwenMLXError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise QwenMLXError(f"{folder}: not a folder; info needs a model folder")
    config = ModelConfig.from_file(folder / "config.json")
    print(config.describe())
    native = config.native_context
    if config.rope.rope_type == "yarn":
        base = config.rope.original_max_position_embeddings or config.max_position_embeddings
        context = f"{native:,} positions (YaRN x{config.rope.factor:g} of {base:,})"
    elif config.family == "qwen":
        context = f"{native:,} positions (dynamic NTK and LogN)" if config.ntk_seq_length \
            else f"{native:,} positions"
    else:
        context = f"{native:,} positions (--rope-scaling yarn extends it)"
    print(f"context: {context}")
    print(f"vocabulary: {config.vocab_size:,} embedding rows; tied embeddings: "
          f"{'yes' if config.tie_word_embeddings else 'no'}")
    tensors = _tensor_headers(folder)
    params, mtp, stored = _parameter_count(tensors, config.quantization)
    print(f"parameters: {_count(params)}" + (f" (and {_count(mtp)} in the multi-token "
                                             "prediction head)" if mtp else ""))
    kinds = sorted(stored, key=stored.get, reverse=True)
    print(f"dtype: {config.torch_dtype or 'not given in config.json'}; stored as "
          + (", ".join(_DTYPE_NAMES.get(k, k) for k in kinds) or "nothing"))
    windows = sorted({w for w in config.sliding_windows if w})
    if windows:
        n = sum(1 for w in config.sliding_windows if w)
        print(f"sliding window {windows[0]} on {n} of {config.num_layers} layers")
    if config.quantization:
        print(f"quantized: {config.quantization['bits']} bits, group size "
              f"{config.quantization['group_size']}")
    return 0


_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64",
                "U32": "uint32 (packed quantized weights)", "I64": "int64", "I32": "int32",
                "U8": "uint8", "I8": "int8", "BOOL": "bool"}


def _tensor_headers(folder: Path) -> dict[str, dict]:
    """Every tensor's dtype and shape, from the safetensors headers alone (no weights read)."""
    from .checkpoint.loader import list_shards
    from .errors import WeightsError

    tensors: dict[str, dict] = {}
    for f in list_shards(folder):
        try:
            with open(f, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                if size > 100 * 2 ** 20:
                    raise ValueError(f"a header of {size:,} bytes")
                header = json.loads(fh.read(size))
            if not isinstance(header, dict):
                raise ValueError("the header is not an object")
        except OSError as e:
            raise WeightsError(f"{f}: cannot be read ({e.strerror})") from None
        except (struct.error, ValueError, UnicodeDecodeError, RecursionError) as e:
            raise WeightsError(f"{f}: not a safetensors file ({e}); it is truncated or corrupt: "
                               "download or convert it again") from None
        for name, info in header.items():
            if name != "__metadata__" and isinstance(info, dict):
                tensors[name] = info
    return tensors


def _parameter_count(tensors: dict[str, dict], quantization: dict | None,
                     ) -> tuple[int, int, dict[str, int]]:
    """(parameters, of them in an MTP head, elements stored per dtype). A quantized weight
    counts the values it packs; its scales and biases are not parameters."""
    import math

    params = mtp = 0
    stored: dict[str, int] = {}
    for name, info in tensors.items():
        shape, dtype = list(info.get("shape", [])), str(info.get("dtype", "?"))
        module, _, leaf = name.rpartition(".")
        quantized = f"{module}.scales" in tensors
        if quantized and leaf in ("scales", "biases"):
            continue
        n = math.prod(shape)
        stored[dtype] = stored.get(dtype, 0) + n
        if quantized and leaf == "weight" and shape:
            own = (quantization or {}).get(module)
            bits = own.get("bits") if isinstance(own, dict) else (quantization or {}).get("bits")
            n = n * 32 // int(bits or 4)
        params += n
        if name.startswith("mtp."):
            mtp += n
    return params - mtp, mtp, stored


def _serve(args: argparse.Namespace) -> int:
    from .serve.cli import run  # starlette and uvicorn load only for `serve`

    return run(args)


def _quality(args: argparse.Namespace) -> int:
    from .quality.cli import run

    return run(args)


def _count(n: int) -> str:
    return f"{n:,} ({n / 1e9:.2f} B)" if n >= 1e8 else f"{n:,} ({n / 1e6:.2f} M)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse reports these from the top parser; the subcommand's usage helps more.
        command = parser.subcommands.get(args.command) if args.command else None
        (command or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        from .model.parallel import cpu_count

        cpu_count()  # a bad QWEN_MLX_THREADS fails here, before a model loads
        return {"bench": run_bench, "chat": run_chat, "convert": run_convert,
                "generate": run_generate, "info": _info, "serve": _serve,
                "perplexity": _quality, "attention": _quality}[args.command](args)
    except QwenMLXError as e:
        print(f"qwen-mlx: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
