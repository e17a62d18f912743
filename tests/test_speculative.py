"""Speculative decoding: exact greedy output, the target's distribution under sampling,
and rollback that leaves the caches as a run that never drafted."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import qwen_mlx
from conftest import build_checkpoint, write_tiny_tokenizer
from hybrid_fixtures import build_case, build_case_with_tokenizer
from qwen_mlx.bench_speculative import damp
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.generate.generation import ChatSession, generate_tokens
from qwen_mlx.generate.sampling import Sampler, SamplingParams
from qwen_mlx.generate.speculative import (MTPDrafter, ModelDrafter, SpeculativeStats, accept,
                                           layer_draft, speculative_tokens)

TOKENS = 72
PROMPT = [5, 17, 33, 2, 9, 41, 12, 7, 30, 11, 3, 25]


def damp_last_layer(model, factor: float = 0.2) -> None:
    """The last layer's contribution scaled down, so a draft of the other layers agrees
    with the target often, but not always."""
    damp(model, model.config.num_layers - 1, factor)


def add_mtp_from_layer(folder: Path, layer: int, seed: int) -> None:
    """An MTP block (spec §5) for a checkpoint that has none: its decoder layer is a copy
    of the trunk's full-attention layer `layer` (MoE included), fc and norms random."""
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    gen = torch.Generator().manual_seed(seed)
    prefix = f"model.layers.{layer}."
    h = tensors["model.embed_tokens.weight"].shape[1]
    for k, v in list(tensors.items()):
        if k.startswith(prefix):
            tensors["mtp.layers.0." + k[len(prefix):]] = v.clone()
    tensors["mtp.fc.weight"] = 0.08 * torch.randn(h, 2 * h, generator=gen)
    for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        tensors[f"mtp.{name}.weight"] = 0.3 * torch.randn(h, generator=gen)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> a float32 target with its last layer damped."""
    root = tmp_path_factory.mktemp("spec")
    out = {}
    for family in ("qwen2", "qwen3", "qwen3_moe"):
        _, folder = build_checkpoint(root / family, family, seed=3)
        out[family] = qwen_mlx.load(folder, dtype="float32")[0]
    for name in ("qwen3_5-nested-untied", "qwen3_5_moe-fused"):
        out[name] = qwen_mlx.load(build_case(name, root / name).folder, dtype="float32")[0]
    case = build_case("qwen3_next-published", root / "next")
    add_mtp_from_layer(case.folder, 3, seed=5)
    out["qwen3_next"] = qwen_mlx.load(case.folder, dtype="float32")[0]
    for m in out.values():
        damp_last_layer(m)
    return out


def plain_run(model, n: int = TOKENS) -> list[int]:
    sampler = Sampler(SamplingParams(temperature=0.0, top_k=0, top_p=1.0),
                      model.config.vocab_size)
    return list(generate_tokens(model, PROMPT, model.make_cache(), sampler, max_tokens=n))


def spec_run(model, drafter, num_draft: int, n: int = TOKENS, cache=None):
    sampler = Sampler(SamplingParams(temperature=0.0, top_k=0, top_p=1.0),
                      model.config.vocab_size)
    cache = cache if cache is not None else model.make_cache()
    stats = SpeculativeStats()
    tokens = list(speculative_tokens(model, PROMPT, cache, sampler, drafter,
                                     num_draft=num_draft, max_tokens=n, stats=stats))
    return tokens, stats, cache


def _layer_drafter(model):
    return ModelDrafter(layer_draft(model, model.config.num_layers - 1),
                        limit=model.config.vocab_size)


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "qwen3_moe", "qwen3_5-nested-untied",
                                  "qwen3_5_moe-fused"])
def test_greedy_with_a_draft_model_is_the_plain_greedy_output(models, name):
    model = models[name]
    expected = plain_run(model)
    for num_draft in (1, 4):
        tokens, stats, _ = spec_run(model, _layer_drafter(model), num_draft)
        assert tokens == expected, (name, num_draft)
        # Drafts were both accepted and rejected, so the rollback paths ran.
        assert 0 < stats.accepted_tokens < stats.draft_tokens, stats


@pytest.mark.parametrize("name", ["qwen3_5-nested-untied", "qwen3_next"])
def test_greedy_with_the_mtp_block_is_the_plain_greedy_output(models, name):
    model = models[name]
    assert model.mtp is not None
    expected = plain_run(model)
    for num_draft in (1, 3):
        drafter = MTPDrafter(model, limit=model.config.vocab_size)
        tokens, stats, _ = spec_run(model, drafter, num_draft)
        assert tokens == expected, (name, num_draft)
        assert stats.draft_tokens > 0
        # The block's cache holds one pair per position but the last, plus queued pairs.
        assert drafter._covered() == len(PROMPT) + TOKENS - 1


@pytest.mark.parametrize("name,kind", [("qwen3", "model"), ("qwen3_5-nested-untied", "model"),
                                       ("qwen3_5-nested-untied", "mtp")])
def test_after_rejected_drafts_the_cache_gives_the_logits_of_a_run_that_never_drafted(
        models, name, kind):
    model = models[name]
    drafter = (_layer_drafter(model) if kind == "model"
               else MTPDrafter(model, limit=model.config.vocab_size))
    tokens, stats, cache = spec_run(model, drafter, 3, n=40)
    assert stats.draft_tokens > stats.accepted_tokens  # some drafts were rolled back
    held = PROMPT + tokens[:-1]
    assert cache[0].offset == len(held)
    fresh = model.make_cache()
    model(mx.array(held)[None], cache=fresh)
    ours = model(mx.array(tokens[-1:])[None], cache=cache)
    theirs = model(mx.array(tokens[-1:])[None], cache=fresh)
    np.testing.assert_allclose(np.array(ours), np.array(theirs), atol=2e-5)


def test_a_consumer_that_stops_mid_draft_leaves_the_cache_at_what_it_took(models):
    model = models["qwen3_5-nested-untied"]
    sampler = Sampler(SamplingParams(temperature=0.0, top_k=0, top_p=1.0),
                      model.config.vocab_size)
    cache = model.make_cache()
    gen = speculative_tokens(model, PROMPT, cache, sampler, _layer_drafter(model),
                             num_draft=4, max_tokens=TOKENS)
    taken = [next(gen) for _ in range(11)]
    gen.close()
    assert taken == plain_run(model)[:11]
    assert cache[0].offset in (len(PROMPT) + 10, len(PROMPT) + 11)
    ours = model(mx.array(taken[-1:])[None], cache=cache) if cache[0].offset == len(
        PROMPT) + 10 else None
    if ours is not None:
        fresh = model.make_cache()
        model(mx.array(PROMPT + taken[:-1])[None], cache=fresh)
        theirs = model(mx.array(taken[-1:])[None], cache=fresh)
        np.testing.assert_allclose(np.array(ours), np.array(theirs), atol=2e-5)


# --- sampling: the output distribution is the target's -------------------------------

V = 8


def _emitted(params: SamplingParams, target: np.ndarray, draft: np.ndarray, trials: int,
             seed: int, prior: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Counts of the first emitted token, and of the second given the first draft was
    accepted, over `trials` verify steps with two drafts drawn from softmax(draft)."""
    sampler = Sampler(params, V, prompt=prior)
    rng = np.random.default_rng(seed)
    q = np.exp(draft - draft.max(axis=-1, keepdims=True))
    q /= q.sum(axis=-1, keepdims=True)
    first, second = np.zeros(V), np.zeros(V)
    logits = mx.array(target)
    for _ in range(trials):
        d = [int(rng.choice(V, p=q[i])) for i in range(2)]
        a, nxt = accept(sampler, logits, d, mx.array(q.astype(np.float32)))
        emitted = d[:a] + [nxt]
        first[emitted[0]] += 1
        if a >= 1 and d[0] == 2:  # condition on one first token to test its successor
            second[emitted[1]] += 1
    return first, second


