"""`qwen-mlx serve`: the command line of the OpenAI-compatible server."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ..errors import QwenMLXError

API_KEY_ENV = "QWEN_MLX_API_KEY"


def _size(text: str) -> int:
    """Bytes from '512M', '2G', '1048576'."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 512M, 2G)") from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `serve` to the CLI's subcommands."""
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model at /v1/chat/completions, /v1/completions, /v1/models, "
                    "/health and /metrics, decoding concurrent requests in one batch. "
                    "--model takes a folder or hub id, loaded as chat loads it.")
    p.add_argument("-m", "--model", help="model folder or hub repo id "
                                         "(default: the chat default)")
    p.add_argument("--revision", help="hub branch, tag or commit")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--model-name", action="append", dest="model_names",
                   help="a name clients may send as `model` (repeatable; default: the "
                        "--model value and the folder's name)")
    p.add_argument("--api-key", help=f"require Authorization: Bearer KEY (or set {API_KEY_ENV})")
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests decoded together (default 8)")
    p.add_argument("--cache-memory", type=_size, default=_size("1G"),
                   help="prompt cache bound (default 1G; 0 turns it off)")
    p.add_argument("--max-tokens", type=int, default=4096,
                   help="the most tokens one reply may ask for (default 4096)")
    p.add_argument("--default-max-tokens", type=int, default=2048,
                   help="reply length when a request gives none (default 2048)")
    p.add_argument("--max-body", type=_size, default=_size("4M"),
                   help="largest request body (default 4M)")
    p.add_argument("--prefill-step-size", type=int, default=512)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-context", type=int, help="context limit in tokens")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds Ctrl+C waits for running requests (default 30)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    from ..distributed.cli import add_arguments as add_distributed_arguments

    add_distributed_arguments(p)
    return p


def build_server(args: argparse.Namespace):
    """Load the model as `chat` does and make the `Server` (no socket yet); None on a
    distributed run's follower rank, after rank 0 ended."""
    from ..checkpoint.loader import load
    from ..checkpoint.models import DEFAULT_MODEL, prepare_model
    from .app import Limits, Server

    for name in ("max_batch", "max_tokens", "default_max_tokens", "prefill_step_size"):
        if getattr(args, name) < 1:
            raise QwenMLXError(f"--{name.replace('_', '-')} must be at least 1, "
                               f"got {getattr(args, name)}")
    if not 0 <= args.port <= 65535:
        raise QwenMLXError(f"--port {args.port} is not a port (0 to 65535)")
    key = args.api_key or os.environ.get(API_KEY_ENV) or None
    source = args.model or DEFAULT_MODEL
    folder = prepare_model(source, revision=args.revision)
    batch, cache_memory = args.max_batch, args.cache_memory
    if getattr(args, "distributed", None):
        from ..distributed.cli import setup

        loaded = setup(folder, args.distributed, backend=args.distributed_backend,
                       dtype=args.dtype, max_context=args.max_context)
        if loaded is None:
            return None  # a follower: it ran rank 0's forwards until rank 0 ended
        model, tokenizer = loaded
        # The other ranks mirror one request's caches at a time and cannot see copies.
        batch, cache_memory = 1, 0
    else:
        model, tokenizer = load(folder, dtype=args.dtype, max_context=args.max_context)
    if tokenizer is None:
        raise QwenMLXError(f"{folder} has no tokenizer.json: the server needs one")
    names = args.model_names or list(dict.fromkeys([source, Path(folder).name]))
    limits = Limits(max_body=args.max_body, max_tokens=args.max_tokens,
                    default_max_tokens=min(args.default_max_tokens, args.max_tokens))
    return Server(model, tokenizer, names, api_key=key, limits=limits,
                  max_batch=batch, prefill_step=args.prefill_step_size,
                  cache_memory=cache_memory)


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl+C, which stops taking requests and lets running ones finish."""
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(message)s")
    server = build_server(args)
    if server is None:
        return 0  # a distributed follower, done when rank 0 stopped
    if args.host not in ("127.0.0.1", "localhost", "::1") and not server.api_key:
        print(f"qwen-mlx: warning: serving on {args.host} without --api-key: anyone who "
              "can reach this port can use the model", file=sys.stderr)
    config = uvicorn.Config(server.app, host=args.host, port=args.port,
                            log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=args.drain_timeout)
    print(f"qwen-mlx: serving {', '.join(server.names)} at http://{args.host}:{args.port}/v1",
          file=sys.stderr)
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the Ctrl+C it drained for: the shutdown was clean
    return 0
