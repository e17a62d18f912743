"""Pipeline parallelism: each rank holds a contiguous range of layers.

Rank 0 holds the embedding, the first layers, the final norm and the vocabulary head;
rank r > 0 holds layers [a_r, b_r). A forward passes the hidden states round the ring
with `mx.distributed.send`/`recv`: 0 -> 1 -> ... -> N-1 -> 0, where rank 0 turns
them into logits. One hop carries B·L·hidden values (the last hop, the last position
only when only its logits are wanted), so a decoded token costs N small messages:
the mode for links too slow for tensor mode's two all-reduces per layer.
"""

from __future__ import annotations

import mlx.core as mx

from ..errors import QwenMLXError
from ..model.cache import cache_arrays
from ..model.decoder import Model
from .group import Comm
from .plan import Idle, Plan, drop_module


def layer_ranges(num_layers: int, size: int, where: str) -> list[tuple[int, int]]:
    """Contiguous layer ranges, one per rank, as even as they come (later ranks take
    the extra layers: rank 0 also runs the embedding and the head)."""
    if num_layers < size:
        raise QwenMLXError(f"{where}: the model has {num_layers} layers, fewer than the "
                           f"{size} ranks; pipeline mode needs a layer per rank")
    base, extra = divmod(num_layers, size)
    sizes = [base + (1 if r >= size - extra else 0) for r in range(size)]
    bounds = [sum(sizes[:r]) for r in range(size + 1)]
    return [(bounds[r], bounds[r + 1]) for r in range(size)]


def shard_pipeline(model: Model, comm: Comm) -> Plan:
    """Keep this rank's layers (and, on rank 0, the embedding, norm and head); the MTP
    head is dropped. Sets `model.layer_range`."""
    plan = Plan()
    plan.drop_prefixes.append("mtp.")
    model.mtp = None
    first, last = layer_ranges(model.config.num_layers, comm.size, comm.name())[comm.rank]
    layers = model.model.layers
    for i in range(len(layers)):
        if not first <= i < last:
            plan.drop_prefixes.append(f"model.layers.{i}.")
            layers[i] = Idle()
    if not comm.lead:
        drop_module(plan, model.model, "embed_tokens", "model.embed_tokens", Idle())
        drop_module(plan, model.model, "norm", "model.norm", Idle())
        if "lm_head" in model:
            drop_module(plan, model, "lm_head", "lm_head", Idle())
    model.layer_range = (first, last)
    return plan


def pipeline_forward(model: Model, comm: Comm, inputs: mx.array | None, cache: list | None,
                     *, shape: tuple[int, int], dtype: mx.Dtype, prompt_length: int | None,
                     last_only: bool) -> mx.array | None:
    """This rank's part of one forward over tokens of `shape` [B, L]; rank 0 returns
    the logits, every other rank None. Evaluated here, stage by stage, so that each
    rank's sends and receives run in the ring's order."""
    first, last = model.layer_range
    B, L = shape
    H = model.config.hidden_size
    offset = cache[first].offset if cache else 0
    positions = model.positions(offset, L, prompt_length)
    r, n = comm.rank, comm.size
    if comm.lead:
        h = model.model.embed_tokens(inputs)
    else:
        h = comm.recv((B, L, H), dtype, r - 1)
    for i in range(first, last):
        h = model.model.layers[i](h, positions, cache[i] if cache else None)
    local = cache_arrays(cache[first:last]) if cache else []
    if n > 1:
        if r == n - 1 and last_only:
            h = h[:, -1:]
        if not comm.lead:
            mx.eval(comm.send(h, (r + 1) % n), local)
            return None
        mx.eval(comm.send(h, 1), local)
        h = comm.recv((B, 1 if last_only else L, H), dtype, n - 1)
    if last_only:
        h = h[:, -1:]
    logits = model.head(model.model.norm(h))
    mx.eval(logits, local)
    return logits
