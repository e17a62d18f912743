"""Tool calls: find the calls in a streamed reply and turn them into structured data.

Qwen models call a tool by writing one of two formats between ``<tool_call>`` and
``</tool_call>`` (both non-special added tokens, so they reach us as text, cut anywhere
by the stream):

- ``"json"`` (Qwen2.5, Qwen3): ``<tool_call>\\n{"name": NAME, "arguments": {...}}\\n</tool_call>``;
- ``"xml"`` (Qwen3.5, Qwen3-Coder; mlx-lm's ``qwen3_coder`` parser)::

      <tool_call>
      <function=NAME>
      <parameter=ARG>
      VALUE
      </parameter>
      ...
      </function>
      </tool_call>

`detect_tool_format` tells them apart from the chat template, as mlx-lm does; with
``"auto"`` each call's own text decides.

XML values are text; they are typed by the tool's JSON schema, following mlx-lm's
``qwen3_coder`` parser (`convert_parameter`): one newline is trimmed at each end; ``null``
is None; a parameter without a schema (no tools given, an unknown tool or parameter) stays
a string; ``string``-like types stay raw; ``integer``, ``number`` and ``boolean`` are
converted; ``object``/``array`` are JSON (else a Python literal); a schema entry without a
``type`` is decoded when it is a JSON object or array. Unlike mlx-lm, a value that does not
convert stays a string with a warning instead of failing the call, ``boolean`` accepts only
true/false (the Qwen3.5 template writes ``True``), and ``None`` is None for non-string types.

A malformed call (bad JSON, a body that is not ``<function=…>``, an unclosed tag) is never
an exception: its text is passed on as ordinary text, with a warning.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, TypedDict

__all__ = ["ToolCall", "ToolCallParser", "ToolPiece", "ParsedReply", "convert_parameter",
           "detect_tool_format", "parse_tool_calls", "TOOL_CALL_OPEN", "TOOL_CALL_CLOSE"]

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
FORMATS = ("json", "xml", "auto")

_FUNCTION = re.compile(r"\s*<function=([^\s<>]+)>(.*)</function>\s*\Z", re.S)
_PARAMETER = re.compile(r"<parameter=([^\s<>]+)>(.*?)</parameter>", re.S)
_STRING_TYPES = {"string", "str", "text", "varchar", "char", "enum"}
_BOOL_TYPES = {"boolean", "bool", "binary"}
_OBJECT_TYPES = {"object", "array", "arr"}
_INT_PREFIXES = ("int", "uint", "long", "short", "unsigned")
# Model output is untrusted: a huge literal should not cost seconds to decode.
_MAX_LITERAL = 1 << 20


class ToolCall(TypedDict):
    """One parsed call: a unique id, the function's name and its arguments."""

    id: str
    name: str
    arguments: dict[str, Any]


@dataclass
class ToolPiece:
    """A stretch of the reply: text to show, or a tool call (then `text` is empty).

    `raw` is the stretch as the model wrote it; `warnings` say why a call's text came out
    as text, or, with a call, what was odd about it (a tool that was not given, a value
    that kept its text)."""

    text: str = ""
    call: ToolCall | None = None
    raw: str = ""
    warnings: list[str] = field(default_factory=list)


@dataclass
class ParsedReply:
    """A whole reply split by `parse_tool_calls`."""

    text: str
    calls: list[ToolCall] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def detect_tool_format(template_source: str | None) -> str | None:
    """The call format a chat template teaches: "xml", "json", or None when it has no
    ``<tool_call>`` (mlx-lm's rule: qwen3_coder when ``<tool_call>`` is followed by a
    ``<function=`` line, else json_tools)."""
    if not template_source or TOOL_CALL_OPEN not in template_source:
        return None
    # A Jinja string literal spells the newline "\\n"; a raw block holds a real one.
    if any(f"<tool_call>{nl}<function=" in template_source for nl in ("\\n", "\n")):
        return "xml"
    return "json"


def _tool_schema(name: str, tools: Sequence[Mapping[str, Any]] | None) -> dict | None:
    """The properties of tool `name`'s parameters ({} when it has none), None if unknown."""
    for tool in tools or ():
        if not isinstance(tool, Mapping):
            continue
        fn = tool.get("function", tool)
        if isinstance(fn, Mapping) and fn.get("name") == name:
            params = fn.get("parameters")
            props = params.get("properties") if isinstance(params, Mapping) else None
            return dict(props) if isinstance(props, Mapping) else {}
    return None


