"""Qwen3-Next, Qwen3.5 (dense, MoE) and Qwen3-VL text models against transformers 5.24.

float32 logits within 1e-4 of transformers, for a full forward and for a prefill of 70
tokens, a continuation of 37, then token-by-token decoding to 160 (the splits sit off
the DeltaNet's 64-token chunk grid). The checkpoints are tiny random ones post-processed
into the published layouts (tests/hybrid_fixtures.py): published and transformers config
schemas, nested and flat, tied and untied, per-expert, fused and transposed experts,
`mtp.*` tensors. Every 1-D weight is random, so a missing or doubled (1+w) norm shift
shows. The first two tests check the oracle itself, not qwen-mlx.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import qwen_mlx
from hybrid_fixtures import CASE_NAMES, CaseCache, chunks, edit_config, edit_weights, hf_logits

import mlx.core as mx

TOL = 1e-4
# transformers' chunked DeltaNet prefill and its token-by-token recurrence agree to about
# 1e-5 in fp32 on these checkpoints (measured up to 1.2e-5; the 64-long chunks of 16-dim
# keys make the chunk's triangular solve mildly ill-conditioned). The bound keeps the
# oracle's own spread well under TOL.
ORACLE_TOL = 3e-5


@pytest.fixture(scope="session")
def hybrid_cases(tmp_path_factory) -> CaseCache:
    return CaseCache(tmp_path_factory)


@pytest.fixture(scope="module", params=CASE_NAMES)
def case(request, hybrid_cases):
    return hybrid_cases.get(request.param)


@pytest.fixture(scope="module")
def model(case):
    model, _ = qwen_mlx.load(case.folder, dtype="float32")
    return model


# --- the oracle ------------------------------------------------------------------------

def test_oracle_incremental_run_matches_its_full_forward(case):
    """Checks transformers, not qwen-mlx: its cached run agrees with its own full forward."""
    steps = case.incremental_logits()
    assert [s.shape[1] for s in steps[:2]] == [70, 37] and len(steps) == 2 + 160 - 107
    diff = np.abs(np.concatenate(steps, axis=1) - case.full_logits()).max()
    assert diff < ORACLE_TOL, f"{case.name}: HF incremental vs full {diff:.2e}"


def test_oracle_reads_the_rewritten_folder_as_built(case):
    """Checks the fixture: transformers reloads the post-processed files to the same model."""
    diff = np.abs(hf_logits(case.folder, case.ids) - case.full_logits()).max()
    assert diff < 1e-6, f"{case.name}: reloaded vs in-memory {diff:.2e}"


# --- qwen-mlx against the oracle ---------------------------------------------------------

def test_full_forward_matches_transformers(case, model):
    expected = case.full_logits()
    got = np.array(model(mx.array(case.ids)))
    assert got.shape == expected.shape
    diff = np.abs(got - expected).max()
    assert diff < TOL, f"{case.name}: full forward max |diff| {diff:.2e}"


def test_prefill_continuation_decode_match_transformers(case, model):
    expected = case.incremental_logits()
    cache = model.make_cache()
    diffs = []
    for chunk, want in zip(chunks(case.ids), expected):
        got = np.array(model(mx.array(chunk), cache=cache))
        assert got.shape == want.shape
        diffs.append(float(np.abs(got - want).max()))
    worst = int(np.argmax(diffs))
    where = {0: "the prefill", 1: "the continuation"}.get(worst, f"decode step {worst - 2}")
    assert diffs[worst] < TOL, (
        f"{case.name}: max |diff| {diffs[worst]:.2e} at {where}; prefill {diffs[0]:.2e}, "
        f"continuation {diffs[1]:.2e}, decode max {max(diffs[2:]):.2e}")


def test_mtp_module_iff_mtp_tensors(case, model):
    if case.has_mtp:
        assert model.mtp is not None
    else:
        assert getattr(model, "mtp", None) is None


# --- bad input -----------------------------------------------------------------------------

def _copy(hybrid_cases: CaseCache, name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(hybrid_cases.get(name).folder, dst)
    return dst


def _load_error(folder: Path) -> str:
    with pytest.raises(qwen_mlx.QwenMLXError) as info:
        qwen_mlx.load(folder, dtype="float32")
    return str(info.value)


def test_value_heads_not_a_multiple_of_key_heads(hybrid_cases, tmp_path):
    folder = _copy(hybrid_cases, "qwen3_5-flat", tmp_path)
    edit_config(folder, lambda c: c.update(linear_num_value_heads=3))  # key heads: 2
    msg = _load_error(folder)
    assert "linear_num_value_heads" in msg and "config.json" in msg, msg


def test_unknown_layer_type(hybrid_cases, tmp_path):
    folder = _copy(hybrid_cases, "qwen3_5-nested-untied", tmp_path)

    def edit(cfg: dict) -> None:
        cfg["text_config"]["layer_types"][1] = "mamba_attention"

    edit_config(folder, edit)
    msg = _load_error(folder)
    assert "layer_types" in msg and "mamba_attention" in msg and "config.json" in msg, msg


def test_missing_A_log(hybrid_cases, tmp_path):
    folder = _copy(hybrid_cases, "qwen3_5-flat", tmp_path)
    edit_weights(folder, lambda t: t.pop("model.layers.1.linear_attn.A_log"))
    msg = _load_error(folder)
    assert "A_log" in msg and "config.json" in msg, msg


@pytest.mark.parametrize("shape", [(128, 1, 3), (120, 1, 4)], ids=["kernel", "channels"])
def test_conv1d_weight_not_matching_the_config(hybrid_cases, tmp_path, shape):
    folder = _copy(hybrid_cases, "qwen3_5-flat", tmp_path)
    key = "model.layers.2.linear_attn.conv1d.weight"

    def edit(tensors: dict) -> None:
        assert tuple(tensors[key].shape) == (128, 1, 4)  # 2*Hk*Dk + Hv*Dv, 1, kernel 4
        tensors[key] = tensors[key][:shape[0], :, :shape[2]]

    edit_weights(folder, edit)
    msg = _load_error(folder)
    assert "conv1d" in msg and "config.json" in msg, msg
    assert json.loads((folder / "config.json").read_text())["linear_conv_kernel_dim"] == 4
