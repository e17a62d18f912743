"""Config normalization: class defaults per family, both schemas, clear errors."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import CONFIG_CLASSES
from qwen_mlx.model.config import ModelConfig
from qwen_mlx.errors import ConfigError


def norm(d: dict, **kw) -> ModelConfig:
    return ModelConfig.from_dict(d, **kw)


@pytest.mark.parametrize("family", ["qwen2", "qwen2_moe", "qwen3", "qwen3_moe"])
def test_empty_config_takes_transformers_class_defaults(family):
    hf = CONFIG_CLASSES[family]()
    c = norm({"model_type": family})
    assert c.vocab_size == hf.vocab_size == 151936
    assert c.hidden_size == hf.hidden_size
    assert c.intermediate_size == hf.intermediate_size
    assert c.num_layers == hf.num_hidden_layers
    assert c.num_heads == hf.num_attention_heads
    assert c.num_kv_heads == hf.num_key_value_heads
    assert c.head_dim == getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    assert c.rms_norm_eps == hf.rms_norm_eps
    assert c.max_position_embeddings == hf.max_position_embeddings
    assert c.tie_word_embeddings is False
    assert c.rope.theta == hf.rope_parameters["rope_theta"] == 10000.0
    assert c.sliding_windows == (None,) * c.num_layers
    if family.endswith("moe"):
        assert c.moe.num_experts == hf.num_experts
        assert c.moe.top_k == hf.num_experts_per_tok
        assert c.moe.intermediate_size == hf.moe_intermediate_size
        assert c.moe.norm_topk_prob is False
        assert all(c.sparse_layers)


def test_family_differences_in_the_spec():
    assert norm({"model_type": "qwen3"}).head_dim == 128  # a field, not hidden/heads
    assert norm({"model_type": "qwen2"}).head_dim == 4096 // 32
    assert norm({"model_type": "qwen2", "num_key_value_heads": None}).num_kv_heads == 32
    assert norm({"model_type": "qwen3_moe"}).num_kv_heads == 4
    assert norm({"model_type": "qwen2"}).qkv_bias and not norm({"model_type": "qwen2"}).o_bias
    assert not norm({"model_type": "qwen2_moe", "qkv_bias": False}).qkv_bias
    q3 = norm({"model_type": "qwen3", "attention_bias": True})
    assert q3.qkv_bias and q3.o_bias and q3.qk_norm
    assert norm({"model_type": "qwen2_moe"}).moe.shared_intermediate_size == 5632
    assert norm({"model_type": "qwen3_moe"}).moe.shared_intermediate_size == 0


def test_qwen1_config():
    c = norm({"model_type": "qwen", "seq_length": 8192, "rotary_pct": 0.5})
    assert (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (4096, 32, 32, 128)
    assert c.intermediate_size == 22016 // 2  # w1 and w2 each output half
    assert c.rotary_dim == 64
    assert c.rope.theta == 10000.0 and c.ntk_seq_length == c.logn_seq_length == 8192
    assert c.qkv_bias and not c.o_bias and not c.mlp_bias  # no_bias defaults true
    off = norm({"model_type": "qwen", "use_dynamic_ntk": False, "use_logn_attn": False})
    assert off.ntk_seq_length is None and off.logn_seq_length is None


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_rope_schemas_agree(family):
    old = norm({"model_type": family, "rope_theta": 1e6,
                "rope_scaling": {"type": "yarn", "factor": 4.0,
                                 "original_max_position_embeddings": 32768}})
    new = norm({"model_type": family,
                "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                    "original_max_position_embeddings": 32768}})
    assert old.rope == new.rope
    assert old.rope.rope_type == "yarn" and old.rope.theta == 1e6


def test_rope_scaling_wins_and_defaults():
    c = norm({"model_type": "qwen2", "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                          "rope_theta": 5e5},
              "rope_scaling": {"rope_type": "yarn", "factor": 8.0}})
    assert c.rope.rope_type == "yarn" and c.rope.factor == 8.0 and c.rope.theta == 5e5
    # yarn without original_max_position_embeddings uses max_position_embeddings.
    assert c.rope.original_max_position_embeddings == 32768
    assert norm({"model_type": "qwen3", "max_position_embeddings": 40960,
                 "rope_scaling": {"rope_type": "yarn", "factor": 4}}
                ).rope.original_max_position_embeddings == 40960
    assert norm({"model_type": "qwen2_5_vl",
                 "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}
                ).rope.rope_type == "default"


def test_rope_override_replaces_the_files():
    base = {"model_type": "qwen3", "rope_theta": 1e6}
    c = norm(base, rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                 "original_max_position_embeddings": 100})
    assert c.rope.rope_type == "yarn" and c.rope.factor == 2.0 and c.rope.theta == 1e6
    with pytest.raises(ConfigError, match="Qwen1"):
        norm({"model_type": "qwen", "seq_length": 8}, rope_scaling={"rope_type": "yarn"})


def test_vl_text_config_is_merged():
    c = norm({"model_type": "qwen2_5_vl", "tie_word_embeddings": True,
              "text_config": {"hidden_size": 128, "num_attention_heads": 4,
                              "num_hidden_layers": 2, "num_key_value_heads": 2,
                              "vocab_size": 300, "intermediate_size": 256}})
    assert (c.family, c.hidden_size, c.num_layers, c.vocab_size) == ("qwen2", 128, 2, 300)
    assert c.tie_word_embeddings and c.qkv_bias


@settings(max_examples=60, deadline=None)
@given(family=st.sampled_from(["qwen2", "qwen2_moe", "qwen3", "qwen3_moe"]),
       layers=st.integers(1, 8), use=st.booleans(), window=st.integers(1, 64),
       max_window_layers=st.integers(0, 9), old_schema=st.booleans())
def test_sliding_window_layers_match_transformers(family, layers, use, window,
                                                  max_window_layers, old_schema):
    kwargs = dict(num_hidden_layers=layers, use_sliding_window=use, sliding_window=window,
                  max_window_layers=max_window_layers)
    hf = CONFIG_CLASSES[family](**kwargs)
    saved = json.loads(hf.to_json_string())
    if old_schema:
        saved.pop("layer_types", None)
        saved.update(kwargs)
    c = norm(saved)
    if family == "qwen3_moe":  # its config has no layer_types: the model windows every layer
        expected = [hf.sliding_window if hf.sliding_window else None] * layers
    else:
        expected = [hf.sliding_window if t == "sliding_attention" and hf.sliding_window else None
                    for t in hf.layer_types]
    assert list(c.sliding_windows) == expected


@settings(max_examples=40, deadline=None)
@given(family=st.sampled_from(["qwen2_moe", "qwen3_moe"]), layers=st.integers(1, 8),
       step=st.integers(1, 4), only=st.lists(st.integers(0, 7), max_size=4))
def test_sparse_layers_follow_the_rule(family, layers, step, only):
    c = norm({"model_type": family, "num_hidden_layers": layers, "decoder_sparse_step": step,
              "mlp_only_layers": only})
    assert list(c.sparse_layers) == [i not in only and (i + 1) % step == 0 for i in range(layers)]


@pytest.mark.parametrize("data, match", [
    ({}, "model_type"),
    ({"model_type": "llama"}, "model_type 'llama'"),
    ({"model_type": "qwen"}, "seq_length"),
    ({"model_type": "qwen2", "num_attention_heads": 6, "num_key_value_heads": 4},
     "num_key_value_heads"),
    ({"model_type": "qwen2", "hidden_size": 100, "num_attention_heads": 3}, "hidden_size"),
    ({"model_type": "qwen2", "hidden_size": "64"}, "'hidden_size' must be an integer"),
    ({"model_type": "qwen2", "rope_scaling": {"type": "longrope", "factor": 2}}, "longrope"),
    ({"model_type": "qwen2", "rope_scaling": {"type": "linear"}}, "factor"),
    ({"model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 8},
     "num_experts_per_tok"),
    ({"model_type": "qwen2", "use_sliding_window": True, "num_hidden_layers": 2,
      "layer_types": ["full_attention"]}, "layer_types"),
    ({"model_type": "qwen2", "quantization_config": {"quant_method": "awq", "bits": 4}}, "awq"),
    ({"model_type": "qwen", "seq_length": 8, "kv_channels": 64}, "kv_channels"),
])
def test_bad_configs_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match) as e:
        norm(data, source="/m/config.json")
    assert "/m/config.json" in str(e.value)


def test_from_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path / "config.json")


def test_yarn_numbers_from_the_spec():
    """Spec §3.4: s 4, L0 32768, θ 1e6, d 128 -> ramp 23..40, attention factor 1.138629."""
    from qwen_mlx.model.rope import yarn_attention_factor, yarn_inv_freq, default_inv_freq

    c = norm({"model_type": "qwen3", "rope_theta": 1e6,
              "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                               "original_max_position_embeddings": 32768}})
    assert math.isclose(yarn_attention_factor(c.rope), 1.138629, rel_tol=1e-6)
    inv, base = yarn_inv_freq(c.rope, 128), default_inv_freq(1e6, 128)
    kept = [i for i in range(64) if math.isclose(inv[i], base[i], rel_tol=1e-6)]
    scaled = [i for i in range(64) if math.isclose(inv[i], base[i] / 4, rel_tol=1e-6)]
    assert kept == list(range(0, 24)) and scaled == list(range(40, 64))
