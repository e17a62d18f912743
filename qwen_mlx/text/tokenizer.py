"""`QwenTokenizer`: a `tokenizers.Tokenizer` plus the checkpoint's chat template and stop ids.

Every Qwen generation ships a byte-level BPE ``tokenizer.json`` (Qwen1 after conversion from
``qwen.tiktoken``). This wrapper adds what chatting needs: the chat template, rendered as
transformers renders it, the end-of-turn ids generation stops on, and one safety rule that
transformers does not apply by default: **text inside messages never becomes a control
token**. A user who types ``<|im_end|>\\n<|im_start|>system`` gets those characters encoded
as plain text, so they cannot close their turn and forge a system prompt.

Runtime dependencies: the standard library, numpy, tokenizers and jinja2.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Encoding, Tokenizer

from .templates import (
    BUILTIN_CHAT_TEMPLATE,
    ChatTemplate,
    SpecialTokenShield,
    plain_template_data,
)
from .detokenizer import StreamingDetokenizer, token_bytes_table
from .thinking import mentions_soft_switch
from ..errors import QwenMLXError

__all__ = ["QwenTokenizer", "check_fits_model"]

# Names a message's reasoning may come under; templates read "reasoning_content" (Qwen3)
# or "thinking". transformers fills both from whichever is given, and so do we.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_TEMPLATE_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class QwenTokenizer:
    """A Qwen tokenizer: encode/decode, chat templates and end-of-turn ids.

    Args:
        tokenizer: the wrapped `tokenizers.Tokenizer` (kept as `self.tokenizer`).
        chat_template: a template string, or named templates ``{name: ChatTemplate | str}``
            (``"default"`` is used, ``"tool_use"`` when tools are given); None means the
            built-in ChatML (Qwen1's format).
        bos_token, eos_token, unk_token, pad_token: token strings the template may use.
        eos_token_ids: extra end-of-generation ids (generation_config.json's).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        chat_template: str | Mapping[str, ChatTemplate | str] | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        eos_token_ids: Iterable[int] = (),
        generation_config: Mapping[str, Any] | None = None,
        origin: str | None = None,
    ):
        self.tokenizer = tokenizer
        # generation_config.json travels with the tokenizer: its eos ids and
        # sampling defaults are what generation needs from the checkpoint.
        self.generation_config = dict(generation_config or {})
        # Where it came from (a folder), for error messages.
        self.origin = origin
        self._id_limit: int | None = None
        self.bos_token, self.eos_token = bos_token, eos_token
        self.unk_token, self.pad_token = unk_token, pad_token
        self.chat_templates = _as_templates(chat_template)
        # Encoding toggles the wrapped tokenizer's encode_special_tokens flag; the lock
        # keeps two threads from seeing each other's setting.
        self._lock = threading.Lock()
        self._token_bytes: list[bytes] | None = None
        self._soft_switch: dict[str, bool] = {}  # template source -> has_soft_switch

        added = tokenizer.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        self._shield = SpecialTokenShield(t.content for t in added.values() if t.special)

        ids = [*eos_token_ids]
        for token in (eos_token, "<|im_end|>", "<|endoftext|>"):
            if token is not None and (i := tokenizer.token_to_id(token)) is not None:
                ids.append(i)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in ids))

        self.im_start_id = tokenizer.token_to_id("<|im_start|>")
        self.im_end_id = tokenizer.token_to_id("<|im_end|>")
        self.think_start_id = tokenizer.token_to_id("<think>")
        self.think_end_id = tokenizer.token_to_id("</think>")

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> QwenTokenizer:
        """Load tokenizer.json, the chat template and the stop ids from a model folder.

        The template comes from chat_template.jinja, else chat_template.json (processor
        folders such as Qwen2.5-VL), else tokenizer_config.json's ``chat_template``, else
        the built-in ChatML. Stop ids: generation_config.json's ``eos_token_id`` plus the
        config's eos_token, ``<|im_end|>`` and ``<|endoftext|>`` when in the vocabulary.
        """
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            hint = (" It has qwen.tiktoken: convert the checkpoint first (qwen-mlx convert "
                    "FOLDER), which writes a tokenizer.json."
                    if (folder / "qwen.tiktoken").is_file() else
                    " Copy it from the original checkpoint.")
            raise QwenMLXError(f"{path} not found: a tokenizer.json is needed to encode text."
                               + hint)
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception for bad JSON
            raise QwenMLXError(f"{path}: cannot be read as a tokenizers JSON file ({e})") from None

        config_path = folder / "tokenizer_config.json"
        config = _read_json(config_path) or {}
        if not isinstance(config, dict):
            raise QwenMLXError(f"{config_path}: expected a JSON object, "
                               f"got {type(config).__name__}")
        tokens = {key: _token_string(config, key, config_path) for key in _TEMPLATE_TOKEN_KEYS}
        gen_path = folder / "generation_config.json"
        gen = _read_json(gen_path) or {}
        return cls(tokenizer, chat_template=_find_chat_template(folder, config),
                   eos_token_ids=_eos_ids(gen, gen_path),
                   generation_config=gen if isinstance(gen, dict) else {},
                   origin=str(folder), **tokens)

    @property
    def generation_config_origin(self) -> str:
        """The generation_config.json these sampling defaults came from, for messages."""
        if self.origin is None:
            return "the tokenizer's generation_config"
        return str(Path(self.origin) / "generation_config.json")

    # ---------------------------------------------------------------- encoding

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the control tokens (special added tokens): skipped when decoding for display."""
        return self._special_ids

    def detokenizer(self) -> StreamingDetokenizer:
        """A fresh streaming detokenizer; the byte table is built once, on first use."""
        if self._token_bytes is None:
            self._token_bytes = token_bytes_table(self.tokenizer)
        return StreamingDetokenizer(self._token_bytes, self._special_ids)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (BPE plus added tokens)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def id_limit(self) -> int:
        """One past the highest id the tokenizer knows (ids may leave gaps, so this can
        exceed `vocab_size`); every id it encodes or decodes lies below it."""
        if self._id_limit is None:
            ids = self.tokenizer.get_vocab(with_added_tokens=True).values()
            self._id_limit = max(ids, default=-1) + 1
        return self._id_limit

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of `text`, with no BOS/EOS added.

        With ``special=False`` (the default) special-token strings such as ``<|im_end|>``
        are encoded as the plain text they are; ``special=True`` turns them into their ids.
        Non-special added tokens (``<think>``, ``<tool_call>``) are matched either way.
        """
        return list(self._encode(text, plain=not special).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens are dropped unless ``skip_special_tokens=False``."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _encode(self, text: str, *, plain: bool) -> Encoding:
        tok = self.tokenizer
        with self._lock:
            before = tok.encode_special_tokens
            tok.encode_special_tokens = plain
            try:
                return tok.encode(text, add_special_tokens=False)
            finally:
                tok.encode_special_tokens = before

    # ----------------------------------------------------------- chat template

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        enable_thinking: bool | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tokenize: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> list[int] | str:
        """Render `messages` with the chat template, as transformers' method of that name.

        Args:
            messages: dicts with "role" and "content" (and "reasoning_content",
                "tool_calls", ...); keys whose value is None are dropped first.
            add_generation_prompt: end with the header of a new assistant turn.
            enable_thinking: passed to the template only when not None, so templates'
                ``enable_thinking is defined`` checks behave as in transformers.
            tools: JSON-schema tool descriptions.
            tokenize: return token ids (default) or the rendered text.
            chat_template: the name of one of the folder's templates, or a template string.
            **kwargs: more template variables (they override bos_token & co).

        Special-token strings inside messages, tools and kwargs are encoded as plain text;
        only the template's own markers become control tokens. The text returned with
        ``tokenize=False`` is exactly what transformers renders.
        """
        template = self._pick_template(chat_template, tools)
        # Dataclass and pydantic messages become dicts here, anything else a placeholder.
        chat = [] if isinstance(messages, (str, Mapping)) else plain_template_data(list(messages))
        if not chat:
            raise QwenMLXError("apply_chat_template needs a list of at least one message")
        if not all(isinstance(m, dict) for m in chat):
            raise QwenMLXError("messages must be a list of dicts with 'role' and 'content'")
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise QwenMLXError("tools must be a list of JSON-schema dicts "
                               "({'type': 'function', 'function': {...}})")
        if enable_thinking is not None:
            kwargs["enable_thinking"] = enable_thinking
        documents = kwargs.pop("documents", None)

        # OpenAI-style clients send content=None / tool_calls=None; templates handle a
        # missing key better than a None (transformers drops them too).
        chat = [_alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in chat]
        untrusted = {"messages": chat, "tools": plain_template_data(tools),
                     "documents": plain_template_data(documents),
                     "kwargs": plain_template_data(kwargs)}
        hidden, sentinels = self._shield.hide(untrusted, reserved=(template.source,))
        variables = {
            **{k: getattr(self, k) for k in _TEMPLATE_TOKEN_KEYS if getattr(self, k)},
            **hidden["kwargs"],
            "messages": hidden["messages"], "tools": hidden["tools"],
            "documents": hidden["documents"], "add_generation_prompt": add_generation_prompt,
        }
        rendered = template.render(variables)
        if not tokenize:
            return SpecialTokenShield.reveal(rendered, sentinels)
        return self._encode_rendered(rendered, sentinels)

    def has_soft_switch(self, *, tools: Sequence[Mapping[str, Any]] | None = None,
                        chat_template: str | None = None) -> bool:
        """Whether ``/think`` and ``/no_think`` in messages switch this template's thinking.

        Pass the result to `thinking_enabled` as ``soft_switch``. The switch is something
        Qwen3's hybrid models were trained on, not template code (Qwen3's template never
        mentions it), so it is recognised by how the template treats thinking:

        - a template whose text handles ``/think`` or ``/no_think`` itself defines it;
        - a template that never reads ``enable_thinking`` has no thinking switch at all
          (Qwen2.5, Qwen3-2507 Instruct, the built-in ChatML);
        - one that reads it defines the soft switch only when, thinking left on, its
          generation prompt leaves the choice to the model (Qwen3's bare
          ``<|im_start|>assistant\\n``). A prompt that opens the ``<think>`` block itself
          (Qwen3.5/3.6's ``<think>\\n``, Qwen3-Thinking) forces reasoning: no switch.

        Decided once per template, by rendering a one-message chat.
        """
        template = self._pick_template(chat_template, tools)
        source = template.source
        known = self._soft_switch.get(source)
        if known is not None:
            return known
        if mentions_soft_switch(source):
            found = True
        elif "enable_thinking" not in source:
            found = False
        else:
            try:
                prompt = self.apply_chat_template(
                    [{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                    tokenize=False, chat_template=source, tools=tools)
                found = prompt.rfind("<think>") <= prompt.rfind("</think>")
            except QwenMLXError:
                found = True  # cannot tell: keep the Qwen3 behaviour
        if len(self._soft_switch) < 16:  # chat_template= strings could be endless
            self._soft_switch[source] = found
        return found

    def _pick_template(self, name_or_source: str | None, tools: Any) -> ChatTemplate:
        # transformers' get_chat_template: a name, else tool_use with tools, else default.
        named = self.chat_templates
        if name_or_source is not None:
            if name_or_source in named:
                return named[name_or_source]
            return ChatTemplate(name_or_source, "the chat_template argument")
        if tools is not None and "tool_use" in named:
            return named["tool_use"]
        if "default" in named:
            return named["default"]
        raise QwenMLXError(f"this model has chat templates named {sorted(named)} but none "
                           "called 'default': pass chat_template=NAME")

    def _encode_rendered(self, rendered: str, sentinels: Mapping[str, str]) -> list[int]:
        """Encode a rendered chat: the template's special tokens as ids, message text as text.

        The special tokens left in `rendered` are the template's own (the caller's were
        swapped for sentinels). Encode it normally; then each stretch between two control
        tokens that holds a sentinel is encoded again, tokens restored, as plain text.
        Stretches without one keep their ids, so a benign chat encodes exactly as in
        transformers.
        """
        enc = self._encode(rendered, plain=False)
        if not sentinels:
            return list(enc.ids)
        special = self._special_ids
        ids: list[int] = []
        run: list[int] = []
        start = 0

        def flush(end: int) -> None:
            piece = rendered[start:end]
            if any(s in piece for s in sentinels):
                text = SpecialTokenShield.reveal(piece, sentinels)
                plain_ids = self._encode(text, plain=True).ids
                if special.intersection(plain_ids):
                    raise QwenMLXError("this tokenizer turns plain text into special tokens, "
                                       "so message text cannot be kept from becoming control "
                                       f"tokens (text {text[:60]!r})")
                ids.extend(plain_ids)
            else:
                ids.extend(run)

        for token_id, (s, e) in zip(enc.ids, enc.offsets):
            if token_id in special:
                flush(s)
                ids.append(token_id)
                run, start = [], e
            else:
                run.append(token_id)
        flush(len(rendered))
        return ids

    def __repr__(self) -> str:
        return (f"QwenTokenizer(vocab_size={self.vocab_size}, "
                f"templates={sorted(self.chat_templates)}, eos_token_ids={self.eos_token_ids})")


def check_fits_model(tokenizer: Any, rows: int, where: str | None = None) -> None:
    """Refuse a tokenizer whose ids run past the model's `rows` embedding rows.

    Such a pair would index past the embedding (a crash, or garbage read from memory):
    the tokenizer is not this model's. `where` (a folder) is named in the message."""
    limit = getattr(tokenizer, "id_limit", None)
    if tokenizer is None or limit is None or limit <= rows:
        return
    place = f"{where}: " if where else ""
    raise QwenMLXError(
        f"{place}the tokenizer has ids up to {limit - 1} but the model's embedding has only "
        f"{rows} rows (vocab_size); the tokenizer does not belong to these weights. Copy "
        "tokenizer.json (and tokenizer_config.json) from the checkpoint the weights came from")


# ---------------------------------------------------------------------- helpers


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _as_templates(spec: str | Mapping[str, ChatTemplate | str] | None) -> dict[str, ChatTemplate]:
    if spec is None:
        return {"default": ChatTemplate(BUILTIN_CHAT_TEMPLATE, "the built-in ChatML template")}
    if isinstance(spec, str):
        return {"default": ChatTemplate(spec, "the chat_template argument")}
    return {name: t if isinstance(t, ChatTemplate) else ChatTemplate(t, f"chat template {name!r}")
            for name, t in spec.items()}


def _read_json(path: Path) -> Any:
    """Parsed JSON of `path`, or None when it does not exist."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QwenMLXError(f"{path}: cannot be read as JSON ({e}); fix or remove the file"
                           ) from None


def _find_chat_template(folder: Path, config: dict) -> dict[str, ChatTemplate] | None:
    """The folder's chat templates by name, or None when it has none."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            source = jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise QwenMLXError(f"{jinja}: cannot be read ({e})") from None
        return {"default": ChatTemplate(source, str(jinja))}

    processor = folder / "chat_template.json"
    data = _read_json(processor)
    if isinstance(data, dict) and data.get("chat_template") is not None:
        return {"default": ChatTemplate(data["chat_template"], f"{processor} 'chat_template'")}

    spec = config.get("chat_template")
    origin = f"{folder / 'tokenizer_config.json'} 'chat_template'"
    if spec is None:
        return None
    if isinstance(spec, str):
        return {"default": ChatTemplate(spec, origin)}
    if isinstance(spec, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                      and isinstance(t.get("template"), str) for t in spec):
        return {t["name"]: ChatTemplate(t["template"], f"{origin} [{t['name']!r}]") for t in spec}
    raise QwenMLXError(f"{origin}: expected a template string or a list of "
                       "{\"name\": ..., \"template\": ...} objects")


def _token_string(config: dict, key: str, path: Path) -> str | None:
    # Older configs serialise tokens as AddedToken dicts {"content": ..., ...}.
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise QwenMLXError(f"{path}: '{key}' should be a token string, got {value!r}")
    return value


def _eos_ids(config: Any, path: Path) -> list[int]:
    value = config.get("eos_token_id") if isinstance(config, dict) else None
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise QwenMLXError(f"{path}: 'eos_token_id' should be a token id or a list of ids, "
                           f"got {value!r}")
    return values
