"""Caches of the hybrids: snapshots, prompt-cache files, constant state, bounded prefill.

A Gated DeltaNet layer's state cannot be trimmed, so going back needs a
snapshot. The properties checked here on the transformers-built fixtures of
tests/hybrid_fixtures.py (and on random all-linear models for memory):
- restoring a snapshot and feeding the same tokens gives the uninterrupted
  run's logits, and a snapshot serves any number of restores;
- a KVCache snapshot is refused once the positions it covers were written over;
- a prompt-cache file of a hybrid reloads and continues identically;
- a linear layer's state has one size however long the context, and a chunked
  prefill's peak memory does not grow with the context.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import mlx.core as mx

pytest.importorskip("torch")

import qwen_mlx  # noqa: E402
from conftest import write_tiny_tokenizer  # noqa: E402
from hybrid_fixtures import VOCAB, CaseCache  # noqa: E402
from qwen_mlx.generate.generation import generate  # noqa: E402
from qwen_mlx.generate.prompt_cache import load_prompt_cache, save_prompt_cache  # noqa: E402
from qwen_mlx.model.cache import (KVCache, LinearCache, RotatingKVCache, restore_cache,  # noqa: E402
                                  snapshot_cache)
from qwen_mlx.model.config import ModelConfig  # noqa: E402
from qwen_mlx.model.decoder import Model  # noqa: E402

CASES = ["qwen3_5-nested-untied", "qwen3_next-transformers", "qwen3_5_moe-fused"]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return CaseCache(tmp_path_factory)


@pytest.fixture(scope="module")
def loaded(cases):
    models = {}

    def get(name):
        if name not in models:
            case = cases.get(name)
            write_tiny_tokenizer(case.folder, vocab=VOCAB)
            models[name] = (case, *qwen_mlx.load(case.folder, dtype="float32"))
        return models[name]
    return get


def _continue(model, cache, ids: np.ndarray) -> list[np.ndarray]:
    """A 37-token chunk, then single tokens: the logits of each call."""
    out = [np.array(model(mx.array(ids[:, :37]), cache=cache))]
    out += [np.array(model(mx.array(ids[:, t:t + 1]), cache=cache)) for t in range(37, ids.shape[1])]
    return out


@pytest.mark.parametrize("options", [{}, {"max_kv_size": 40, "kv_bits": 8}],
                         ids=["growing", "rotating-8bit"])
@pytest.mark.parametrize("name", CASES)
def test_restored_snapshot_replays_the_uninterrupted_run(loaded, name, options):
    case, model, _ = loaded(name)
    ids = case.ids
    cache = model.make_cache(**options)
    model(mx.array(ids[:, :70]), cache=cache)
    snap = snapshot_cache(cache)
    first = _continue(model, cache, ids[:, 70:120])
    for _ in range(2):  # a snapshot serves again after a restore
        assert restore_cache(cache, snap)
        assert cache[0].offset == 70
        again = _continue(model, cache, ids[:, 70:120])
        assert max(np.abs(a - b).max() for a, b in zip(first, again)) == 0.0
    # ... and the uninterrupted run equals transformers' (so the replay is not merely
    # self-consistent): prefill 70, then the same 37-token chunk and single steps.
    if not options:
        full = case.full_logits()[:, 70:120]
        assert np.abs(np.concatenate(again, axis=1) - full).max() < 1e-4


def test_kv_snapshot_is_refused_once_its_positions_are_rewritten():
    cache = KVCache()
    k = mx.random.normal((1, 2, 100, 32))
    cache.update(k, k)
    at_100 = cache.snapshot()
    cache.trim(50)
    at_50 = cache.snapshot()
    assert cache.restore(at_100) and cache.offset == 100  # nothing written over yet
    cache.trim(50)
    cache.update(k[:, :, :10], k[:, :, :10])  # positions 50..59 rewritten
    assert not cache.restore(at_100)
    assert cache.offset == 60
    assert cache.restore(at_50) and cache.offset == 50
    # restore_cache changes nothing unless every layer can go back.
    linear = LinearCache()
    linear.offset = 60
    both = [cache, linear]
    cache.offset = 60
    assert not restore_cache(both, [at_100, linear.snapshot()])
    assert cache.offset == 60 and linear.offset == 60


def test_rotating_snapshot_survives_ring_writes():
    cache = RotatingKVCache(8)
    x = mx.arange(10 * 4, dtype=mx.float32).reshape(1, 1, 10, 4)
    cache.update(x, x)
    snap = cache.snapshot()
    before = [np.array(a) for a in cache.state()]
    for t in range(5):  # ring writes in place
        y = mx.full((1, 1, 1, 4), -1.0)
        cache.update(y, y)
    assert cache.restore(snap)
    after = [np.array(a) for a in cache.state()]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("name", ["qwen3_5-nested-untied", "qwen3_next-transformers"])
def test_prompt_cache_file_of_a_hybrid_continues_identically(loaded, name, tmp_path):
    case, model, _ = loaded(name)
    ids = case.ids
    cache = model.make_cache()
    model(mx.array(ids[:, :70]), cache=cache)
    path = tmp_path / "prompt.safetensors"
    save_prompt_cache(path, cache, {"note": "seventy"})
    reloaded, meta = load_prompt_cache(path)
    assert meta["note"] == "seventy"
    assert [type(c) for c in reloaded] == [type(c) for c in cache]
    assert any(isinstance(c, LinearCache) for c in reloaded)
    a = _continue(model, cache, ids[:, 70:110])
    b = _continue(model, reloaded, ids[:, 70:110])
    assert max(np.abs(x - y).max() for x, y in zip(a, b)) == 0.0


def test_linear_state_does_not_grow(loaded):
    case, model, _ = loaded("qwen3_5-nested-untied")
    cache = model.make_cache()
    model(mx.array(case.ids[:, :20]), cache=cache)
    sizes = [c.nbytes for c in cache if isinstance(c, LinearCache)]
    model(mx.array(case.ids[:, 20:160]), cache=cache)
    assert sizes and [c.nbytes for c in cache if isinstance(c, LinearCache)] == sizes
    state = next(c for c in cache if isinstance(c, LinearCache)).recurrent_state
    assert state.dtype == mx.float32  # bf16 state degenerates (hybrid spec §2.4)


def test_a_longer_context_does_not_raise_prefill_peak_memory():
    config = ModelConfig.from_dict(dict(
        model_type="qwen3_5_text", vocab_size=64, hidden_size=64, intermediate_size=64,
        num_hidden_layers=2, layer_types=["linear_attention"] * 2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=32, linear_value_head_dim=32))
    model = Model(config)
    mx.eval(model.parameters())

    def peak(tokens: int) -> int:
        cache = model.make_cache()
        mx.eval(model(mx.zeros((1, 256), mx.int32), cache=cache))
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        for _ in range(tokens // 256 - 1):
            mx.eval(model(mx.zeros((1, 256), mx.int32), cache=cache, last_only=True),
                    *[a for c in cache for a in c.state()])
        return mx.get_peak_memory() - base

    short, long = peak(512), peak(4096)
    assert long <= short * 1.1 + 2**20


def test_vision_placeholders_are_refused(loaded):
    case, model, tokenizer = loaded("qwen3_5-nested-untied")
    assert model.config.vision_token_ids  # from the nested config's image/video ids
    with pytest.raises(qwen_mlx.QwenMLXError, match="vision"):
        model.check_prompt([1, model.config.vision_token_ids[0]])
    # Through generation too, with an id inside this tiny vocabulary standing for the pad.
    original = model.config
    model.config = dataclasses.replace(original, vision_token_ids=(7,))
    try:
        with pytest.raises(qwen_mlx.QwenMLXError, match="vision"):
            generate(model, tokenizer, [3, 7, 9], max_tokens=2)
    finally:
        model.config = original


def test_bfloat16_keeps_a_log_norms_and_state_in_float32(cases):
    case = cases.get("qwen3_5-nested-untied")
    model, _ = qwen_mlx.load(case.folder, dtype="bfloat16")
    layers = model.model.layers
    linear = next(layer for layer in layers if layer.kind == "linear")
    assert linear.linear_attn.A_log.dtype == mx.float32
    assert linear.input_layernorm.weight.dtype == mx.float32  # 1 + w, formed in float32
    assert linear.linear_attn.in_proj_qkv.weight.dtype == mx.bfloat16
    cache = model.make_cache()
    logits = model(mx.array(case.ids[:, :80]), cache=cache)
    assert logits.dtype == mx.bfloat16
    state = next(c for c in cache if isinstance(c, LinearCache)).recurrent_state
    assert state.dtype == mx.float32
    err = np.abs(np.array(logits.astype(mx.float32)) - case.full_logits()[:, :80]).max()
    assert err < 0.25 * np.abs(case.full_logits()).max()
