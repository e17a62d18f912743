"""Folders written by mlx-lm load in qwen_mlx and give mlx-lm's logits.

The issue asks that "folders written by mlx-lm, quantized ones included (the
`quantization` block in config.json, `switch_mlp` expert names)" load as they
are, and that "folders converted by mlx-lm (float and 4-bit) load and give the
same logits as mlx-lm gives on them".

Everything is built here, nothing is downloaded:

1. tiny random Hugging Face checkpoints (transformers, torch CPU, float32) for
   qwen2 (tied embeddings), qwen3 (untied, q/k norms), qwen2_moe (shared
   expert) and qwen3_moe, each with a tiny byte-level BPE tokenizer;
2. `mlx_lm.convert` turns them into MLX folders: float32, bfloat16, 4-bit with
   group 32 (every matrix quantized), 4-bit with group 64 and bfloat16 scales
   (mlx-lm's defaults for a bf16 hub model: expert down projections of input
   width 32 stay unquantized), 8-bit, and one folder split into several
   safetensors shards by mlx-lm's own writer;
3. both `mlx_lm.load` and `qwen_mlx.load(..., dtype="float32")` load each
   folder and their logits on the same prompt are compared; for MoE folders
   also on a 48-token prompt (enough (token, expert) pairs for the sorted
   gathered-matmul path), through the KV cache (prefill 8, decode 4), and the
   folder's tokenizer is checked against mlx-lm's.

The configs avoid the places where mlx-lm itself is wrong (it makes every
qwen2_moe layer sparse, ignores qwen2_moe's norm_topk_prob, and knows no
sliding window): decoder_sparse_step 1, mlp_only_layers [], norm_topk_prob
false for qwen2_moe, use_sliding_window off. `test_mlx_lm_reference_matches_
transformers` checks that mlx-lm really agrees with transformers on them, so
that agreeing with mlx-lm means something.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
mlx_lm = pytest.importorskip("mlx_lm")

import mlx_lm.utils as mlx_lm_utils  # noqa: E402
from mlx_lm import convert as mlx_lm_convert  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import qwen_mlx  # noqa: E402
from conftest import write_tiny_tokenizer  # noqa: E402

VOCAB = 320  # model vocab; the tokenizer has 300 entries, inside it
TOKENIZER_VOCAB = 300
ROPE_THETA = 10000.0  # not mlx-lm's qwen2 default (1e6): a loader must read it

COMMON = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    intermediate_size=128,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    use_sliding_window=False,
    rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
)

FAMILIES = {
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(tie_word_embeddings=False, head_dim=16),
    "qwen2_moe": dict(
        tie_word_embeddings=False,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        norm_topk_prob=False,  # mlx-lm ignores it for qwen2_moe
        decoder_sparse_step=1,  # mlx-lm makes every qwen2_moe layer sparse
        mlp_only_layers=[],
    ),
    "qwen3_moe": dict(
        tie_word_embeddings=False,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
}

# name -> (family, keyword arguments of mlx_lm.convert, number of shards or None)
VARIANTS = {
    "qwen2-f32": ("qwen2", dict(dtype="float32"), None),
    "qwen3-f32": ("qwen3", dict(dtype="float32"), None),
    "qwen2_moe-f32": ("qwen2_moe", dict(dtype="float32"), None),
    "qwen3_moe-f32": ("qwen3_moe", dict(dtype="float32"), None),
    "qwen3-bf16": ("qwen3", dict(dtype="bfloat16"), None),
    "qwen2-q4g32": ("qwen2", dict(dtype="float32", quantize=True, q_bits=4, q_group_size=32), None),
    "qwen3-q4g32": ("qwen3", dict(dtype="float32", quantize=True, q_bits=4, q_group_size=32), None),
    "qwen2_moe-q4g32": ("qwen2_moe", dict(dtype="float32", quantize=True, q_bits=4, q_group_size=32), None),
    "qwen3_moe-q4g32": ("qwen3_moe", dict(dtype="float32", quantize=True, q_bits=4, q_group_size=32), None),
    # mlx-lm's defaults on a bf16 hub checkpoint: 4 bits, group 64, bf16 scales.
    # The expert down projections (input width 32) are left unquantized.
    "qwen3_moe-q4g64-bf16": ("qwen3_moe", dict(dtype="bfloat16", quantize=True, q_bits=4, q_group_size=64), None),
    "qwen2_moe-q4g64-bf16": ("qwen2_moe", dict(dtype="bfloat16", quantize=True, q_bits=4, q_group_size=64), None),
    "qwen2-q8g64": ("qwen2", dict(dtype="float32", quantize=True, q_bits=8, q_group_size=64), None),
    "qwen3-q4g32-sharded": ("qwen3", dict(dtype="float32", quantize=True, q_bits=4, q_group_size=32), 3),
}

FLOAT32_VARIANTS = [n for n, (_, kw, _) in VARIANTS.items() if not kw.get("quantize") and kw["dtype"] == "float32"]
FLOAT_TOL = 1e-4
QUANT_TOL = 1e-4  # same quantized kernels on the same weights: observed ~1e-6

PROMPT = np.random.RandomState(1234).randint(0, TOKENIZER_VOCAB, size=12).astype(np.int32)


# --------------------------------------------------------------------------
# building the folders


def _build_tokenizer(folder: Path) -> None:
    """A tiny byte-level BPE tokenizer (300 entries) with Qwen's special tokens."""
    write_tiny_tokenizer(folder, vocab=TOKENIZER_VOCAB)


