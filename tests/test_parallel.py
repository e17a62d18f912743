"""Matmuls split across CPU cores give the numbers of the unsplit model.

The split only pays on real-sized layers, so these tests lower its size
threshold and force two CPU streams (CI may have one core) to run the split
path on tiny checkpoints.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import qwen_mlx
from qwen_mlx.model import parallel
from conftest import build_checkpoint, hf_incremental_logits, mlx_incremental_logits


@pytest.fixture
def split_everything(monkeypatch):
    monkeypatch.setattr(parallel, "MIN_PARALLEL_WEIGHTS", 0)
    monkeypatch.setattr(parallel, "_streams", [mx.new_thread_local_stream(mx.cpu)
                                               for _ in range(2)])
    calls = []
    real = parallel.split

    def counting(count, weights, fn, axis=-1):
        y = real(count, weights, fn, axis)
        calls.append(y is not None)
        return y

    monkeypatch.setattr(parallel, "split", counting)
    return calls


def no_split(monkeypatch):
    monkeypatch.setattr(parallel, "_streams", [])


@pytest.mark.parametrize("family, overrides", [
    ("qwen3", {"tie_word_embeddings": True}),
    ("qwen2", {}),
    ("qwen3_moe", {"norm_topk_prob": True}),
    ("qwen2_moe", {"shared_expert_intermediate_size": 48}),
])
def test_split_float_model_matches_transformers(tmp_path, split_everything, family, overrides):
    hf, folder = build_checkpoint(tmp_path / family, family, **overrides)
    ids = np.random.default_rng(0).integers(0, 160, (1, 40))
    model, _ = qwen_mlx.load(folder, dtype="float32")
    # 31 prefill tokens sort the MoE pairs (>= 64 with k=2..4); the rest decode unsorted.
    ours = mlx_incremental_logits(model, ids, 31)
    assert np.abs(ours - hf_incremental_logits(hf, ids, 31)).max() < 1e-4
    assert any(split_everything)


def test_split_quantized_model_matches_the_unsplit_one(tmp_path, monkeypatch, split_everything):
    _, folder = build_checkpoint(tmp_path / "src", "qwen3_moe", tie_word_embeddings=True,
                                 max_position_embeddings=512)
    out = tmp_path / "q4"
    qwen_mlx.convert(folder, out, quantize=True, bits=4, group_size=32, progress=False)
    model, _ = qwen_mlx.load(out, dtype="float32")
    # 300 prompt rows take the dequantize-then-matmul route of a prefill chunk.
    ids = np.random.default_rng(1).integers(0, 160, (1, 304))
    split = mlx_incremental_logits(model, ids, 300)
    assert any(split_everything)
    no_split(monkeypatch)
    whole = mlx_incremental_logits(model, ids, 300)
    assert np.abs(split - whole).max() < 1e-4 * max(1.0, np.abs(whole).max())
    assert (split[0, -4:].argmax(-1) == whole[0, -4:].argmax(-1)).all()


def test_no_split_with_one_core(monkeypatch):
    monkeypatch.setattr(parallel, "_streams", None)
    monkeypatch.setenv("QWEN_MLX_THREADS", "1")
    assert parallel.cpu_streams() == []
    assert parallel.split(8, 1 << 30, lambda s: mx.zeros((1,))) is None
    monkeypatch.setattr(parallel, "_streams", None)
    monkeypatch.setenv("QWEN_MLX_THREADS", "3")
    assert len(parallel.cpu_streams()) == 3


@pytest.mark.parametrize("value", ["0", "four", "-2", ""])
def test_a_bad_thread_count_is_named(monkeypatch, value):
    monkeypatch.setenv("QWEN_MLX_THREADS", value)
    with pytest.raises(qwen_mlx.QwenMLXError, match="QWEN_MLX_THREADS"):
        parallel.cpu_count()


def test_split_runs_on_any_thread(split_everything):
    """Generation threads come and go (one per chat turn): streams must follow them."""
    import threading

    lin = parallel.Linear(64, 96, bias=True)
    x = mx.random.normal((1, 3, 64))
    mx.eval(lin.parameters(), x)
    expected = np.array(x @ lin.weight.T + lin.bias)
    results = []

    def turn():
        results.append(np.array(lin(x)))

    for _ in range(3):
        t = threading.Thread(target=turn)
        t.start()
        t.join()
    results.append(np.array(lin(x)))
    assert len(results) == 4 and all(split_everything)
    for r in results:
        assert np.abs(r - expected).max() < 1e-5
