"""The converter's sources and safety: the offline hub cache, atomic output, clear errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import qwen_mlx
from conftest import build_checkpoint, hf_logits
from qwen_mlx.errors import QwenMLXError

IDS = np.random.RandomState(0).randint(0, 160, size=(1, 10))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny 3-shard qwen3 checkpoint with a pickle and remote code beside it."""
    root = tmp_path_factory.mktemp("src")
    hf, _ = build_checkpoint(root / "single", "qwen3", num_hidden_layers=2, intermediate_size=128)
    folder = root / "Qwen3-Tiny"
    hf.save_pretrained(folder, max_shard_size="40KB")
    assert len(list(folder.glob("*.safetensors"))) >= 3
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return hf, folder


def make_hub_cache(hf_home: Path, repo_id: str, folder: Path, extra: dict[str, bytes],
                   commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Lay out a real Hugging Face cache: blobs by hash, snapshot symlinks, refs/main."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    for name, data in {**files, **extra}.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def no_leftovers(parent: Path, name: str) -> bool:
    return not any(p.name.startswith(f".{name}.") for p in parent.iterdir())


def test_hub_repo_from_the_offline_cache(tmp_path, source, monkeypatch):
    hf, folder = source
    hf_home = tmp_path / "hf"
    make_hub_cache(hf_home, "tiny-org/Qwen3-Tiny", folder,
                   {"pytorch_model.bin": b"pickle", "modeling_evil.py": b"raise SystemExit"})
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    # huggingface_hub reads its environment at import: run in a fresh process.
    r = subprocess.run([sys.executable, "-m", "qwen_mlx.cli", "convert", "tiny-org/Qwen3-Tiny",
                        "-q", "--group-size", "32"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "Qwen3-Tiny-4bit"  # the default output name
    assert "bits per weight" in r.stdout and "wrote" in r.stdout
    assert (out / "tokenizer_config.json").exists()
    assert not (out / "pytorch_model.bin").exists() and not (out / "modeling_evil.py").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}

    r = subprocess.run([sys.executable, "-m", "qwen_mlx.cli", "convert", "tiny-org/Missing",
                        "-o", str(tmp_path / "m")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "tiny-org/Missing is not in the Hugging Face cache" in r.stderr
    assert "HF_HUB_OFFLINE" in r.stderr and not (tmp_path / "m").exists()


def test_hub_revision_resolves_in_the_cache(tmp_path, source, monkeypatch):
    _, folder = source
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    make_hub_cache(tmp_path / "hf", "tiny-org/Qwen3-Tiny", folder, {}, commit=commit)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    code = ("import qwen_mlx.checkpoint.hub as h;"
            f"print(h.resolve_model_path('tiny-org/Qwen3-Tiny', revision='{commit}'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(commit)


def test_refuses_to_overwrite_without_force(tmp_path, source):
    hf, folder = source
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(QwenMLXError, match="already exists; pass --force"):
        qwen_mlx.convert(folder, target, progress=False)
    assert (target / "keep.txt").read_text() == "mine"
    result = qwen_mlx.convert(folder, target, force=True, progress=False)
    assert not (target / "keep.txt").exists()
    model, _ = qwen_mlx.load(result.path)
    assert np.abs(np.array(model(mx.array(IDS))) - hf_logits(hf, IDS)).max() < 1e-4
    assert no_leftovers(tmp_path, "out")


def broken_copy(folder: Path, dst: Path) -> Path:
    shutil.copytree(folder, dst)
    return dst


def test_truncated_shard_leaves_nothing_behind(tmp_path, source):
    src = broken_copy(source[1], tmp_path / "src")
    shard = sorted(src.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(QwenMLXError, match=f"{shard.name}.*truncated or corrupt"):
        qwen_mlx.convert(src, tmp_path / "out", quantize=True, group_size=32, progress=False)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path, "out")


def test_missing_shard_named_by_the_index(tmp_path, source):
    src = broken_copy(source[1], tmp_path / "src")
    victim = sorted(src.glob("*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(QwenMLXError, match=f"names {victim.name}, which is missing"):
        qwen_mlx.convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path, "out")


def test_unknown_model_type_and_pickle_only(tmp_path, source):
    src = broken_copy(source[1], tmp_path / "llama")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(QwenMLXError, match="model_type 'llama' is not a Qwen model"):
        qwen_mlx.convert(src, tmp_path / "out", progress=False)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(source[1] / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(QwenMLXError, match="never unpickles"):
        qwen_mlx.convert(pickled, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)])


def test_no_space_left_on_device(tiny_disk, source):
    with pytest.raises(QwenMLXError, match="no space left on the device"):
        qwen_mlx.convert(source[1], tiny_disk / "out", progress=False)
    assert list(tiny_disk.iterdir()) == []  # the partial folder is gone


def test_layers_the_group_size_does_not_divide_stay_float(tmp_path):
    hf, folder = build_checkpoint(tmp_path / "src", "qwen2", num_hidden_layers=2,
                                  intermediate_size=96)
    notes = []
    result = qwen_mlx.convert(folder, tmp_path / "out", quantize=True, group_size=64,
                              progress=False, log=notes.append)
    # down_proj's input width is 96, which 64 does not divide.
    assert sorted(result.kept_float) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert any("kept in floats" in n for n in notes)
    tensors = load_file(result.path / "model.safetensors")
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == np.float32
    assert "model.layers.0.mlp.up_proj.scales" in tensors
    qwen_mlx.load(result.path)  # and the mixed folder loads


@pytest.mark.parametrize("kwargs, match", [
    (dict(quantize=True, bits=7), "--bits 7"),
    (dict(quantize=True, group_size=48), "--group-size 48"),
    (dict(recipe="mixed_9_9"), "unknown recipe"),
    (dict(dtype="int8"), "--dtype int8"),
    (dict(quantize=True, dequantize=True), "exclude each other"),
    (dict(dequantize=True), "not quantized"),
])
def test_bad_options(tmp_path, source, kwargs, match):
    with pytest.raises(QwenMLXError, match=match):
        qwen_mlx.convert(source[1], tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_and_script_report_errors_without_traceback(tmp_path, source):
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(root / "convert.py"), str(tmp_path / "nowhere")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no such folder, and not a hub repo id" in r.stderr
    r = subprocess.run([sys.executable, "-m", "qwen_mlx.cli", "convert", str(source[1]),
                        "--recipe", "mixed_4_6", "--bits", "3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "sets the bits itself" in r.stderr


def test_vl_checkpoint_converts_to_its_text_model(tmp_path):
    hf, src = build_checkpoint(tmp_path / "src", "qwen2", num_hidden_layers=2,
                               tie_word_embeddings=True)
    cfg = json.loads((src / "config.json").read_text())
    text = {k: v for k, v in cfg.items() if k not in ("model_type", "tie_word_embeddings")}
    vl = tmp_path / "vl"
    vl.mkdir()
    (vl / "config.json").write_text(json.dumps({
        "model_type": "qwen2_5_vl", "tie_word_embeddings": True, "text_config": text,
        "vision_config": {"depth": 1}, "image_token_id": 151655,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}))
    tensors = {k.replace("model.", "model.language_model.", 1): v
               for k, v in load_file(src / "model.safetensors").items()}
    tensors["model.visual.patch_embed.proj.weight"] = np.zeros((4, 4), np.float32)
    save_file(tensors, vl / "model.safetensors")
    result = qwen_mlx.convert(vl, tmp_path / "out", progress=False)
    out_cfg = json.loads((result.path / "config.json").read_text())
    assert out_cfg["model_type"] == "qwen2" and "vision_config" not in out_cfg
    assert out_cfg["rope_scaling"] is None and "image_token_id" not in out_cfg
    model, _ = qwen_mlx.load(result.path)
    assert np.abs(np.array(model(mx.array(IDS))) - hf_logits(hf, IDS)).max() < 1e-4


def test_moe_config_without_optional_keys_loads_in_mlx_lm(tmp_path):
    """Keys HF leaves to class defaults are written out, since mlx-lm requires them."""
    import mlx_lm

    from conftest import write_tiny_tokenizer

    hf, src = build_checkpoint(tmp_path / "src", "qwen3_moe", num_hidden_layers=2,
                               vocab_size=320, intermediate_size=128, moe_intermediate_size=64)
    write_tiny_tokenizer(src, vocab=320)
    cfg = json.loads((src / "config.json").read_text())
    for key in ("decoder_sparse_step", "mlp_only_layers", "norm_topk_prob"):
        cfg.pop(key, None)
    (src / "config.json").write_text(json.dumps(cfg))
    out = qwen_mlx.convert(src, tmp_path / "out", progress=False).path
    written = json.loads((out / "config.json").read_text())
    assert written["decoder_sparse_step"] == 1 and written["mlp_only_layers"] == []
    model, _ = mlx_lm.load(str(out))
    ids = mx.array(IDS % 320)
    ours = np.array(qwen_mlx.load(out)[0](ids))
    assert np.abs(np.array(model(ids).astype(mx.float32)) - ours).max() < 1e-4
