"""qwen_mlx.text.thinking: the reasoning/answer split of a streamed reply, the soft switch,
and strip_reasoning against the real Qwen3 chat template."""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest
from hypothesis import given, settings, strategies as st

from qwen_mlx.text.thinking import ThinkingParser, strip_reasoning, thinking_enabled

TEMPLATE = Path(__file__).parent / "fixtures" / "templates" / "qwen3.jinja"


def merge(pieces):
    """Join adjacent pieces of one phase, as one feed would."""
    out: list[tuple[str, str]] = []
    for phase, text in pieces:
        if out and out[-1][0] == phase:
            out[-1] = (phase, out[-1][1] + text)
        else:
            out.append((phase, text))
    return out


def run(chunks, **kwargs):
    """Feed `chunks`, flush, and check the parser's own bookkeeping on the way."""
    parser = ThinkingParser(**kwargs)
    pieces = []
    for chunk in chunks:
        got = parser.feed(chunk)
        assert got == merge(got) and all(text for _, text in got)
        pieces += got
    pieces += parser.flush()
    pieces = merge(pieces)
    assert parser.thinking_text == "".join(t for p, t in pieces if p == "thinking")
    assert parser.answer_text == "".join(t for p, t in pieces if p == "answer")
    return pieces


def reference(text, in_thinking=False):
    """The trimming rules stated on the whole text: each thinking segment is stripped, and
    an answer segment that follows </think> loses its leading newlines."""
    pieces, phase, after_close = [], "thinking" if in_thinking else "answer", False
    while True:
        segment, found, text = text.partition("</think>" if phase == "thinking" else "<think>")
        if phase == "thinking":
            segment = segment.strip()
        elif after_close:
            segment = segment.lstrip("\r\n")
        if segment:
            pieces.append((phase, segment))
        if not found:
            return merge(pieces)
        after_close = phase == "thinking"
        phase = "answer" if phase == "thinking" else "thinking"


# (reply, in_thinking, expected pieces)
REPLIES = {
    "thinking_on": (
        "<think>\nOkay, the user asks for 2+2.\n\nThat is 4.\n</think>\n\n2 + 2 = **4**.",
        False,
        [("thinking", "Okay, the user asks for 2+2.\n\nThat is 4."),
         ("answer", "2 + 2 = **4**.")]),
    "empty_block": (
        "<think>\n\n</think>\n\nHello! How can I help you today?",
        False, [("answer", "Hello! How can I help you today?")]),
    "template_opened": (
        "用户问的是天气。\n我应该说明我无法联网。\n</think>\n\n抱歉，我无法获取实时天气。🌦️",
        True,
        [("thinking", "用户问的是天气。\n我应该说明我无法联网。"),
         ("answer", "抱歉，我无法获取实时天气。🌦️")]),
    "template_opened_newline": (
        "\nHmm.  \n</think>\n\nOK", True, [("thinking", "Hmm."), ("answer", "OK")]),
    "two_segments": (
        "<think>\nFirst, call the tool.\n</think>\n\n<tool_call>\n{\"name\": \"f\"}\n</tool_call>"
        "<think>\nThe tool said 3.\n</think>\n\nThe answer is 3.",
        False,
        [("thinking", "First, call the tool."),
         ("answer", "<tool_call>\n{\"name\": \"f\"}\n</tool_call>"),
         ("thinking", "The tool said 3."), ("answer", "The answer is 3.")]),
    "no_tags": (
        "Plain answer from Qwen2.5.\n\n```python\nprint('hi')\n```\n",
        False, [("answer", "Plain answer from Qwen2.5.\n\n```python\nprint('hi')\n```\n")]),
    "literal_partial_tag": (
        "<think>\nShould I mention <thi tags?\n</think>\n\nType <thi then tab; a<b, 1 <th",
        False,
        [("thinking", "Should I mention <thi tags?"),
         ("answer", "Type <thi then tab; a<b, 1 <th")]),
    "lone_close_tag_in_answer": (
        "<think>\nExplain the tag.\n</think>\n\n"
        "Close a block with </think>, e.g. <think>x</think>",
        False,
        # "<think>x" opens a new segment; a </think> in the answer is only text.
        [("thinking", "Explain the tag."), ("answer", "Close a block with </think>, e.g. "),
         ("thinking", "x")]),
    "truncated_reasoning": (
        "<think>\nStill thinking about </th", False,
        [("thinking", "Still thinking about </th")]),
}


@pytest.mark.parametrize("name", REPLIES)
def test_reply_whole(name):
    reply, in_thinking, expected = REPLIES[name]
    assert run([reply], in_thinking=in_thinking) == expected
    assert reference(reply, in_thinking) == expected


@pytest.mark.parametrize("name", REPLIES)
def test_reply_every_split_point(name):
    reply, in_thinking, expected = REPLIES[name]
    for i in range(len(reply) + 1):
        assert run([reply[:i], reply[i:]], in_thinking=in_thinking) == expected, i
    assert run(list(reply), in_thinking=in_thinking) == expected


@pytest.mark.parametrize("name", REPLIES)
def test_reply_every_pair_of_split_points(name):
    reply, in_thinking, expected = REPLIES[name]
    n = len(reply)
    for i in range(0, n + 1, 3):
        for j in range(i, n + 1, 2):
            assert run([reply[:i], reply[i:j], reply[j:]], in_thinking=in_thinking) == expected


