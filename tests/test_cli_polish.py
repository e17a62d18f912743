"""The command line as a new user meets it (issue 18, items 10-14): empty prompts, a
--max-context past the model's context, `info`, messages that name the flag, `bench`'s
options and folders, and --dequantize's output name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import build_checkpoint, write_tiny_tokenizer
from qwen_mlx import cli
from qwen_mlx.checkpoint.converter import dequantized_name

VOCAB = 320
NATIVE = 256  # the tiny model's max_position_embeddings


def make(root: Path, **overrides) -> tuple[object, Path]:
    model, folder = build_checkpoint(root, "qwen3", **{
        "vocab_size": VOCAB, "max_position_embeddings": NATIVE, "num_hidden_layers": 2,
        "head_dim": 32, "tie_word_embeddings": True, **overrides})
    write_tiny_tokenizer(folder, vocab=VOCAB, chat_template="qwen3")
    return model, folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make(tmp_path_factory.mktemp("tiny") / "Tiny-Qwen3")


@pytest.fixture
def run(capsys):
    """qwen_mlx.cli.main(argv) -> (exit code, stdout, stderr); argparse's exit is a code too."""
    def go(*argv: str) -> tuple[int, str, str]:
        try:
            code = cli.main(list(argv))
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err
    return go


def generate(folder: Path, *args: str) -> list[str]:
    return ["generate", "-m", str(folder), "--no-think", "--temperature", "0",
            "--max-tokens", "3", *args]


# ------------------------------------------------------------ item 10: empty prompts


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_an_empty_prompt_argument_is_refused(tiny, run, prompt):
    code, out, err = run(*generate(tiny[1], prompt))
    assert code == 2 and out == ""
    assert "the prompt is empty (the argument)" in err and "Traceback" not in err


def test_an_empty_file_or_stdin_is_refused(tiny, tmp_path, run):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    code, out, err = run(*generate(tiny[1], "--file", str(empty)))
    assert code == 2 and out == "" and f"the prompt is empty (the file {empty})" in err
    for data in (b"", b"  \n"):
        r = subprocess.run([sys.executable, "-m", "qwen_mlx.cli", *generate(tiny[1])],
                           input=data, capture_output=True, timeout=120)
        assert r.returncode == 2 and r.stdout == b""
        assert b"the prompt is empty (stdin)" in r.stderr and b"generation" not in r.stderr
    # Text still generates.
    code, out, err = run(*generate(tiny[1], "hello"))
    assert code == 0 and "generation 3 tokens" in err


# ------------------------------------------------- item 11: --max-context past native


def test_a_max_context_past_the_native_context_is_refused_with_the_yarn_hint(tiny, run):
    code, out, err = run(*generate(tiny[1], "--max-context", "1000", "hello"))
    assert code == 2 and out == ""
    assert ("--max-context 1,000 is above this model's context of 256 positions; extend it "
            "with --rope-scaling yarn --rope-factor 4 (1,024 positions)") in err
    # Under YaRN x2 (512 positions) it is still too far; x4 covers it.
    code, _, err = run(*generate(tiny[1], "--max-context", "1000", "--rope-scaling", "yarn",
                                 "--rope-factor", "2", "hello"))
    assert code == 2 and "512 positions with yarn x2" in err and "--rope-factor 4" in err
    for flags in (["--max-context", "1000", "--rope-scaling", "yarn", "--rope-factor", "4"],
                  ["--max-context", str(NATIVE)]):
        code, _, err = run(*generate(tiny[1], *flags, "hello"))
        assert code == 0, err
    code, _, err = run(*generate(tiny[1], "--max-context", "1", "hello"))
    assert code == 2 and "--max-context must be at least 2 positions, got 1" in err


def test_chat_refuses_the_same_before_the_window_opens_and_honours_saved_yarn(
        tiny, tmp_path, run, monkeypatch):
    import tui.app

    opened = []
    monkeypatch.setattr(tui.app, "run_chat", lambda folder, **kw: opened.append(kw))
    monkeypatch.setenv("QWEN_MLX_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    code, _, err = run("chat", "-m", str(tiny[1]), "--max-context", "1000")
    assert code == 2 and "--rope-scaling yarn --rope-factor 4" in err and opened == []
    # YaRN turned on in the saved settings covers it: the window opens with the cap.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "settings.json").write_text(json.dumps(
        {"rope_scaling": "yarn", "rope_factor": 4.0}))
    code, _, err = run("chat", "-m", str(tiny[1]), "--max-context", "1000")
    assert code == 0, err
    assert opened and opened[0]["max_context"] == 1000


