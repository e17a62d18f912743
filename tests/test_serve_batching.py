"""Continuous batching in the model (issue 13): rows at different positions decode in one
forward, join and leave between steps, and each row's logits equal transformers' full
forward of that row's own sequence, for softmax attention (qwen3, qwen3_moe) and for the
hybrid's Gated DeltaNet layers (qwen3_5).

Each row is prefilled alone (a single-row cache), joins the batch, is fed its own
sequence's next tokens (teacher forcing), and leaves; a row extracted from the batch
carries on alone exactly as it would have in the batch.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

import mlx.core as mx  # noqa: E402

import qwen_mlx  # noqa: E402
from conftest import build_checkpoint, hf_logits  # noqa: E402
from hybrid_fixtures import build_case  # noqa: E402
from qwen_mlx.generate.generation import prefill  # noqa: E402

# (prefill length, step at which the row joins, steps it decodes in the batch)
ROWS = [(5, 0, 9), (11, 0, 4), (1, 2, 6), (17, 3, 5)]
STEPS = 9
ATOL = 1e-4


@pytest.fixture(scope="module", params=["qwen3", "qwen3_moe", "qwen3_5"])
def family(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "qwen3_5":
        case = build_case("qwen3_5-flat", folder / "m")
        ids, oracle = case.ids[:, :40], case.full_logits()[:, :40]
        folder = case.folder
    else:
        hf, folder = build_checkpoint(folder / "m", request.param, max_position_embeddings=64)
        ids = np.random.RandomState(7).randint(0, 160, size=(1, 40))
        oracle = hf_logits(hf, ids)
    model, _ = qwen_mlx.load(folder, dtype="float32")
    return model, ids[0].tolist(), oracle[0]


def _single(model, ids):
    cache = model.make_cache()
    prefill(model, ids, cache)
    return cache


def test_batched_rows_match_transformers(family):
    model, ids, oracle = family
    assert model.can_batch
    batch, members = None, []  # members: (row index, position of the next input)
    done = {}
    for step in range(STEPS + 4):
        for r, (n, join, _) in enumerate(ROWS):
            if join == step:
                one = model.batch_cache(_single(model, ids[:n - 1]))
                if batch is None:
                    batch = one
                else:
                    for c, o in zip(batch, one):
                        c.extend(o)
                members.append([r, n - 1])
        if not members:
            break
        tokens = mx.array([[ids[p]] for _, p in members])
        logits = np.array(model(tokens, cache=batch)[:, -1, :])
        for i, (r, p) in enumerate(members):
            np.testing.assert_allclose(logits[i], oracle[p], atol=ATOL, rtol=0,
                                       err_msg=f"row {r} at position {p}")
            members[i][1] += 1
        keep = [i for i, (r, p) in enumerate(members)
                if p - (ROWS[r][0] - 1) < ROWS[r][2]]
        for i, (r, p) in enumerate(members):
            if i not in keep:
                done[r] = [c.extract(i) for c in batch]
        members = [members[i] for i in keep]
        if keep:
            for c in batch:
                c.filter(keep)
        else:
            batch = None
    assert sorted(done) == list(range(len(ROWS)))
    # A row that left carries on alone from where the batch left it.
    r = 2
    cache = done[r]
    p = ROWS[r][0] - 1 + ROWS[r][2]
    assert cache[0].offset == p
    logits = np.array(model(mx.array([ids[p:p + 3]]), cache=cache))
    np.testing.assert_allclose(logits[0], oracle[p:p + 3], atol=ATOL, rtol=0)


def test_a_row_joining_longer_than_the_batch_shifts_the_others(family):
    """The batch's rows are padded on the left when a longer row joins: the mask hides
    the padding, and (for the DeltaNet layers) nothing but the row's own state is read."""
    model, ids, oracle = family
    batch = model.batch_cache(_single(model, ids[:2]))
    for c, o in zip(batch, model.batch_cache(_single(model, ids[:20]))):
        c.extend(o)
    positions = [2, 20]
    for _ in range(3):
        logits = np.array(model(mx.array([[ids[p]] for p in positions]), cache=batch))
        for i, p in enumerate(positions):
            np.testing.assert_allclose(logits[i, -1], oracle[p], atol=ATOL, rtol=0)
        positions = [p + 1 for p in positions]
    assert all(np.isfinite(np.array(c.state()[0])).all() for c in batch)
