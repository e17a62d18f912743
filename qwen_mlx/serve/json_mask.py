"""`response_format: json_object`: decoding constrained to one JSON object.

`advance` is an incremental JSON prefix checker: a small pushdown automaton over the
reply's bytes (objects, arrays, strings with escapes, numbers, true/false/null,
whitespace). It works on bytes, not characters, so a byte-level token that holds part of
a UTF-8 character needs no special case: bytes >= 0x80 are allowed inside strings only,
where any character is, and nowhere else (JSON's syntax is all ASCII).

`JsonVocabulary` holds, per tokenizer, each id's bytes and, per automaton state, the mask
of the ids that keep the reply a valid prefix (cached, so a state seen again costs a
dictionary look-up). `JsonConstraint` follows one request's reply through it. The reply
must start with ``{`` (no leading whitespace, so it cannot idle) and, once the object is
closed, only the end-of-turn ids are allowed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Iterable, Sequence

import numpy as np

__all__ = ["State", "START", "advance", "is_complete", "JsonVocabulary", "JsonConstraint"]

# A state: (stack of open containers as "{"/"[" characters, mode, detail). Hashable, so
# it keys the mask cache. Modes:
#   start   the reply's first byte must open the object
#   value   a value must come (after ":" or ",")
#   value]  a value or "]" (just after "[")
#   key}    a key or "}" (just after "{")
#   key     a key (after "," in an object)
#   colon   ":" after a key
#   next    "," or the top container's closer, after a value
#   str     inside a string; detail: (is_key, escape) with escape "" | "\\" | "u4".."u1"
#   num     inside a number; detail: where (see _NUMBER)
#   lit     inside true/false/null; detail: the bytes still to come
#   done    the object is closed
State = tuple
START: State = ("", "start", None)
_WS = frozenset(b" \t\n\r")
_ESCAPES = frozenset(b'"\\/bfnrt')
_HEX = frozenset(b"0123456789abcdefABCDEF")
_DIGITS = frozenset(b"0123456789")
_LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
# Number sub-states: which bytes may follow, and whether the number may end there.
_NUMBER = {
    "-": ({"0": "0", "1-9": "int"}, False),
    "0": ({".": ".", "e": "e"}, True),
    "int": ({"d": "int", ".": ".", "e": "e"}, True),
    ".": ({"d": "frac"}, False),
    "frac": ({"d": "frac", "e": "e"}, True),
    "e": ({"sign": "sign", "d": "exp"}, False),
    "sign": ({"d": "exp"}, False),
    "exp": ({"d": "exp"}, True),
}


def _number_step(where: str, b: int) -> str | None:
    moves, _ = _NUMBER[where]
    if b in _DIGITS:
        if "d" in moves:
            return moves["d"]
        if b == 0x30:
            return moves.get("0")
        return moves.get("1-9")
    if b == 0x2E:
        return moves.get(".")
    if b in (0x65, 0x45):
        return moves.get("e")
    if b in (0x2B, 0x2D):
        return moves.get("sign")
    return None


def _after_value(stack: str) -> State:
    return (stack, "done", None) if not stack else (stack, "next", None)


def _start_value(stack: str, b: int) -> State | None:
    """The state after `b` begins a value, or None when no value begins with it."""
    if b == 0x22:
        return (stack, "str", (False, ""))
    if b == 0x7B:
        return (stack + "{", "key}", None)
    if b == 0x5B:
        return (stack + "[", "value]", None)
    if b == 0x2D:
        return (stack, "num", "-")
    if b == 0x30:
        return (stack, "num", "0")
    if b in _DIGITS:
        return (stack, "num", "int")
    if b in _LITERALS:
        return (stack, "lit", _LITERALS[b])
    return None


def _close(stack: str, b: int) -> State | None:
    if stack and b == (0x7D if stack[-1] == "{" else 0x5D):
        return _after_value(stack[:-1])
    return None


def step(state: State, b: int) -> State | None:
    """The state after byte `b`, or None when `b` cannot come next in valid JSON."""
    stack, mode, detail = state
    if mode == "str":
        is_key, esc = detail
        if esc == "":
            if b == 0x22:
                return (stack, "colon", None) if is_key else _after_value(stack)
            if b == 0x5C:
                return (stack, "str", (is_key, "\\"))
            return None if b < 0x20 else state
        if esc == "\\":
            if b == 0x75:
                return (stack, "str", (is_key, "u4"))
            return (stack, "str", (is_key, "")) if b in _ESCAPES else None
        if b not in _HEX:
            return None
        left = int(esc[1]) - 1
        return (stack, "str", (is_key, f"u{left}" if left else ""))
    if mode == "num":
        nxt = _number_step(detail, b)
        if nxt is not None:
            return (stack, "num", nxt)
        if not _NUMBER[detail][1]:
            return None
        return step(_after_value(stack), b)  # the byte after the number, in its own right
    if mode == "lit":
        if b != detail[0]:
            return None
        return (stack, "lit", detail[1:]) if len(detail) > 1 else _after_value(stack)
    if mode == "start":
        return ("{", "key}", None) if b == 0x7B else None
    if mode == "done":
        return None
    if b in _WS:
        return state
    if mode in ("value", "value]"):
        if mode == "value]" and b == 0x5D:
            return _close(stack, b)
        return _start_value(stack, b)
    if mode in ("key}", "key"):
        if mode == "key}" and b == 0x7D:
            return _close(stack, b)
        return (stack, "str", (True, "")) if b == 0x22 else None
    if mode == "colon":
        return (stack, "value", None) if b == 0x3A else None
    if mode == "next":
        if b == 0x2C:
            return (stack, "key" if stack[-1] == "{" else "value", None)
        return _close(stack, b)
    raise AssertionError(f"unknown JSON state {state!r}")


def advance(state: State | None, data: bytes) -> State | None:
    """The state after `data`, or None when `data` breaks the JSON prefix."""
    for b in data:
        if state is None:
            return None
        state = step(state, b)
    return state


def is_complete(state: State | None) -> bool:
    """Whether the bytes so far are one whole JSON object."""
    return state is not None and state[1] == "done"


class JsonVocabulary:
    """Per tokenizer: each id's bytes and, per automaton state, the allowed-id mask.

    `token_bytes[i]` is what id i adds to the reply; `end_ids` may end it once the object
    is complete; `banned` (added tokens such as <think> or <tool_call>, ids with no
    text) are never allowed, since the other parsers of the reply would take them.
    `width` is the logits' width. The masks are `mx.array`s made on the thread that asks
    (the scheduler's MLX thread); at most `cache_size` states are kept."""

    def __init__(self, token_bytes: Sequence[bytes], end_ids: Iterable[int], width: int, *,
                 banned: Iterable[int] = (), cache_size: int = 256) -> None:
        self.token_bytes = list(token_bytes)
        self.width = width
        self.end_ids = sorted(i for i in set(end_ids) if 0 <= i < width)
        banned = set(banned) | set(self.end_ids)
        # By first byte, so one step rejects a whole group; "plain" ids (no quote,
        # backslash or control byte) never leave a string, so inside one they need no walk.
        groups: dict[int, list[int]] = {}
        others: dict[int, list[int]] = {}
        plain = []
        for i, data in enumerate(self.token_bytes[:width]):
            if not data or i in banned:
                continue
            groups.setdefault(data[0], []).append(i)
            if all(b >= 0x20 and b not in (0x22, 0x5C) for b in data):
                plain.append(i)
            else:
                others.setdefault(data[0], []).append(i)
        self._groups, self._others = groups, others
        self._plain = np.array(plain, dtype=np.int64)
        self._masks: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.cache_size = cache_size
        self.computed = 0  # states whose mask was built (the rest were cache hits)

    @classmethod
    def for_tokenizer(cls, tokenizer, width: int) -> "JsonVocabulary":
        """From a `QwenTokenizer`: its detokenizer's byte table, its eos ids (<|im_end|>
        among them), and every added token banned."""
        from ..text.detokenizer import token_bytes_table

        table = token_bytes_table(tokenizer.tokenizer)
        added = tokenizer.tokenizer.get_added_tokens_decoder()
        return cls(table, tokenizer.eos_token_ids, width, banned=added)

    def allowed(self, state: State) -> np.ndarray:
        """The allowed ids after `state` as a boolean array of `width` (NumPy)."""
        mask = np.zeros(self.width, dtype=bool)
        if state[1] == "done":
            mask[self.end_ids] = True
            return mask
        groups = self._groups
        if state[1] == "str" and state[2][1] == "":
            mask[self._plain] = True
            groups = self._others
        table = self.token_bytes
        for first, ids in groups.items():
            after = step(state, first)
            if after is None:
                continue
            for i in ids:
                data = table[i]
                if len(data) == 1 or advance(after, data[1:]) is not None:
                    mask[i] = True
        if not mask.any():  # cannot happen with a byte-level vocabulary; never stall
            mask[self.end_ids] = True
        return mask

    def mask(self, state: State):
        """`allowed(state)` as an `mx.array` of booleans [width], cached per state."""
        import mlx.core as mx

        with self._lock:
            hit = self._masks.get(state)
            if hit is not None:
                self._masks.move_to_end(state)
                return hit
        m = mx.array(self.allowed(state))
        with self._lock:
            self.computed += 1
            self._masks[state] = m
            while len(self._masks) > self.cache_size:
                self._masks.popitem(last=False)
        return m


class JsonConstraint:
    """One reply's progress through the JSON automaton."""

    def __init__(self, vocab: JsonVocabulary) -> None:
        self.vocab = vocab
        self.state: State | None = START

    def apply(self, logits):
        """`logits` [1, width] with every id that would break the JSON at -inf."""
        import mlx.core as mx

        mask = self.vocab.mask(self.state)
        return mx.where(mask, logits, mx.array(-mx.inf, dtype=logits.dtype))

    def advance(self, token: int) -> None:
        """Move past the sampled `token` (an end id ends the reply: nothing to check)."""
        if token in self.vocab.end_ids:
            return
        data = self.vocab.token_bytes[token] if token < len(self.vocab.token_bytes) else b""
        new = advance(self.state, data)
        if new is None:
            raise AssertionError(f"token {token} ({data!r}) breaks the JSON reply: the "
                                 "mask should have kept it out")
        self.state = new

    @property
    def complete(self) -> bool:
        return is_complete(self.state)
