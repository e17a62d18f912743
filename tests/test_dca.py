"""Dual Chunk Attention (spec §3.7) against a NumPy reference written here from the spec.

The reference runs inside the transformers model: a registered attention function
undoes HF's RoPE on q and k (a rotation by the true positions, so by their negatives
it is undone exactly) and computes DCA in NumPy, so everything around attention is
transformers' and the attention is the spec's, independent of qwen_mlx's code.
"""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers

import qwen_mlx
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.model import dca as dca_module
from qwen_mlx.model.config import ConfigError, ModelConfig
from tests.conftest import build_checkpoint

CHUNK, LOCAL = 32, 8
C = CHUNK - LOCAL  # chunk length c = 24: 100 tokens span chunks 0..4
LENGTH = 100


def rope_np(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """NeoX RoPE of x [..., L, D] by per-token positions, in float32 (spec §3.1)."""
    d = x.shape[-1]
    inv = (1.0 / np.power(np.float32(theta), np.arange(0, d, 2, dtype=np.float32) / d))
    ang = positions.astype(np.float32)[:, None] * inv.astype(np.float32)[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    half = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], axis=-1)
    return x * cos + half * sin


def factor(length: int, original: int) -> float:
    return 1.0 if original <= 0 else max(1.0, 0.1 * math.log(length / original) + 1.0)


