"""Sampling against transformers' logits processors, and the defaults' precedence."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
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