def _build_hf_checkpoint(family: str, folder: Path):
    """Save a random tiny checkpoint of `family`; return its torch model."""
    config = AutoConfig.for_model(family, **COMMON, **FAMILIES[family])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1000 + sorted(FAMILIES).index(family))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.08)
            elif "norm" in name:  # RMSNorm gains: around 1, not all 1
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:  # q/k/v biases
                p.copy_(torch.randn(p.shape, generator=gen) * 0.08)
    model.save_pretrained(str(folder))
    # Written as Qwen's hub configs (transformers 4) have it: a top-level
    # rope_theta, num_experts for qwen3_moe and torch_dtype. transformers 5
    # writes rope_parameters, num_local_experts and dtype, which mlx-lm 0.32
    # cannot read for every family (qwen3_moe needs rope_theta and num_experts).
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = ROPE_THETA
    cfg["rope_scaling"] = None
    if "num_local_experts" in cfg:
        cfg["num_experts"] = cfg.pop("num_local_experts")
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    cfg_path.write_text(json.dumps(cfg, indent=2))
    _build_tokenizer(folder)
    return model


def _sharding(n_shards: int):
    """A stand-in for mlx_lm.utils.make_shards that splits into n_shards files."""

    def make_shards(weights, max_file_size_gb=None):
        items = list(weights.items())
        chunk = -(-len(items) // n_shards)
        return [dict(items[i : i + chunk]) for i in range(0, len(items), chunk)]

    return make_shards


class _Folders:
    def __init__(self, root: Path):
        self.root = root
        self._sources = {}
        self._converted = {}
        self._torch_logits = {}

    def source(self, family: str) -> Path:
        if family not in self._sources:
            folder = self.root / f"{family}-hf"
            model = _build_hf_checkpoint(family, folder)
            with torch.no_grad():
                out = model(torch.tensor(PROMPT[None].astype(np.int64))).logits
            self._torch_logits[family] = out[0].float().numpy()
            self._sources[family] = folder
        return self._sources[family]

    def torch_logits(self, family: str) -> np.ndarray:
        self.source(family)
        return self._torch_logits[family]

    def converted(self, name: str) -> Path:
        if name not in self._converted:
            family, kwargs, shards = VARIANTS[name]
            src = self.source(family)
            dst = self.root / name
            if shards:
                original = mlx_lm_utils.make_shards
                mlx_lm_utils.make_shards = _sharding(shards)
                try:
                    mlx_lm_convert(hf_path=str(src), mlx_path=str(dst), **kwargs)
                finally:
                    mlx_lm_utils.make_shards = original
            else:
                mlx_lm_convert(hf_path=str(src), mlx_path=str(dst), **kwargs)
            self._converted[name] = dst
        return self._converted[name]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return _Folders(tmp_path_factory.mktemp("mlx_lm_folders"))


# --------------------------------------------------------------------------
# helpers


def _tensors(folder: Path) -> dict:
    """name -> (shape, dtype string) over every safetensors file of a folder."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                out[k] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


def _mlx_lm_logits(folder: Path, ids: np.ndarray) -> np.ndarray:
    model, _ = mlx_lm.load(str(folder))
    # Compute in float32 like qwen_mlx: casts only floating parameters (norms,
    # float weights, quantization scales and biases); packed uint32 stay.
    model.set_dtype(mx.float32)
    out = model(mx.array(ids[None], dtype=mx.int32)).astype(mx.float32)
    mx.eval(out)
    return np.array(out)[0]


def _qwen_mlx_load(folder: Path):
    loaded = qwen_mlx.load(str(folder), dtype="float32")
    assert isinstance(loaded, tuple) and len(loaded) == 2, "qwen_mlx.load must return (model, tokenizer)"
    return loaded


def _logits(model, ids: np.ndarray, cache=None) -> np.ndarray:
    if cache is None:
        out = model(mx.array(ids[None], dtype=mx.int32))
    else:
        out = model(mx.array(ids[None], dtype=mx.int32), cache=cache)
    out = out.astype(mx.float32)
    mx.eval(out)
    return np.array(out)[0]


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    assert np.all(np.isfinite(a)), "non-finite logits"
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


# --------------------------------------------------------------------------
# the reference is sound


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mlx_lm_reference_matches_transformers(folders, family):
    """mlx-lm is exact on these configs, so agreeing with it is meaningful."""
    name = f"{family}-f32"
    ours = _mlx_lm_logits(folders.converted(name), PROMPT)
    ref = folders.torch_logits(family)
    assert ours.shape == (len(PROMPT), VOCAB)
    assert np.abs(ref).max() > 0.5, "random weights should give non-trivial logits"
    diff = _max_diff(ours, ref)
    print(f"[mlx-lm vs transformers] {name}: max|diff| = {diff:.3g}")
    assert diff <= FLOAT_TOL


# --------------------------------------------------------------------------
# what mlx-lm writes: the shapes qwen_mlx has to accept


def test_float_folders_keep_the_requested_dtype(folders):
    f32 = _tensors(folders.converted("qwen3-f32"))
    bf16 = _tensors(folders.converted("qwen3-bf16"))
    assert {dt for _, dt in f32.values()} == {"F32"}
    assert {dt for _, dt in bf16.values()} == {"BF16"}
    # tied embeddings: no lm_head tensor in the qwen2 folder
    assert "lm_head.weight" not in _tensors(folders.converted("qwen2-f32"))
    assert "lm_head.weight" in f32


@pytest.mark.parametrize("name", ["qwen2_moe-q4g32", "qwen3_moe-q4g32", "qwen3_moe-q4g64-bf16"])
def test_quantized_moe_folder_layout(folders, name):
    family, kwargs, _ = VARIANTS[name]
    folder = folders.converted(name)
    cfg = json.loads((folder / "config.json").read_text())
    q = cfg["quantization"]
    assert q["bits"] == kwargs["q_bits"] and q["group_size"] == kwargs["q_group_size"]
    assert q.get("mode", "affine") == "affine"
    tensors = _tensors(folder)
    n_exp = FAMILIES[family]["num_experts"]
    assert not any(".experts." in k for k in tensors), "mlx-lm stacks experts into switch_mlp"
    p = "model.layers.0.mlp."
    # stacked experts: [E, out, in * bits / 32] packed uint32
    shape, dt = tensors[p + "switch_mlp.gate_proj.weight"]
    assert dt == "U32" and shape == (n_exp, 32, 64 * kwargs["q_bits"] // 32)
    assert tensors[p + "switch_mlp.gate_proj.scales"][0] == (n_exp, 32, 64 // kwargs["q_group_size"])
    if kwargs["q_group_size"] == 32:
        assert tensors[p + "switch_mlp.down_proj.weight"] == ((n_exp, 64, 4), "U32")
    else:  # input width 32 is not a multiple of 64: left in float, no scales
        assert tensors[p + "switch_mlp.down_proj.weight"] == ((n_exp, 64, 32), "BF16")
        assert p + "switch_mlp.down_proj.scales" not in tensors
    # the router
    gate_shape, gate_dt = tensors[p + "gate.weight"]
    assert gate_dt == "U32"
    if family == "qwen3_moe":  # mlx-lm's qwen3_moe quant_predicate: 8-bit router
        assert q[p + "gate"] == {"group_size": 64, "bits": 8}
        assert gate_shape == (n_exp, 64 * 8 // 32)
    else:  # qwen2_moe: the router is quantized like everything else
        assert p + "gate" not in q
        assert gate_shape == (n_exp, 64 * kwargs["q_bits"] // 32)
        assert tensors[p + "shared_expert_gate.weight"][1] == "U32"
        assert p + "shared_expert.gate_proj.scales" in tensors


def test_sharded_folder_has_several_files(folders):
    folder = folders.converted("qwen3-q4g32-sharded")
    files = sorted(f.name for f in folder.glob("*.safetensors"))
    assert len(files) == 3 and files[0] == "model-00001-of-00003.safetensors"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)


# --------------------------------------------------------------------------
# qwen_mlx loads them and agrees with mlx-lm


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_mlx_lm(folders, name):
    family, kwargs, _ = VARIANTS[name]
    folder = folders.converted(name)
    ref = _mlx_lm_logits(folder, PROMPT)
    model, _tokenizer = _qwen_mlx_load(folder)
    ours = _logits(model, PROMPT)
    assert ours.shape == (len(PROMPT), VOCAB)
    diff = _max_diff(ours, ref)
    tol = QUANT_TOL if kwargs.get("quantize") else FLOAT_TOL
    print(f"[qwen_mlx vs mlx-lm] {name}: max|diff| = {diff:.3g} (tol {tol})")
    assert diff <= tol
    if name in FLOAT32_VARIANTS:
        diff_t = _max_diff(ours, folders.torch_logits(family))
        print(f"[qwen_mlx vs transformers] {name}: max|diff| = {diff_t:.3g}")
        assert diff_t <= FLOAT_TOL


@pytest.mark.parametrize("name", ["qwen3_moe-q4g32", "qwen2_moe-q4g64-bf16"])
def test_cached_decode_matches_full_forward(folders, name):
    folder = folders.converted(name)
    model, _ = _qwen_mlx_load(folder)
    full = _logits(model, PROMPT)
    cache = model.make_cache()
    prefill = _logits(model, PROMPT[:8], cache=cache)
    diffs = [_max_diff(prefill, full[:8])]
    for i in range(8, len(PROMPT)):
        step = _logits(model, PROMPT[i : i + 1], cache=cache)
        assert step.shape == (1, VOCAB)
        diffs.append(_max_diff(step[0], full[i]))
    print(f"[cache vs full] {name}: prefill {diffs[0]:.3g}, steps {[f'{d:.3g}' for d in diffs[1:]]}")
    assert max(diffs) <= FLOAT_TOL
    # and the decoded steps agree with mlx-lm's full forward too
    ref = _mlx_lm_logits(folder, PROMPT)
    assert _max_diff(full, ref) <= QUANT_TOL


# More (token, expert) pairs than the gathered-matmul sorting threshold (64 in
# mlx-lm's SwitchGLU), so the sorted path of the expert kernels runs too.
LONG_PROMPT = np.random.RandomState(99).randint(0, TOKENIZER_VOCAB, size=48).astype(np.int32)


@pytest.mark.parametrize("name", ["qwen2_moe-f32", "qwen3_moe-q4g32", "qwen3_moe-q4g64-bf16"])
def test_moe_long_prompt_matches_mlx_lm(folders, name):
    folder = folders.converted(name)
    ref = _mlx_lm_logits(folder, LONG_PROMPT)
    model, _ = _qwen_mlx_load(folder)
    ours = _logits(model, LONG_PROMPT)
    diff = _max_diff(ours, ref)
    print(f"[qwen_mlx vs mlx-lm, 48 tokens] {name}: max|diff| = {diff:.3g}")
    assert diff <= (QUANT_TOL if VARIANTS[name][1].get("quantize") else FLOAT_TOL)


TEXTS = [
    "hello world, the quick fox 42!  \n x",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "naïve café 東京 🙂\tdef main():\n    return 42",
]


@pytest.mark.parametrize("name", ["qwen2-q4g32", "qwen3_moe-q4g64-bf16"])
def test_tokenizer_matches_mlx_lm(folders, name):
    """The folder's tokenizer (rewritten by mlx-lm's save) reads the same in both."""
    folder = folders.converted(name)
    _, ref_tok = mlx_lm.load(str(folder))
    _, tok = _qwen_mlx_load(folder)
    assert tok is not None, "the converted folder has tokenizer.json"
    for text in TEXTS:
        ids = tok.encode(text, special=True)
        assert ids == list(ref_tok.encode(text, add_special_tokens=False)), text
        assert tok.decode(ids, skip_special_tokens=False) == text
