"""Qwen1 (model_type "qwen") logits tests: qwen_mlx vs the independent NumPy reference.

The reference lives in ``tests/qwen1_reference.py`` and is written from
``docs/qwen-architecture.md`` (§1.1, §2, §3.1, §3.5, §3.6, §4). Random tiny checkpoints are
built on the fly in Qwen1 format (config.json + model.safetensors with ``transformer.*``
names). Every comparison is float32 MLX vs float64 NumPy, max abs diff of logits <= 1e-4.

Most tests also carry a *negative control*: they check that the detail under test (NTK
alpha, LogN, ...) moves the reference logits by far more than the tolerance, so a library
that got it wrong could not pass by accident.
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from qwen1_reference import (  # noqa: E402
    Qwen1Reference,
    logn_scale,
    ntk_alpha,
    ntk_base,
    rotary_dim,
)

ATOL = 1e-4
# A detail under test must move the logits by at least this much (negative controls).
VISIBLE = 1e-2

VOCAB = 300
HIDDEN = 64
HEADS = 4


# ---------------------------------------------------------------------------
# Checkpoint builder
# ---------------------------------------------------------------------------


def qwen1_config(**over) -> dict:
    cfg = {
        "model_type": "qwen",
        "architectures": ["QWenLMHeadModel"],
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": HEADS,
        "kv_channels": HIDDEN // HEADS,
        "intermediate_size": 2 * 96,  # real FFN width 96 (w1/w2 each output 96)
        "layer_norm_epsilon": 1e-6,
        "rotary_pct": 1.0,
        "rotary_emb_base": 10000,
        "use_dynamic_ntk": True,
        "use_logn_attn": True,
        "seq_length": 2048,
        "max_position_embeddings": 8192,
        "no_bias": True,
        "tie_word_embeddings": False,
        "scale_attn_weights": True,
        "use_flash_attn": "auto",
        "bf16": False,
        "fp16": False,
        "fp32": False,
    }
    cfg.update(over)
    return cfg


def qwen1_weights(cfg: dict, seed: int = 0, extra_buffers: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    H, V, n = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    F = cfg["intermediate_size"] // 2

    def mat(*shape, std=0.08):
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    def norm():
        return (1.0 + rng.normal(0.0, 0.1, size=(H,))).astype(np.float32)

    w = {"transformer.wte.weight": mat(V, H, std=0.5)}
    for i in range(n):
        p = f"transformer.h.{i}."
        w[p + "ln_1.weight"] = norm()
        # Slightly wider q/k/v so that positional details (RoPE base, LogN) are visible.
        w[p + "attn.c_attn.weight"] = mat(3 * H, H, std=0.2)
        w[p + "attn.c_attn.bias"] = mat(3 * H, std=0.2)
        w[p + "attn.c_proj.weight"] = mat(H, H)
        w[p + "ln_2.weight"] = norm()
        w[p + "mlp.w1.weight"] = mat(F, H)
        w[p + "mlp.w2.weight"] = mat(F, H)
        w[p + "mlp.c_proj.weight"] = mat(H, F)
        if not cfg["no_bias"]:
            w[p + "attn.c_proj.bias"] = mat(H)
            w[p + "mlp.w1.bias"] = mat(F)
            w[p + "mlp.w2.bias"] = mat(F)
            w[p + "mlp.c_proj.bias"] = mat(H)
    w["transformer.ln_f.weight"] = norm()
    w["lm_head.weight"] = mat(V, H)
    if extra_buffers:
        # Non-persistent buffer that some exported Qwen1 checkpoints carry: must be dropped.
        d = rotary_dim(cfg["kv_channels"], cfg["rotary_pct"])
        w["transformer.h.0.attn.rotary_emb.inv_freq"] = (
            1.0 / (10000.0 ** (np.arange(0, d, 2, dtype=np.float32) / d))
        ).astype(np.float32)
    return w


def write_checkpoint(folder, cfg: dict, weights: dict) -> str:
    from safetensors.numpy import save_file

    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "np"})
    return folder


class Case:
    """A checkpoint on disk + the reference built from the same arrays + the MLX model."""

    def __init__(self, folder, cfg, weights):
        self.folder = folder
        self.cfg = cfg
        self.weights = weights
        self.ref = Qwen1Reference(cfg, weights)
        self._model = None

    @property
    def model(self):
        if self._model is None:
            import qwen_mlx

            model, _tok = qwen_mlx.load(self.folder, dtype="float32")
            self._model = model
        return self._model


@pytest.fixture
def make_case(tmp_path):
    counter = [0]

    def _make(seed=0, extra_buffers=False, **over):
        cfg = qwen1_config(**over)
        w = qwen1_weights(cfg, seed=seed, extra_buffers=extra_buffers)
        counter[0] += 1
        folder = write_checkpoint(tmp_path / f"qwen1_{counter[0]}", cfg, w)
        return Case(folder, cfg, w)

    return _make


def token_ids(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=n).astype(np.int32)


# ---------------------------------------------------------------------------
# MLX helpers
# ---------------------------------------------------------------------------


def _to_np(a) -> np.ndarray:
    import mlx.core as mx

    a = a.astype(mx.float32)
    mx.eval(a)
    return np.array(a)


def mlx_forward(model, ids: np.ndarray) -> np.ndarray:
    import mlx.core as mx

    out = _to_np(model(mx.array(ids[None], dtype=mx.int32)))
    assert out.shape == (1, len(ids), VOCAB), out.shape
    return out[0]


def mlx_steps(model, ids: np.ndarray, chunks) -> list:
    """Run ``ids`` through one cache in the given chunk lengths; return per-chunk logits."""
    import mlx.core as mx

    cache = model.make_cache()
    outs, pos = [], 0
    for n in chunks:
        x = mx.array(ids[None, pos : pos + n], dtype=mx.int32)
        out = _to_np(model(x, cache=cache))
        assert out.shape == (1, n, VOCAB), out.shape
        outs.append(out[0])
        pos += n
    assert pos == len(ids)
    return outs


def ref_steps(ref: Qwen1Reference, ids: np.ndarray, chunks, **kw) -> list:
    cache = ref.make_cache()
    outs, pos = [], 0
    for n in chunks:
        outs.append(ref(ids[pos : pos + n], cache=cache, **kw)[0])
        pos += n
    return outs


def decode_chunks(prefill: int, total: int) -> list:
    return [prefill] + [1] * (total - prefill)


def max_err(a, b) -> float:
    if isinstance(a, list):
        return max(max_err(x, y) for x, y in zip(a, b))
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def assert_close(got, want, what=""):
    err = max_err(got, want)
    print(f"[qwen1] {what}: max abs err {err:.3e}")
    assert err <= ATOL, f"{what}: max abs logits error {err:.3e} > {ATOL:g}"
    return err


def step_errors(got: list, want: list) -> list:
    return [max_err(g, w) for g, w in zip(got, want)]


# ---------------------------------------------------------------------------
# Reference self-checks (no qwen_mlx needed)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "S, L, alpha",
    [
        (8, 1, 1), (8, 5, 1), (8, 8, 1),
        (8, 9, 3), (8, 12, 3), (8, 16, 3),
        (8, 17, 7), (8, 32, 7),
        (8, 33, 15), (8, 64, 15),
        (8, 65, 31),
        (8192, 8192, 1), (8192, 10000, 3), (8192, 16384, 3), (8192, 16385, 7),
        (8192, 32768, 7), (8192, 65536, 15),
    ],
)
def test_reference_ntk_alpha_table(S, L, alpha):
    """§3.5: L <= S -> 1; <= 2S -> 3; <= 4S -> 7; <= 8S -> 15."""
    assert ntk_alpha(L, S) == alpha


def test_reference_ntk_base_example():
    # §3.5 example: S 8192, theta 1e4, d 128, L 10000 -> alpha 3, theta' ~= 30527.74
    a = ntk_alpha(10000, 8192)
    assert a == 3
    assert ntk_base(1e4, a, 128) == pytest.approx(30527.74, abs=0.01)


def test_reference_logn_table():
    S = 8
    p = np.arange(20)
    s = logn_scale(p, S)
    assert np.all(s[: S] == 1.0)  # p + 1 <= S
    assert s[S] == pytest.approx(math.log(9) / math.log(8))
    assert s[19] == pytest.approx(math.log(20) / math.log(8))


def test_reference_rotary_dim():
    assert rotary_dim(128, 1.0) == 128
    assert rotary_dim(16, 0.5) == 8
    assert rotary_dim(16, 0.25) == 4


def test_reference_cache_consistency():
    """Without NTK/LogN effects, cached prefill+decode equals one full forward."""
    cfg = qwen1_config(num_hidden_layers=2, seq_length=2048, no_bias=False, rotary_pct=0.5)
    ref = Qwen1Reference(cfg, qwen1_weights(cfg, seed=3))
    ids = token_ids(20, seed=4)
    full = ref(ids)[0]
    steps = ref_steps(ref, ids, [7, 5] + [1] * 8)
    assert max_err(np.concatenate(steps, 0), full) < 1e-10


def test_reference_matches_transformers_qwen2():
    """Cross-check the reference against transformers' Qwen2 in the regime where Qwen1 and
    Qwen2 coincide (rotary_pct 1, no_bias, no NTK/LogN effect): q/k/v bias, no o bias,
    gate = w2 (SiLU branch), up = w1, down = c_proj."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    cfg = qwen1_config(num_hidden_layers=2, seq_length=2048, no_bias=True)
    w = qwen1_weights(cfg, seed=5)
    H, n = cfg["hidden_size"], cfg["num_hidden_layers"]
    hf_cfg = transformers.Qwen2Config(
        vocab_size=cfg["vocab_size"],
        hidden_size=H,
        intermediate_size=cfg["intermediate_size"] // 2,
        num_hidden_layers=n,
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_attention_heads"],
        rms_norm_eps=cfg["layer_norm_epsilon"],
        rope_theta=float(cfg["rotary_emb_base"]),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    try:
        hf_cfg.rope_parameters = {"rope_type": "default", "rope_theta": float(cfg["rotary_emb_base"])}
    except Exception:
        pass
    model = transformers.Qwen2ForCausalLM(hf_cfg).to(torch.float64).eval()
    sd = {"model.embed_tokens.weight": w["transformer.wte.weight"],
          "model.norm.weight": w["transformer.ln_f.weight"],
          "lm_head.weight": w["lm_head.weight"]}
    for i in range(n):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        Wa, ba = w[p + "attn.c_attn.weight"], w[p + "attn.c_attn.bias"]
        for j, nm in enumerate("qkv"):
            sd[q + f"self_attn.{nm}_proj.weight"] = Wa[j * H : (j + 1) * H]
            sd[q + f"self_attn.{nm}_proj.bias"] = ba[j * H : (j + 1) * H]
        sd[q + "self_attn.o_proj.weight"] = w[p + "attn.c_proj.weight"]
        sd[q + "input_layernorm.weight"] = w[p + "ln_1.weight"]
        sd[q + "post_attention_layernorm.weight"] = w[p + "ln_2.weight"]
        sd[q + "mlp.gate_proj.weight"] = w[p + "mlp.w2.weight"]
        sd[q + "mlp.up_proj.weight"] = w[p + "mlp.w1.weight"]
        sd[q + "mlp.down_proj.weight"] = w[p + "mlp.c_proj.weight"]
    sd = {k: torch.from_numpy(np.asarray(v, np.float64)) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in m for m in missing), missing

    ids = token_ids(24, seed=6)
    with torch.no_grad():
        hf = model(torch.from_numpy(ids[None].astype(np.int64))).logits[0].numpy()
    ref = Qwen1Reference(cfg, w)(ids)[0]
    # ~1e-6: transformers builds inv_freq in fp32 (the reference uses float64).
    assert max_err(hf, ref) < 1e-5


# ---------------------------------------------------------------------------
# qwen_mlx vs reference
# ---------------------------------------------------------------------------


def test_load_returns_model_and_untied_head(make_case):
    case = make_case(seed=10)
    import qwen_mlx

    model, tok = qwen_mlx.load(case.folder, dtype="float32")
    # no tokenizer files in the folder: tok may be None, any value is accepted.
    assert callable(model)
    ids = token_ids(6, seed=11)
    assert_close(mlx_forward(model, ids), case.ref(ids)[0], "load smoke")


def _check_full_and_decode(case, n_full, prefill, total, label, seed=20):
    ids = token_ids(total, seed=seed)
    errs = {}
    full_ids = ids[:n_full]
    errs["full"] = assert_close(mlx_forward(case.model, full_ids), case.ref(full_ids)[0], f"{label} full L={n_full}")
    chunks = decode_chunks(prefill, total)
    got = mlx_steps(case.model, ids, chunks)
    want = ref_steps(case.ref, ids, chunks)
    errs["decode"] = assert_close(got, want, f"{label} prefill {prefill} + decode to {total}")
    return errs


def test_plain(make_case):
    """Case 1: seq_length large (no NTK/LogN effect), rotary_pct 1, no_bias true."""
    case = make_case(seed=30, seq_length=2048, rotary_pct=1.0, no_bias=True)
    _check_full_and_decode(case, n_full=32, prefill=10, total=30, label="plain")


def test_rotary_half_bias_and_inv_freq_buffer(make_case):
    """Case 2: rotary_pct 0.5 (only the first 8 of 16 dims rotated), no_bias false (biases on
    attn.c_proj and all MLP linears), 3 layers, plus a stray rotary_emb.inv_freq buffer in
    the checkpoint that the loader must drop."""
    case = make_case(seed=31, seq_length=2048, rotary_pct=0.5, no_bias=False,
                     num_hidden_layers=3, extra_buffers=True)
    ids = token_ids(24, seed=32)
    # negative controls: the biases and the partial rotation are visible in the logits
    no_bias_ref = Qwen1Reference(dict(case.cfg, no_bias=True), case.weights)
    assert max_err(no_bias_ref(ids), case.ref(ids)) > VISIBLE
    full_rot_ref = Qwen1Reference(dict(case.cfg, rotary_pct=1.0), case.weights)
    assert max_err(full_rot_ref(ids), case.ref(ids)) > VISIBLE
    _check_full_and_decode(case, n_full=24, prefill=9, total=28, label="rotary0.5+bias")


def test_rotary_half_with_ntk_and_logn(make_case):
    """rotary_pct 0.5 with NTK + LogN: the NTK exponent uses the rotary dim d = 8
    (base' = base * alpha ** (8/6)), not kv_channels = 16 or the head dim."""
    case = make_case(seed=35, seq_length=NTK_S, rotary_pct=0.5, no_bias=False)
    ids = token_ids(30, seed=36)
    chunks = decode_chunks(12, 30)  # alpha 3 fixed by the 12-token prefill
    want = ref_steps(case.ref, ids, chunks)
    wrong_base = ntk_base(case.cfg["rotary_emb_base"], 3, case.cfg["kv_channels"])
    assert max_err(ref_steps(case.ref, ids, chunks, base_override=wrong_base), want) > VISIBLE
    assert_close(mlx_forward(case.model, ids[:20]), case.ref(ids[:20])[0], "rotary0.5+NTK full L=20")
    assert_close(mlx_steps(case.model, ids, chunks), want, "rotary0.5+NTK prefill 12 + decode to 30")


def test_tied_embeddings_ignore_lm_head(make_case):
    """tie_word_embeddings true: logits use transformer.wte, any lm_head.weight is ignored."""
    case = make_case(seed=37, tie_word_embeddings=True)
    ids = token_ids(10, seed=38)
    untied = Qwen1Reference(dict(case.cfg, tie_word_embeddings=False), case.weights)
    assert max_err(untied(ids), case.ref(ids)) > VISIBLE
    assert_close(mlx_forward(case.model, ids), case.ref(ids)[0], "tied embeddings")


def test_w1_w2_roles_visible(make_case):
    """Negative control for the MLP roles: swapping w1/w2 must change the logits, so the
    comparisons above would catch a library that swapped them."""
    case = make_case(seed=33)
    w = dict(case.weights)
    for i in range(case.cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}.mlp."
        w[p + "w1.weight"], w[p + "w2.weight"] = w[p + "w2.weight"], w[p + "w1.weight"]
    ids = token_ids(12, seed=34)
    assert max_err(Qwen1Reference(case.cfg, w)(ids), case.ref(ids)) > VISIBLE
    assert_close(mlx_forward(case.model, ids), case.ref(ids)[0], "w1/w2 roles")


NTK_S = 8


@pytest.mark.parametrize("L, alpha", [(8, 1), (12, 3), (16, 3), (20, 7), (32, 7), (33, 15)])
def test_ntk_logn_full_forward(make_case, L, alpha):
    """Case 3a: full (uncached) forward with S = 8: alpha from L, LogN past position S."""
    case = make_case(seed=40, seq_length=NTK_S, use_dynamic_ntk=True, use_logn_attn=True)
    assert ntk_alpha(L, NTK_S) == alpha
    ids = token_ids(L, seed=41)
    want = case.ref(ids)[0]
    if alpha > 1:
        assert max_err(case.ref(ids, alpha_override=1)[0], want) > VISIBLE
        assert max_err(case.ref(ids, alpha_override=2 * alpha + 1)[0], want) > VISIBLE
    if L > NTK_S:
        assert max_err(case.ref(ids, disable_logn=True)[0], want) > VISIBLE
    assert_close(mlx_forward(case.model, ids), want, f"NTK+LogN full L={L} alpha={alpha}")


@pytest.mark.parametrize(
    "ntk, logn", [(True, True), (True, False), (False, True)], ids=["ntk+logn", "ntk", "logn"]
)
def test_short_prefill_then_decode_past_2S(make_case, ntk, logn):
    """Case 3b: prefill of 6 <= S=8 tokens fixes alpha = 1; decoding grows the sequence to
    26 > 2S. alpha must stay 1 (a library re-choosing alpha from the total length would use
    3 and then 7), while LogN still scales queries at positions p + 1 > S."""
    case = make_case(seed=50, seq_length=NTK_S, use_dynamic_ntk=ntk, use_logn_attn=logn)
    ids = token_ids(26, seed=51)
    chunks = decode_chunks(6, 26)
    want = ref_steps(case.ref, ids, chunks)
    # negative controls
    if ntk:
        wrong = ref_steps(case.ref, ids, chunks, alpha_override=3)
        assert max_err(wrong[-1], want[-1]) > VISIBLE
    if logn:
        wrong = ref_steps(case.ref, ids, chunks, disable_logn=True)
        assert max_err(wrong[-1], want[-1]) > VISIBLE
    got = mlx_steps(case.model, ids, chunks)
    errs = step_errors(got, want)
    bad = [(i, e) for i, e in enumerate(errs) if e > ATOL]
    print(f"[qwen1] short prefill {ntk=} {logn=}: max abs err {max(errs):.3e}")
    assert not bad, (
        "steps over tolerance (chunk index, err; chunk 0 = prefill of 6, chunk k = position "
        f"{5}+k): {[(i, f'{e:.3e}') for i, e in bad]}"
    )


@pytest.mark.parametrize(
    "ntk, logn", [(True, True), (True, False), (False, True)], ids=["ntk+logn", "ntk", "logn"]
)
def test_long_prefill_then_decode(make_case, ntk, logn):
    """Case 3c: prefill of 12 > S=8 tokens fixes alpha = 3 (when NTK is on); decoding to 34
    tokens (> 4S) keeps alpha = 3."""
    case = make_case(seed=60, seq_length=NTK_S, use_dynamic_ntk=ntk, use_logn_attn=logn)
    ids = token_ids(34, seed=61)
    chunks = decode_chunks(12, 34)
    want = ref_steps(case.ref, ids, chunks)
    if ntk:
        for a in (1, 7, 15):
            wrong = ref_steps(case.ref, ids, chunks, alpha_override=a)
            assert max_err(wrong, want) > VISIBLE
    if logn:
        wrong = ref_steps(case.ref, ids, chunks, disable_logn=True)
        assert max_err(wrong, want) > VISIBLE
    got = mlx_steps(case.model, ids, chunks)
    errs = step_errors(got, want)
    bad = [(i, e) for i, e in enumerate(errs) if e > ATOL]
    print(f"[qwen1] long prefill {ntk=} {logn=}: max abs err {max(errs):.3e}")
    assert not bad, f"steps over tolerance (chunk index, err): {[(i, f'{e:.3e}') for i, e in bad]}"


def test_chunked_prefill_crossing_S(make_case):
    """Prefill 5 tokens (alpha 1), then a 7-token cached chunk that crosses S=8 (positions
    5..11, key length 12 > S -> LogN on positions 8..11 only), then decode to 24."""
    case = make_case(seed=70, seq_length=NTK_S)
    ids = token_ids(24, seed=71)
    chunks = [5, 7] + [1] * 12
    want = ref_steps(case.ref, ids, chunks)
    assert max_err(ref_steps(case.ref, ids, chunks, alpha_override=3), want) > VISIBLE
    got = mlx_steps(case.model, ids, chunks)
    assert_close(got, want, "chunked prefill crossing S")


@pytest.mark.parametrize(
    "L, alpha",
    [(4, 1), (5, 3), (8, 3), (9, 7), (16, 7), (17, 15), (32, 15), (33, 31)],
)
def test_ntk_alpha_table_through_library(make_case, L, alpha):
    """Case 4: the alpha table boundaries (S = 4, so L <= S -> 1, <= 2S -> 3, <= 4S -> 7,
    <= 8S -> 15), checked through the library's logits. LogN is off to isolate NTK. The
    neighbouring alphas must be distinguishable from the right one."""
    case = make_case(seed=80, seq_length=4, use_dynamic_ntk=True, use_logn_attn=False,
                     num_hidden_layers=2)
    assert ntk_alpha(L, 4) == alpha
    ids = token_ids(L, seed=81)
    want = case.ref(ids)[0]
    got = mlx_forward(case.model, ids)
    for a in {max(1, (alpha - 1) // 2), 2 * alpha + 1} - {alpha}:
        assert max_err(case.ref(ids, alpha_override=a)[0], want) > VISIBLE, a
    if max_err(got, want) > ATOL:
        # name the alpha the library seems to use, for a readable failure
        cands = {a: max_err(got, case.ref(ids, alpha_override=a)[0]) for a in (1, 3, 7, 15, 31, 63)}
        best = min(cands, key=cands.get)
        pytest.fail(
            f"L={L}, S=4: expected alpha {alpha}; library logits are closest to alpha {best} "
            f"(errs {', '.join(f'{a}:{e:.2e}' for a, e in cands.items())})"
        )
    assert_close(got, want, f"alpha table L={L}")