class Reference:
    """DCA in NumPy. `prefill`: the length of the first forward, so each key's length
    factor is the one of the forward that wrote it (keys are scaled before caching)."""

    def __init__(self, theta: float, original: int):
        self.theta, self.original, self.prefill = theta, original, None

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        q, k, v = (t.detach().float().numpy() for t in (query, key, value))
        B, H, L, D = q.shape
        N = k.shape[2]
        groups = H // k.shape[1]
        k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
        # Undo HF's rotation by the true positions.
        q = rope_np(q, -np.arange(N - L, N), self.theta)
        k = rope_np(k, -np.arange(N), self.theta)
        P = self.prefill or N
        written = np.where(np.arange(N) < P, P, np.arange(N) + 1)
        fk = np.array([factor(n, self.original) for n in written], dtype=np.float32)
        fq = factor(N, self.original)
        k_rot = rope_np(k, np.arange(N) % C, self.theta) * fk[:, None]
        out = np.zeros_like(q)
        for i in range(L):
            p = N - L + i
            qi = q[:, :, i:i + 1]
            intra = rope_np(qi, np.array([p % C]), self.theta)
            succ = rope_np(qi, np.array([min(p % C + C, CHUNK)]), self.theta)
            inter = rope_np(qi, np.array([min(2 * C - 1, CHUNK)]), self.theta)
            j = np.arange(p + 1)
            region = (p // C) - (j // C)  # 0: own chunk, 1: the previous, >= 2: older
            s = np.where(region == 0, (intra @ k_rot[:, :, :p + 1].transpose(0, 1, 3, 2))[..., 0, :],
                np.where(region == 1, (succ @ k_rot[:, :, :p + 1].transpose(0, 1, 3, 2))[..., 0, :],
                         (inter @ k_rot[:, :, :p + 1].transpose(0, 1, 3, 2))[..., 0, :]))
            s = s.astype(np.float64) * scaling * fq
            w = np.exp(s - s.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            out[:, :, i] = (w[..., None] * v[:, :, :p + 1]).sum(-2)
        return torch.from_numpy(out.transpose(0, 2, 1, 3).copy()), None


def write_dca(folder, original: int) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg["dual_chunk_attention_config"] = {"chunk_size": CHUNK, "local_size": LOCAL,
                                          "original_max_position_embeddings": original}
    path.write_text(json.dumps(cfg))


@pytest.fixture(scope="module", params=[40, 0], ids=["scaled", "unscaled"])
def dca_case(request, tmp_path_factory):
    original = request.param
    hf, folder = build_checkpoint(tmp_path_factory.mktemp(f"dca{original}"), "qwen2",
                                  max_position_embeddings=256, rope_theta=10000.0,
                                  num_attention_heads=2, num_key_value_heads=1)  # head_dim 32
    write_dca(folder, original)
    ref = Reference(10000.0, original)
    name = f"dca_numpy_{original}"
    transformers.AttentionInterface.register(name, ref)
    hf.set_attn_implementation(name)
    model, _ = qwen_mlx.load(folder, dtype="float32")
    ids = np.random.RandomState(original).randint(0, 160, size=(1, LENGTH))
    return hf, ref, model, ids, folder


def hf_run(hf, ref, ids, prefill=None):
    ref.prefill = prefill
    with torch.no_grad():
        if prefill is None:
            return hf(torch.tensor(ids)).logits.numpy()
        r = hf(torch.tensor(ids[:, :prefill]), use_cache=True)
        out, past = [r.logits.numpy()], r.cache
        for t in range(prefill, ids.shape[1]):
            r = hf(torch.tensor(ids[:, t:t + 1]), cache=past, use_cache=True)
            out.append(r.logits.numpy())
            past = r.cache
        return np.concatenate(out, axis=1)


def test_config_reads_dual_chunk_attention(dca_case):
    model = dca_case[2]
    assert model.dca is not None and model.dca.chunk_len == C
    assert not model.can_batch


def test_full_forward_matches_reference(dca_case):
    hf, ref, model, ids, _ = dca_case
    want = hf_run(hf, ref, ids)
    got = np.array(model(mx.array(ids)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    with torch.no_grad():  # and DCA is not plain attention past the first chunk
        hf.set_attn_implementation("eager")
        plain = hf(torch.tensor(ids)).logits.numpy()
        hf.set_attn_implementation(f"dca_numpy_{ref.original}")
    assert np.abs(plain[:, C:] - want[:, C:]).max() > 1e-2
    if ref.original == 0:  # no length factor: the first chunk is plain attention
        np.testing.assert_allclose(plain[:, :C], want[:, :C], atol=1e-4, rtol=0)


def test_prefill_and_decode_match_reference(dca_case):
    hf, ref, model, ids, _ = dca_case
    prefill = 61  # decode crosses the chunk boundary at 72
    want = hf_run(hf, ref, ids[:, :80], prefill)
    cache = model.make_cache()
    out = [np.array(model(mx.array(ids[:, :prefill]), cache=cache))]
    for t in range(prefill, 80):
        out.append(np.array(model(mx.array(ids[:, t:t + 1]), cache=cache)))
    np.testing.assert_allclose(np.concatenate(out, axis=1), want, atol=1e-4, rtol=0)


def test_chunked_prefill_equals_one_forward(dca_case):
    _, _, model, ids, _ = dca_case
    full = np.array(model(mx.array(ids)))
    cache = model.make_cache()
    out = [np.array(model(mx.array(ids[:, a:a + 17]), cache=cache, prompt_length=LENGTH))
           for a in range(0, LENGTH, 17)]
    np.testing.assert_allclose(np.concatenate(out, axis=1), full, atol=1e-5, rtol=0)


def test_quantized_cache_stays_close(dca_case):
    _, _, model, ids, _ = dca_case
    cache = model.make_cache()
    model(mx.array(ids[:, :70]), cache=cache)
    want = np.array(model(mx.array(ids[:, 70:]), cache=cache))
    for bits, tol in ((8, 0.05), (4, 0.5)):
        cache = model.make_cache(kv_bits=bits)
        model(mx.array(ids[:, :70]), cache=cache)
        got = np.array(model(mx.array(ids[:, 70:]), cache=cache))
        assert np.abs(got - want).max() < tol


def test_below_chunk_length_equals_plain_attention(dca_case, monkeypatch):
    _, _, model, ids, folder = dca_case
    plain, _ = qwen_mlx.load(folder, dtype="float32")
    dca_module.set_dca(plain, False)
    short = mx.array(ids[:, :C])
    monkeypatch.setattr(dca_module, "PLAIN_BELOW_CHUNK", False)  # run the DCA path itself
    np.testing.assert_allclose(np.array(model(short)), np.array(plain(short)), atol=1e-5,
                               rtol=0)
    caches = model.make_cache(), plain.make_cache()
    outs = [[np.array(m(short[:, :10], cache=c))] for m, c in zip((model, plain), caches)]
    for t in range(10, C):
        for m, c, o in zip((model, plain), caches, outs):
            o.append(np.array(m(short[:, t:t + 1], cache=c)))
    np.testing.assert_allclose(np.concatenate(outs[0], 1), np.concatenate(outs[1], 1),
                               atol=1e-5, rtol=0)


def test_switched_off_is_plain_transformers(dca_case, tmp_path):
    hf, _, _, ids, folder = dca_case
    model, _ = qwen_mlx.load(folder, dtype="float32")
    dca_module.set_dca(model, False)
    hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            want = hf(torch.tensor(ids)).logits.numpy()
    finally:
        hf.set_attn_implementation(f"dca_numpy_{model.config.dca.original_max_position_embeddings}")
    np.testing.assert_allclose(np.array(model(mx.array(ids))), want, atol=1e-4, rtol=0)
    assert model.can_batch
    with pytest.raises(QwenMLXError, match="max_kv_size"):
        dca_module.set_dca(model, True)
        model.make_cache(max_kv_size=32)


def test_no_config_cannot_switch_on(tmp_path):
    _, folder = build_checkpoint(tmp_path / "m", "qwen2")
    model, _ = qwen_mlx.load(folder, dtype="float32")
    assert model.dca is None
    with pytest.raises(QwenMLXError, match="dual_chunk_attention_config"):
        dca_module.set_dca(model, True)


@pytest.mark.parametrize("block, message", [
    ({"chunk_size": 8, "local_size": 8}, "larger than local_size"),
    ({"chunk_size": "big"}, "chunk_size"),
    ([1, 2], "must be an object"),
])
def test_bad_dual_chunk_config(block, message):
    data = {"model_type": "qwen2", "vocab_size": 160, "hidden_size": 64,
            "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 64,
            "dual_chunk_attention_config": block}
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(data)
