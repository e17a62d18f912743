"""Streaming detokenization for byte-level BPE, the tokenizer of every Qwen generation.

A byte-level token is a run of bytes, and one UTF-8 character may straddle several tokens
(most emoji and rarer CJK characters do), so decoding token by token would emit broken
characters. `StreamingDetokenizer` feeds each token's bytes to an incremental UTF-8 decoder
that holds an incomplete character until its last byte arrives: O(token length) per token,
never a re-decode of the whole reply.

The streamed text equals ``tokenizer.decode(ids, skip_special_tokens=...)`` for any ids,
because it copies what ``tokenizers`` does (checked against 0.23):

- The ByteLevel decoder joins every token's bytes, added tokens included, with nothing in
  between, and decodes the lot with Rust's ``String::from_utf8_lossy``: one U+FFFD per
  maximal invalid subpart (Unicode's recommended practice). CPython's UTF-8 codec with
  ``errors="replace"`` follows the same practice, incrementally as well, so the two agree.
- A token string maps back through GPT-2's byte table only when every character of it is
  in the table; otherwise its UTF-8 is used. Added tokens get the same treatment, so an
  added token spelled only in table characters, say ``"café"``, decodes to Latin-1 bytes
  (and so to U+FFFD), exactly as ``tokenizers`` does.
- Ids with no token decode to nothing, and special added tokens are dropped on request.
"""

from __future__ import annotations

import codecs
from typing import Iterable

from tokenizers import Tokenizer, decoders

from ..errors import QwenMLXError
from .tiktoken import _byte_to_unicode  # the package's one copy of GPT-2's byte table

__all__ = ["StreamingDetokenizer", "TokenBytes", "special_token_ids", "token_bytes_table"]


def _unicode_to_byte() -> dict[int, int]:
    """str.translate table: vocab character -> its byte, every other Latin-1 char -> U+FFFD.

    Mapping the Latin-1 characters outside GPT-2's table (space, controls, U+00AD) to a
    non-Latin-1 character makes ``encode("latin-1")`` fail on them, which is how
    `_token_bytes` notices a string that is not pure table characters.
    """
    table = {ord(c): b for b, c in _byte_to_unicode().items()}
    table.update({c: 0xFFFD for c in range(256) if c not in table})
    return table


_TO_BYTE = _unicode_to_byte()


def _token_bytes(token: str) -> bytes:
    """The bytes ``tokenizers``' ByteLevel decoder turns one token string into."""
    try:
        return token.translate(_TO_BYTE).encode("latin-1")
    except UnicodeEncodeError:
        return token.encode("utf-8")


class TokenBytes(list[bytes]):
    """A `token_bytes_table` result: ``table[id]`` is that id's bytes; ``special_ids`` the ids
    that ``skip_special_tokens`` drops."""

    special_ids: frozenset[int]


def special_token_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """Ids of the added tokens marked special (``<|im_end|>`` yes; Qwen3's ``<think>`` no)."""
    return frozenset(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)


def token_bytes_table(tokenizer: Tokenizer) -> TokenBytes:
    """For each id, the exact bytes it contributes to ``tokenizer.decode``; b"" for ids
    with no token. The result also carries ``special_ids``. About 0.2 s for Qwen's vocabulary.

    Raises `QwenMLXError` unless the tokenizer decodes with ``decoders.ByteLevel``, the only
    decoder whose output this reproduces.
    """
    if not isinstance(tokenizer.decoder, decoders.ByteLevel):
        raise QwenMLXError(f"streaming detokenization needs a byte-level BPE tokenizer, but "
                           f"this one's decoder is {tokenizer.decoder!r}")
    added = tokenizer.get_added_tokens_decoder()
    size = max(tokenizer.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1)
    # id_to_token looks in the added vocabulary first, then the model, exactly as decode()
    # does; it is also faster than get_vocab() for 151k tokens.
    token = tokenizer.id_to_token
    table = TokenBytes(b"" if (t := token(i)) is None else _token_bytes(t) for i in range(size))
    table.special_ids = special_token_ids(tokenizer)
    return table


def _dead_end(pending: bytes) -> bool:
    """True when held bytes can never complete a character.

    CPython's incremental decoder holds some of these (e.g. ED A1, a surrogate's
    start) until more bytes come, while a full decode already shows them as
    U+FFFD; flushing them keeps the stream as early as a full decode.
    """
    if len(pending) < 2:
        return False
    need = 3 if pending[0] < 0xF0 else 4
    try:
        (pending + b"\x80" * (need - len(pending))).decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


class StreamingDetokenizer:
    """Turns token ids into text one at a time, emitting each character once it is complete.

    ``"".join(add_token(i) for i in ids) + finalize()`` equals
    ``tokenizer.decode(ids, skip_special_tokens=skip_special)``.
    """

    def __init__(self, table: list[bytes], special_ids: Iterable[int] | None = None,
                 skip_special: bool = True):
        """`table` comes from `token_bytes_table`; `special_ids` defaults to its own."""
        self._table = table
        if special_ids is None:
            special_ids = getattr(table, "special_ids", ())
        self._skip = frozenset(special_ids) if skip_special else frozenset()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._parts: list[str] = []

    def add_token(self, token_id: int) -> str:
        """Add one id; returns the text it completes (often "" mid-character)."""
        token_id = int(token_id)
        if token_id in self._skip or not 0 <= token_id < len(self._table):
            return ""
        text = self._decoder.decode(self._table[token_id])
        if _dead_end(self._decoder.getstate()[0]):
            text += self._decoder.decode(b"", final=True)
        if text:
            self._parts.append(text)
        return text

    def finalize(self) -> str:
        """End the stream: incomplete trailing bytes become U+FFFD, as in a full decode."""
        text = self._decoder.decode(b"", final=True)
        if text:
            self._parts.append(text)
        return text

    @property
    def text(self) -> str:
        """Everything emitted so far (costs O(length); `add_token` results are cheaper)."""
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def reset(self) -> None:
        """Forget all text and pending bytes, ready for a new stream."""
        self._decoder.reset()
        self._parts.clear()
