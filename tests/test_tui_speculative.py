"""The chat UI's speculative decoding: the F2 setting, the drafter in the session, and the
acceptance rate beside the decode speed."""

from __future__ import annotations

import pytest
from textual.widgets import Input, Select

import qwen_mlx
from conftest import build_checkpoint, write_tiny_tokenizer
from hybrid_fixtures import build_case_with_tokenizer
from qwen_mlx.generate.speculative import ModelDrafter, MTPDrafter
from test_tui import SIZE, make_app, send, wait_for
from tui.screens.settings import SettingsScreen
from tui.settings import Settings, SettingsError

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    case = build_case_with_tokenizer("qwen3_5-nested-untied",
                                     tmp_path_factory.mktemp("tui-spec") / "q35", "qwen3_5")
    model, tokenizer = qwen_mlx.load(case.folder, dtype="float32")
    return case.folder, model, tokenizer


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tui-spec") / "q3"
    build_checkpoint(folder, "qwen3", vocab_size=320, max_position_embeddings=256,
                     num_hidden_layers=2, head_dim=32)
    write_tiny_tokenizer(folder, vocab=320, chat_template="qwen3")
    model, tokenizer = qwen_mlx.load(folder)
    return folder, model, tokenizer


async def test_the_mtp_setting_drafts_and_the_stats_show_the_acceptance(hybrid, tmp_path):
    app = make_app(hybrid, tmp_path, settings={"speculative": "mtp", "max_tokens": 16})
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "hello world")
        chat = app.chat
        assert isinstance(chat.session.drafter, MTPDrafter)
        stats = str(chat.query_one("#stats").render())
        assert "of drafts accepted" in stats
        saved = chat.record.meta[-1]["stats"]
        assert saved["draft_tokens"] > 0 and 0 <= saved["accepted_tokens"] <= saved["draft_tokens"]


async def test_a_draft_model_setting_loads_it_and_new_chats_use_it(dense, tmp_path):
    folder = dense[0]
    # The model drafting for itself: every draft is accepted.
    app = make_app(dense, tmp_path, settings={"draft_model": str(folder), "max_tokens": 16})
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.draft is not None, what="the draft model")
        await pilot.press("ctrl+n")
        await send(pilot, "hello world")
        chat = app.chat
        assert isinstance(chat.session.drafter, ModelDrafter)
        saved = chat.record.meta[-1]["stats"]
        assert saved["draft_tokens"] > 0 and saved["accepted_tokens"] == saved["draft_tokens"]
        assert "100% of drafts accepted" in str(chat.query_one("#stats").render())


async def test_the_settings_screen_edits_speculation(dense, tmp_path):
    app = make_app(dense, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f2")
        await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen), what="settings")
        screen = app.screen
        screen.query_one("#speculation", Select).value = "model"
        with pytest.raises(SettingsError, match="draft model"):
            screen.read()
        screen.query_one("#draft_model", Input).value = "./Qwen3-0.6B"
        screen.query_one("#num_draft_tokens", Input).value = "4"
        read = screen.read()
        assert read.speculation() == {"draft_model": "./Qwen3-0.6B", "num_draft_tokens": 4}
        screen.query_one("#speculation", Select).value = "mtp"
        assert screen.read().speculation() == {"speculative": "mtp", "num_draft_tokens": 4}


def test_bad_speculation_settings_are_named():
    with pytest.raises(SettingsError, match="one way to draft"):
        Settings(speculative="mtp", draft_model="x").validate()
    with pytest.raises(SettingsError, match="drafts per step"):
        Settings(speculative="mtp", num_draft_tokens=0).validate()
    kept, problems = Settings.from_saved({"speculative": "eagle", "system_prompt": "hi"})
    assert kept.system_prompt == "hi" and kept.speculative is None and problems


async def test_mtp_on_a_checkpoint_without_one_says_so_and_stays_off(dense, tmp_path):
    app = make_app(dense, tmp_path, settings={"speculative": "mtp", "max_tokens": 8})
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "hello")
        assert app.chat.session.drafter is None
        assert any("no MTP head" in n.message for n in app._notifications)
