"""The subcommands wired into `qwen-mlx` run end to end through `main`: perplexity,
attention, convert --awq, and generate with speculative decoding."""

from __future__ import annotations

import json

import pytest

from conftest import build_checkpoint, write_tiny_tokenizer
from qwen_mlx.cli import main

TEXT = "the quick brown fox jumps over the lazy dog. hello world, def main(): return 42\n" * 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "q3"
    build_checkpoint(folder, "qwen3", vocab_size=320, max_position_embeddings=512)
    write_tiny_tokenizer(folder, vocab=320, chat_template="qwen3")
    return folder


def test_perplexity_command(tiny, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    assert main(["perplexity", str(tiny), "--file", str(text), "--context", "32",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["perplexity"] > 1


def test_attention_command_writes_a_png(tiny, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "a.png"
    assert main(["attention", str(tiny), "hello world", "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_convert_awq_command(tiny, tmp_path):
    out = tmp_path / "awq"
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    assert main(["convert", str(tiny), "-o", str(out), "--awq", "--calibration", str(calib),
                 "--bits", "4", "--group-size", "32"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4


def test_generate_with_a_draft_model_prints_the_same_text(tiny, capsys):
    base = ["generate", "-m", str(tiny), "--raw", "hello world", "--temperature", "0",
            "--max-tokens", "16"]
    assert main(base) == 0
    plain = capsys.readouterr()
    assert main(base + ["--draft-model", str(tiny), "--num-draft-tokens", "2"]) == 0
    spec = capsys.readouterr()
    assert spec.out == plain.out
    assert "accepted" in spec.err and "accepted" not in plain.err


def test_speculative_flag_errors_are_clear(tiny, capsys):
    assert main(["generate", "-m", str(tiny), "--raw", "x", "--speculative", "mtp"]) == 2
    assert "MTP block" in capsys.readouterr().err
    assert main(["generate", "-m", str(tiny), "--raw", "x", "--num-draft-tokens", "2"]) == 2
    assert "needs --draft-model" in capsys.readouterr().err