def test_trailing_thinking_whitespace_is_held_until_more_reasoning():
    parser = ThinkingParser()
    assert parser.feed("<think>\n") == [] and parser.phase == "thinking"
    assert parser.feed("Step one.\n\n") == [("thinking", "Step one.")]
    assert parser.feed("Step two.") == [("thinking", "\n\nStep two.")]
    assert parser.feed("\n</think>\n") == [] and parser.phase == "answer"
    assert parser.feed("\nDone.\n") == [("answer", "Done.\n")]
    assert parser.flush() == []
    assert parser.thinking_text == "Step one.\n\nStep two." and parser.answer_text == "Done.\n"


def test_partial_tag_is_released_as_text():
    parser = ThinkingParser(in_thinking=True)
    assert parser.feed("a </thi") == [("thinking", "a")]
    assert parser.feed("s") == [("thinking", " </this")]
    assert parser.feed(" </") == []
    assert parser.flush() == [("thinking", " </")]


def test_one_feed_merges_phases_around_an_empty_block():
    assert ThinkingParser().feed("a<think> \n</think>\n\nb") == [("answer", "ab")]


def test_custom_tags():
    parser = ThinkingParser(open_tag="<reasoning>", close_tag="</reasoning>")
    pieces = parser.feed("<reasoning>\nx\n</reason") + parser.feed("ing>\n\ny <think>")
    assert pieces == [("thinking", "x"), ("answer", "y <think>")]
    with pytest.raises(ValueError):
        ThinkingParser(open_tag="")


ANY_TEXT = st.one_of(
    st.lists(st.sampled_from(["<think>", "</think>", "<", "</", "<th", "think", "ink>", ">",
                              "/", "\n", "\n\n", " ", "\t", "\r\n", "a", "b", "é", "你", "😀"]),
             max_size=30).map("".join),
    st.text(max_size=40),
)


@settings(max_examples=400, deadline=None)
@given(text=ANY_TEXT, in_thinking=st.booleans(), data=st.data())
def test_any_chunking_equals_whole(text, in_thinking, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    whole = run([text], in_thinking=in_thinking)
    assert run(chunks, in_thinking=in_thinking) == whole == reference(text, in_thinking)


# --- soft switch ---------------------------------------------------------------------------

def user(text):
    return {"role": "user", "content": text}


@pytest.mark.parametrize("messages, enable_thinking, expected", [
    ([user("hi")], None, True),
    ([user("hi")], True, True),
    ([user("hi /think")], False, False),  # the hard switch wins
    ([user("hi /no_think")], None, False),
    ([user("hi /no_think")], True, False),
    ([user("a /no_think"), {"role": "assistant", "content": "x"}, user("b")], None, False),
    ([user("a /no_think"), {"role": "assistant", "content": "x"}, user("b /think")], None, True),
    ([{"role": "system", "content": "/no_think"}, user("hi")], None, False),
    ([{"role": "system", "content": "/no_think"}, user("hi /think")], None, True),
    ([user("first /think, then /no_think")], None, False),  # latest within a message too
    ([user("/no_think, then /think")], None, True),
    ([user("q"), {"role": "assistant", "content": "/no_think"}], None, True),  # not user/system
    ([user("q /no_think"), {"role": "tool", "content": "/think"}], None, False),
    ([user("/thinking about src/think and a/no_think")], None, True),  # not switches
    ([user("Explain./no_think")], None, False),
    ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "/no_think"}]}],
     None, False),
    ([], None, True),
    ([], False, False),
])
def test_thinking_enabled(messages, enable_thinking, expected):
    assert thinking_enabled(messages, enable_thinking) is expected


# --- strip_reasoning -----------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("<think>\nreason\n</think>\n\nanswer", ("reason", "answer")),
    ("<think>\n\n</think>\n\nanswer", ("", "answer")),
    ("reason only opened by the template\n</think>\n\nanswer", (
        "reason only opened by the template", "answer")),
    ("plain answer", ("", "plain answer")),
    ("<think>\ncut off by max_tokens", ("", "<think>\ncut off by max_tokens")),
    ("<think>\nr\n</think>\n\nwrite </think> to close", ("r", "write </think> to close")),
    ("junk<think>\nold<think>\n  r  \n</think>\n\n  a  ", ("  r  ", "  a  ")),
])
def test_strip_reasoning(text, expected):
    assert strip_reasoning(text) == expected


@pytest.fixture(scope="module")
def qwen3_template():
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(TEMPLATE.read_text())


ONE_BLOCK = st.builds(
    lambda pre, reasoning, post: pre + reasoning + "</think>" + post,
    st.sampled_from(["", "<think>", "<think>\n", "x<think>\n\n"]),
    st.text(st.sampled_from("ab \n<think>/"), max_size=12).filter(lambda s: "</think>" not in s),
    st.text(st.sampled_from("ab \n<think>"), max_size=12),
)


@settings(max_examples=200, deadline=None)
@given(reply=ONE_BLOCK)
def test_strip_reasoning_renders_like_the_template(qwen3_template, reply):
    """With one </think>, rendering (reasoning, answer) explicitly equals the template's own
    split of the raw reply."""
    reasoning, answer = strip_reasoning(reply)
    raw = [user("q"), {"role": "assistant", "content": reply}]
    split = [user("q"), {"role": "assistant", "content": answer, "reasoning_content": reasoning}]
    assert qwen3_template.render(messages=raw) == qwen3_template.render(messages=split)
