"""Generation under bad input, failures, threads and stale files (issue 17).

Token ids out of range, a tokenizer that does not fit the model, padding rows, failed
chat turns, rotating-cache chats, thread pools, prompt cache files, and every sampling
and cache option checked before anything runs.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import qwen_mlx
from conftest import build_checkpoint, write_tiny_tokenizer
from qwen_mlx import cli
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.generate import prompt_cache as pc
from qwen_mlx.generate.generation import ChatSession, stream_generate
from qwen_mlx.model.cache import KVCache, RotatingKVCache

VOCAB = 320


def make(root: Path, family: str = "qwen3", *, tokenizer_vocab: int = VOCAB,
         generation_config: dict | None = None, **overrides) -> Path:
    extra = {"tie_word_embeddings": True} if family == "qwen3" else {}
    _, folder = build_checkpoint(root, family, **{
        "vocab_size": VOCAB, "max_position_embeddings": 256, "num_hidden_layers": 2, **extra,
        **overrides})
    write_tiny_tokenizer(folder, vocab=tokenizer_vocab, chat_template="qwen3",
                         generation_config=generation_config)
    return folder


@pytest.fixture(scope="module")
def q3(tmp_path_factory):
    folder = make(tmp_path_factory.mktemp("q3"), head_dim=32)
    model, tok = qwen_mlx.load(folder)
    return model, tok, folder


def greedy(model, tok, prompt, n=8, **kw) -> list[int]:
    out: list[int] = []
    for _ in stream_generate(model, tok, prompt, max_tokens=n, temperature=0.0,
                             tokens_out=out, **kw):
        pass
    return out


# ------------------------------------------------------------------ item 7: token ids


@pytest.mark.parametrize("bad", [[VOCAB + 5000], [VOCAB], [-1], [1, 2, "x"], [1.5], [True]])
def test_prompt_ids_outside_the_embedding_are_refused(q3, bad):
    model, tok, _ = q3
    with pytest.raises(QwenMLXError, match="prompt"):
        next(iter(stream_generate(model, tok, bad, max_tokens=2)))
    with pytest.raises(QwenMLXError, match="prompt"):
        qwen_mlx.generate(model, tok, bad, max_tokens=2)
    # numpy ids are fine, and the model still works afterwards
    assert greedy(model, tok, list(np.arange(5, 12))) == greedy(model, tok, list(range(5, 12)))


def test_a_tokenizer_with_more_ids_than_embedding_rows_is_refused(tmp_path, q3):
    small = make(tmp_path / "small", vocab_size=200, head_dim=32)  # a 320-id tokenizer
    with pytest.raises(QwenMLXError, match=r"small: the tokenizer has ids up to 319 but the "
                                           r"model's embedding has only 200 rows"):
        qwen_mlx.load(small)
    # A mismatched pair put together by hand is refused by generation and chat sessions.
    _, tok, _ = q3
    weights_only, none = _load_without_tokenizer(small)
    assert none is None
    with pytest.raises(QwenMLXError, match="200 rows"):
        next(iter(stream_generate(weights_only, tok, "hello", max_tokens=2)))
    s = ChatSession(weights_only, tok, enable_thinking=False)
    with pytest.raises(QwenMLXError, match="200 rows"):
        list(s.send("hello"))
    assert s.messages == []


def _load_without_tokenizer(folder: Path):
    import shutil

    bare = folder.parent / f"{folder.name}-bare"
    shutil.copytree(folder, bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (bare / name).unlink(missing_ok=True)
    return qwen_mlx.load(bare)


def test_padding_rows_past_the_tokenizer_are_never_sampled(tmp_path):
    # The embedding has 320 rows, the tokenizer 300 ids. Zero every real row of the
    # vocabulary head and make the padding rows large: unmasked, greedy decoding and
    # sampling would pick padding ids (which decode to nothing).
    folder = make(tmp_path, "qwen2", tokenizer_vocab=300)
    model, tok = qwen_mlx.load(folder)
    assert tok.id_limit == 300 < model.config.vocab_size
    w = model.lm_head.weight
    pad = mx.random.normal((VOCAB - 300, w.shape[1]), key=mx.random.key(0)) * 10
    model.lm_head.weight = mx.concatenate([mx.zeros((300, w.shape[1])), pad])
    mx.eval(model.parameters())
    ids = list(range(10, 30))
    for options in (dict(temperature=0.0), dict(temperature=1.0, top_k=0, top_p=1.0, seed=1),
                    dict(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5)):
        out: list[int] = []
        for _ in stream_generate(model, tok, ids, max_tokens=12, tokens_out=out, **options):
            pass
        assert out and max(out) < 300, options


# -------------------------------------------------------------- item 9: failed turns


def roles(s: ChatSession) -> list[str]:
    return [m["role"] for m in s.messages]


def reply(s: ChatSession, text: str, **kw) -> str:
    for _ in s.send(text, max_tokens=kw.pop("max_tokens", 8), temperature=0.0, **kw):
        pass
    return s.messages[-1]["content"]


def test_a_message_too_long_for_the_context_leaves_the_session_usable(q3):
    model, tok, folder = q3
    small, _ = qwen_mlx.load(folder, max_context=80)
    s = ChatSession(small, tok, enable_thinking=False)
    reply(s, "hello")
    before = [dict(m) for m in s.messages]
    for _ in range(2):
        with pytest.raises(QwenMLXError, match="context limit"):
            list(s.send("the quick brown fox jumps over the lazy dog " * 8, max_tokens=4))
        assert s.messages == before
    reply(s, "hi")  # later turns work
    assert roles(s) == ["user", "assistant", "user", "assistant"]
    assert len(s.cached) == s.cache[0].offset


@pytest.mark.parametrize("bad", [dict(top_p=0), dict(temperature="hot"), dict(seed=-1),
                                 dict(presence_penalty=float("nan")), dict(temprature=0.5)])
def test_a_bad_sampling_argument_leaves_the_history_as_it_was(q3, bad):
    model, tok, _ = q3
    s = ChatSession(model, tok, enable_thinking=False)
    first = reply(s, "hello there")
    before = [dict(m) for m in s.messages]
    for attempt in (lambda: s.send("again", **bad), lambda: s.regenerate(**bad),
                    lambda: s.edit(0, "changed", **bad)):
        with pytest.raises(QwenMLXError):
            list(attempt())
        assert s.messages == before
    reply(s, "and again")
    assert roles(s) == ["user", "assistant", "user", "assistant"]
    # The cache still matches the history: a fresh session replies the same.
    fresh = ChatSession(model, tok, enable_thinking=False, messages=s.messages[:-1])
    for _ in fresh.respond(max_tokens=8, temperature=0.0):
        pass
    assert fresh.messages[-1]["content"] == s.messages[-1]["content"]
    assert s.messages[1]["content"] == first


def test_cancelling_during_the_prefill_adds_nothing_and_keeps_the_cache_consistent(q3):
    model, tok, _ = q3
    s = ChatSession(model, tok, enable_thinking=False, prefill_step_size=4)
    reply(s, "hello")
    before = [dict(m) for m in s.messages]
    calls = []

    def cancel():  # stop after the first prefill chunk
        calls.append(1)
        return len(calls) > 1

    rs = list(s.send("the quick brown fox jumps over the lazy dog", max_tokens=8,
                     temperature=0.0, cancel=cancel))
    assert rs[-1].finish_reason == "cancelled" and rs[-1].generation_tokens == 0
    assert s.messages == before
    assert len(s.cached) == s.cache[0].offset
    got = reply(s, "the quick brown fox")
    fresh = ChatSession(model, tok, enable_thinking=False, messages=s.messages[:-1])
    for _ in fresh.respond(max_tokens=8, temperature=0.0):
        pass
    assert fresh.messages[-1]["content"] == got


def test_stopping_mid_reply_keeps_the_partial_reply(q3):
    model, tok, _ = q3
    s = ChatSession(model, tok, enable_thinking=False)
    event = threading.Event()
    for _ in s.send("hello there", max_tokens=20, temperature=0.0, cancel=event):
        event.set()
    assert roles(s) == ["user", "assistant"]


# ------------------------------------------------- item 11: rotating caches in a chat


class Counting:
    """A model that counts the positions run through it."""

    def __init__(self, model):
        self._model, self.positions = model, 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, inputs, cache=None, **kw):
        self.positions += inputs.shape[1]
        return self._model(inputs, cache=cache, **kw)


@pytest.mark.parametrize("thinking", [False, True])
def test_a_wrapped_rotating_cache_does_not_re_prefill_the_history(q3, thinking):
    model, tok, _ = q3
    counted = Counting(model)
    s = ChatSession(counted, tok, enable_thinking=thinking, max_kv_size=40)
    per_turn, own = [], []
    texts = ["hello there", "the quick brown fox", "jumps over the lazy dog",
             "hello world again", "def main return 42", "user assistant system"]
    for text in texts:
        before = counted.positions
        got = reply(s, text, max_tokens=8)
        per_turn.append(counted.positions - before)
        # This turn's own tokens: its message and reply as the template renders them.
        own.append(len(tok.apply_chat_template(s.messages[-2:], enable_thinking=thinking)))
        # The same history, prefilled from scratch into the same kind of cache.
        ref = ChatSession(model, tok, enable_thinking=thinking, max_kv_size=40,
                          messages=s.messages[:-1])
        for _ in ref.respond(max_tokens=8, temperature=0.0):
            pass
        assert ref.messages[-1]["content"] == got
    history = len(tok.apply_chat_template(s.messages, enable_thinking=thinking))
    assert s.cache[0].offset > 2 * 40 and history > 150  # the window wrapped long ago
    # Each turn runs its message and its reply (generated, then re-read as the template
    # will show it) with the template around them; never the history again.
    assert all(n <= 2 * m + 16 for n, m in zip(per_turn, own)), (per_turn, own)
    assert per_turn[-1] < history / 2, (per_turn, history)


def test_regenerate_with_a_wrapped_rotating_cache_reuses_the_snapshot(q3):
    model, tok, _ = q3
    counted = Counting(model)
    s = ChatSession(counted, tok, enable_thinking=False, max_kv_size=24)
    for text in ["hello there", "the quick brown fox", "jumps over the lazy dog",
                 "hello world again", "def main return 42", "user assistant system"]:
        reply(s, text)
    first = s.messages[-1]["content"]
    for _ in range(2):
        before = counted.positions
        for _ in s.regenerate(max_tokens=8, temperature=0.0):
            pass
        assert s.messages[-1]["content"] == first  # greedy: the same reply again
        own = len(tok.apply_chat_template(s.messages[-2:], enable_thinking=False))
        history = len(tok.apply_chat_template(s.messages, enable_thinking=False))
        assert counted.positions - before <= 2 * own + 16 < history


# ---------------------------------------------------------------- item 12: threads


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/task")
def test_many_calling_threads_leave_the_os_thread_count_bounded(q3):
    model, tok, _ = q3
    expected = greedy(model, tok, list(range(5, 15)), 4)
    s = ChatSession(model, tok, enable_thinking=False)
    reply(s, "warm up")
    start = os_threads()
    results, errors = [], []

    def job(i):
        try:
            results.append(greedy(model, tok, list(range(5, 15)), 4))
            session = ChatSession(model, tok, enable_thinking=False)
            reply(session, f"hello {i}", max_tokens=2)
        except Exception as e:  # reported below
            errors.append(e)

    for i in range(40):
        t = threading.Thread(target=job, args=(i,))
        t.start()
        t.join()
    assert not errors and results == [expected] * 40
    assert os_threads() - start <= 2, (start, os_threads())
    # Concurrent callers are served in turn, each with its own reply.
    threads = [threading.Thread(target=job, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [expected] * 48
    assert os_threads() - start <= 2


def test_a_consumer_that_stops_early_frees_the_worker(q3):
    model, tok, _ = q3
    gen = stream_generate(model, tok, list(range(5, 15)), max_tokens=50, temperature=0.0)
    next(gen)
    gen.close()
    assert greedy(model, tok, list(range(5, 15)), 4)  # the worker is free again


# ------------------------------------------------- items 13 and 14: options checked


@pytest.mark.parametrize("key, value, message", [
    ("temperature", "hot", "temperature must be a number"),
    ("top_k", "20", "top_k must be a whole number"),
    ("top_k", 20.5, "top_k must be a whole number"),
    ("top_p", 1.5, "top_p 1.5 is out of range"),
    ("temperature", -1, "temperature -1 is out of range"),
    ("repetition_penalty", [1], "repetition_penalty must be a number"),
    ("do_sample", "yes", "do_sample must be true or false"),
])
def test_generation_config_values_are_checked_naming_the_file(tmp_path, key, value, message):
    folder = make(tmp_path, head_dim=32, generation_config={key: value})
    model, tok = qwen_mlx.load(folder)
    where = str(folder / "generation_config.json")
    with pytest.raises(QwenMLXError) as e:
        ChatSession(model, tok)
    assert where in str(e.value) and message in str(e.value)
    with pytest.raises(QwenMLXError, match=message):
        next(iter(stream_generate(model, tok, "hello", max_tokens=2)))


def test_a_whole_float_top_k_in_generation_config_is_accepted(tmp_path):
    folder = make(tmp_path, head_dim=32, generation_config={"top_k": 20.0, "temperature": 0})
    model, tok = qwen_mlx.load(folder)
    assert greedy(model, tok, [5, 6, 7], 2)


@pytest.mark.parametrize("options, message", [
    (dict(seed=-1), "seed -1"), (dict(seed=2 ** 64), "seed"), (dict(seed=1.5), "seed"),
    (dict(presence_penalty=float("nan")), "presence_penalty must be a finite number"),
    (dict(frequency_penalty=float("inf")), "frequency_penalty must be a finite number"),
    (dict(temperature=float("inf")), "temperature must be a finite number"),
    (dict(min_p=float("nan")), "min_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(repetition_penalty=float("-inf")), "repetition_penalty"),
    (dict(kv_bits=2), "kv_bits 2 is not supported"), (dict(kv_bits=3), "kv_bits 3"),
    (dict(kv_bits=5), "kv_bits 5"), (dict(kv_bits=16), "kv_bits 16"),
    (dict(max_kv_size=0), "max_kv_size"), (dict(max_kv_size=-4), "max_kv_size"),
    (dict(max_kv_size=2.5), "max_kv_size"),
])
def test_bad_options_are_refused_before_anything_runs(q3, options, message):
    model, tok, _ = q3
    with pytest.raises(QwenMLXError, match=message):
        next(iter(stream_generate(model, tok, "hello", max_tokens=2, **options)))
    cache_options = {k: v for k, v in options.items() if k in ("kv_bits", "max_kv_size")}
    if cache_options:
        with pytest.raises(QwenMLXError, match=message):
            ChatSession(model, tok, **cache_options)
    assert mx.random.key(2 ** 64 - 1) is not None  # the largest seed accepted


def test_kv_bits_on_a_head_size_the_quantizer_cannot_group(tmp_path, capsys):
    folder = make(tmp_path, head_dim=24)
    model, tok = qwen_mlx.load(folder)
    with pytest.raises(QwenMLXError, match="head size 24 is not a multiple of 32"):
        next(iter(stream_generate(model, tok, "hello", max_tokens=2, kv_bits=4)))
    with pytest.raises(QwenMLXError, match="head size 24"):
        ChatSession(model, tok, kv_bits=8)
    assert cli.main(["generate", "-m", str(folder), "hi", "--kv-bits", "4"]) == 2
    err = capsys.readouterr().err
    assert "--kv-bits 4" in err and "head size 24" in err and "Traceback" not in err


@pytest.mark.parametrize("flags, message", [
    (["--seed", "-1"], "--seed -1"), (["--seed", str(2 ** 70)], "--seed"),
    (["--presence-penalty", "nan"], "--presence-penalty must be a finite number"),
    (["--frequency-penalty", "inf"], "--frequency-penalty must be a finite number"),
    (["--temperature", "nan"], "--temperature"), (["--top-p", "inf"], "--top-p"),
])
def test_cli_refuses_bad_sampling_flags_before_loading(tmp_path, capsys, flags, message):
    # The model folder does not exist: the flag is reported first.
    assert cli.main(["generate", "-m", str(tmp_path / "none"), "hi", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# ----------------------------------------------------------- item 10: prompt caches


@pytest.fixture
def cli_run(capsys):
    def go(folder: Path, cache: Path | None, *flags: str, prompt: str = "hello world",
           code: int = 0) -> tuple[str, str]:
        args = ["generate", "-m", str(folder), prompt, "--temperature", "0", "--max-tokens",
                "6", "--no-think", *flags]
        if cache is not None:
            args += ["--prompt-cache", str(cache)]
        assert cli.main(args) == code
        out = capsys.readouterr()
        return out.out, out.err
    return go


def cached_count(err: str) -> int:
    import re

    return int(re.search(r"\((\d+) cached\)", err)[1])


@pytest.mark.parametrize("content", [b"", b"\x00" * 3, os.urandom(4096), "truncated",
                                     "weights"])
def test_unusable_cache_files_warn_and_start_fresh(q3, tmp_path, cli_run, content):
    _, _, folder = q3
    plain, _ = cli_run(folder, None)
    path = tmp_path / "p.safetensors"
    if content == "truncated":
        cli_run(folder, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif content == "weights":
        path.write_bytes((folder / "model.safetensors").read_bytes())
    else:
        path.write_bytes(content)
    out, err = cli_run(folder, path)
    assert out == plain and "warning" in err and "starting a fresh prompt cache" in err
    assert str(path) in err and "Traceback" not in err
    out, err = cli_run(folder, path)  # rewritten: now reused
    assert out == plain and cached_count(err) > 0 and "warning" not in err


def test_a_cache_name_without_the_suffix_is_used_as_given(q3, tmp_path, cli_run):
    _, _, folder = q3
    path = tmp_path / "conversation.cache"
    first, _ = cli_run(folder, path)
    assert path.is_file() and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    again, err = cli_run(folder, path)
    assert again == first and cached_count(err) > 0


def test_cache_options_of_an_existing_file_are_not_ignored(q3, tmp_path, cli_run):
    _, _, folder = q3
    path = tmp_path / "p.safetensors"
    cli_run(folder, path)
    _, err = cli_run(folder, path, "--max-kv-size", "64", "--kv-bits", "4")
    assert "--kv-bits none, --max-kv-size none" in err and "--kv-bits 4, --max-kv-size 64" in err
    cache, meta = pc.load_prompt_cache(path)
    assert all(isinstance(c, RotatingKVCache) and c.window == 64 and c.bits == 4 for c in cache)
    _, err = cli_run(folder, path, "--max-kv-size", "64", "--kv-bits", "4")
    assert "warning" not in err and cached_count(err) > 0
    _, err = cli_run(folder, path)  # back to an unbounded float cache: rebuilt again
    assert "starting a fresh prompt cache" in err
    assert all(isinstance(c, KVCache) and c.bits is None for c in pc.load_prompt_cache(path)[0])


@pytest.mark.parametrize("change", [dict(head_dim=64), dict(seed=1), "quantized"])
def test_another_model_at_the_same_path_is_not_reused(q3, tmp_path, cli_run, change):
    _, _, folder = q3
    path = tmp_path / "p.safetensors"
    cli_run(folder, path)
    other = tmp_path / "other"
    if change == "quantized":
        qwen_mlx.convert(folder, other, quantize=True, bits=8, group_size=32)
    else:
        make(other, **{"head_dim": 32, **change})
    plain, _ = cli_run(other, None)
    out, err = cli_run(other, path)
    assert out == plain and "another model" in err and "Traceback" not in err


def test_rope_scaling_changes_the_fingerprint(q3):
    model, _, folder = q3
    scaled, _ = qwen_mlx.load(folder, rope_scaling="yarn", rope_factor=2.0)
    assert pc.model_fingerprint(model, folder) != pc.model_fingerprint(scaled, folder)
    assert pc.model_fingerprint(model, folder) == pc.model_fingerprint(model, folder)


def test_cache_writes_are_atomic(q3, tmp_path, monkeypatch):
    model, tok, _ = q3
    path = tmp_path / "p.safetensors"
    cache = model.make_cache()
    greedy(model, tok, list(range(5, 20)), 3, prompt_cache=cache)
    pc.save_prompt_cache(path, cache, {"tokens": "1 2 3"})
    good = path.read_bytes()

    def broken(file, arrays, metadata=None):  # writes half a file, then the disk is full
        Path(file).write_bytes(b"\x10" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pc.mx, "save_safetensors", broken)
    with pytest.raises(QwenMLXError, match="No space left on device"):
        pc.save_prompt_cache(path, cache, {"tokens": "1 2 3"})
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors"]


@pytest.mark.parametrize("where", ["file_parent", "missing_folder", "folder"])
def test_an_unwritable_cache_path_fails_before_generating(q3, tmp_path, cli_run, where):
    _, _, folder = q3
    (tmp_path / "f.txt").write_text("x")
    (tmp_path / "d").mkdir()
    path = {"file_parent": tmp_path / "f.txt" / "c.safetensors",
            "missing_folder": tmp_path / "no" / "c.safetensors", "folder": tmp_path / "d"}[where]
    out, err = cli_run(folder, path, code=2)
    assert out == "" and "--prompt-cache" in err and "Traceback" not in err


def test_load_prompt_cache_raises_a_clear_error(tmp_path):
    for name, data in (("empty", b""), ("random", os.urandom(100))):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(pc.PromptCacheError, match=str(path)):
            pc.load_prompt_cache(path)
