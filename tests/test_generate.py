"""Generation: greedy parity with transformers, sampling, stops, chat sessions and caches."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import mlx.core as mx
import numpy as np
import pytest
import torch

import qwen_mlx
from conftest import build_checkpoint, write_tiny_tokenizer
from qwen_mlx.model.cache import KVCache, RotatingKVCache
from qwen_mlx.generate.prompt_cache import load_prompt_cache, save_prompt_cache
from qwen_mlx.generate.generation import ChatSession, StopMatcher, stream_generate

VOCAB = 320
FAMILIES = {
    "qwen2": {},
    "qwen2_moe": {"shared_expert_intermediate_size": 48, "decoder_sparse_step": 2},
    "qwen3": {"tie_word_embeddings": True},
    "qwen3_moe": {"norm_topk_prob": True},
}


def checkpoint(root, family, template="qwen3", **overrides):
    hf, folder = build_checkpoint(root, family, vocab_size=VOCAB, max_position_embeddings=256,
                                  **{**FAMILIES[family], **overrides})
    write_tiny_tokenizer(folder, vocab=VOCAB, chat_template=template)
    return hf, folder


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request, tmp_path_factory):
    hf, folder = checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    model, tok = qwen_mlx.load(folder)
    return hf, model, tok


def greedy(model, tok, ids, n, **kw):
    out = []
    for _ in stream_generate(model, tok, ids, max_tokens=n, temperature=0.0, tokens_out=out,
                             **kw):
        pass
    return out


@pytest.mark.parametrize("prefill_step_size", [512, 5])
def test_greedy_tokens_equal_transformers_generate(family_model, prefill_step_size):
    hf, model, tok = family_model
    ids = np.random.RandomState(7).randint(0, VOCAB, 23).tolist()
    eos = sorted(set(tok.eos_token_ids) | {tok.im_start_id})
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                          eos_token_id=eos, pad_token_id=eos[0], top_k=None, top_p=None,
                          temperature=None)[0, len(ids):].tolist()
    ours = greedy(model, tok, ids, 32, prefill_step_size=prefill_step_size)
    assert ours == ref


def test_sampling_is_seeded_and_top_k_1_is_greedy(family_model):
    _, model, tok = family_model
    ids = list(range(10, 30))
    a, b, c = [], [], []
    for out, seed in ((a, 1), (b, 1), (c, 2)):
        for _ in stream_generate(model, tok, ids, max_tokens=16, temperature=1.5, top_p=1.0,
                                 top_k=0, seed=seed, tokens_out=out):
            pass
    assert a == b and a != c
    top1 = []
    for _ in stream_generate(model, tok, ids, max_tokens=16, temperature=1.0, top_k=1,
                             seed=3, tokens_out=top1):
        pass
    assert top1 == greedy(model, tok, ids, 16)


def test_stop_matcher_holds_back_partial_stops():
    m = StopMatcher(["END", "xy"])
    assert m.feed("abcE") == ("abc", False)
    assert m.feed("Nd") == ("ENd", False)
    assert m.feed("foo x") == ("foo ", False)
    assert m.feed("yz") == ("", True)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    hf, folder = checkpoint(tmp_path_factory.mktemp("q3"), "qwen3", num_hidden_layers=2,
                            head_dim=32)
    model, tok = qwen_mlx.load(folder)
    return model, tok, folder


def test_max_tokens_stop_string_and_cancel(qwen3):
    model, tok, _ = qwen3
    ids = list(range(40, 60))
    rs = list(stream_generate(model, tok, ids, max_tokens=5, temperature=0.0))
    assert rs[-1].finish_reason in ("length", "stop") and rs[-1].generation_tokens <= 5
    full = "".join(r.text for r in stream_generate(model, tok, ids, max_tokens=40,
                                                   temperature=0.0))
    if len(full) > 6:
        stop = full[3:6]
        cut = "".join(r.text for r in stream_generate(model, tok, ids, max_tokens=40,
                                                      temperature=0.0, stop=[stop]))
        assert cut == full[: full.index(stop)]
    event = threading.Event()
    seen = []
    for r in stream_generate(model, tok, ids, max_tokens=40, temperature=0.0, cancel=event):
        seen.append(r)
        event.set()
    assert seen[-1].finish_reason == "cancelled" and seen[-1].generation_tokens == 1


def reply_tokens(session, text, n=12):
    first = None
    for r in session.send(text, max_tokens=n, temperature=0.0):
        first = first or r
    return session.messages[-1], first


def test_chat_turn_two_prefills_only_new_tokens(qwen3):
    model, tok, _ = qwen3
    s = ChatSession(model, tok, system="be brief", enable_thinking=False)
    reply_tokens(s, "hello there")
    msg, first = reply_tokens(s, "and again")
    full = tok.apply_chat_template(s.messages[:-1], add_generation_prompt=True,
                                   enable_thinking=False)
    new_part = tok.encode("and again<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
                          special=True)
    assert first.cached_tokens + first.prompt_tokens == len(full)
    assert first.prompt_tokens <= len(new_part) + 3  # the new message and the template around it
    # Reusing the cache changes nothing: a fresh session replies identically.
    fresh = ChatSession(model, tok, enable_thinking=False, messages=s.messages[:-1])
    for _ in fresh.respond(max_tokens=12, temperature=0.0):
        pass
    assert fresh.messages[-1]["content"] == msg["content"]


def test_regenerate_and_edit_reuse_the_cache(qwen3):
    model, tok, _ = qwen3
    s = ChatSession(model, tok, enable_thinking=False)
    reply_tokens(s, "hello there")
    reply_tokens(s, "the quick brown fox")
    prompt = tok.apply_chat_template(s.messages[:-1], add_generation_prompt=True,
                                     enable_thinking=False)
    first = next(iter(s.regenerate(max_tokens=4, temperature=0.0)))
    # Only the generation prompt's empty think block differs from the cached history.
    suffix = tok.encode("<think>\n\n</think>\n\n")
    assert first.prompt_tokens <= len(suffix) + 1
    assert first.cached_tokens + first.prompt_tokens == len(prompt)
    turn1 = tok.apply_chat_template(s.messages[:1], add_generation_prompt=False)
    first = next(iter(s.edit(2, "hello world", max_tokens=4, temperature=0.0)))
    assert len(turn1) - 3 <= first.cached_tokens < len(prompt)


def test_saved_prompt_cache_continues_the_same_tokens(qwen3, tmp_path):
    model, tok, _ = qwen3
    ids = list(range(50, 80))
    straight = greedy(model, tok, ids, 12)
    cache = model.make_cache()
    first = []
    for _ in stream_generate(model, tok, ids, max_tokens=6, temperature=0.0,
                             prompt_cache=cache, tokens_out=first):
        pass
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache, {"tokens": "x"})
    loaded, meta = load_prompt_cache(str(tmp_path / "c.safetensors"))
    assert meta["tokens"] == "x" and loaded[0].offset == cache[0].offset == len(ids) + 5
    rest = []
    for _ in stream_generate(model, tok, first[-1:], max_tokens=6, temperature=0.0,
                             prompt_cache=loaded, tokens_out=rest):
        pass
    assert first + rest == straight


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_and_rotating_caches_stay_bounded(qwen3, bits):
    model, tok, _ = qwen3
    ids = list(range(20, 60))
    plain = model.make_cache()
    quant = model.make_cache(kv_bits=bits)
    both = model.make_cache(kv_bits=bits, max_kv_size=16)
    for cache in (plain, quant, both):
        for _ in stream_generate(model, tok, ids, max_tokens=30, temperature=0.0,
                                 prompt_cache=cache):
            pass
    assert all(isinstance(c, RotatingKVCache) for c in both)
    assert all(isinstance(c, KVCache) for c in quant)
    per_position = lambda c: c.nbytes / c.keys[0].shape[2] if bits else 0  # noqa: E731
    ratio = per_position(quant[0]) / (plain[0].nbytes / plain[0].keys.shape[2])
    assert ratio < {4: 0.25, 8: 0.4}[bits]  # float32 -> packed bits plus scales and biases
    for c in both:
        assert c.offset > 16 and c.keys[0].shape[2] <= 16


def test_quantized_cache_stays_close(qwen3):
    model, tok, _ = qwen3
    ids = mx.array([list(range(20, 60))])
    ref = model(ids)
    for bits, tol in ((8, 0.05), (4, 0.5)):
        cache = model.make_cache(kv_bits=bits)
        model(ids[:, :30], cache=cache)
        got = model(ids[:, 30:], cache=cache)
        assert np.abs(np.array(got) - np.array(ref[:, 30:])).max() < tol


def test_context_limit(qwen3, tmp_path):
    model, tok, folder = qwen3
    small, _ = qwen_mlx.load(folder, max_context=24)
    with pytest.raises(qwen_mlx.QwenMLXError, match="context limit is 24"):
        next(iter(stream_generate(small, tok, list(range(30)), max_tokens=4)))
    rs = list(stream_generate(small, tok, list(range(20)), max_tokens=40, temperature=0.0))
    assert rs[-1].generation_tokens <= 4 and rs[-1].finish_reason in ("context", "stop")


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "qwen_mlx.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_cli_generate(qwen3, tmp_path):
    _, _, folder = qwen3
    r = run_cli("generate", "-m", str(folder), "hello world", "--temperature", "0",
                "--max-tokens", "8", "--no-think")
    assert r.returncode == 0, r.stderr
    assert "tok/s" in r.stderr and "TTFT" in r.stderr and "peak memory" in r.stderr
    r2 = run_cli("generate", "-m", str(folder), "--temperature", "0", "--max-tokens", "8",
                 "--no-think", stdin="hello world")
    assert r2.stdout == r.stdout
    cache = tmp_path / "p.safetensors"
    args = ("generate", "-m", str(folder), "hello world", "--temperature", "0",
            "--max-tokens", "8", "--no-think", "--prompt-cache", str(cache))
    run_cli(*args)
    again = run_cli(*args)
    assert again.stdout == r.stdout and "cached)" in again.stderr
    assert " 0 cached" not in again.stderr
    bad = run_cli("generate", "-m", str(tmp_path / "none"), "hi")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    binary = subprocess.run([sys.executable, "-m", "qwen_mlx.cli", "generate", "-m", str(folder)],
                            input=b"\xff\xfe not utf-8", capture_output=True, timeout=300)
    assert binary.returncode == 2 and b"not valid UTF-8" in binary.stderr
    threads = subprocess.run([sys.executable, "-m", "qwen_mlx.cli", "generate", "-m", str(folder),
                              "hi"], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "QWEN_MLX_THREADS": "many"})
    assert threads.returncode == 2 and "QWEN_MLX_THREADS='many'" in threads.stderr
    assert "Traceback" not in threads.stderr


def test_cancel_during_a_long_prefill_and_a_failed_turn_adds_nothing(qwen3):
    model, tok, folder = qwen3
    calls = []

    def cancel():  # stop after the first prefill chunk
        calls.append(1)
        return len(calls) > 1

    rs = list(stream_generate(model, tok, list(range(100)), max_tokens=8, prefill_step_size=10,
                              cancel=cancel))
    assert rs[-1].finish_reason == "cancelled" and rs[-1].generation_tokens == 0
    small, _ = qwen_mlx.load(folder, max_context=24)
    s = ChatSession(small, tok, enable_thinking=False)
    with pytest.raises(qwen_mlx.QwenMLXError, match="context limit"):
        list(s.send("the quick brown fox jumps over the lazy dog " * 3))
    assert s.messages == []  # the failed turn left the history as it was
