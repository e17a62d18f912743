"""The Gated DeltaNet layer (`linear_attn`) of Qwen3-Next and Qwen3.5/3.6.

Exactly the computation of hybrid spec §2: projections, a causal depthwise
conv with SiLU over [q | k | v], L2-normalized q and k, β = sigmoid(b), the
float32 log decay g = -exp(A_log)·softplus(a + dt_bias), the delta rule,
the gated RMSNorm and out_proj. Decoding a token runs the recurrence; any
longer input runs the chunked (UT/WY) form of §2.3, which is matmuls, so
prefill costs a few matrix products per 64 tokens instead of a step per
token, on every backend. Its triangular solve doubles blocks with
matmuls too, so Metal and CUDA run the same code.

The layer works in the Qwen3.5 layout (in_proj_qkv, in_proj_z, in_proj_b,
in_proj_a); the loader permutes Qwen3-Next's grouped in_proj_qkvz/in_proj_ba
into it. conv1d.weight is stored [C, K, 1] as mlx-lm stores it.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import parallel
from .config import ModelConfig
from .norm import GatedRMSNorm
from .parallel import Linear

CHUNK = 64


def _unit_lower_inverse(a: mx.array) -> mx.array:
    """(I + A)^-1 for strictly lower-triangular A [..., n, n], n a power of two.

    By doubling blocks, as FLA's solve_tril merges them: the inverse of
    [[L1, 0], [C, L2]] is [[T1, 0], [-T2·C·T1, T2]]. Exact like a triangular
    solve (a power series of A cancels catastrophically when keys are alike),
    and nothing but batched matmuls.
    """
    n = a.shape[-1]
    lead = a.shape[:-2]
    blocks = mx.ones((*lead, n, 1, 1), dtype=a.dtype)  # the 1x1 diagonal blocks' inverses
    size = 1
    while size < n:
        pairs = n // (2 * size)
        grid = a.reshape(*lead, pairs, 2, size, pairs, 2, size)
        # Lower-left block of each merged pair: rows of its second half, columns of its first.
        c = mx.diagonal(grid[..., :, 1, :, :, 0, :], axis1=-4, axis2=-2)  # [..., s, s, pairs]
        c = mx.moveaxis(c, -1, -3)
        t1, t2 = blocks[..., 0::2, :, :], blocks[..., 1::2, :, :]
        lower = -(t2 @ c @ t1)
        top = mx.concatenate([t1, mx.zeros_like(t1)], axis=-1)
        bottom = mx.concatenate([lower, t2], axis=-1)
        blocks = mx.concatenate([top, bottom], axis=-2)
        size *= 2
    return blocks.reshape(*lead, n, n)


def chunked_delta_rule(q, k, v, g, beta, state, chunk: int = CHUNK):
    """The gated delta rule over T tokens, chunk by chunk (spec §2.3).

    q, k [B, H, T, Dk] (normalized, q scaled), v [B, H, T, Dv], g and beta
    [B, H, T], state [B, H, Dk, Dv]; all float32. Returns (o [B, H, T, Dv], state).
    """
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    pad = -T % chunk
    if pad:  # q = k = v = 0, β = 0, g = 0 are exactly neutral
        q, k, v = (mx.pad(t, [(0, 0), (0, 0), (0, pad), (0, 0)]) for t in (q, k, v))
        g, beta = (mx.pad(t, [(0, 0), (0, 0), (0, pad)]) for t in (g, beta))
    n = (T + pad) // chunk
    q, k = q.reshape(B, H, n, chunk, Dk), k.reshape(B, H, n, chunk, Dk)
    v = v.reshape(B, H, n, chunk, Dv)
    g, beta = g.reshape(B, H, n, chunk), beta.reshape(B, H, n, chunk)

    gamma = mx.cumsum(g, axis=-1)  # cumulative log decay inside each chunk
    idx = mx.arange(chunk)
    lower = idx[:, None] >= idx[None, :]
    # Γ_ij = exp(γ_i - γ_j) on and below the diagonal; masked before exp so nothing overflows.
    decay = mx.exp(mx.where(lower, gamma[..., :, None] - gamma[..., None, :], -mx.inf))
    kt = k.swapaxes(-1, -2)
    k_beta = k * beta[..., None]
    a = mx.where(idx[:, None] > idx[None, :], (k_beta @ kt) * decay, 0)
    t = _unit_lower_inverse(a)
    u = t @ (v * beta[..., None])
    w = t @ (k_beta * mx.exp(gamma)[..., None])
    p = (q @ kt) * decay
    q_decayed = q * mx.exp(gamma)[..., None]
    k_decayed = k * mx.exp(gamma[..., -1:] - gamma)[..., None]
    chunk_decay = mx.exp(gamma[..., -1])[..., None, None]

    outs = []
    for i in range(n):
        v_new = u[:, :, i] - w[:, :, i] @ state
        outs.append(q_decayed[:, :, i] @ state + p[:, :, i] @ v_new)
        state = state * chunk_decay[:, :, i] + k_decayed[:, :, i].swapaxes(-1, -2) @ v_new
    o = mx.stack(outs, axis=2).reshape(B, H, n * chunk, Dv)
    return (o[:, :, :T] if pad else o), state


def recurrent_delta_rule(q, k, v, g, beta, state):
    """One token of the gated delta rule (spec §2.2 step 5); shapes as `chunked_delta_rule`, T = 1."""
    state = state * mx.exp(g)[..., None]
    kt = k[:, :, 0]
    memory = (state * kt[..., None]).sum(axis=-2)
    delta = beta[:, :, 0, None] * (v[:, :, 0] - memory)
    state = state + kt[..., None] * delta[..., None, :]
    o = (state * q[:, :, 0][..., None]).sum(axis=-2)
    return o[:, :, None], state


def stepwise_delta_rule(q, k, v, g, beta, state):
    """The recurrence token by token, also returning the state after every token
    [B, H, T, Dk, Dv]: what a speculative verify needs to keep only a prefix."""
    outs, states = [], []
    for t in range(q.shape[2]):
        o, state = recurrent_delta_rule(*(x[:, :, t:t + 1] for x in (q, k, v, g, beta)), state)
        outs.append(o)
        states.append(state)
    return mx.concatenate(outs, axis=2), state, mx.stack(states, axis=2)


def delta_rule(q, k, v, g, beta, state):
    """The recurrence for one token, the chunked form for more."""
    T = q.shape[2]
    if T == 1:
        return recurrent_delta_rule(q, k, v, g, beta, state)
    # Short inputs (speculative verification) need no full 64-token chunk.
    chunk = CHUNK if T >= CHUNK else 1 << max(1, (T - 1).bit_length())
    return chunked_delta_rule(q, k, v, g, beta, state, chunk)


def l2_normalize(x: mx.array, eps: float = 1e-6) -> mx.array:
    """x / sqrt(sum(x²) + eps): the ε is added to the sum of squares, as FLA and HF do."""
    return x * mx.rsqrt((x * x).sum(axis=-1, keepdims=True) + eps)


class GatedDeltaNet(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        lc = config.linear
        self.num_k_heads, self.num_v_heads = lc.num_key_heads, lc.num_value_heads
        self.head_k_dim, self.head_v_dim = lc.key_head_dim, lc.value_head_dim
        self.key_dim, self.conv_dim, self.kernel = lc.key_dim, lc.conv_dim, lc.conv_kernel
        H = config.hidden_size
        self.in_proj_qkv = Linear(H, lc.conv_dim, bias=False)
        self.in_proj_z = Linear(H, lc.value_dim, bias=False)
        self.in_proj_b = Linear(H, lc.num_value_heads, bias=False)
        self.in_proj_a = Linear(H, lc.num_value_heads, bias=False)
        self.conv1d = nn.Conv1d(lc.conv_dim, lc.conv_dim, lc.conv_kernel, groups=lc.conv_dim,
                                bias=False)
        self.dt_bias = mx.ones((lc.num_value_heads,))
        self.A_log = mx.zeros((lc.num_value_heads,))
        self.norm = GatedRMSNorm(lc.value_head_dim, eps=config.rms_norm_eps)
        self.out_proj = Linear(lc.value_dim, H, bias=False)

    def rule_inputs(self, x: mx.array, cache=None):
        """What the delta rule reads, as this layer forms it: q, k (normalized, q scaled,
        repeated per value head), v [B, Hv, T, D] and g, β [B, Hv, T], all float32; then
        the conv inputs [B, T, C] and the conv state that preceded them (the cache's conv
        state advances)."""
        B, T, _ = x.shape
        Hk, Hv, Dk, Dv = self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim
        mixed = self.in_proj_qkv(x)
        b, a = self.in_proj_b(x), self.in_proj_a(x)

        conv, prev_conv = self._conv(mixed, cache)
        q = conv[..., :self.key_dim].reshape(B, T, Hk, Dk)
        k = conv[..., self.key_dim:2 * self.key_dim].reshape(B, T, Hk, Dk)
        v = conv[..., 2 * self.key_dim:].reshape(B, T, Hv, Dv)

        beta = mx.sigmoid(b).astype(mx.float32)
        g = -mx.exp(self["A_log"].astype(mx.float32)) * nn.softplus(
            a.astype(mx.float32) + self["dt_bias"].astype(mx.float32))
        r = Hv // Hk  # value head h reads key head h // r
        q, k = (l2_normalize(t.astype(mx.float32)) for t in (q, k))
        q = q * Dk ** -0.5
        q, k = (mx.repeat(t, r, axis=2) if r > 1 else t for t in (q, k))
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v.astype(mx.float32)))
        return q, k, v, g.transpose(0, 2, 1), beta.transpose(0, 2, 1), mixed, prev_conv

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        B, T, _ = x.shape
        Hv, Dk, Dv = self.num_v_heads, self.head_k_dim, self.head_v_dim
        z = self.in_proj_z(x).reshape(B, T, Hv, Dv)
        q, k, v, g, beta, mixed, prev_conv = self.rule_inputs(x, cache)
        heads = [q, k, v]
        state = cache.recurrent_state if cache is not None and cache.recurrent_state is not None else \
            mx.zeros((B, Hv, Dk, Dv), dtype=mx.float32)

        # A speculative verify keeps the state after each of its few tokens, so that
        # rejected drafts are dropped without running the accepted ones again; the
        # step-by-step recurrence is also what plain decoding computes.
        stepwise = cache is not None and cache.keep_steps and T > 1
        rule = stepwise_delta_rule if stepwise else delta_rule

        def run(s: slice):
            return rule(*(t[:, s] for t in heads), g[:, s], beta[:, s], state[:, s])

        # Value heads are independent: on the CPU each core takes a share of them.
        parts = parallel.split(Hv, T * Hv * Dk * Dv * 4, run, axis=1)
        out = run(slice(0, Hv)) if parts is None else parts
        o, state = out[0], out[1]
        if cache is not None:
            if stepwise:
                cache.steps = (prev_conv, mixed, out[2])
            cache.recurrent_state = state
            cache.offset += T
        o = o.transpose(0, 2, 1, 3).astype(x.dtype)
        y = self.norm(o, z).reshape(B, T, -1)
        return self.out_proj(y)

    def _conv(self, mixed: mx.array, cache) -> tuple[mx.array, mx.array]:
        """Causal depthwise conv over time, then SiLU, in the conv weight's dtype; also
        the conv inputs that preceded `mixed`."""
        B, T, C = mixed.shape
        K = self.kernel
        w = self.conv1d["weight"]  # [C, K, 1]
        prev = cache.conv_state if cache is not None else None
        if prev is None:
            prev = mx.zeros((B, K - 1, C), dtype=mixed.dtype)
        window = mx.concatenate([prev, mixed], axis=1)
        if cache is not None:
            cache.conv_state = window[:, T:]  # the last K-1 inputs
        window = window.astype(w.dtype)
        out = window[:, 0:T] * w[:, 0, 0]
        for j in range(1, K):
            out = out + window[:, j:j + T] * w[:, j, 0]
        return nn.silu(out).astype(mixed.dtype), prev
