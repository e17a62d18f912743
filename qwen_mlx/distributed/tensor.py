"""Tensor parallelism: every rank holds a share of every layer and the ranks sum.

Per layer (Megatron's split, as mlx-lm shards its models):
- attention: q/k/v split by heads (output rows; a gated q_proj's rows are per head, so
  the gate goes with its head), o_proj by its input columns; KV heads fewer than the
  ranks are replicated so each rank holds the one its query heads read;
- Gated DeltaNet: value heads split, with the key heads they read; in_proj_qkv's
  q, k and v sections, the conv channels, z, b, a, dt_bias and A_log follow, and
  out_proj is split by input columns; the recurrent and conv states are per rank;
- MLP and shared expert: gate/up by output rows, down by input columns;
- MoE: experts split across ranks, the router replicated: each rank runs the tokens'
  choices among its own experts (the others' weights are zero here);
- the embedding and the vocabulary head (its own or the tied one) split by rows: a
  lookup is summed, logits are gathered.
Each block's partial output goes through one `all_sum`, so a layer costs two.
Quantized weights split on group boundaries (else a clear error).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..model.attention import Attention
from ..model.decoder import Model
from ..model.deltanet import GatedDeltaNet
from ..model.moe import MLP, SparseMoE
from .group import Comm
from .plan import (Idle, Plan, drop_module, even_ranges, head_range, split_in, split_out,
                   swap)


class Summed:
    """A block whose output is a partial sum on each rank."""

    def __call__(self, *args, **kwargs) -> mx.array:
        return self._comm.all_sum(super().__call__(*args, **kwargs))


class VocabRows:
    """An embedding holding vocabulary rows [start, start + n): lookups of other ids are
    zero here and the ranks sum; as the head, each rank's logits are gathered."""

    def __call__(self, ids: mx.array) -> mx.array:
        local = ids - self._start
        inside = (local >= 0) & (local < self._rows)
        e = super().__call__(mx.where(inside, local, 0))
        return self._comm.all_sum(e * inside[..., None].astype(e.dtype))

    def as_linear(self, x: mx.array) -> mx.array:
        return self._comm.gather_last(super().as_linear(x))


class GatheredRows:
    """A linear head holding some output rows: each rank's outputs are gathered."""

    def __call__(self, x: mx.array) -> mx.array:
        return self._comm.gather_last(super().__call__(x))


class LocalExperts:
    """Stacked experts [start, start + n) of all E: a token's choices among other
    ranks' experts give zero here."""

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        local = indices - self._start
        inside = (local >= 0) & (local < self._count)
        y = super().__call__(x, mx.where(inside, local, 0))
        return y * inside[..., None].astype(y.dtype)


def _rows(heads: tuple[int, int], width: int) -> tuple[tuple[int, int], ...]:
    return ((heads[0] * width, heads[1] * width),)


def shard_tensor(model: Model, comm: Comm) -> Plan:
    """Shard `model` in place for this rank of `comm`; returns the plan, which the loader
    applies to checkpoint tensors. The MTP head is dropped (speculative decoding does
    not run distributed)."""
    plan = Plan()
    r, n = comm.rank, comm.size
    where = comm.name()
    c = model.config
    if model.mtp is not None:
        model.mtp = None
    plan.drop_prefixes.append("mtp.")

    start, stop = even_ranges(c.vocab_size, n, r, "vocab_size", where)
    embed = model.model.embed_tokens
    split_out(plan, embed, "model.embed_tokens", ((start, stop),))
    swap(embed, VocabRows, _comm=comm, _start=start, _rows=stop - start)
    if not c.tie_word_embeddings:
        split_out(plan, model.lm_head, "lm_head", ((start, stop),))
        swap(model.lm_head, GatheredRows, _comm=comm)

    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        if layer.kind == "linear":
            _shard_deltanet(plan, layer.linear_attn, f"{p}.linear_attn", comm)
        else:
            _shard_attention(plan, layer.self_attn, f"{p}.self_attn", comm)
        if isinstance(layer.mlp, SparseMoE):
            _shard_moe(plan, layer.mlp, f"{p}.mlp", comm)
        else:
            layer.mlp = _shard_mlp(plan, layer, "mlp", f"{p}.mlp", comm, summed=True)
    return plan