# --------------------------------------------------------------------- item 12: info


def test_info_gives_context_vocabulary_dtype_ties_and_parameters(tiny, run):
    model, folder = tiny
    code, out, err = run("info", str(folder))
    assert code == 0, err
    assert "context: 256 positions (--rope-scaling yarn extends it)" in out
    assert "vocabulary: 320 embedding rows; tied embeddings: yes" in out
    assert f"parameters: {model.num_parameters():,} " in out
    assert "dtype: float32; stored as float32" in out


def test_info_counts_a_quantized_folder_like_its_float_source(tiny, tmp_path, run):
    model, folder = tiny
    q = tmp_path / "Tiny-4bit"
    assert run("convert", str(folder), "-q", "--group-size", "32", "-o", str(q))[0] == 0
    code, out, err = run("info", str(q))
    assert code == 0, err
    assert f"parameters: {model.num_parameters():,} " in out
    assert "uint32 (packed quantized weights)" in out and "quantized: 4 bits, group size 32" in out


def test_info_reads_headers_only(tiny, run, monkeypatch):
    import mlx.core as mx

    def no_loading(*args, **kwargs):
        raise AssertionError("info loaded weights")

    monkeypatch.setattr(mx, "load", no_loading)
    code, out, _ = run("info", str(tiny[1]))
    assert code == 0 and "parameters:" in out


def test_info_on_a_missing_folder_or_a_hub_id(tmp_path, run, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run("info", str(tmp_path / "nowhere"))
    assert code == 2 and f"{tmp_path / 'nowhere'}: no such folder" in err
    code, _, err = run("info", "Qwen/Qwen3-0.6B")
    assert code == 2 and "info needs a local folder" in err and "qwen-mlx convert" in err
    assert "config.json" not in err


# ----------------------------------------------------------------- item 13: messages


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "5"], "--top-p 5.0 is out of range: it must be above 0 and at most 1"),
    (["--top-k", "-2"], "--top-k -2 is out of range: it must be at least 0"),
    (["--min-p", "1"], "--min-p 1.0 is out of range: it must be at least 0 and below 1"),
    (["--repetition-penalty", "0"], "--repetition-penalty 0.0 is out of range: it must be above 0"),
    (["--temperature", "-1"], "--temperature -1.0 is out of range: it must be at least 0"),
])
def test_range_errors_name_the_flag_and_the_range(tiny, run, flags, message):
    code, out, err = run(*generate(tiny[1], *flags, "hello"))
    assert code == 2 and out == "" and message in err
    assert "_" not in err.split("error:")[1].split()[0]  # --top-p, never top_p


@pytest.mark.parametrize("flags, message", [
    (["--gen", "1"], "--gen must be at least 2 (decode speed needs two tokens), got 1"),
    (["--reps", "0"], "--reps must be at least 1, got 0"),
    (["--contexts", "1,128"], "--contexts '1,128': each prompt length must be at least 2 tokens"),
])
def test_bench_range_errors_name_the_flag_and_the_value(tmp_path, run, flags, message):
    code, _, err = run("bench", "--shape", "tiny-shape", "--work", str(tmp_path), *flags)
    assert code == 2 and message in err


def test_chat_refuses_a_bad_rope_factor_before_the_window_opens(tiny, run, monkeypatch):
    import tui.app

    monkeypatch.setattr(tui.app, "run_chat", lambda folder, **kw: pytest.fail("UI opened"))
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    code, _, err = run("chat", "-m", str(tiny[1]), "--rope-scaling", "yarn", "--rope-factor",
                       "0.5")
    assert code == 2 and "(--rope-factor) must be a number above 1" in err


def test_a_message_too_long_for_the_context_gives_its_token_count(tiny, run):
    code, _, err = run(*generate(tiny[1], "--raw", "--max-context", "16", "hello " * 40))
    assert code == 2
    count = int(err.split("the prompt needs ")[1].split()[0])
    assert count > 16 and "the context limit is 16" in err


