"""AWQ: folded-but-unquantized models compute what they did (every family, against
transformers where it has the family); the converted folder is what quantizing the
folded model gives, in every output layout, and mlx-lm loads it; at 4 bits AWQ is
closer to the float model than plain quantization on models with outlier channels."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from awq_quality import EVAL_TEXT, inject_outliers  # noqa: E402
from conftest import build_checkpoint, hf_logits, write_tiny_tokenizer  # noqa: E402
from hybrid_fixtures import build_case, build_case_with_tokenizer  # noqa: E402
from hybrid_fixtures import hf_logits as hybrid_hf_logits  # noqa: E402

import qwen_mlx  # noqa: E402
from qwen_mlx.checkpoint import awq  # noqa: E402
from qwen_mlx.checkpoint.loader import load  # noqa: E402
from qwen_mlx.checkpoint.quantize import RECIPES, plan  # noqa: E402
from qwen_mlx.errors import QwenMLXError  # noqa: E402
from qwen_mlx.quality.perplexity import perplexity  # noqa: E402

GROUP = 32  # the fixtures are 64 wide: two groups per row


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    """A slice of the built-in text: enough for the tiny models, and quick."""
    path = tmp_path_factory.mktemp("calibration") / "calibration.txt"
    path.write_text(awq.builtin_calibration_text()[:700], encoding="utf-8")
    return path


def _qwen1(folder: Path) -> Path:
    from test_qwen1 import qwen1_config, qwen1_weights, write_checkpoint

    cfg = qwen1_config(vocab_size=300)
    write_checkpoint(folder, cfg, qwen1_weights(cfg))
    write_tiny_tokenizer(folder, vocab=300)
    return folder


def _bits_for(config, bits=4):
    return lambda path, d: plan(path, d, config, RECIPES["uniform"], bits, GROUP)


def _build(name: str, folder: Path):
    """(folder, transformers model or None) with outlier channels injected."""
    if name == "qwen":
        hf, folder = None, _qwen1(folder)
    elif name in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"):
        extra = {"shared_expert_intermediate_size": 48} if name == "qwen2_moe" else {}
        hf, folder = build_checkpoint(folder, name, vocab_size=300, **extra)
        write_tiny_tokenizer(folder, vocab=300)
    else:
        case = build_case_with_tokenizer(name, folder)
        hf, folder = None, case.folder  # the outliers below change the weights transformers saw
    inject_outliers(folder, 20.0)
    return folder, hf


FOLD_CASES = ["qwen", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "qwen3_next-transformers",
              "qwen3_5-nested-untied", "qwen3_5-flat", "qwen3_5_moe-fused", "qwen3_vl-tied"]


@pytest.mark.parametrize("name", FOLD_CASES)
def test_folded_float_model_is_exact(name, tmp_path):
    folder, _ = _build(name, tmp_path / name)
    model, tok = load(folder, dtype="float32")
    ids = mx.array(np.random.RandomState(7).randint(0, model.config.vocab_size, (1, 40)))
    before = np.array(model(ids))
    tokens = awq.calibration_tokens(tok, None, model.config.vocab_size, seq_len=64,
                                    max_tokens=128)
    result = awq.search(model, tokens, _bits_for(model.config), progress=False)
    after = np.array(model(ids))
    # The scales are far from 1, so a fold on the wrong side, or a shared input given two
    # scales, would move the logits by much more than the tolerance.
    spread = max(float(s.max() / s.min()) for s in result.input_scales.values())
    assert spread > 3
    assert any(".input_layernorm." in k for k in result.weights)
    assert any(".post_attention_layernorm." in k for k in result.weights)
    np.testing.assert_allclose(after, before, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["qwen3_5_moe-fused"])
def test_folded_hybrid_matches_transformers(name, tmp_path):
    case = build_case(name, tmp_path / name)
    write_tiny_tokenizer(case.folder, vocab=272)
    model, tok = load(case.folder, dtype="float32")
    ids = case.ids[:, :48]
    tokens = awq.calibration_tokens(tok, None, model.config.vocab_size, seq_len=64,
                                    max_tokens=128)
    awq.search(model, tokens, _bits_for(model.config), progress=False)
    np.testing.assert_allclose(np.array(model(mx.array(ids))), hybrid_hf_logits(case.hf, ids),
                               atol=1e-4, rtol=0)


def _quantized_in_memory(folder: Path, calibration: Path, bits: int) -> nn.Module:
    """What the converter should write: the folded model, quantized with the same plan."""
    model, tok = load(folder, dtype="float32")
    tokens = awq.calibration_tokens(tok, calibration, model.config.vocab_size)
    awq.search(model, tokens, _bits_for(model.config, bits), progress=False)
    config = model.config

    def predicate(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        spec = plan(path, module["weight"].shape[-1], config, RECIPES["uniform"], bits, GROUP)
        return spec is not None and {"bits": spec[0], "group_size": spec[1]}

    nn.quantize(model, group_size=GROUP, bits=bits, class_predicate=predicate)
    return model


@pytest.mark.parametrize("name", ["qwen", "qwen3_next-published", "qwen3_5-nested-untied",
                                  "qwen3_5_moe-fused"])
def test_converted_folder_is_the_folded_model_quantized(name, tmp_path, calibration):
    folder, _ = _build(name, tmp_path / name)
    out = tmp_path / "awq"
    qwen_mlx.convert(folder, out, bits=4, group_size=GROUP, awq=True, calibration=calibration,
                     progress=False, log=lambda s: None)
    got, _ = load(out, dtype="float32")
    expected = _quantized_in_memory(folder, calibration, 4)
    ids = mx.array(np.random.RandomState(3).randint(0, got.config.vocab_size, (1, 32)))
    np.testing.assert_allclose(np.array(got(ids)), np.array(expected(ids)), atol=1e-4, rtol=0)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "np") as f:
        names = set(f.keys())
    # Routers and norms stay in floats; a DeltaNet's b/a projections at 8 bits (their plan).
    assert not any(n.endswith(("mlp.gate.scales", "shared_expert_gate.scales",
                               "layernorm.scales", "A_log.scales", "conv1d.scales"))
                   for n in names)
    for n in names:
        if n.endswith(("in_proj_a.weight", "in_proj_b.weight", "in_proj_ba.weight")):
            assert cfg["quantization"][n[:-len(".weight")]]["bits"] == 8


@pytest.mark.parametrize("name", ["qwen3", "qwen3_5_moe-fused"])
def test_mlx_lm_loads_the_awq_folder(name, tmp_path, calibration):
    import mlx_lm

    folder, _ = _build(name, tmp_path / name)
    out = tmp_path / "awq"
    qwen_mlx.convert(folder, out, bits=4, group_size=GROUP, awq=True, awq_clip=True,
                     calibration=calibration, progress=False, log=lambda s: None)
    ours, tok = load(out, dtype="float32")
    theirs, _ = mlx_lm.load(str(out))
    ids = mx.array([tok.encode(EVAL_TEXT)[:32]])
    np.testing.assert_allclose(np.array(theirs(ids).astype(mx.float32)), np.array(ours(ids)),
                               atol=2e-3, rtol=0)


@pytest.mark.parametrize("name", ["qwen3", "qwen3_5_moe-fused"])
def test_awq_beats_plain_at_4_bits(name, tmp_path):
    folder, _ = _build(name, tmp_path / name)
    reference, tok = load(folder, dtype="float32")
    text = tok.encode(EVAL_TEXT)  # shares nothing with the calibration text
    kl = {}
    # The built-in calibration text: a slice of it is too little to pay off.
    for label, extra in (("plain", {}), ("awq", {"awq": True})):
        out = tmp_path / label
        qwen_mlx.convert(folder, out, quantize=True, bits=4, group_size=GROUP, progress=False,
                         log=lambda s: None, **extra)
        model, _ = load(out, dtype="float32")
        kl[label] = perplexity(model, text, context=128, reference=reference,
                               progress=False).kl
    assert kl["awq"] < 0.95 * kl["plain"], kl


def test_clipping_never_raises_the_error():
    rng = np.random.default_rng(0)
    w = mx.array(rng.standard_t(2, (48, 64)).astype(np.float32))  # heavy tails: clipping pays
    x = mx.array(rng.normal(size=(200, 64)).astype(np.float32))

    def err(v):
        return float(mx.mean((x @ awq.fake_quantize(v, 3, GROUP).T - x @ w.T) ** 2).item())

    clipped = awq.clip_weight(w, x, 3, GROUP)
    assert err(clipped) < 0.97 * err(w)
    assert bool(mx.any(mx.abs(clipped) < mx.abs(w)).item())
    assert bool(mx.all(mx.abs(clipped) <= mx.abs(w)).item())


def test_errors(tmp_path):
    _, folder = build_checkpoint(tmp_path / "m", "qwen3", vocab_size=300)
    with pytest.raises(QwenMLXError, match="only apply with --awq"):
        qwen_mlx.convert(folder, tmp_path / "o", awq_clip=True, progress=False)
    with pytest.raises(QwenMLXError, match="no tokenizer"):
        qwen_mlx.convert(folder, tmp_path / "o", awq=True, progress=False, log=lambda s: None)
    assert not (tmp_path / "o").exists()
    write_tiny_tokenizer(folder, vocab=300)
    short = tmp_path / "short.txt"
    short.write_text("hello", encoding="utf-8")
    with pytest.raises(QwenMLXError, match="at least 16"):
        qwen_mlx.convert(folder, tmp_path / "o", awq=True, calibration=short, progress=False,
                         log=lambda s: None)
