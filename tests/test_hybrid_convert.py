"""`qwen-mlx convert` for Qwen3-Next, Qwen3.5/3.6 and Qwen3-VL, round trip.

From the transformers-built fixtures of tests/hybrid_fixtures.py (every
published expert layout, nested and flat, MTP tensors present): a float
conversion computes what the source computes; a 4-bit one loads in mlx-lm
with our logits and in qwen_mlx; the vision tower is left out with a notice;
the MTP head is kept in mtp.safetensors (which mlx-lm does not read) unless
--no-mtp; the DeltaNet's A_log, dt_bias, conv and norms stay unquantized and
its β/decay projections get 8 bits; --check reports KL and top-1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx

pytest.importorskip("torch")
mlx_lm = pytest.importorskip("mlx_lm")

import qwen_mlx  # noqa: E402
from hybrid_fixtures import build_case_with_tokenizer  # noqa: E402
from qwen_mlx.cli import main  # noqa: E402

CASES = ["qwen3_5-nested-untied", "qwen3_5-flat", "qwen3_5_moe-fused", "qwen3_5_moe-per-expert",
         "qwen3_next-transformers", "qwen3_vl-tied", "qwen3_vl_moe-transposed"]
PROMPT = 100


class Lab:
    def __init__(self, root: Path):
        self.root, self.cases, self.done = root, {}, {}

    def case(self, name: str):
        if name not in self.cases:
            case = build_case_with_tokenizer(name, self.root / name / "hf")
            self.cases[name] = case
        return self.cases[name]

    def converted(self, name: str, kind: str, **options):
        if (name, kind) not in self.done:
            logs: list[str] = []
            result = qwen_mlx.convert(self.case(name).folder, self.root / name / kind,
                                      progress=False, log=logs.append, **options)
            self.done[name, kind] = (result, logs)
        return self.done[name, kind]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return Lab(tmp_path_factory.mktemp("hybrid-convert"))


def _logits(folder: Path, ids: np.ndarray) -> np.ndarray:
    model, _ = qwen_mlx.load(folder, dtype="float32")
    return np.array(model(mx.array(ids)))


def _mlx_lm_logits(folder: Path, ids: np.ndarray) -> np.ndarray:
    model, _ = mlx_lm.load(str(folder))
    return np.array(model(mx.array(ids)).astype(mx.float32))


@pytest.mark.parametrize("name", CASES)
def test_float_conversion_computes_what_the_source_computes(lab, name):
    ids = lab.case(name).ids[:, :PROMPT]
    result, _ = lab.converted(name, "float")
    got = _logits(result.path, ids)
    assert np.abs(got - _logits(lab.case(name).folder, ids)).max() < 1e-5
    assert np.abs(got - lab.case(name).full_logits()[:, :PROMPT]).max() < 1e-4
    assert np.abs(got - _mlx_lm_logits(result.path, ids)).max() < 1e-4


@pytest.mark.parametrize("name", CASES)
def test_4bit_folder_loads_in_mlx_lm_with_our_logits(lab, name):
    ids = lab.case(name).ids[:, :PROMPT]
    result, _ = lab.converted(name, "q4", quantize=True, group_size=32)
    assert np.abs(_logits(result.path, ids) - _mlx_lm_logits(result.path, ids)).max() < 1e-4


def test_vision_tower_is_left_out_with_a_notice(lab, capfd):
    capfd.readouterr()
    qwen_mlx.convert(lab.case("qwen3_vl-tied").folder, lab.root / "vl-notice", progress=False,
                     log=lambda m: None)
    assert "skipping the vision tower" in capfd.readouterr().err
    cfg = json.loads((lab.root / "vl-notice" / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and "vision_config" not in cfg
    names = _names(lab.root / "vl-notice")
    assert not any("visual" in n for n in names)


def _names(folder: Path) -> dict[str, tuple]:
    out = {}
    for f in folder.glob("*.safetensors"):
        out.update({k: tuple(v.shape) for k, v in mx.load(str(f)).items()})
    return out


def test_mtp_head_is_kept_apart_and_dropped_on_request(lab):
    name = "qwen3_5-nested-untied"
    kept, _ = lab.converted(name, "q4", quantize=True, group_size=32)
    assert (kept.path / "mtp.safetensors").exists()
    model_files = {k for f in kept.path.glob("model*.safetensors") for k in mx.load(str(f))}
    assert not any(k.startswith("mtp.") for k in model_files)  # mlx-lm would refuse them
    mtp = mx.load(str(kept.path / "mtp.safetensors"))
    assert "mtp.layers.0.self_attn.q_proj.scales" in mtp  # quantized like the trunk's attention
    model, _ = qwen_mlx.load(kept.path)
    assert model.mtp is not None
    dropped, logs = lab.converted(name, "no-mtp", mtp=False)
    assert not list(dropped.path.glob("mtp*.safetensors"))
    assert any("multi-token-prediction" in line for line in logs)
    assert qwen_mlx.load(dropped.path)[0].mtp is None


@pytest.mark.parametrize("name", ["qwen3_5_moe-fused", "qwen3_next-transformers"])
def test_deltanet_state_weights_and_routers_keep_precision(lab, name):
    result, _ = lab.converted(name, "q4", quantize=True, group_size=32)
    names = _names(result.path)
    cfg = json.loads((result.path / "config.json").read_text())
    q = cfg["quantization"]
    layer = "model.layers.0.linear_attn."
    for kept in ("A_log", "dt_bias", "conv1d.weight", "norm.weight"):
        assert layer + kept in names and not any(
            n.startswith(layer + kept.rsplit(".", 1)[0] + ".scales") for n in names)
    assert names[layer + "conv1d.weight"][-1] == 1  # MLX's [C, K, 1]
    assert mx.load(str(next(result.path.glob("model*.safetensors"))))[layer + "A_log"].dtype \
        == mx.float32
    decay = ["in_proj_ba"] if name.startswith("qwen3_next") else ["in_proj_a", "in_proj_b"]
    for proj in decay:
        assert q[layer + proj]["bits"] == 8
    assert "model.layers.0.mlp.gate.weight" in names  # the router stays float
    assert "model.layers.0.mlp.gate.scales" not in names
    assert "model.layers.0.input_layernorm.scales" not in names


def test_check_reports_kl_and_top1_for_a_hybrid(lab, capsys):
    name = "qwen3_5_moe-fused"
    out = lab.root / "cli-check"
    assert main(["convert", str(lab.case(name).folder), "-o", str(out), "-q", "--group-size", "32",
                 "--check"]) == 0
    text = capsys.readouterr().out
    assert "KL" in text and "top-1" in text