@pytest.mark.parametrize("argv, wrong", [
    (["generate", "-m", "x", "--bogus", "hi"], "--bogus"),
    (["generate", "-m", "x", "one", "two"], "two"),
    (["info", "x", "--bogus"], "--bogus"),
    (["bench", "--shape", "tiny-shape", "--bogus"], "--bogus"),
    (["convert", "x", "--bogus"], "--bogus"),
])
def test_a_wrong_flag_shows_the_subcommands_usage(run, argv, wrong):
    code, _, err = run(*argv)
    assert code == 2 and err.startswith(f"usage: qwen-mlx {argv[0]} ")
    assert f"qwen-mlx {argv[0]}: error: unrecognized arguments: {wrong}\n" in err


# -------------------------------------------------------------------- item 14: bench


@pytest.mark.parametrize("layers", ["0", "-1", "3"])
def test_bench_refuses_layers_outside_the_shape(tmp_path, run, layers):
    code, _, err = run("bench", "--shape", "tiny-shape", "--layers", layers,
                       "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"))
    assert code == 2
    assert f"--layers must be from 1 to 2 (tiny-shape has 2 layers), got {layers}" in err
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


def test_bench_says_where_it_writes_and_clean_removes_only_its_folders(tmp_path, run):
    work, out = tmp_path / "work", tmp_path / "out"
    code, stdout, err = run("bench", "--shape", "tiny-shape", "--contexts", "8", "--gen", "2",
                            "--reps", "1", "--no-peers", "--work", str(work), "--out", str(out))
    assert code == 0, err
    assert f"results go to {out}" in err and f"kept in {work}" in err
    assert "qwen-mlx bench --clean" in err
    made = sorted(p.name for p in work.iterdir())
    assert made == ["tiny-shape-L2", "tiny-shape-L2-4bit-g64"]
    header = stdout.splitlines()[0]
    assert "{" not in header and "Device(" not in header and "on the CPU" in header
    # Someone's own files in the work folder stay.
    (work / "notes").mkdir()
    (work / "notes" / "config.json").write_text("{}")
    (work / "mine-L2.txt").write_text("keep")
    code, _, err = run("bench", "--clean", "--work", str(work))
    assert code == 0 and "removed 2 folders" in err
    assert sorted(p.name for p in work.iterdir()) == ["mine-L2.txt", "notes"]
    code, _, err = run("bench", "--clean", "--work", str(work))
    assert code == 0 and "nothing to remove" in err


def test_bench_clean_after_a_run_leaves_nothing(tmp_path, run):
    work = tmp_path / "work"
    code, _, err = run("bench", "--shape", "tiny-shape", "--contexts", "8", "--gen", "2",
                       "--reps", "1", "--no-peers", "--work", str(work), "--out",
                       str(tmp_path / "out"), "--clean")
    assert code == 0, err
    assert "removed after this one" in err and not work.exists()
    assert (tmp_path / "out" / "bench.json").exists()


# ------------------------------------------------------ item 14: --dequantize's name


@pytest.mark.parametrize("name, dtype, expected", [
    ("Tiny-4bit", None, "Tiny-float"), ("Tiny-mixed_4_6", None, "Tiny-float"),
    ("Tiny-MLX-8bit", "bfloat16", "Tiny-bfloat16"), ("Tiny", None, "Tiny-float"),
])
def test_dequantize_names_the_output_after_the_float_model(name, dtype, expected):
    assert dequantized_name(f"some/where/{name}/", dtype) == expected


def test_dequantize_writes_x_float_for_x_4bit(tiny, tmp_path, run, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run("convert", str(tiny[1]), "-q", "--group-size", "32")[0] == 0
    assert (tmp_path / "Tiny-Qwen3-4bit" / "config.json").exists()
    code, _, err = run("convert", "Tiny-Qwen3-4bit", "--dequantize")
    assert code == 0, err
    assert (tmp_path / "Tiny-Qwen3-float" / "config.json").exists()
    assert not (tmp_path / "Tiny-Qwen3-4bit-mlx").exists()
