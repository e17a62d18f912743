"""Sampling against transformers' logits processors, and the defaults' precedence."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers import generation as hf

from qwen_mlx.generate.sampling import (QWEN3_NON_THINKING, QWEN3_THINKING, Sampler, SamplingParams,
                               generation_config_defaults, resolve_sampling)

V = 50


def kept(logits: np.ndarray) -> set[int]:
    return set(np.flatnonzero(np.isfinite(logits)).tolist())


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), top_k=st.integers(0, 60),
       top_p=st.floats(0.05, 1.0), min_p=st.floats(0.0, 0.5), temperature=st.floats(0.2, 2.0))
def test_filters_keep_what_transformers_keeps(seed, top_k, top_p, min_p, temperature):
    # Within float32's epsilon of 1 the two rules part on tokens of probability ~1e-16
    # (transformers drops them, we keep them): a difference no draw can see.
    assume(top_p == 1.0 or top_p <= 1 - 1e-6)
    logits = np.random.default_rng(seed).normal(0, 3, (1, V)).astype(np.float32)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    ours = np.array(Sampler(params, V).filter(mx.array(logits)))[0]
    scores = torch.tensor(logits) / temperature
    if top_k:
        scores = hf.TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = hf.TopPLogitsWarper(top_p)(None, scores)
    if min_p > 0:
        scores = hf.MinPLogitsWarper(min_p)(None, scores)
    assert kept(ours) == kept(scores.numpy()[0])
    finite = np.isfinite(ours)
    np.testing.assert_allclose(ours[finite], scores.numpy()[0][finite], rtol=1e-5)


def test_repetition_penalty_matches_transformers_and_counts_the_prompt():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (1, V)).astype(np.float32)
    prompt, generated = [1, 2, 3], [7, 7, 9]
    s = Sampler(SamplingParams(temperature=0.0, repetition_penalty=1.3), V, prompt=prompt)
    for t in generated:
        s.observe(mx.array([t]))
    ours = np.array(s._apply_penalties(mx.array(logits)))
    ref = hf.RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + generated]),
                                                  torch.tensor(logits)).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


def test_presence_and_frequency_penalties_count_the_reply_only():
    logits = np.zeros((1, V), np.float32)
    s = Sampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), V, prompt=[4])
    for t in (7, 7, 9):
        s.observe(mx.array([t]))
    out = np.array(s._apply_penalties(mx.array(logits)))[0]
    assert out[4] == 0 and out[9] == pytest.approx(-0.75) and out[7] == pytest.approx(-1.0)


def test_qwen35_presets_apply_like_qwen3s():
    from qwen_mlx.generate.sampling import QWEN35_NON_THINKING, QWEN35_THINKING, family_preset

    gen = generation_config_defaults({"do_sample": True, "temperature": 0.6, "top_p": 0.95})
    for family in ("qwen3_5", "qwen3_5_moe"):
        p = resolve_sampling(family=family, thinking=True, generation_config=gen)
        assert (p.temperature, p.top_p, p.top_k, p.presence_penalty) == (1.0, 0.95, 20, 1.5)
        p = resolve_sampling(family=family, thinking=False, generation_config=gen)
        assert (p.temperature, p.top_p, p.top_k, p.presence_penalty) == (0.7, 0.8, 20, 1.5)
        p = resolve_sampling(family=family, thinking=True, generation_config=gen,
                             presence_penalty=0.0)
        assert p.presence_penalty == 0.0  # the caller still wins
    assert family_preset("qwen3_5", True) == QWEN35_THINKING
    assert family_preset("qwen3_5_moe", False) == QWEN35_NON_THINKING
    # Qwen3-Next and Qwen3-VL follow Qwen3's card; Qwen2.5 has no preset.
    assert family_preset("qwen3_next", True) == QWEN3_THINKING
    assert family_preset("qwen3_vl", False) == QWEN3_NON_THINKING
    assert family_preset("qwen2", True) == {}


def test_defaults_precedence():
    gen = generation_config_defaults({"do_sample": True, "temperature": 0.6, "top_p": 0.95,
                                      "top_k": 20, "repetition_penalty": 1.05})
    # Qwen2.5: the checkpoint's generation_config.
    p = resolve_sampling(family="qwen2", thinking=True, generation_config=gen)
    assert (p.temperature, p.top_p, p.repetition_penalty) == (0.6, 0.95, 1.05)
    # Qwen3: Qwen's preset for the mode wins over the file, the caller over both.
    p = resolve_sampling(family="qwen3", thinking=False, generation_config=gen)
    assert (p.temperature, p.top_p, p.top_k) == tuple(QWEN3_NON_THINKING[k] for k in
                                                      ("temperature", "top_p", "top_k"))
    p = resolve_sampling(family="qwen3_moe", thinking=True, generation_config={}, top_k=5)
    assert p.temperature == QWEN3_THINKING["temperature"] and p.top_k == 5
    assert generation_config_defaults({"do_sample": False})["temperature"] == 0.0
    with pytest.raises(Exception, match="top_p"):
        resolve_sampling(family="qwen2", thinking=True, generation_config={}, top_p=0)


@pytest.mark.parametrize("field, value", [
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "0.7"),
    ("top_p", float("nan")), ("top_k", 2.5), ("top_k", "20"), ("top_k", True),
    ("min_p", float("nan")), ("repetition_penalty", float("inf")),
    ("presence_penalty", float("nan")), ("frequency_penalty", float("-inf")),
    ("presence_penalty", "1"), ("seed", -1), ("seed", 2 ** 64), ("seed", 1.0),
])
def test_every_sampling_field_is_checked(field, value):
    with pytest.raises(Exception, match=field):
        SamplingParams(**{field: value}).validate()
    with pytest.raises(Exception, match=f"gen.json: {field}"):
        if field == "seed":
            SamplingParams(seed=value).validate("gen.json")
        else:
            generation_config_defaults({field: value}, "gen.json")


def test_ids_past_the_allowed_ones_are_never_sampled():
    logits = np.zeros((1, V), np.float32)
    logits[0, 45] = 100.0  # a padding row would win
    for params in (SamplingParams(temperature=0.0),
                   SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=0)):
        s = Sampler(params, V, allowed=40)
        draws = [int(s(mx.array(logits)).item()) for _ in range(50)]
        assert max(draws) < 40
    assert int(Sampler(SamplingParams(temperature=0.0), V)(mx.array(logits)).item()) == 45


def full_sort_filter(logits: mx.array, p: SamplingParams) -> mx.array:
    """The filter as it was before the partition: whole-vocabulary sorts (the reference)."""
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = mx.sort(logits, axis=-1)[..., -p.top_k][..., None]
        logits = mx.where(logits < kth, -mx.inf, logits)
    if p.min_p > 0 or p.top_p < 1:
        probs = mx.softmax(logits, axis=-1)
        if p.min_p > 0:
            logits = mx.where(probs < p.min_p * probs.max(axis=-1, keepdims=True), -mx.inf,
                              logits)
        if p.top_p < 1:
            order = mx.argsort(-probs, axis=-1)
            ranked = mx.take_along_axis(probs, order, axis=-1)
            drop = mx.put_along_axis(mx.zeros(order.shape, mx.bool_), order,
                                     mx.cumsum(ranked, axis=-1) - ranked >= p.top_p, axis=-1)
            logits = mx.where(drop, -mx.inf, logits)
    return logits


class FullSortSampler(Sampler):
    def filter(self, logits):
        return full_sort_filter(logits, self.params)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 10_000), vocab=st.sampled_from([50, 3000]),
       top_k=st.sampled_from([0, 1, 2, 20, 49, 200]), top_p=st.floats(0.05, 1.0),
       min_p=st.sampled_from([0.0, 0.01, 0.2]), temperature=st.floats(0.2, 2.0),
       scale=st.sampled_from([1.0, 3.0, 10.0]))
def test_partition_keeps_what_the_full_sort_keeps(seed, vocab, top_k, top_p, min_p,
                                                  temperature, scale):
    logits = mx.array(np.random.default_rng(seed).normal(0, scale, (1, vocab)).astype(np.float32))
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    ours = np.array(Sampler(params, vocab).filter(logits))[0]
    ref = np.array(full_sort_filter(logits, params))[0]
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    np.testing.assert_array_equal(ours[np.isfinite(ours)], ref[np.isfinite(ref)])
    # The distribution sampled from: the same probabilities.
    np.testing.assert_allclose(np.array(mx.softmax(mx.array(ours))),
                               np.array(mx.softmax(mx.array(ref))), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("params", [QWEN3_THINKING, QWEN3_NON_THINKING,
                                    dict(temperature=1.0, top_k=0, top_p=0.9, min_p=0.05)])
def test_a_seed_draws_the_same_tokens_as_the_full_sort(params):
    vocab = 151_936  # Qwen's vocabulary: what the partition is for
    rng = np.random.default_rng(1)
    p = SamplingParams(**params, seed=1234)
    ours, ref = Sampler(p, vocab), FullSortSampler(p, vocab)
    draws = []
    for _ in range(40):
        logits = mx.array(rng.normal(0, 4, (1, vocab)).astype(np.float32))
        a, b = int(ours(logits).item()), int(ref(logits).item())
        assert a == b
        draws.append(a)
    assert len(set(draws)) > 1  # it did sample, not pick the top every time


def test_top_k_keeps_the_ties_with_the_kth_and_counts_their_mass():
    # Top-2 of [5, 1, 1, 1, 0...]: the three 1s tie with the 2nd largest and all survive
    # top-k, as transformers keeps them; the 5 holds e^4/(e^4+3) = 0.948 of the mass.
    logits = np.zeros((1, V), np.float32)
    logits[0, :4] = [5, 1, 1, 1]
    hf_kept = kept(hf.TopKLogitsWarper(2)(None, torch.tensor(logits)).numpy()[0])
    assert hf_kept == {0, 1, 2, 3}
    top_k = Sampler(SamplingParams(temperature=1.0, top_k=2, top_p=1.0), V)
    assert kept(np.array(top_k.filter(mx.array(logits)))[0]) == hf_kept
    # Top-p walks the ties in id order, each adding 0.017: 0.96 stops after the first
    # (0.982 of the mass had the ties outside the partition not been counted: none kept).
    for top_p, expected in ((0.94, {0}), (0.96, {0, 1}), (0.97, {0, 1, 2}), (0.99, {0, 1, 2, 3})):
        params = SamplingParams(temperature=1.0, top_k=2, top_p=top_p)
        assert kept(np.array(Sampler(params, V).filter(mx.array(logits)))[0]) == expected
        assert kept(np.array(full_sort_filter(mx.array(logits), params))[0]) == expected


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 10_000), levels=st.integers(2, 12), top_k=st.integers(1, 60),
       top_p=st.floats(0.05, 1.0), min_p=st.sampled_from([0.0, 0.1]),
       temperature=st.sampled_from([0.5, 1.0]))
def test_ties_keep_what_the_full_sort_keeps(seed, levels, top_k, top_p, min_p, temperature):
    # Few distinct values (as bfloat16 logits have): ties at the k-th and at the top-p cut.
    values = np.random.default_rng(seed).integers(0, levels, (1, 200)).astype(np.float32)
    # Where the mass before a token equals top_p (0.5 with 92 tied tokens of 1/92 each),
    # float rounding alone decides: no ranking is more right there, so skip those.
    kth = np.sort(values[0])[-top_k]
    ranked = np.sort(values[0][values[0] >= kth])[::-1] / temperature
    probs = np.exp(ranked - ranked[0]) / np.exp(ranked - ranked[0]).sum()
    assume(np.abs(np.cumsum(probs) - probs - top_p).min() > 1e-5)
    logits = mx.array(values)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    ours = np.isfinite(np.array(Sampler(params, 200).filter(logits)))
    np.testing.assert_array_equal(ours, np.isfinite(np.array(full_sort_filter(logits, params))))