def _expected(params: SamplingParams, row: np.ndarray, seen: list[int]) -> np.ndarray:
    """The distribution sampling one token at a time draws from, after `seen`."""
    sampler = Sampler(params, V, prompt=[])
    for t in seen:
        sampler.observe(mx.array([t]))
    processed = sampler.process_rows(mx.array(row[None]), [])
    return np.array(sampler.probabilities(processed))[0]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_p=1.0, top_k=0, seed=1),
    SamplingParams(temperature=0.7, top_p=0.9, top_k=5, min_p=0.05, seed=2),
    SamplingParams(temperature=1.3, top_p=1.0, top_k=0, presence_penalty=0.8,
                   frequency_penalty=0.3, repetition_penalty=1.2, seed=3),
], ids=["plain", "filters", "penalties"])
def test_rejection_sampling_draws_from_the_targets_distribution(params):
    rng = np.random.default_rng(0)
    target = rng.normal(0, 1.2, (3, V)).astype(np.float32)
    draft = (target[:2] + rng.normal(0, 0.8, (2, V))).astype(np.float32)
    trials = 3000
    first, second = _emitted(params, target, draft, trials, seed=7, prior=[])
    p0 = _expected(params, target[0], [])
    p1 = _expected(params, target[1], [2])
    for counts, p in ((first, p0), (second, p1)):
        n = counts.sum()
        assert n > 300
        # Tokens the filters remove are never drawn.
        assert counts[p == 0].sum() == 0
        keep = p > 0
        expected = n * p[keep]
        chi2 = float((((counts[keep] - expected) ** 2) / expected).sum())
        # Fixed seeds: a deterministic check; the bound is the 0.999 quantile of chi2(7).
        assert chi2 < 24.3, (counts, expected)


