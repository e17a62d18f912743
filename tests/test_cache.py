"""KV caches: attention through them equals attention over the whole sequence."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_mlx.model.cache import KVCache, RotatingKVCache


def reference_attention(q, k, v, window=None):
    """Causal (optionally windowed) attention over a full sequence, in NumPy."""
    L = q.shape[2]
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    i, j = np.arange(L)[:, None], np.arange(L)[None, :]
    visible = j <= i
    if window is not None:
        visible &= j > i - window
    scores = np.where(visible, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def run_chunks(cache, q, k, v, chunks):
    outs, start = [], 0
    for n in chunks:
        sl = slice(start, start + n)
        keys, values, mask = cache.update(mx.array(k[:, :, sl]), mx.array(v[:, :, sl]))
        o = mx.fast.scaled_dot_product_attention(mx.array(q[:, :, sl]), keys, values,
                                                 scale=q.shape[-1] ** -0.5, mask=mask)
        outs.append(np.array(o))
        start += n
    return np.concatenate(outs, axis=2)


chunk_lists = st.lists(st.integers(1, 9), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(chunks=chunk_lists, window=st.integers(1, 12), seed=st.integers(0, 10))
def test_rotating_cache_equals_windowed_attention(chunks, window, seed):
    L = sum(chunks)
    rng = np.random.RandomState(seed)
    q, k, v = (rng.randn(1, 2, L, 8).astype(np.float32) for _ in range(3))
    cache = RotatingKVCache(window)
    got = run_chunks(cache, q, k, v, chunks)
    np.testing.assert_allclose(got, reference_attention(q, k, v, window), atol=1e-5)
    assert cache.offset == L
    assert cache.keys.shape[2] <= window  # memory bounded by the window


@settings(max_examples=30, deadline=None)
@given(chunks=chunk_lists, seed=st.integers(0, 10))
def test_growing_cache_equals_causal_attention(chunks, seed):
    L = sum(chunks)
    rng = np.random.RandomState(seed)
    q, k, v = (rng.randn(1, 2, L, 8).astype(np.float32) for _ in range(3))
    KVCache.step = 4  # force several growths
    try:
        got = run_chunks(KVCache(), q, k, v, chunks)
    finally:
        KVCache.step = 256
    np.testing.assert_allclose(got, reference_attention(q, k, v), atol=1e-5)


def test_rotating_cache_memory_stays_bounded_over_a_long_decode():
    cache = RotatingKVCache(16)
    x = mx.zeros((1, 2, 1, 8))
    cache.update(mx.zeros((1, 2, 40, 8)), mx.zeros((1, 2, 40, 8)))
    for _ in range(500):
        cache.update(x, x)
    assert cache.offset == 540
    assert cache.keys.shape[2] == 16 and cache.nbytes == 2 * 16 * 2 * 8 * 4


def test_growing_cache_preallocates_in_steps():
    cache = KVCache()
    x = mx.zeros((1, 2, 1, 8))
    cache.update(x, x)
    assert cache.keys.shape[2] == KVCache.step
    for _ in range(KVCache.step):
        cache.update(x, x)
    assert cache.keys.shape[2] == 2 * KVCache.step and cache.offset == KVCache.step + 1
