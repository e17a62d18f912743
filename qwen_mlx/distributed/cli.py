"""What the command line calls: load this rank's share, then lead or follow.

    loaded = setup(folder, "tensor", dtype=..., rope_scaling=...)
    if loaded is None:      # a follower: it ran rank 0's forwards until rank 0 ended
        return 0
    model, tokenizer = loaded  # rank 0: use them as `load`'s, print as usual

Under `mlx.launch` every rank runs the same command; only rank 0 gets past `setup`,
so only rank 0 prints, reads stdin or serves HTTP.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..checkpoint.loader import load
from .group import init
from .pipeline import shard_pipeline
from .runner import MODES, Driver, Stage, follow
from .tensor import shard_tensor

SHARDERS = {"tensor": shard_tensor, "pipeline": shard_pipeline}


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
    if stage.comm.lead:
        return Driver(stage), tokenizer
    follow(stage)
    return None
