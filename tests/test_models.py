"""`qwen-mlx chat`'s model: local folders as they are, hub repos converted once and cached."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import build_checkpoint
from test_convert_safety import make_hub_cache


def prepare(tmp_path, source, extra_env=None):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "QWEN_MLX_CACHE": str(tmp_path / "cache"), **(extra_env or {})}
    env.pop("HF_HUB_CACHE", None)
    code = ("import sys, qwen_mlx.checkpoint.models as m\n"
            "from qwen_mlx.errors import QwenMLXError\n"
            "try:\n"
            f"    print('PATH', m.prepare_model({source!r}, progress=False))\n"
            "except QwenMLXError as e:\n"
            "    print('ERROR', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    _, folder = build_checkpoint(tmp_path_factory.mktemp("src") / "Tiny", "qwen3",
                                 num_hidden_layers=2, intermediate_size=128)
    return folder


def test_hub_repo_is_converted_once_then_reused(tmp_path, hf_folder):
    make_hub_cache(tmp_path / "hf", "org/Tiny", hf_folder, {})
    out = prepare(tmp_path, "org/Tiny")
    assert "First run with org/Tiny" in out and "bits per weight" in out
    target = tmp_path / "cache" / "models" / "org--Tiny-4bit"
    assert out.strip().endswith(f"PATH {target}")
    assert json.loads((target / "config.json").read_text())["quantization"]["bits"] == 4
    stamp = (target / "config.json").stat().st_mtime_ns
    again = prepare(tmp_path, "org/Tiny")
    assert again.strip() == f"PATH {target}"  # no second conversion
    assert (target / "config.json").stat().st_mtime_ns == stamp


def test_mlx_repo_and_local_folders_are_used_as_they_are(tmp_path, hf_folder):
    import qwen_mlx

    mlx = qwen_mlx.convert(hf_folder, tmp_path / "mlx", quantize=True, group_size=32,
                           progress=False).path
    snapshot = make_hub_cache(tmp_path / "hf", "org/Tiny-4bit", mlx, {})
    assert prepare(tmp_path, "org/Tiny-4bit").strip() == f"PATH {snapshot}"
    assert prepare(tmp_path, str(hf_folder)).strip() == f"PATH {hf_folder}"


def test_offline_without_the_model_says_what_to_pass(tmp_path):
    out = prepare(tmp_path, "Qwen/Qwen3-0.6B")
    assert out.startswith("ERROR") and "not in the Hugging Face cache" in out
    assert "--model PATH" in out