def test_a_rejected_draft_is_never_emitted_where_the_target_gives_it_nothing():
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=2, seed=4)
    target = np.array([[4.0, 3.0, -9, -9, -9, -9, -9, -9]] * 2, dtype=np.float32)
    draft = np.array([[-9, -9, 5.0, -9, -9, -9, -9, -9]], dtype=np.float32)
    sampler = Sampler(params, V)
    q = np.zeros((1, V), np.float32)
    q[0, 2] = 1.0
    for _ in range(50):
        a, nxt = accept(sampler, mx.array(target), [2], mx.array(q))
        assert a == 0 and nxt in (0, 1)


# --- surfaces -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec-chat")
    _, folder = build_checkpoint(root / "qwen3", "qwen3", seed=4, vocab_size=320,
                                 max_position_embeddings=1024)
    write_tiny_tokenizer(folder, chat_template="qwen3")
    qwen3 = qwen_mlx.load(folder, dtype="float32")
    case = build_case_with_tokenizer("qwen3_5-nested-untied", root / "q35", "qwen3_5")
    q35 = qwen_mlx.load(case.folder, dtype="float32")
    for m, _ in (qwen3, q35):
        damp_last_layer(m)
    return {"qwen3": qwen3, "qwen3_5": q35}


def _turns(session, messages) -> list[str]:
    replies = []
    for text in messages:
        parts = [r.text for r in session.send(text, max_tokens=24, temperature=0.0)]
        replies.append("".join(parts))
    return replies


@pytest.mark.parametrize("name,how", [("qwen3", "model"), ("qwen3_5", "model"),
                                      ("qwen3_5", "mtp")])
def test_chat_turns_with_speculation_equal_turns_without(chat_models, name, how):
    model, tokenizer = chat_models[name]
    messages = ["hello world", "the quick brown fox", "def main():"]
    plain = _turns(ChatSession(model, tokenizer, enable_thinking=False), messages)
    options = (dict(draft_model=(layer_draft(model, model.config.num_layers - 1), tokenizer))
               if how == "model" else dict(speculative="mtp"))
    session = ChatSession(model, tokenizer, enable_thinking=False, num_draft_tokens=3,
                          **options)
    assert _turns(session, messages) == plain
    # Regenerating goes back into the drafter's cache too.
    again = "".join(r.text for r in session.regenerate(max_tokens=24, temperature=0.0))
    assert again == plain[-1]


