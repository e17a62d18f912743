"""What the command line calls: load this rank's share, then lead or follow.

    loaded = setup(folder, "tensor", dtype=..., rope_scaling=...)
    if loaded is None:      # a follower: it ran rank 0's forwards until rank 0 ended
        return 0
    model, tokenizer = loaded  # rank 0: use them as `load`'s, print as usual

Under `mlx.launch` every rank runs the same command; only rank 0 gets past `setup`,
so only rank 0 prints, reads stdin or serves HTTP.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..checkpoint.loader import load
from .group import init
from .pipeline import shard_pipeline
from .runner import MODES, Driver, Stage, follow
from .tensor import shard_tensor

SHARDERS = {"tensor": shard_tensor, "pipeline": shard_pipeline}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--distributed MODE and --distributed-backend, for generate (and serve)."""
    parser.add_argument(
        "--distributed", choices=MODES,
        help="run one share of the model per process started by mlx.launch: tensor (every "
             "layer split, two all-reduces per layer: Thunderbolt) or pipeline (contiguous "
             "layer ranges, one hop per rank per token: slower links); rank 0 prints")
    # Not --backend: mlx.launch takes that flag itself when no `--` precedes the command.
    parser.add_argument("--distributed-backend", default="any",
                        choices=["any", "ring", "mpi", "jaccl", "nccl"],
                        help="with --distributed: mx.distributed's backend (default: the one "
                             "mlx.launch set up)")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse, before loading, the options a distributed run cannot honour."""
    from ..errors import QwenMLXError

    for flag in ("prompt_cache", "draft_model", "speculative"):
        if getattr(args, flag, None):
            name = "--" + flag.replace("_", "-")
            raise QwenMLXError(f"{name} does not work with --distributed (the other ranks "
                               f"cannot share it): leave out {name}")


def load_share(folder: str | Path, mode: str, *, backend: str = "any", **options: Any):
    """(this rank's Stage, tokenizer): the sharded model, read as its share only."""
    from ..errors import QwenMLXError

    if mode not in MODES:
        raise QwenMLXError(f"--distributed {mode}: choose tensor or pipeline")
    comm = init(backend)
    with comm.named():
        model, tokenizer = load(folder, shard=lambda m: SHARDERS[mode](m, comm), **options)
    return Stage(model, comm, mode), tokenizer


def setup(folder: str | Path, mode: str, *, backend: str = "any", **options: Any):
    """Rank 0: (model, tokenizer) to use as `load`'s. Any other rank: follows rank 0's
    forwards until rank 0 ends, then returns None. `options` go to `load`."""
    stage, tokenizer = load_share(folder, mode, backend=backend, **options)
    if stage.comm.size == 1:
        print(f"qwen-mlx: warning: --distributed {mode} found no other ranks (start every "
              "rank with mlx.launch); running on this process alone", file=sys.stderr)
    if stage.comm.lead:
        return Driver(stage), tokenizer
    follow(stage)
    return None