def _schema_type(schema: Mapping[str, Any]) -> str | None:
    kind = schema.get("type")
    if isinstance(kind, (list, tuple)):  # ["integer", "null"]: the first real type
        kind = next((k for k in kind if str(k).lower() != "null"), None)
    return None if kind is None else str(kind).strip().lower()


def convert_parameter(value: str, schema: Mapping[str, Any] | None) -> tuple[Any, str | None]:
    """An XML parameter's text typed by its JSON `schema`: (value, warning or None).

    The rule is the module docstring's (mlx-lm's ``qwen3_coder``, never failing)."""
    if value.lower() == "null":
        return None, None
    if not isinstance(schema, Mapping):
        return value, None
    kind = _schema_type(schema)
    if kind is None:
        decoded = _json(value)
        return (decoded if isinstance(decoded, (dict, list)) else value), None
    if kind in _STRING_TYPES:
        return value, None
    if value.strip() == "None":
        return None, None
    if kind.startswith(_INT_PREFIXES) or kind.startswith(("num", "float")):
        try:
            number = float(value)
            whole = int(number)
        except (ValueError, OverflowError):
            return value, f"{value[:40]!r} is not a number ({kind}); kept as text"
        if number == whole:
            return whole, None
        if kind.startswith(_INT_PREFIXES):
            return value, f"{value[:40]!r} is not a whole number ({kind}); kept as text"
        return number, None
    if kind in _BOOL_TYPES:
        word = value.strip().lower()
        if word in ("true", "false"):
            return word == "true", None
        return value, f"{value[:40]!r} is not true or false ({kind}); kept as text"
    if kind in _OBJECT_TYPES or kind.startswith(("dict", "list")):
        decoded = _json(value)
        if decoded is not _FAILED:
            return decoded, None
    decoded = _literal(value)
    return (value, None) if decoded is _FAILED else (decoded, None)


_FAILED = object()


def _json(text: str) -> Any:
    if len(text) > _MAX_LITERAL:
        return _FAILED
    try:
        return json.loads(text, strict=False)
    except (ValueError, RecursionError):
        return _FAILED


def _literal(text: str) -> Any:
    if len(text) > _MAX_LITERAL:
        return _FAILED
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _FAILED


def _new_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ToolCallParser:
    """Incremental splitter of reply text into text and tool calls.

    Args:
        format: "json", "xml" (only that format is a call) or "auto" (each call's text
            decides: ``<function=`` is XML, ``{`` is JSON).
        tools: the tools the model was given (JSON schemas): they type XML values, and a
            call to a tool not among them is kept but warned about.

    Feeding a text in any chunks gives the same pieces (once merged) as feeding it whole;
    the pieces' `raw` strings concatenate back to the text fed.
    """

    def __init__(self, format: str = "auto", tools: Sequence[Mapping[str, Any]] | None = None):
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        self.format, self.tools = format, list(tools) if tools is not None else None
        self._held = ""  # the end of the text, outside a call, that may begin <tool_call>
        self._body: list[str] | None = None  # the open call's text so far, in parts
        self._tail = ""  # its last characters, which may begin </tool_call>
        self.calls: list[ToolCall] = []
        self.warnings: list[str] = []

    @property
    def in_call(self) -> bool:
        """Whether the text so far ends inside an open ``<tool_call>``."""
        return self._body is not None

    def feed(self, text: str) -> list[ToolPiece]:
        """Add streamed text; returns the pieces it settles, in order.

        Linear in the text fed: a long call is kept in parts and only the end of what
        came before is searched again for the closing tag."""
        out: list[ToolPiece] = []
        while True:
            if self._body is None:
                buf, self._held = self._held + text, ""
                at = buf.find(TOOL_CALL_OPEN)
                if at < 0:
                    keep = _partial_suffix(buf, TOOL_CALL_OPEN)
                    self._held = buf[len(buf) - keep:]
                    self._text(buf[:len(buf) - keep], out)
                    return out
                self._text(buf[:at], out)
                text = buf[at + len(TOOL_CALL_OPEN):]
                self._body, self._tail = [], ""
                continue
            window = self._tail + text
            at = window.find(TOOL_CALL_CLOSE)
            if at < 0:
                self._body.append(text)
                self._tail = window[-(len(TOOL_CALL_CLOSE) - 1):]
                return out
            cut = at - len(self._tail)  # negative when the tag began in earlier text
            body = "".join(self._body)
            body = body[:len(body) + cut] if cut < 0 else body + text[:cut]
            self._body, self._tail = None, ""
            self._finish(body, out)
            text = text[cut + len(TOOL_CALL_CLOSE):]

    def flush(self) -> list[ToolPiece]:
        """End of reply: a held partial tag is text, an unclosed call is text with a warning."""
        out: list[ToolPiece] = []
        held, self._held = self._held, ""
        if self._body is not None:
            held, self._body, self._tail = "".join(self._body), None, ""
            raw = TOOL_CALL_OPEN + held
            self._reject(raw, f"a tool call was not closed with {TOOL_CALL_CLOSE}", out)
        else:
            self._text(held, out)
        return out

    def _text(self, text: str, out: list[ToolPiece]) -> None:
        if not text:
            return
        last = out[-1] if out else None
        if last is not None and last.call is None and not last.warnings:
            last.text += text
            last.raw += text
        else:
            out.append(ToolPiece(text=text, raw=text))

    def _reject(self, raw: str, why: str, out: list[ToolPiece]) -> None:
        warning = f"{why}; passed on as text: {raw[:80]!r}{'…' if len(raw) > 80 else ''}"
        self.warnings.append(warning)
        out.append(ToolPiece(text=raw, raw=raw, warnings=[warning]))

    def _finish(self, body: str, out: list[ToolPiece]) -> None:
        raw = TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE
        call, error, warnings = self._parse(body)
        if call is None:
            self._reject(raw, error, out)
            return
        if self.tools is not None and _tool_schema(call["name"], self.tools) is None:
            warnings.append(f"the model called {call['name']!r}, "
                            "which is not among the tools given")
        self.warnings.extend(warnings)
        self.calls.append(call)
        out.append(ToolPiece(call=call, raw=raw, warnings=warnings))

    def _parse(self, body: str) -> tuple[ToolCall | None, str, list[str]]:
        head = body.lstrip()
        kind = self.format
        if kind == "auto":
            kind = "xml" if head.startswith("<function=") else "json"
        return _parse_xml(body, self.tools) if kind == "xml" else _parse_json(body)


