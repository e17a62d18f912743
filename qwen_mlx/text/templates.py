"""Chat templates: compile and render Hugging Face Jinja chat templates as transformers does.

Checkpoints ship their prompt format as a Jinja template (``chat_template.jinja`` or the
``chat_template`` key of tokenizer_config.json). Templates are untrusted code from the Hub,
so they run in Jinja's immutable sandbox, with the same options, filters and globals as
``transformers.utils.chat_template_utils`` (transformers 5): the rendered text then matches
transformers character for character.

`SpecialTokenShield` keeps message text from turning into control tokens: before rendering,
special-token strings inside the caller's data become private-use sentinel characters, which
`QwenTokenizer` encodes back as plain text.

Runtime dependencies: the standard library, numpy and jinja2.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import QwenMLXError
from .tiktoken import QWEN1_CHAT_TEMPLATE

__all__ = ["BUILTIN_CHAT_TEMPLATE", "ChatTemplate", "SpecialTokenShield", "plain_template_data"]

# ChatML as Qwen1 builds it (spec §5), for checkpoints that ship no template.
BUILTIN_CHAT_TEMPLATE = QWEN1_CHAT_TEMPLATE

# Older jinja2 releases have known sandbox escapes, and templates are untrusted.
_MIN_JINJA = (3, 1, 6)


class _TemplateRaised(jinja2.TemplateError):
    """What a template's own ``raise_exception(...)`` call raises."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # transformers replaces Jinja's tojson, which HTML-escapes '<', '>' and '&' and would
    # change every tool schema Qwen templates print.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """``dict(...)`` and ``dict.fromkeys(...)`` for templates, without the type object itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _check_namespace_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"chat templates cannot store underscore-prefixed attributes on a namespace "
            f"(got {name!r})")


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses dunder/underscore names, which lead to CPython internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


class _GenerationTag(jinja2.ext.Extension):
    """Accept ``{% generation %}…{% endgeneration %}`` (transformers' assistant-mask markers).

    Training-oriented templates wrap assistant turns in it; rendering just emits the body.
    """

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _make_environment() -> ImmutableSandboxedEnvironment:
    version = tuple(int(p) for p in re.findall(r"\d+", jinja2.__version__)[:3])
    if version < _MIN_JINJA:
        raise QwenMLXError(f"chat templates need jinja2 >= 3.1.6 (found {jinja2.__version__}): "
                           "older versions have sandbox escapes; run pip install -U jinja2")
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


_ENV: ImmutableSandboxedEnvironment | None = None


def _environment() -> ImmutableSandboxedEnvironment:
    global _ENV
    if _ENV is None:
        _ENV = _make_environment()
    return _ENV


class ChatTemplate:
    """A compiled chat template, with where it came from for error messages.

    Args:
        source: the Jinja text.
        origin: where it came from, e.g. ``/m/chat_template.jinja``; errors name it.
    """

    def __init__(self, source: str, origin: str):
        if not isinstance(source, str):
            raise QwenMLXError(f"{origin}: a chat template must be a string, "
                               f"got {type(source).__name__}")
        self.source = source
        self.origin = origin
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise QwenMLXError(f"{origin}: the chat template is not valid Jinja "
                               f"(line {e.lineno}: {e.message}); fix or remove it") from None

    def render(self, variables: Mapping[str, Any]) -> str:
        """Render with `variables`; any failure becomes a `QwenMLXError` naming the origin."""
        try:
            return self._template.render(**variables)
        except _TemplateRaised as e:
            raise QwenMLXError(f"the chat template from {self.origin} rejected these "
                               f"messages: {e.message}") from None
        except Exception as e:
            # Whatever goes wrong here is the template's code meeting these messages (a
            # missing key, content of the wrong type, a sandbox violation), not our bug.
            raise QwenMLXError(f"the chat template from {self.origin} failed to render: "
                               f"{type(e).__name__}: {e}") from None

    def __repr__(self) -> str:
        return f"ChatTemplate(origin={self.origin!r})"


def plain_template_data(value: Any) -> Any:
    """Rebuild `value` from plain JSON-like types, as transformers does before rendering.

    Rich objects (arrays, images, models) have methods the sandbox does not know to be
    dangerous, so anything that is not a scalar, mapping, list, tuple, dataclass or pydantic
    model becomes an inert ``"<TypeName>"`` placeholder.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums...) would carry extra methods
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_template_data(k): plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_template_data(v) for v in value)
    if isinstance(value, np.generic):
        return plain_template_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_template_data(getattr(value, f.name))
                for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return plain_template_data(value.model_dump())
    return f"<{type(value).__name__}>"


# Private-use planes 15 and 16: no text means anything by them, so they can stand in for
# special tokens. Each call picks ones that occur nowhere in its inputs or template.
_PRIVATE_USE = re.compile("[\U000F0000-\U000FFFFD\U00100000-\U0010FFFD]")


def _free_private_use(taken: set[str]) -> Iterator[str]:
    for lo, hi in ((0xF0000, 0xFFFFD), (0x100000, 0x10FFFD)):
        for cp in range(lo, hi + 1):
            if chr(cp) not in taken:
                yield chr(cp)


def _strings(value: Any) -> Iterator[str]:
    """Every string in plain template data, dict keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


class SpecialTokenShield:
    """Swap special-token strings in untrusted data for sentinels, and back.

    `hide` replaces every occurrence of a special token (longest first, so a token wins
    over tokens it contains) in every string of the data, dict keys included, by one
    private-use character per token, chosen to occur nowhere in the data or `reserved`
    text. The template can then only write control tokens itself; `reveal` maps the
    sentinels in the rendered text back to the token strings, which the tokenizer encodes
    as plain text.
    """

    def __init__(self, special_tokens: Iterable[str]):
        ordered = sorted({t for t in special_tokens if t}, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def hide(self, data: Any, reserved: Iterable[str] = ()) -> tuple[Any, dict[str, str]]:
        """Return (`data` with special tokens replaced, {sentinel: token})."""
        if self._pattern is None:
            return data, {}
        texts = list(_strings(data))
        if not any(self._pattern.search(t) for t in texts):
            return data, {}
        taken = {c for t in (*texts, *reserved) for c in _PRIVATE_USE.findall(t)}
        free = _free_private_use(taken)
        sentinel_of: dict[str, str] = {}

        def swap(match: re.Match) -> str:
            token = match.group()
            if token not in sentinel_of:
                sentinel_of[token] = next(free)
            return sentinel_of[token]

        def walk(value: Any) -> Any:
            if isinstance(value, str):
                return self._pattern.sub(swap, value)
            if isinstance(value, dict):
                return {walk(k): walk(v) for k, v in value.items()}
            if isinstance(value, list):
                return [walk(v) for v in value]
            if isinstance(value, tuple):
                return tuple(walk(v) for v in value)
            return value

        hidden = walk(data)
        return hidden, {s: t for t, s in sentinel_of.items()}

    @staticmethod
    def reveal(text: str, sentinels: Mapping[str, str]) -> str:
        """Put the original token strings back in place of their sentinels."""
        if not sentinels:
            return text
        return text.translate({ord(s): t for s, t in sentinels.items()})
