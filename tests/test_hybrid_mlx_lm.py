"""Folders that mlx-lm writes for the new generations load here with mlx-lm's logits.

mlx-lm converts the tiny transformers checkpoints of tests/hybrid_fixtures.py
(float32, and 4-bit with group 32 so every matrix is quantized): its folders
hold the zero-centred norms already shifted to 1 + w, the conv weight as
[C, K, 1], `language_model.model.*` names and `switch_mlp` experts, and
Qwen3-Next's grouped in_proj_qkvz / in_proj_ba (quantized rows included).
qwen_mlx must detect that layout and shift nothing twice.

Where mlx-lm needs keys the published files do not all carry, the source
config is given them first (hybrid spec §1.5: tie_word_embeddings inside
text_config for qwen3_vl; the legacy top-level rope keys for qwen3_next).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx

pytest.importorskip("torch")
mlx_lm = pytest.importorskip("mlx_lm")

from mlx_lm import convert as mlx_lm_convert  # noqa: E402

import qwen_mlx  # noqa: E402
from hybrid_fixtures import build_case_with_tokenizer, edit_config  # noqa: E402

CASES = ["qwen3_5-nested-untied", "qwen3_5_moe-fused", "qwen3_next-published", "qwen3_vl-tied"]
KINDS = {"float32": dict(dtype="float32"),
         "4bit": dict(dtype="float32", quantize=True, q_bits=4, q_group_size=32)}
PROMPT = 100  # tokens: past one 64-token DeltaNet chunk


def _tie_inside_text_config(cfg: dict) -> None:
    cfg["text_config"]["tie_word_embeddings"] = cfg.get("tie_word_embeddings", False)


class Folders:
    def __init__(self, root: Path):
        self.root, self.cases, self.done = root, {}, {}

    def case(self, name: str):
        if name not in self.cases:
            case = build_case_with_tokenizer(name, self.root / name / "hf")
            if name.startswith("qwen3_vl"):
                edit_config(case.folder, _tie_inside_text_config)
            self.cases[name] = case
        return self.cases[name]

    def converted(self, name: str, kind: str) -> Path:
        key = (name, kind)
        if key not in self.done:
            dst = self.root / name / kind
            mlx_lm_convert(hf_path=str(self.case(name).folder), mlx_path=str(dst), **KINDS[kind])
            self.done[key] = dst
        return self.done[key]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return Folders(tmp_path_factory.mktemp("hybrid-mlx-lm"))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", CASES)
def test_mlx_lm_folder_matches_mlx_lm(folders, name, kind):
    folder = folders.converted(name, kind)
    config = json.loads((folder / "config.json").read_text())
    assert (kind == "4bit") == ("quantization" in config)
    ids = mx.array(folders.case(name).ids[:, :PROMPT])
    reference, _ = mlx_lm.load(str(folder))
    expected = np.array(reference(ids).astype(mx.float32))
    model, _ = qwen_mlx.load(folder, dtype="float32")
    got = np.array(model(ids))
    assert np.abs(got - expected).max() < 1e-4
    if kind == "float32":
        # ... and mlx-lm's float folder still computes what transformers computes, so
        # agreeing with it means the (1+w) shift was applied exactly once.
        hf = folders.case(name).full_logits()[:, :PROMPT]
        assert np.abs(got - hf).max() < 1e-4


@pytest.mark.parametrize("name", ["qwen3_5-nested-untied", "qwen3_next-published"])
def test_quantized_mlx_lm_folder_decodes_through_the_cache(folders, name):
    folder = folders.converted(name, "4bit")
    ids = folders.case(name).ids[:, :PROMPT]
    model, _ = qwen_mlx.load(folder, dtype="float32")
    full = np.array(model(mx.array(ids)))
    cache = model.make_cache()
    steps = [np.array(model(mx.array(ids[:, :70]), cache=cache))]
    steps += [np.array(model(mx.array(ids[:, t:t + 1]), cache=cache)) for t in range(70, PROMPT)]
    assert np.abs(np.concatenate(steps, axis=1) - full).max() < 1e-4