def _parse_json(body: str) -> tuple[ToolCall | None, str, list[str]]:
    text = body.strip()
    if len(text) > _MAX_LITERAL:
        return None, "a tool call's JSON is too long", []
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        return None, f"a tool call is not valid JSON ({e})", []
    if not isinstance(data, dict):
        return None, f"a tool call's JSON is a {type(data).__name__}, not an object", []
    name = data.get("name")
    if not isinstance(name, str) or not name:
        return None, "a tool call's JSON has no \"name\" string", []
    args = data.get("arguments", {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args) if args.strip() else {}
        except (ValueError, RecursionError):
            return None, f"the arguments of {name!r} are a string that is not JSON", []
    if not isinstance(args, dict):
        return None, (f"the arguments of {name!r} are a {type(args).__name__}, "
                      "not an object"), []
    return {"id": _new_id(), "name": name, "arguments": args}, "", []


def _parse_xml(body: str, tools: Sequence[Mapping[str, Any]] | None,
               ) -> tuple[ToolCall | None, str, list[str]]:
    match = _FUNCTION.match(body)
    if match is None:
        start = body.lstrip()[:30]
        if not body.lstrip().startswith("<function="):
            return None, f"a tool call should start with <function=NAME>, not {start!r}", []
        return None, "a tool call's <function=NAME> is not closed with </function>", []
    name, inner = match.group(1), match.group(2)
    schema = _tool_schema(name, tools) or {}
    args: dict[str, Any] = {}
    warnings: list[str] = []
    pos = 0
    while True:
        while pos < len(inner) and inner[pos].isspace():
            pos += 1
        if pos == len(inner):
            break
        param = _PARAMETER.match(inner, pos)
        if param is None:
            return None, (f"unexpected text in the call of {name!r}: "
                          f"{inner[pos:pos + 30]!r} (expected <parameter=NAME>…</parameter>)"), []
        key, value = param.group(1), param.group(2)
        if value.startswith("\n"):
            value = value[1:]
        if value.endswith("\n"):
            value = value[:-1]
        args[key], warning = convert_parameter(value, schema.get(key))
        if warning:
            warnings.append(f"{name}.{key}: {warning}")
        pos = param.end()
    return {"id": _new_id(), "name": name, "arguments": args}, "", warnings


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def parse_tool_calls(text: str, format: str = "auto",
                     tools: Sequence[Mapping[str, Any]] | None = None) -> ParsedReply:
    """Split a complete reply's answer into its text and its tool calls."""
    parser = ToolCallParser(format, tools)
    pieces = parser.feed(text) + parser.flush()
    return ParsedReply(text="".join(p.text for p in pieces), calls=list(parser.calls),
                       warnings=list(parser.warnings))
