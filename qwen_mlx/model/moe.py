"""The feed-forward blocks: SwiGLU, and the sparse MoE with its optional shared expert."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .experts import SwitchGLU
from .parallel import Linear


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Qwen1's w2 is gate, w1 is up."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=bias)
        self.up_proj = Linear(hidden, intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """Top-k routed experts, plus the sigmoid-gated shared expert of Qwen2-MoE,
    Qwen3-Next and Qwen3.5-MoE."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        moe = config.moe
        self.top_k, self.norm_topk_prob = moe.top_k, moe.norm_topk_prob
        self.gate = Linear(config.hidden_size, moe.num_experts, bias=False)
        self.switch_mlp = SwitchGLU(config.hidden_size, moe.intermediate_size, moe.num_experts)
        if moe.shared_intermediate_size:
            self.shared_expert = MLP(config.hidden_size, moe.shared_intermediate_size)
            self.shared_expert_gate = Linear(config.hidden_size, 1, bias=False)
        self.has_shared = bool(moe.shared_intermediate_size)

    def __call__(self, x: mx.array) -> mx.array:
        # Router logits in the model dtype, softmax and renormalization in float32 (spec §2).
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1)
        k = self.top_k
        indices = mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k]
        weights = mx.take_along_axis(probs, indices, axis=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        weights = weights.astype(x.dtype)
        routed = self.switch_mlp(x, indices) * weights[..., None]
        # transformers sums the k weighted expert outputs with a float32 accumulator.
        y = routed.astype(mx.float32).sum(axis=-2).astype(x.dtype)
        if self.has_shared:
            y = y + mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y
