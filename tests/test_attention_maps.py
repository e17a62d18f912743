"""Attention maps: the captured probabilities equal transformers' output_attentions
(eager attention, float32) within 1e-5; a DeltaNet layer's effective attention
reproduces the layer's output; the PNG is written; the normal forward is untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import mlx.core as mx

from conftest import build_checkpoint, write_tiny_tokenizer
from hybrid_fixtures import build_case
from qwen_mlx.checkpoint.loader import load
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.quality.attention_maps import (attention_maps, deltanet_inputs,
                                             effective_attention, prompt_ids, save_png)


def _hf_attentions(folder, ids: np.ndarray, cls=transformers.AutoModelForCausalLM):
    hf = cls.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf(torch.tensor(ids), output_attentions=True)
    return [None if a is None else a[0].numpy() for a in out.attentions]


@pytest.mark.parametrize("family,extra", [
    ("qwen2", {}),
    ("qwen3", {}),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 12, "max_window_layers": 1,
               "layer_types": ["full_attention", "sliding_attention"] * 2}),
])
def test_softmax_maps_equal_transformers(family, extra, tmp_path):
    _, folder = build_checkpoint(tmp_path / family, family, **extra)
    ids = np.random.RandomState(0).randint(0, 160, (1, 30))
    model, _ = load(folder, dtype="float32")
    maps = attention_maps(model, None, ids[0].tolist())
    expected = _hf_attentions(folder, ids)
    assert len(maps.layers) == len(expected) == 4
    for m, e in zip(maps.layers, expected):
        assert m.kind == "attention" and m.weights.shape == e.shape == (4, 30, 30)
        np.testing.assert_allclose(m.weights, e, atol=1e-5, rtol=0)
    if extra:  # the window shows: position 29 cannot see key 5 in the sliding layers
        assert maps.layers[1].weights[:, 29, 5].max() == 0
        assert maps.layers[0].weights[:, 29, 5].min() > 0


def test_gated_hybrid_attention_equals_transformers(tmp_path):
    case = build_case("qwen3_5-flat", tmp_path / "q35")
    ids = case.ids[:, :40]
    model, _ = load(case.folder, dtype="float32")
    maps = attention_maps(model, None, ids[0].tolist())
    expected = _hf_attentions(case.folder, ids)
    softmax = [m for m in maps.layers if m.kind == "attention"]
    assert [m.index for m in softmax] == [3]
    assert len(expected) == 1  # transformers returns the full-attention layers' only
    np.testing.assert_allclose(softmax[0].weights, expected[0], atol=1e-5, rtol=0)


def test_deltanet_effective_attention_reproduces_the_layer(tmp_path):
    case = build_case("qwen3_5-flat", tmp_path / "q35")
    model, _ = load(case.folder, dtype="float32")
    layer = model.model.layers[0]
    la = layer.linear_attn
    assert layer.kind == "linear"
    x = layer.input_layernorm(model.model.embed_tokens(mx.array(case.ids[:, :70])))
    A = effective_attention(la, x)  # [1, Hv, 70, 70]
    _, _, v, _, _ = deltanet_inputs(la, x)
    o = mx.array(np.einsum("bhts,bhsd->bhtd", A, np.array(v)))  # Σ_s A[t, s] v_s
    B, T = x.shape[:2]
    z = la.in_proj_z(x).reshape(B, T, la.num_v_heads, la.head_v_dim)
    out = la.out_proj(la.norm(o.transpose(0, 2, 1, 3), z).reshape(B, T, -1))
    np.testing.assert_allclose(np.array(out), np.array(la(x)), atol=1e-4, rtol=0)
    assert np.abs(np.triu(A[0, 0], 1)).max() == 0


def test_png_and_selection(tmp_path):
    case = build_case("qwen3_5-flat", tmp_path / "q35")
    write_tiny_tokenizer(case.folder, vocab=272, chat_template="qwen3")
    model, tok = load(case.folder, dtype="float32")
    before = np.array(model(mx.array(case.ids[:, :20])))
    ids = prompt_ids(tok, "hello world")
    maps = attention_maps(model, tok, ids)
    assert "<|im_start|>" in maps.labels and maps.special[maps.labels.index("<|im_start|>")]
    assert maps.select("mean", "mean").shape == (len(ids), len(ids))
    np.testing.assert_allclose(maps.select(3, 1), maps.layers[3].weights[1])
    np.testing.assert_allclose(maps.select("mean", "mean"), maps.layers[3].weights.mean(0))
    for layer, head in (("mean", "mean"), (3, 0), (0, "mean")):
        path = save_png(maps, tmp_path / f"map-{layer}-{head}.png", layer=layer, head=head)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(QwenMLXError, match="head 9 does not exist"):
        maps.select(3, 9)
    with pytest.raises(QwenMLXError, match="layer 7 does not exist"):
        attention_maps(model, tok, ids, layers=[7])
    # Capturing changed nothing the ordinary forward reads.
    np.testing.assert_array_equal(np.array(model(mx.array(case.ids[:, :20]))), before)


def _cli(argv: list[str]) -> int:
    import argparse

    from qwen_mlx.quality import cli

    parser = argparse.ArgumentParser(prog="qwen-mlx")
    cli.add_parser(parser.add_subparsers(dest="command"))
    return cli.run(parser.parse_args(argv))


def test_cli_writes_pngs(tmp_path, capsys):
    case = build_case("qwen3_5-flat", tmp_path / "q35")
    write_tiny_tokenizer(case.folder, vocab=272, chat_template="qwen3")
    assert _cli(["attention", str(case.folder), "hello world", "-o",
                 str(tmp_path / "a.png")]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "a.png") and "effective attention" in err
    assert _cli(["attention", str(case.folder), "hello", "--raw", "--per-layer", "--head", "0",
                 "-o", str(tmp_path / "m.png")]) == 0
    assert sorted(p.name for p in tmp_path.glob("m-layer*.png")) == [
        f"m-layer{i}.png" for i in range(4)]
    with pytest.raises(QwenMLXError, match="give an index or 'mean'"):
        _cli(["attention", str(case.folder), "hi", "--layer", "first"])


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_chat_key_saves_the_last_replys_prompt_map(tmp_path):
    import json
    import time

    from tui.app import ChatApp

    folder = tmp_path / "Qwen3-tiny"
    folder.mkdir()
    build_checkpoint(folder, "qwen3", vocab_size=320, num_hidden_layers=2, head_dim=32)
    write_tiny_tokenizer(folder, vocab=320, chat_template="qwen3")
    model, tok = load(folder)
    data = tmp_path / "data"
    data.mkdir()
    (data / "settings.json").write_text(json.dumps({"temperature": 0.0, "max_tokens": 4}))
    app = ChatApp(folder, data_dir=data, preloaded=(model, tok), flush_interval=0.01)

    async def wait_for(condition, what):
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await pilot.pause(0.02)

    def said(text):
        return any(text in str(n.message) for n in app._notifications)

    async with app.run_test(size=(100, 30)) as pilot:
        chat = app.chat
        await wait_for(lambda: chat.session is not None, "the model")
        await pilot.press("f4")
        await wait_for(lambda: said("There is no reply yet"), "the warning")
        chat.prompt.set_text("hello world")
        await pilot.press("enter")
        await wait_for(lambda: chat.turn == 1 and not chat.busy, "the reply")
        await pilot.press("f4")
        path = app.store.path(chat.record.id).with_suffix(".attention.png")
        await wait_for(lambda: said(f"Saved to {path}"), "the saved map")
        assert path.read_bytes()[:4] == b"\x89PNG"
