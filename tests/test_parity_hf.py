"""float32 logits within 1e-4 of transformers, full forward and cached decode.

Every case is a tiny random checkpoint saved by transformers 5; half of them
are rewritten into the published checkpoints' config schema (rope_theta +
rope_scaling, num_experts, no layer_types, torch_dtype).
"""

from __future__ import annotations

import numpy as np
import pytest

import qwen_mlx
from conftest import build_checkpoint, hf_incremental_logits, hf_logits, mlx_incremental_logits

import mlx.core as mx

TOL = 1e-4
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}

# (id, family, schema, overrides, sequence length, prefill length)
CASES = [
    ("qwen2-untied", "qwen2", "new", {}, 24, 9),
    ("qwen2-tied", "qwen2", "old", {"tie_word_embeddings": True}, 24, 9),
    # Positions run to 40, past original_max_position_embeddings 16.
    ("qwen2-yarn", "qwen2", "old", {"rope_parameters": YARN}, 40, 20),
    ("qwen2-yarn-beta", "qwen2", "new",
     {"rope_parameters": {**YARN, "beta_fast": 16, "beta_slow": 2, "rope_theta": 1e5}}, 40, 20),
    ("qwen2-linear", "qwen2", "old", {"rope_parameters": {"rope_type": "linear", "factor": 2.0}},
     24, 9),
    # Sliding window 5 on layers >= 2 (max_window_layers), sequences of 24.
    ("qwen2-window", "qwen2", "new",
     {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 2}, 24, 9),
    ("qwen2-window-old", "qwen2", "old",
     {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 2}, 24, 3),
    ("qwen3-untied", "qwen3", "new", {}, 24, 9),
    ("qwen3-tied-bias", "qwen3", "old", {"tie_word_embeddings": True, "attention_bias": True},
     24, 9),
    ("qwen3-yarn", "qwen3", "new",
     {"rope_parameters": {**YARN, "rope_theta": 1e6, "attention_factor": 1.3}}, 40, 20),
    ("qwen3-window", "qwen3", "old",
     {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}, 24, 9),
    # Layers 1 and 3 sparse (step 2), layer 3 forced dense: only layer 1 is MoE.
    ("qwen2_moe-step-only", "qwen2_moe", "old",
     {"decoder_sparse_step": 2, "mlp_only_layers": [3], "shared_expert_intermediate_size": 48},
     40, 9),
    ("qwen2_moe-normtopk", "qwen2_moe", "new",
     {"norm_topk_prob": True, "shared_expert_intermediate_size": 48, "mlp_only_layers": [0]},
     40, 9),
    # qwen2_moe's quirk: windows on even layers below max_window_layers.
    ("qwen2_moe-window", "qwen2_moe", "old",
     {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 3,
      "shared_expert_intermediate_size": 48}, 24, 9),
    ("qwen3_moe-normtopk", "qwen3_moe", "new", {"norm_topk_prob": True}, 40, 9),
    ("qwen3_moe-plain-step", "qwen3_moe", "old",
     {"norm_topk_prob": False, "decoder_sparse_step": 2, "mlp_only_layers": [1]}, 40, 9),
    ("qwen3_moe-yarn-window", "qwen3_moe", "old",
     {"rope_parameters": YARN, "use_sliding_window": True, "sliding_window": 7}, 40, 20),
]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def case(request, tmp_path_factory):
    name, family, schema, overrides, length, prefill = request.param
    hf, folder = build_checkpoint(tmp_path_factory.mktemp(name), family, schema=schema,
                                  **overrides)
    ids = np.random.RandomState(len(name)).randint(0, hf.config.vocab_size, size=(2, length))
    model, _ = qwen_mlx.load(folder, dtype="float32")
    return hf, model, ids, prefill


def test_full_forward_matches_transformers(case):
    hf, model, ids, _ = case
    expected = hf_logits(hf, ids)
    got = np.array(model(mx.array(ids)))
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < TOL


def test_cached_decode_matches_transformers(case):
    hf, model, ids, prefill = case
    expected = hf_incremental_logits(hf, ids[:1], prefill)
    got = mlx_incremental_logits(model, ids[:1], prefill)
    assert np.abs(got - expected).max() < TOL


@pytest.mark.parametrize("max_pos", [12])
def test_dynamic_rope_matches_transformers(tmp_path, max_pos):
    """HF dynamic RoPE recomputes θ as the sequence grows, and resets for short inputs."""
    hf, folder = build_checkpoint(tmp_path, "qwen2", max_position_embeddings=max_pos,
                                  rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    model, _ = qwen_mlx.load(folder, dtype="float32")
    ids = np.random.RandomState(3).randint(0, hf.config.vocab_size, size=(1, 30))
    # The same sequence of calls on both sides, since both keep state across calls:
    # long full forward, short forward (reset), then prefill + decode past max_pos.
    for sl in (slice(0, 30), slice(0, 6)):
        assert np.abs(np.array(model(mx.array(ids[:, sl]))) - hf_logits(hf, ids[:, sl])).max() < TOL
    got = mlx_incremental_logits(model, ids, 5)
    expected = hf_incremental_logits(hf, ids, 5)
    assert np.abs(got - expected).max() < TOL