def _shard_attention(plan: Plan, attn: Attention, path: str, comm: Comm) -> None:
    r, n, where = comm.rank, comm.size, comm.name()
    D = attn.head_dim
    q = even_ranges(attn.num_heads, n, r, f"{path}: attention heads", where)
    kv = head_range(attn.num_kv_heads, n, r, f"{path}: KV heads", where)
    split_out(plan, attn.q_proj, f"{path}.q_proj", _rows(q, 2 * D if attn.gated else D))
    split_out(plan, attn.k_proj, f"{path}.k_proj", _rows(kv, D))
    split_out(plan, attn.v_proj, f"{path}.v_proj", _rows(kv, D))
    split_in(plan, attn.o_proj, f"{path}.o_proj", _rows(q, D), r, where)
    attn.num_heads, attn.num_kv_heads = q[1] - q[0], kv[1] - kv[0]
    swap(attn, Summed, _comm=comm)


def _shard_deltanet(plan: Plan, gdn: GatedDeltaNet, path: str, comm: Comm) -> None:
    r, n, where = comm.rank, comm.size, comm.name()
    Dk, Dv = gdn.head_k_dim, gdn.head_v_dim
    v = even_ranges(gdn.num_v_heads, n, r, f"{path}: linear_num_value_heads", where)
    k = head_range(gdn.num_k_heads, n, r, f"{path}: linear_num_key_heads", where)
    key_dim = gdn.key_dim
    # in_proj_qkv's rows and the conv channels are [q | k | v]: keep each section's share.
    channels = ((k[0] * Dk, k[1] * Dk), (key_dim + k[0] * Dk, key_dim + k[1] * Dk),
                (2 * key_dim + v[0] * Dv, 2 * key_dim + v[1] * Dv))
    split_out(plan, gdn.in_proj_qkv, f"{path}.in_proj_qkv", channels)
    split_out(plan, gdn.conv1d, f"{path}.conv1d", channels)
    split_out(plan, gdn.in_proj_z, f"{path}.in_proj_z", _rows(v, Dv))
    split_out(plan, gdn.in_proj_b, f"{path}.in_proj_b", (v,))
    split_out(plan, gdn.in_proj_a, f"{path}.in_proj_a", (v,))
    for key in ("dt_bias", "A_log"):
        plan.slices[f"{path}.{key}"] = (0, (v,))
        gdn[key] = plan.take(f"{path}.{key}", gdn[key])
    split_in(plan, gdn.out_proj, f"{path}.out_proj", _rows(v, Dv), r, where)
    gdn.num_k_heads, gdn.num_v_heads = k[1] - k[0], v[1] - v[0]
    gdn.key_dim = gdn.num_k_heads * Dk
    gdn.conv_dim = 2 * gdn.key_dim + gdn.num_v_heads * Dv
    swap(gdn, Summed, _comm=comm)


def _mlp_splits(mlp: MLP, n: int) -> bool:
    """Whether an MLP's intermediate width splits evenly, on quantization group bounds."""
    inter = mlp.gate_proj["weight"].shape[0]
    if inter % n:
        return False
    group = getattr(mlp.down_proj, "group_size", None) if "scales" in mlp.down_proj else None
    return group is None or (inter // n) % group == 0


def _shard_mlp(plan: Plan, parent: nn.Module, key: str, path: str, comm: Comm, *,
               summed: bool) -> nn.Module:
    """Split an MLP's intermediate width; where it does not split evenly (or not on
    quantization groups), rank 0 runs it whole and the others hold nothing."""
    mlp = parent[key]
    r, n = comm.rank, comm.size
    if _mlp_splits(mlp, n):
        inter = ((mlp.gate_proj["weight"].shape[0] * r // n,
                  mlp.gate_proj["weight"].shape[0] * (r + 1) // n),)
        split_out(plan, mlp.gate_proj, f"{path}.gate_proj", inter)
        split_out(plan, mlp.up_proj, f"{path}.up_proj", inter)
        split_in(plan, mlp.down_proj, f"{path}.down_proj", inter, r, comm.name())
    elif r:
        drop_module(plan, parent, key, path, Idle())
        mlp = parent[key]
    return swap(mlp, Summed, _comm=comm) if summed else mlp


def _shard_moe(plan: Plan, moe: SparseMoE, path: str, comm: Comm) -> None:
    r, n, where = comm.rank, comm.size, comm.name()
    experts = moe.switch_mlp
    count = experts.gate_proj["weight"].shape[0]
    first, last = even_ranges(count, n, r, f"{path}: num_experts", where)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        split_out(plan, experts[proj], f"{path}.switch_mlp.{proj}", ((first, last),))
    swap(experts, LocalExperts, _start=first, _count=last - first)
    if moe.has_shared:
        # Partial like the routed sum; the replicated sigmoid gate scales each part.
        _shard_mlp(plan, moe, "shared_expert", f"{path}.shared_expert", comm, summed=False)
    swap(moe, Summed, _comm=comm)
