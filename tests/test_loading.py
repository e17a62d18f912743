"""Loading: shards, layouts, dtypes, overrides, and a clear error for each bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import qwen_mlx
from conftest import build_checkpoint, hf_logits
from qwen_mlx.errors import ConfigError, QwenMLXError, WeightsError

IDS = np.random.RandomState(0).randint(0, 160, size=(1, 12))


def logits(model, ids=IDS):
    return np.array(model(mx.array(ids)))


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2")


def copy_folder(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads(tmp_path):
    hf, _ = build_checkpoint(tmp_path / "src", "qwen3_moe")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "sharded/model.safetensors.index.json").exists()
    model, tok = qwen_mlx.load(tmp_path / "sharded")
    assert tok is None
    assert np.abs(logits(model) - hf_logits(hf, IDS)).max() < 1e-4


def test_cpu_default_dtype_is_float32_and_override_works(tmp_path):
    hf, folder = build_checkpoint(tmp_path / "bf16", "qwen3")
    hf.to(torch.bfloat16).save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    model, _ = qwen_mlx.load(folder)
    assert mx.default_device() == mx.cpu
    assert model.model.embed_tokens.weight.dtype == mx.float32
    full = logits(model)
    model, _ = qwen_mlx.load(folder, dtype="bfloat16")
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == mx.bfloat16
    half = model(mx.array(IDS))
    assert half.dtype == mx.bfloat16
    assert np.abs(np.array(half.astype(mx.float32)) - full).max() < 0.1
    with pytest.raises(QwenMLXError, match="dtype 'fp8'"):
        qwen_mlx.load(folder, dtype="fp8")


def test_tied_checkpoint_with_or_without_lm_head(tmp_path):
    hf, folder = build_checkpoint(tmp_path / "tied", "qwen2", tie_word_embeddings=True)
    tensors = load_file(folder / "model.safetensors")
    assert "lm_head.weight" not in tensors
    expected = hf_logits(hf, IDS)
    assert np.abs(logits(qwen_mlx.load(folder)[0]) - expected).max() < 1e-4
    # Some tied checkpoints also carry lm_head.weight; it must be ignored.
    tensors["lm_head.weight"] = np.random.randn(*tensors["model.embed_tokens.weight"].shape
                                                ).astype(np.float32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert np.abs(logits(qwen_mlx.load(folder)[0]) - expected).max() < 1e-4


def test_rope_scaling_override_equals_a_yarn_config(tmp_path):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}
    hf, folder = build_checkpoint(tmp_path / "m", "qwen3", rope_parameters=yarn)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    ids = np.random.RandomState(1).randint(0, 160, size=(1, 30))
    plain = logits(qwen_mlx.load(folder)[0], ids)
    assert np.abs(plain - hf_logits(hf, ids)).max() > 1e-3  # the override is what matters
    model, _ = qwen_mlx.load(folder, rope_scaling=yarn)
    assert np.abs(logits(model, ids) - hf_logits(hf, ids)).max() < 1e-4


def test_qwen2_5_vl_text_path(tmp_path, capsys):
    hf, src = build_checkpoint(tmp_path / "src", "qwen2", tie_word_embeddings=True)
    cfg = json.loads((src / "config.json").read_text())
    text_keys = {k: cfg.pop(k) for k in list(cfg) if k not in ("tie_word_embeddings", "dtype")}
    text_keys.pop("model_type")
    vl = {"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"],
          "tie_word_embeddings": True, "text_config": text_keys,
          "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
          "vision_config": {"depth": 1}}
    folder = tmp_path / "vl"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(vl))
    tensors = {k.replace("model.", "model.language_model.", 1): v
               for k, v in load_file(src / "model.safetensors").items()}
    tensors["model.visual.patch_embed.proj.weight"] = np.zeros((4, 3), np.float32)
    tensors["model.visual.blocks.0.attn.qkv.weight"] = np.zeros((4, 4), np.float32)
    save_file(tensors, folder / "model.safetensors")
    model, _ = qwen_mlx.load(folder)
    assert "vision tower (2 tensors)" in capsys.readouterr().err
    assert np.abs(logits(model) - hf_logits(hf, IDS)).max() < 1e-4


# ---- bad input: each gets a clear error naming the file or tensor ----

def test_missing_folder_and_config(tmp_path):
    with pytest.raises(QwenMLXError, match="no such model folder"):
        qwen_mlx.load(tmp_path / "nope")
    with pytest.raises(ConfigError, match="config.json"):
        qwen_mlx.load(tmp_path)


def test_pickle_only_checkpoint_is_refused(tmp_path, qwen2):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text((qwen2[1] / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(WeightsError, match="pytorch_model.bin.*never unpickles"):
        qwen_mlx.load(folder)


def test_truncated_shard(tmp_path, qwen2):
    folder = copy_folder(qwen2[1], tmp_path / "m")
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(WeightsError, match="model.safetensors.*truncated or corrupt"):
        qwen_mlx.load(folder)


def test_index_naming_a_missing_shard(tmp_path):
    hf, _ = build_checkpoint(tmp_path / "src", "qwen2")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    victim = sorted((tmp_path / "sharded").glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(WeightsError, match=f"names {victim.name}, which is missing"):
        qwen_mlx.load(tmp_path / "sharded")


def test_weights_that_do_not_match_the_config(tmp_path, qwen2):
    folder = copy_folder(qwen2[1], tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(WeightsError, match=r"mlp\.\w+_proj\.weight' in model.safetensors has shape"):
        qwen_mlx.load(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 5}))
    with pytest.raises(WeightsError, match=r"num_hidden_layers 5, but the checkpoint holds "
                                           r"layers 0-3"):
        qwen_mlx.load(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(WeightsError, match=r"num_hidden_layers 3, but the checkpoint holds "
                                           r"layers 0-3"):
        qwen_mlx.load(folder)


def test_missing_expert_is_named(tmp_path):
    _, folder = build_checkpoint(tmp_path / "moe", "qwen3_moe", num_hidden_layers=1)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.0.mlp.experts.5.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(WeightsError, match=r"experts\.5\.up_proj\.weight is missing"):
        qwen_mlx.load(folder)


# ---- the command line ----

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qwen_mlx.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_version_and_help():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"qwen-mlx {qwen_mlx.__version__}"
    r = run_cli("--help")
    assert r.returncode == 0 and "info" in r.stdout


def test_cli_info_and_user_errors(tmp_path, qwen2):
    r = run_cli("info", str(qwen2[1]))
    assert r.returncode == 0 and "qwen2: 4 layers, hidden 64" in r.stdout
    r = run_cli("info", str(tmp_path / "missing"))
    assert r.returncode == 2
    assert "error:" in r.stderr and "no such folder" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "empty").mkdir()
    r = run_cli("info", str(tmp_path / "empty"))
    assert r.returncode == 2 and "config.json" in r.stderr and "Traceback" not in r.stderr


def test_bfloat16_moe_on_cpu_runs(tmp_path):
    """MLX's CPU gather_mm is float32-only: unquantized experts must still run in bf16 mode."""
    hf, folder = build_checkpoint(tmp_path / "moe", "qwen3_moe", num_hidden_layers=2)
    model, _ = qwen_mlx.load(folder, dtype="bfloat16")
    out = model(mx.array(IDS))
    assert out.dtype == mx.bfloat16
    assert np.abs(np.array(out.astype(mx.float32)) - hf_logits(hf, IDS)).max() < 0.1


def test_named_rope_scaling_and_max_context(tmp_path):
    hf, folder = build_checkpoint(tmp_path / "m", "qwen3", num_hidden_layers=2,
                                  rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 64})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    ids = np.random.RandomState(2).randint(0, 160, size=(1, 70))
    # "yarn" takes the original length from max_position_embeddings (64 here).
    model, _ = qwen_mlx.load(folder, rope_scaling="yarn", rope_factor=4.0)
    assert np.abs(logits(model, ids) - hf_logits(hf, ids)).max() < 1e-4
    assert model.max_context == 256 and qwen_mlx.load(folder)[0].max_context == 64
    assert qwen_mlx.load(folder, max_context=100)[0].max_context == 100
    with pytest.raises(QwenMLXError, match="--rope-scaling longrope"):
        qwen_mlx.load(folder, rope_scaling="longrope")