def test_stream_generate_reports_drafts_and_acceptance(chat_models):
    model, tokenizer = chat_models["qwen3"]
    draft = (layer_draft(model, model.config.num_layers - 1), tokenizer)
    plain = list(qwen_mlx.stream_generate(model, tokenizer, "hello world", max_tokens=30,
                                          temperature=0.0))
    spec = list(qwen_mlx.stream_generate(model, tokenizer, "hello world", max_tokens=30,
                                         temperature=0.0, draft_model=draft,
                                         num_draft_tokens=2))
    assert "".join(r.text for r in spec) == "".join(r.text for r in plain)
    last = spec[-1]
    assert last.draft_tokens > 0 and 0 <= last.accepted_tokens <= last.draft_tokens
    assert last.acceptance_rate == last.accepted_tokens / last.draft_tokens
    assert plain[-1].draft_tokens == 0


def test_clear_errors(chat_models, tmp_path):
    model, tokenizer = chat_models["qwen3"]
    with pytest.raises(QwenMLXError, match="MTP block"):
        list(qwen_mlx.stream_generate(model, tokenizer, "hi", max_tokens=2, speculative="mtp"))
    with pytest.raises(QwenMLXError, match="num_draft_tokens"):
        ChatSession(model, tokenizer, draft_model=(model, tokenizer), num_draft_tokens=0)
    with pytest.raises(QwenMLXError, match="one way to draft"):
        ChatSession(model, tokenizer, draft_model=(model, tokenizer), speculative="mtp")
    with pytest.raises(QwenMLXError, match="'eagle' is not known"):
        ChatSession(model, tokenizer, speculative="eagle")
    with pytest.raises(QwenMLXError, match="tokenizer does not match"):
        ChatSession(model, tokenizer, draft_model=(model, _swapped_tokenizer(tmp_path)))


def _swapped_tokenizer(tmp_path):
    """The tiny tokenizer with two tokens' ids exchanged: another vocabulary."""
    import json

    from qwen_mlx.text.tokenizer import QwenTokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    write_tiny_tokenizer(folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = [t for t, i in vocab.items() if i in (100, 101)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (folder / "tokenizer.json").write_text(json.dumps(data))
    return QwenTokenizer.from_folder(folder)


def test_rollback_copies_no_kv_cache(models):
    """A rejected draft is dropped by moving offsets: the KV buffers are the same arrays
    afterwards, and the DeltaNet layers take their kept state from the verify's own steps."""
    from qwen_mlx.generate.speculative import _rewind
    from qwen_mlx.model.cache import KVCache, LinearCache

    model = models["qwen3_5-nested-untied"]
    cache = model.make_cache()
    model(mx.array(PROMPT)[None], cache=cache)
    fed = [3, 4, 5, 6]
    for c in cache:
        if isinstance(c, LinearCache):
            c.keep_steps = True
    model(mx.array(fed)[None], cache=cache)
    buffers = [(c.keys, c.values) for c in cache if isinstance(c, KVCache)]
    steps = [c.steps[2] for c in cache if isinstance(c, LinearCache)]
    _rewind(model, cache, None, fed, 2, None)
    after = [(c.keys, c.values) for c in cache if isinstance(c, KVCache)]
    assert all(a[0] is b[0] and a[1] is b[1] for a, b in zip(buffers, after))
    linear = [c for c in cache if isinstance(c, LinearCache)]
    assert all(c.offset == len(PROMPT) + 2 and c.steps is None for c in linear)
    for c, s in zip(linear, steps):
        np.testing.assert_array_equal(np.array(c.recurrent_state), np.array(s[:, :, 1]))
