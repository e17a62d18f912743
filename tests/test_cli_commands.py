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


@pytest.fixture(scope="module")
def dca_folder(tmp_path_factory):
    from test_dca import write_dca

    folder = tmp_path_factory.mktemp("cli-dca") / "q2"
    build_checkpoint(folder, "qwen2", vocab_size=320, max_position_embeddings=512)
    write_tiny_tokenizer(folder, vocab=320, chat_template="qwen2_5")
    write_dca(folder, 0)
    return folder


def test_dca_is_said_and_can_be_turned_off(dca_folder, tiny, capsys):
    base = ["generate", "-m", str(dca_folder), "--raw", "hello world", "--temperature", "0",
            "--max-tokens", "4"]
    assert main(base) == 0
    assert "DCA on" in capsys.readouterr().err
    assert main(base + ["--dca", "off"]) == 0
    assert "DCA on" not in capsys.readouterr().err
    assert main(["generate", "-m", str(tiny), "--raw", "x", "--dca", "on"]) == 2
    assert "dual_chunk_attention_config" in capsys.readouterr().err


def test_the_chat_ui_meter_names_dca_and_the_cache_at_the_limit(dca_folder):
    import qwen_mlx
    from qwen_mlx.model.dca import set_dca
    from tui.context import limit_label
    from tui.widgets.status import ContextMeter, ContextState

    model, _ = qwen_mlx.load(dca_folder)
    assert limit_label(model) == "DCA"
    set_dca(model, False)
    assert limit_label(model) == ""
    text = ContextMeter.describe(ContextState(used=10, limit=512, kv_bytes=1 << 20,
                                              kv_at_limit=3 << 30, memory=2 << 30))
    assert "At the context limit it needs 3" in text and "do not fit" in text


def test_qwen1_window_flag_is_refused_for_other_families(tiny, capsys):
    assert main(["generate", "-m", str(tiny), "--raw", "x", "--qwen1-window"]) == 2
    assert "Qwen1" in capsys.readouterr().err
