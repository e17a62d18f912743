"""Hostile config.json values and weights get clear errors, never a traceback, an
out-of-memory kill or silent garbage (issue 17, findings 6, 13 and 14).

Each case edits a copy of a tiny real checkpoint and loads it in a child process
whose peak RSS is bounded, so that a regression that allocates by a config's word
fails here instead of taking the machine down.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import build_checkpoint

MAX_RSS_MB = 1500  # the interpreter, mlx and one tiny model need about 400
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    return {family: build_checkpoint(root / family, family)[1]
            for family in ("qwen3", "qwen3_moe")}


def _load_in_child(folder) -> tuple[int, str, int]:
    """(exit code, stderr+stdout, peak RSS in MB) of `load(folder)` in a fresh process."""
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, ({MAX_RSS_MB * 4} << 20, {MAX_RSS_MB * 4} << 20))
        import qwen_mlx
        try:
            qwen_mlx.load({str(folder)!r})
        except qwen_mlx.QwenMLXError as e:
            print("ERROR:", e)
            sys.exit(2)
        print("LOADED")
    """)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=TIMEOUT_S)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return r.returncode, r.stdout + r.stderr, max(peak, before) // 1024


def _edited(sources, tmp_path, family: str, edit) -> object:
    folder = tmp_path / "model"
    shutil.copytree(sources[family], folder)
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _set(**values):
    def edit(cfg):
        cfg.update(values)
    return edit


HOSTILE = {
    "num_experts huge": ("qwen3_moe", _set(num_experts=2**31, num_local_experts=2**31),
                         "num_experts"),
    "layers huge": ("qwen3", _set(num_hidden_layers=10_000_000), "num_hidden_layers"),
    "layers more than the weights": ("qwen3", _set(num_hidden_layers=5), "num_hidden_layers"),
    "vocab huge": ("qwen3", _set(vocab_size=2**31), "vocab_size"),
    "negative eps": ("qwen3", _set(rms_norm_eps=-1), "rms_norm_eps"),
    "model_type list": ("qwen3", _set(model_type=["qwen3"]), "model_type"),
    "partial rotary string": ("qwen3", _set(partial_rotary_factor="0.5"), "partial_rotary_factor"),
    "quantization_config number": ("qwen3", _set(quantization_config=4), "quantization_config"),
    "rope_parameters list": ("qwen3", _set(rope_parameters=[1, 2]), "rope_parameters"),
    "yarn beta string": ("qwen3", _set(rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "beta_fast": "x",
        "original_max_position_embeddings": 64}), "beta_fast"),
    "rope theta nan": ("qwen3", _set(rope_parameters={"rope_type": "default",
                                                       "rope_theta": float("nan")}), "rope_theta"),
    "rope theta inf": ("qwen3", _set(rope_parameters={"rope_type": "default",
                                                       "rope_theta": float("inf")}), "rope_theta"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_config_gets_a_clear_error_within_bounds(sources, tmp_path, case):
    family, edit, key = HOSTILE[case]
    folder = _edited(sources, tmp_path, family, edit)
    code, out, peak = _load_in_child(folder)
    assert code == 2, out
    assert "Traceback" not in out and key in out and "config.json" in out, out
    assert peak < MAX_RSS_MB, f"peak RSS {peak} MB"


def test_config_not_utf8_and_deeply_nested(sources, tmp_path):
    folder = _edited(sources, tmp_path, "qwen3", lambda cfg: None)
    (folder / "config.json").write_bytes(b'{"model_type": "qwen3\xff"}')
    code, out, _ = _load_in_child(folder)
    assert code == 2 and "UTF-8" in out and "Traceback" not in out, out
    (folder / "config.json").write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
    code, out, _ = _load_in_child(folder)
    assert code == 2 and "nested" in out and "Traceback" not in out, out


def test_index_not_utf8(sources, tmp_path):
    folder = _edited(sources, tmp_path, "qwen3", lambda cfg: None)
    (folder / "model.safetensors.index.json").write_bytes(b'{"weight_map": {"\xff": 1}}')
    code, out, _ = _load_in_child(folder)
    assert code == 2 and "index" in out and "Traceback" not in out, out


def _edit_weights(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_at_load(sources, tmp_path, value):
    folder = _edited(sources, tmp_path, "qwen3", lambda cfg: None)
    name = "model.layers.1.mlp.down_proj.weight"

    def poison(t):
        t[name] = t[name].copy()
        t[name][3, 5] = value
    _edit_weights(folder, poison)
    code, out, _ = _load_in_child(folder)
    assert code == 2 and name in out and "NaN or infinite" in out, out


def test_integer_weights_are_refused_at_load(sources, tmp_path):
    folder = _edited(sources, tmp_path, "qwen3", lambda cfg: None)
    name = "model.layers.0.self_attn.q_proj.weight"

    def to_int(t):
        t[name] = (t[name] * 100).astype(np.int32)
    _edit_weights(folder, to_int)
    code, out, _ = _load_in_child(folder)
    assert code == 2 and name in out and "int32" in out, out
