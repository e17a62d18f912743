"""Rank 0 drives, the other ranks follow.

Rank 0 runs the library as on one machine (generate, ChatSession, a server) with a
`Driver` in place of the model: each forward first tells every rank what to run (a
small header: the op, which cache, the shape, the cache's offset, and in tensor mode
the token ids), then runs its own share. The other ranks sit in `follow`, running the
same forwards on their own shares and caches until rank 0 says stop (at exit).

A follower makes a cache whenever rank 0 does and frees it once rank 0's is garbage
(the ids of freed caches ride on the next header). It keeps them in step by offset: when rank 0's cache was
trimmed (a chat that regenerates or edits, a prompt reused), the follower trims its
own by as much, or empties it when rank 0's is empty. A hybrid's recurrent state cannot
be trimmed, so a hybrid whose session restores a snapshot stops with a clear error.
"""

from __future__ import annotations

import atexit
import weakref
from collections import deque
from typing import Any

import mlx.core as mx

from ..errors import QwenMLXError
from ..model.cache import cache_arrays
from ..model.decoder import Model
from .group import Comm
from .pipeline import pipeline_forward

MODES = ("tensor", "pipeline")
STOP, MAKE_CACHE, FORWARD = 1, 2, 3
FIELDS = 8  # an instruction's own fields; then the ids of caches rank 0 has freed
FREES = 4
HEADER = FIELDS + FREES
DTYPES = (mx.float32, mx.bfloat16, mx.float16)


class Cache(list):
    """Rank 0's per-layer cache list, with the id the followers know it by (a plain
    list cannot carry an attribute or a weak reference)."""

    cid: int = 0


class Stage:
    """One rank's sharded model and how it runs a forward in `mode`."""

    def __init__(self, model: Model, comm: Comm, mode: str):
        if mode not in MODES:
            raise QwenMLXError(f"--distributed {mode}: choose tensor or pipeline")
        self.model, self.comm, self.mode = model, comm, mode
        # The layers this rank runs: its cache's offset is read from the first.
        self.layers = model.layer_range if mode == "pipeline" else (0, len(model.model.layers))
        self.first = self.layers[0]

    def forward(self, tokens: mx.array | None, cache: list | None, *, shape: tuple[int, int],
                dtype: mx.Dtype, prompt_length: int | None, last_only: bool):
        if self.mode == "pipeline":
            return pipeline_forward(self.model, self.comm, tokens, cache, shape=shape,
                                    dtype=dtype, prompt_length=prompt_length,
                                    last_only=last_only)
        logits = self.model(tokens, cache, prompt_length=prompt_length, last_only=last_only)
        # Every rank evaluates the whole forward, so the collectives match on all of them.
        mx.eval(logits, cache_arrays(cache) if cache else [])
        return logits


