"""Perplexity and KL against a reference: equal to a direct computation from transformers'
logits on tiny checkpoints (float32), with sliding windows and disjoint chunks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import build_checkpoint, write_tiny_tokenizer
from qwen_mlx.checkpoint.loader import load
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.quality.perplexity import perplexity, perplexity_file, windows

TEXT = ("the quick brown fox jumps over the lazy dog. hello world, this is a tiny tokenizer "
        "for the qwen mlx tests. def main():\n    return 42\n") * 3


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two tiny qwen3 checkpoints (different seeds) sharing the tiny tokenizer."""
    folders = []
    for seed in (0, 1):
        hf, folder = build_checkpoint(tmp_path_factory.mktemp(f"ppl{seed}"), "qwen3",
                                      seed=seed, vocab_size=300)
        write_tiny_tokenizer(folder, vocab=300)
        folders.append((hf, folder))
    return folders


def _hf_log_probs(hf, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def _direct(hf, ids: list[int], context: int, stride: int, ref=None):
    """The recipe written out: each window predicts the next `stride` unscored tokens,
    with the window's earlier tokens (at most `context` in all) as context."""
    nll, kl, n, chunks, first = 0.0, 0.0, 0, [], 1
    while first < len(ids):
        end = min(first + stride, len(ids))
        begin = max(0, end - context)
        lp = _hf_log_probs(hf, ids[begin:end])
        rows = list(range(first - 1 - begin, end - 1 - begin))  # row r predicts token r + 1
        targets = ids[first:end]
        chunk = -sum(lp[r, t] for r, t in zip(rows, targets))
        nll += chunk
        chunks.append(chunk / len(targets))
        if ref is not None:
            rp = _hf_log_probs(ref, ids[begin:end])
            kl += float((np.exp(rp[rows]) * (rp[rows] - lp[rows])).sum())
        n += len(targets)
        first = end
    return nll / n, n, chunks, kl / n


@pytest.mark.parametrize("context,stride", [(24, None), (32, 12), (200, None)])
def test_perplexity_equals_transformers(pair, context, stride):
    (hf, folder), (hf_ref, ref_folder) = pair
    model, tok = load(folder, dtype="float32")
    reference, _ = load(ref_folder, dtype="float32")
    ids = tok.encode(TEXT)[:90]
    got = perplexity(model, ids, context=context, stride=stride, reference=reference,
                     progress=False)
    nll, n, chunks, kl = _direct(hf, ids, context, stride or context - 1, hf_ref)
    assert got.tokens == n == len(ids) - 1
    assert got.chunks == len(chunks)
    assert got.perplexity == pytest.approx(math.exp(nll), rel=1e-4)
    assert got.kl == pytest.approx(kl, rel=1e-4)
    assert kl > 0.1  # two different random models: the KL is far from zero
    if len(chunks) > 1:
        se = np.std(chunks, ddof=1) / math.sqrt(len(chunks))
        assert got.stderr == pytest.approx(se, rel=1e-3)
        lo, hi = got.interval
        assert lo < got.perplexity < hi
    else:
        assert got.stderr is None and got.interval is None


def test_kl_against_itself_is_zero(pair):
    (_, folder), _ = pair
    model, tok = load(folder, dtype="float32")
    got = perplexity(model, tok.encode(TEXT)[:60], context=20, reference=model, progress=False)
    assert abs(got.kl) < 1e-6


def test_windows_score_every_token_once():
    for n, context, stride in [(10, 4, 3), (10, 4, 1), (11, 5, None), (2, 2, None), (50, 64, 8)]:
        wins = windows(n, context, stride)
        scored = [i for w in wins for i in range(w.end - w.scored, w.end)]
        assert scored == list(range(1, n))
        assert all(w.end - w.begin <= context for w in wins)


def test_file_and_errors(pair, tmp_path):
    (_, folder), _ = pair
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    got = perplexity_file(folder, text, context=16, max_tokens=40, dtype="float32",
                          progress=False)
    assert got.tokens == 39 and got.chunks == 3  # 15 + 15 + 9 scored
    with pytest.raises(QwenMLXError, match="--stride 10 must be between"):
        windows(30, 10, 10)
    with pytest.raises(QwenMLXError, match="cannot be read"):
        perplexity_file(folder, tmp_path / "missing.txt", progress=False)


def test_cli(pair, tmp_path, capsys):
    import argparse
    import json

    from qwen_mlx.quality import cli

    (_, folder), (_, ref_folder) = pair
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    parser = argparse.ArgumentParser(prog="qwen-mlx")
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["perplexity", str(folder), "--file", str(text), "--context", "20",
                              "--reference", str(ref_folder), "--json"])
    assert cli.run(args) == 0
    got = json.loads(capsys.readouterr().out)
    model, tok = load(folder)
    reference, _ = load(ref_folder)
    direct = perplexity(model, tok.encode(TEXT), context=20, reference=reference,
                        progress=False)
    assert got["perplexity"] == pytest.approx(direct.perplexity, rel=1e-6)
    assert got["kl"] == pytest.approx(direct.kl, rel=1e-6)
    assert got["interval"][0] < got["perplexity"] < got["interval"][1]
