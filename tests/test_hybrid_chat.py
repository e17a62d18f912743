"""Chat sessions over a hybrid's recurrent state (issue 11).

A Gated DeltaNet layer cannot be trimmed, so a session keeps snapshots at turn
boundaries. On a tiny transformers-built Qwen3.5 (tests/hybrid_fixtures.py)
with the Qwen3.5-style template (tests/fixtures/templates/qwen3_5.jinja):
- each turn prefills only its new message, plus the reply before it when the
  template renders that reply differently in history (Qwen3.5 drops the
  `<think>` block of earlier turns, so the state must go back to the reply's
  start: a recurrence cannot skip tokens), plus the template's few markers;
- regenerate prefills only the generation prompt; edit goes back to the nearest
  snapshot before the edited message;
- every reply equals a fresh session's greedy reply for the same history;
- the snapshots stay bounded in number, and their memory is reported.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

import qwen_mlx  # noqa: E402
from hybrid_fixtures import build_case_with_tokenizer  # noqa: E402
from qwen_mlx.generate.generation import ChatSession  # noqa: E402

MESSAGES = ["the quick brown fox", "jumps over the lazy dog", "hello world, this is a test",
            "def main(): return 42", "user assistant system"]
OVERHEAD = 12  # the template's markers around a new message and the generation prompt


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    case = build_case_with_tokenizer("qwen3_5-nested-untied",
                                     tmp_path_factory.mktemp("chat") / "m", "qwen3_5")
    return qwen_mlx.load(case.folder, dtype="float32")


def _turn(stream) -> tuple[str, int]:
    text, prefilled = [], 0
    for r in stream:
        text.append(r.text)
        prefilled = r.prompt_tokens
    return "".join(text), prefilled


def _fresh(model, tokenizer, messages, thinking) -> str:
    session = ChatSession(model, tokenizer, enable_thinking=thinking, messages=messages)
    return _turn(session.respond(max_tokens=8, temperature=0.0))[0]


@pytest.mark.parametrize("thinking", [False, True], ids=["no-thinking", "thinking"])
def test_turns_prefill_only_their_message_and_equal_a_fresh_session(hybrid, thinking):
    model, tokenizer = hybrid
    session = ChatSession(model, tokenizer, enable_thinking=thinking)
    previous = ""
    for i, text in enumerate(MESSAGES[:4]):
        reply, prefilled = _turn(session.send(text, max_tokens=8, temperature=0.0))
        history = len(tokenizer.apply_chat_template(session.messages[:-1],
                                                    add_generation_prompt=True,
                                                    enable_thinking=thinking))
        if i:
            new = len(tokenizer.encode(text)) + len(tokenizer.encode(previous))
            assert prefilled <= new + OVERHEAD, (i, prefilled)
        if i >= 2:
            assert prefilled < history / 2  # not the whole history, as mlx-lm must
        assert reply == _fresh(model, tokenizer, session.messages[:-1], thinking)
        previous = reply
    assert 0 < len(session._snapshots) <= session.max_snapshots
    assert session.snapshot_bytes > 0


def test_regenerate_and_edit_reuse_the_state(hybrid):
    model, tokenizer = hybrid
    session = ChatSession(model, tokenizer, enable_thinking=False)
    for text in MESSAGES[:4]:
        _turn(session.send(text, max_tokens=8, temperature=0.0))
    history = len(tokenizer.apply_chat_template(session.messages, add_generation_prompt=True,
                                                enable_thinking=False))
    reply, prefilled = _turn(session.regenerate(max_tokens=8, temperature=0.0))
    assert prefilled <= OVERHEAD
    assert reply == _fresh(model, tokenizer, session.messages[:-1], False)
    # Editing the third user message goes back to the snapshot before it, not the start.
    third = [i for i, m in enumerate(session.messages) if m["role"] == "user"][2]
    before = len(tokenizer.apply_chat_template(session.messages[:third],
                                               add_generation_prompt=False,
                                               enable_thinking=False))
    edited = session.messages[:third] + [{"role": "user", "content": "a changed message"}]
    ids = tokenizer.apply_chat_template(edited, add_generation_prompt=True,
                                        enable_thinking=False)
    # At most: the reply before the edited message (its start is the nearest snapshot),
    # the edited message and the generation prompt.
    since_reply = len(ids) - len(tokenizer.apply_chat_template(
        session.messages[:third - 1], add_generation_prompt=False, enable_thinking=False))
    reply, prefilled = _turn(session.edit(third, "a changed message", max_tokens=8,
                                          temperature=0.0))
    assert prefilled <= since_reply
    assert prefilled < history - before
    assert reply == _fresh(model, tokenizer, session.messages[:-1], False)


def test_snapshots_stay_bounded(hybrid):
    model, tokenizer = hybrid
    session = ChatSession(model, tokenizer, enable_thinking=False)
    session.max_snapshots = 3
    for i in range(6):
        _turn(session.send(MESSAGES[i % len(MESSAGES)], max_tokens=4, temperature=0.0))
        assert len(session._snapshots) <= 3
    lengths = [len(ids) for ids, _ in session._snapshots]
    assert lengths == sorted(lengths)


def test_the_chat_ui_counts_the_snapshots_in_its_kv_figure(hybrid):
    from tui.context import kv_cache_bytes

    model, tokenizer = hybrid
    session = ChatSession(model, tokenizer, enable_thinking=False)
    _turn(session.send(MESSAGES[0], max_tokens=4, temperature=0.0))
    assert session.snapshot_bytes > 0
    assert kv_cache_bytes(session) == sum(c.nbytes for c in session.cache) + session.snapshot_bytes