class Driver:
    """Rank 0's model: `model(tokens, cache, ...)` and `model.make_cache(...)` as usual,
    run by every rank; any other attribute is the sharded model's."""

    # One request at a time: batched caches are merged and split on rank 0 by code the
    # followers do not see.
    can_batch = False

    def __init__(self, stage: Stage):
        self._stage = stage
        self._freed: deque[int] = deque()
        self._next_id = 1
        self._closed = False
        atexit.register(self.close)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stage.model, name)

    def _header(self, *values: int) -> None:
        freed = [self._freed.popleft() for _ in range(min(FREES, len(self._freed)))]
        row = list(values) + [0] * (FIELDS - len(values)) + freed + [0] * (FREES - len(freed))
        mx.eval(self._stage.comm.broadcast(mx.array(row, dtype=mx.int32)))

    def make_cache(self, **options) -> list:
        """A cache on every rank; kv_bits and max_kv_size as `Model.make_cache`."""
        kv_bits, max_kv = options.get("kv_bits"), options.get("max_kv_size")
        cache = Cache(self._stage.model.make_cache(**options))
        cache.cid, self._next_id = self._next_id, self._next_id + 1
        with self._stage.comm.named():
            self._header(MAKE_CACHE, cache.cid, kv_bits or 0, max_kv or 0)
        # Freed on the followers with the next instruction (never a collective from
        # inside the garbage collector).
        weakref.finalize(cache, self._freed.append, cache.cid)
        return cache

    def __call__(self, inputs: mx.array, cache: list | None = None, *,
                 prompt_length: int | None = None, last_only: bool = False,
                 return_hidden: bool = False) -> mx.array:
        if return_hidden:
            raise QwenMLXError("speculative decoding (a draft model or the MTP head) does not "
                               "run distributed: leave out --draft-model and --speculative")
        cid = 0
        if cache is not None:
            cid = getattr(cache, "cid", 0)
            if not cid:
                raise QwenMLXError(
                    "in a distributed run every cache must come from the model's make_cache: "
                    "a prompt cache file, or a copy a server's prompt cache made, is not "
                    "shared with the other ranks (leave out --prompt-cache; serve with "
                    "--cache-memory 0)")
        stage = self._stage
        B, L = inputs.shape
        offset = cache[stage.first].offset if cache else 0
        dtype = DTYPES.index(_compute_dtype(stage.model))
        with stage.comm.named():
            self._header(FORWARD, cid, B, L, prompt_length or 0, int(last_only), offset, dtype)
            if stage.mode == "tensor":
                inputs = stage.comm.broadcast(inputs.astype(mx.int32))
            return stage.forward(inputs, cache, shape=(B, L), dtype=DTYPES[dtype],
                                 prompt_length=prompt_length, last_only=last_only)

    def close(self) -> None:
        """Tell the followers to stop (once; also at exit)."""
        if self._closed or self._stage.comm.broken:
            return
        self._closed = True
        try:
            self._header(STOP)
        except RuntimeError:
            pass  # a follower is gone already; its death was reported where it happened


def _compute_dtype(model: Model) -> mx.Dtype:
    """The dtype hidden states travel in: the final norm's output dtype (rank 0)."""
    norm = model.model.norm
    return getattr(norm, "output_dtype", None) or norm.weight.dtype


def follow(stage: Stage) -> None:
    """A follower's loop: run rank 0's forwards on this rank's share until it stops."""
    comm = stage.comm
    caches: dict[int, list] = {}
    with comm.named():
        while True:
            header = comm.broadcast(mx.zeros((HEADER,), dtype=mx.int32)).tolist()
            for cid in header[FIELDS:]:
                caches.pop(cid, None)
            header, op = header[:FIELDS], header[0]
            if op == STOP:
                return
            if op == MAKE_CACHE:
                _, cid, kv_bits, max_kv = header[:4]
                caches[cid] = stage.model.make_cache(kv_bits=kv_bits or None,
                                                     max_kv_size=max_kv or None)
                continue
            if op != FORWARD:
                raise QwenMLXError(f"unknown instruction {op} from rank 0: every rank must run "
                                   "the same qwen-mlx version")
            _, cid, B, L, prompt_length, last_only, offset, dtype = header
            cache = caches[cid] if cid else None
            if cache is not None:
                _follow_offset(cache[slice(*stage.layers)], offset, comm)
            tokens = None
            if stage.mode == "tensor":
                tokens = comm.broadcast(mx.zeros((B, L), dtype=mx.int32))
            stage.forward(tokens, cache, shape=(B, L), dtype=DTYPES[dtype],
                          prompt_length=prompt_length or None, last_only=bool(last_only))


def _follow_offset(cache: list, offset: int, comm: Comm) -> None:
    """Trim (or empty) this rank's layers' caches to rank 0's offset before a forward."""
    mine = cache[0].offset
    if mine == offset:
        return
    if mine > offset:
        if offset == 0:
            from ..generate.generation import clear_cache

            clear_cache(cache)
            return
        if all(c.trim(mine - offset) for c in cache):
            return
    raise QwenMLXError(
        f"{comm.name()}: rank 0's cache holds {offset} positions and this rank's {mine}; the "
        "caches went out of step (a hybrid's recurrent state cannot be rewound: restoring a "
        "chat snapshot is not supported distributed)")
