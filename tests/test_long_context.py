"""Long contexts: attention sinks, quantized and blocked attention, Qwen1 layer-wise
windows, and the context meter's numbers."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qwen_mlx
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.model import blocked
from qwen_mlx.model.cache import (KVCache, RotatingKVCache, cache_arrays, restore_cache,
                                  snapshot_cache)
from qwen_mlx.model.long_context import (cache_bytes, context_info, memory_warning,
                                         qwen1_windows, set_qwen1_window)
from tests.conftest import build_checkpoint
from tests.test_qwen1 import qwen1_config, qwen1_weights, write_checkpoint


def sink_reference(length: int, window: int, sinks: int) -> np.ndarray:
    """[L, L]: query p sees key j iff j <= p and (j < sinks or j > p - (window - sinks))."""
    p, j = np.arange(length)[:, None], np.arange(length)[None, :]
    return (j <= p) & ((j < sinks) | (j > p - (window - sinks)))


def visible_sets(cache, chunks, bits=None) -> np.ndarray:
    """Which positions each query attended to: with zero queries every visible key weighs
    the same, and each value is its position's one-hot row, so the output is the mask
    row divided by its count."""
    L = sum(chunks)
    group = 32
    D = max(L, group)
    D = -(-D // group) * group
    rows, start = [], 0
    for n in chunks:
        k = mx.zeros((1, 1, n, D))
        v = mx.array(np.eye(D, dtype=np.float32)[start:start + n][None, None])
        keys, values, mask = cache.update(k, v, packed=True)
        q = mx.zeros((1, 1, n, D))
        if bits is None:
            out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=1.0, mask=mask)
        else:
            out = blocked.attention(q, keys, values, 1.0, mask, bits)
        rows.append(np.array(out)[0, 0, :, :L] > 1e-3)
        start += n
    return np.concatenate(rows, axis=0)


@settings(max_examples=40, deadline=None)
@given(chunks=st.lists(st.integers(1, 9), min_size=1, max_size=10),
       window=st.integers(3, 12), sinks=st.integers(0, 4), bits=st.sampled_from([None, 8]))
def test_rotating_cache_with_sinks_matches_reference_mask(chunks, window, sinks, bits):
    sinks = min(sinks, window - 1)
    cache = RotatingKVCache(window, bits, sinks=sinks)
    got = visible_sets(cache, chunks, bits)
    np.testing.assert_array_equal(got, sink_reference(sum(chunks), window, sinks))
    assert cache.storage.length(cache.keys) <= window


def test_sinks_survive_snapshot_restore_and_trim():
    chunks = [5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    want = sink_reference(sum(chunks), 8, 2)
    cache = RotatingKVCache(8, 4, sinks=2)
    visible_sets(cache, chunks[:3], 4)
    snap = snapshot_cache([cache])
    visible_sets(cache, [3, 1], 4)  # a detour that is rolled back
    assert restore_cache([cache], snap)
    # Continue as if the detour never happened: positions 7.. see the reference rows.
    D = 32
    got = []
    for p in range(7, sum(chunks)):
        v = mx.array(np.eye(D, dtype=np.float32)[p:p + 1][None, None])
        keys, values, mask = cache.update(mx.zeros((1, 1, 1, D)), v, packed=True)
        out = blocked.attention(mx.zeros((1, 1, 1, D)), keys, values, 1.0, mask, 4)
        got.append(np.array(out)[0, 0, 0, :sum(chunks)] > 1e-3)
    np.testing.assert_array_equal(np.array(got), want[7:])
    short = RotatingKVCache(8, sinks=2)
    visible_sets(short, [4, 1])
    assert short.trim(2) and short.offset == 3
    assert not cache.trim(1)  # positions were dropped: trimming would need them


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    _, folder = build_checkpoint(tmp_path_factory.mktemp("q2"), "qwen2",
                                 num_attention_heads=2, num_key_value_heads=1,
                                 max_position_embeddings=512)
    model, _ = qwen_mlx.load(folder, dtype="float32")
    return model


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_attention_equals_dequantizing(bits):
    rng = np.random.RandomState(bits)
    q = mx.array(rng.randn(1, 4, 5, 64).astype(np.float32))
    k, v = (mx.array(rng.randn(1, 2, 700, 64).astype(np.float32)) for _ in range(2))
    kq, vq = (tuple(mx.quantize(t, group_size=64, bits=bits)) for t in (k, v))
    kd, vd = (mx.dequantize(*t, group_size=64, bits=bits) for t in (kq, vq))
    want = mx.fast.scaled_dot_product_attention(q, kd, vd, scale=0.125, mask="causal")
    for block in (None, 96):
        got = blocked.attend([blocked.Part(q * 0.125, 0, 700, "causal", 695)], kq, vq,
                             bits=bits, block=block)
        np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5, rtol=0)


def test_quantized_cache_logits_and_trim(qwen2):
    """kv_bits 8 logits stay as close to float as the dequantizing path was (it computed
    the same numbers), and trimming a quantized cache then decoding equals a cache that
    never saw the trimmed tokens (what speculative decoding relies on)."""
    model = qwen2
    ids = mx.array(np.random.RandomState(3).randint(0, 160, (1, 60)))
    ref = np.array(model(ids))
    cache = model.make_cache(kv_bits=8)
    model(ids[:, :40], cache=cache)
    got = np.array(model(ids[:, 40:], cache=cache))
    assert np.abs(got - ref[:, 40:]).max() < 0.05
    a, b = model.make_cache(kv_bits=4), model.make_cache(kv_bits=4)
    model(ids[:, :30], cache=a)
    model(ids[:, 30:36], cache=a)
    assert all(c.trim(6) for c in a)
    model(ids[:, :30], cache=b)
    np.testing.assert_array_equal(np.array(model(ids[:, 30:33], cache=a)),
                                  np.array(model(ids[:, 30:33], cache=b)))


def test_blocked_float_prefill_equals_fused(qwen2, monkeypatch):
    """Past the score budget, float attention on the CPU runs in key blocks: the same
    logits as the fused kernel, with temporaries bounded by queries x block."""
    model = qwen2
    ids = mx.array(np.random.RandomState(4).randint(0, 160, (1, 90)))
    want = np.array(model(ids))
    cache = model.make_cache()
    model(ids[:, :50], cache=cache)
    want_cached = np.array(model(ids[:, 50:], cache=cache))
    monkeypatch.setattr(blocked, "SCORE_BUDGET", 512)
    monkeypatch.setattr(blocked, "MIN_BLOCK", 7)
    np.testing.assert_allclose(np.array(model(ids)), want, atol=1e-5, rtol=0)
    cache = model.make_cache()
    model(ids[:, :50], cache=cache)
    np.testing.assert_allclose(np.array(model(ids[:, 50:], cache=cache)), want_cached,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("options", [{}, {"kv_bits": 8}, {"kv_bits": 4, "max_kv_size": 48},
                                     {"max_kv_size": 300}])
def test_cache_bytes_match_the_caches(qwen2, options):
    model = qwen2
    cache = model.make_cache(**options)
    ids = mx.array([list(range(100))])
    model(ids, cache=cache)
    mx.eval(cache_arrays(cache))
    assert cache_bytes(model, 100, **options) == sum(c.nbytes for c in cache)


def test_context_meter(qwen2):
    info = context_info(qwen2, kv_bits=8)
    assert not info.dca and info.yarn_factor is None and info.context_limit == 512
    assert info.cache_bytes_at_limit == cache_bytes(qwen2, 512, kv_bits=8)
    assert "KV cache at 512 tokens" in info.describe()
    assert memory_warning(qwen2, 100) is None
    assert "more than this machine's" in memory_warning(qwen2, 1 << 40)


@pytest.fixture(scope="module")
def qwen1(tmp_path_factory):
    cfg = qwen1_config(seq_length=16, max_position_embeddings=64, use_dynamic_ntk=False,
                       use_logn_attn=False)
    folder = write_checkpoint(tmp_path_factory.mktemp("q1"), cfg, qwen1_weights(cfg, seed=5))
    return folder


def test_qwen1_default_windows_rule(qwen1):
    model, _ = qwen_mlx.load(qwen1, dtype="float32")
    # S = 16, C = 64, 2 layers: layer 0 within the trained length, the top one full.
    assert qwen1_windows(model) == (16, None)
    assert model.windows == (None, None)  # off by default


def test_qwen1_windows_bound_the_receptive_field(qwen1):
    """With windows W0, W1 the logits at p depend on tokens p-(W0-1)-(W1-1) .. p only:
    changing an older token changes nothing, changing the oldest of them changes them."""
    model, _ = qwen_mlx.load(qwen1, dtype="float32")
    off = np.array(model(mx.array([list(range(30))])))
    set_qwen1_window(model, [4, 6])
    ids = np.random.RandomState(6).randint(0, 100, (1, 30))
    base = np.array(model(mx.array(ids)))
    p, reach = 29, 3 + 5
    for j, changes in ((p - reach - 1, False), (p - reach, True)):
        other = ids.copy()
        other[0, j] = (other[0, j] + 1) % 100
        diff = np.abs(np.array(model(mx.array(other)))[0, p] - base[0, p]).max()
        assert (diff > 1e-4) == changes, (j, diff)
    # Through the (rotating) caches, chunk by chunk, the same logits.
    cache = model.make_cache()
    assert [c.window for c in cache] == [4, 6]
    out = [np.array(model(mx.array(ids[:, a:a + 7]), cache=cache)) for a in range(0, 30, 7)]
    np.testing.assert_allclose(np.concatenate(out, axis=1), base, atol=1e-5, rtol=0)
    set_qwen1_window(model, False)
    np.testing.assert_array_equal(np.array(model(mx.array([list(range(30))]))), off)
    assert all(isinstance(c, KVCache) for c in model.make_cache())


def test_qwen1_window_errors(qwen1, qwen2):
    model, _ = qwen_mlx.load(qwen1, dtype="float32")
    with pytest.raises(QwenMLXError, match="one window"):
        set_qwen1_window(model, [4])
    with pytest.raises(QwenMLXError, match="Qwen1 setting"):
        set_qwen1_window(qwen2, True)
