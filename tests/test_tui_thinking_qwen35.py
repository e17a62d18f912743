"""The chat UI's thinking switch with a Qwen3.5-style template (no /think soft switch).

A tiny random Qwen3 checkpoint whose tokenizer carries fixtures/templates/qwen3_5.jinja:
typing /no_think leaves thinking on (the template and model do not define the switch),
and the Ctrl+T toggle maps to the template's enable_thinking.
"""

from __future__ import annotations

import json
import time

import pytest

import qwen_mlx
from conftest import build_checkpoint, write_tiny_tokenizer
from tui.app import ChatApp

pytestmark = pytest.mark.anyio
VOCAB = 320


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tui35") / "Qwen3.5-style-tiny"
    folder.mkdir()
    build_checkpoint(folder, "qwen3", vocab_size=VOCAB, max_position_embeddings=256,
                     num_hidden_layers=2, head_dim=32)
    write_tiny_tokenizer(folder, vocab=VOCAB, chat_template="qwen3_5")
    model, tokenizer = qwen_mlx.load(folder)
    return folder, model, tokenizer


async def wait_for(pilot, condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await pilot.pause(0.02)


async def test_no_think_does_not_switch_and_the_toggle_maps_to_enable_thinking(tiny, tmp_path):
    folder, model, tokenizer = tiny
    assert tokenizer.has_soft_switch() is False
    (tmp_path / "settings.json").write_text(json.dumps({"temperature": 0.0, "max_tokens": 4}))
    app = ChatApp(folder, data_dir=tmp_path, preloaded=(model, tokenizer), flush_interval=0.01)
    async with app.run_test(size=(100, 30)) as pilot:
        chat = app.chat
        await wait_for(pilot, lambda: chat.session is not None)
        meter = lambda: str(chat.query_one("#context").render())  # noqa: E731
        await pilot.press(*"hi /no_think")
        await wait_for(pilot, lambda: "thinking on" in meter())
        assert "/no_think" not in meter()
        messages = [{"role": "user", "content": "hi /no_think"}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                               enable_thinking=chat.session.enable_thinking,
                                               tokenize=False)
        assert prompt.endswith("<|im_start|>assistant\n<think>\n")
        await pilot.press("ctrl+t")
        assert chat.session.enable_thinking is False
        await wait_for(pilot, lambda: "thinking off (Ctrl+T)" in meter())
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                               enable_thinking=chat.session.enable_thinking,
                                               tokenize=False)
        assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
