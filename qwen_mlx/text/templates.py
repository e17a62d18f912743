"""Chat templates: compile and render Hugging Face Jinja chat templates as transformers does.

Checkpoints ship their prompt format as a Jinja template (``chat_template.jinja`` or the
``chat_template`` key of tokenizer_config.json). Templates are untrusted code from the Hub,
so they run in Jinja's immutable sandbox, with the same options, filters and globals as
``transformers.utils.chat_template_utils`` (transformers 5): the rendered text then matches
transformers character for character.

Templates can also try to exhaust the machine (``{{ 'x' * 10000000000 }}``, nested
``range(99999)`` loops). Each render is bounded: no single value (string, list, number)
may grow past a size limit, checked before the operations that could build one in a
single step (``*``, ``+``, ``~``, ``%``, ``**``, ``join``, ``replace``, widths...); the
output is capped; and a watchdog stops a render that runs too long or grows the
process's memory too much. Each becomes a `QwenMLXError` naming the template's file.

`SpecialTokenShield` keeps message text from turning into control tokens: before rendering,
special-token strings inside the caller's data become private-use sentinel characters, which
`QwenTokenizer` encodes back as plain text.

Runtime dependencies: the standard library, numpy and jinja2.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import os
import re
import string
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.filters
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import _PassArg

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
    if indent is not None and len(indent if isinstance(indent, str) else " " * min(
            int(indent) if isinstance(indent, int) else 0, 10 ** 6)) > 64:
        raise _TemplateTooBig(f"tojson's indent {indent!r} is too wide (at most 64)")
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


# ------------------------------------------------------------------ render limits

# Wall-clock seconds one render may take (a real chat renders in milliseconds).
RENDER_SECONDS = 10.0
# How much one render may grow the process's resident memory.
RENDER_MEMORY_BYTES = 1 << 30
# Items (characters, list entries, digits' bytes) one value or the output may hold, at
# least; a render may always use a few times the size of its inputs.
MIN_RENDER_SIZE = 4 * 1024 * 1024


class _TemplateTooBig(jinja2.TemplateError):
    """A value or the output would pass the render's size limit."""


class _RenderAborted(Exception):
    """Raised into a rendering thread by the watchdog (time or memory ran out)."""


_limits = threading.local()


def _size_limit() -> int:
    return getattr(_limits, "size", MIN_RENDER_SIZE)


def _weight(value: Any, budget: int) -> int:
    """Roughly how many items `value` holds (characters of its strings, entries of its
    containers), counted up to `budget` (then budget + 1). Shared parts count each time
    they appear, as they would in text."""
    if isinstance(value, (str, bytes)):  # the common case, kept cheap
        return len(value)
    memo: dict[int, int] = {}

    def walk(x: Any, left: int) -> int:
        if isinstance(x, (str, bytes)):
            return len(x)
        if isinstance(x, int) and not isinstance(x, bool):
            return x.bit_length() // 8
        if not isinstance(x, (list, tuple, dict, set, frozenset)):
            return 1
        if id(x) in memo:
            return memo[id(x)]
        total = len(x)
        items = (y for kv in x.items() for y in kv) if isinstance(x, dict) else iter(x)
        for y in items:
            if total > left:
                break
            total += walk(y, left - total)
        memo[id(x)] = total
        return total

    return walk(value, budget)


def _check(size: int, what: str) -> None:
    limit = _size_limit()
    if size > limit:
        raise _TemplateTooBig(f"{what} would hold about {size:,} items, past the limit of "
                              f"{limit:,} for one render")


def _check_value(value: Any, what: str) -> Any:
    limit = _size_limit()
    _check(_weight(value, limit), what)
    return value


def _check_ints(args: Iterable[Any], what: str) -> None:
    limit = _size_limit()
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > limit:
            raise _TemplateTooBig(f"{what} got the number {a:,}, past the limit of {limit:,} "
                                  "for sizes and counts")


_PRINTF_NUMBERS = re.compile(r"%[#0 +\-]*(\*|\d+)?(?:\.(\*|\d+))?")
_SPEC_NUMBERS = re.compile(r"\d+")


def _check_printf(fmt: str, args: Any) -> None:
    star = False
    for m in _PRINTF_NUMBERS.finditer(fmt):
        for g in m.groups():
            if g == "*":
                star = True
            elif g:
                _check_ints([int(g)], "a % format width")
    if star:
        _check_ints(args if isinstance(args, tuple) else (args,), "a % format width")


def _check_str_format(fmt: str) -> None:
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # str.format itself reports it
    for _, _, spec, _ in fields:
        for number in _SPEC_NUMBERS.findall(spec or ""):
            _check_ints([int(number)], "a format width")


def _checked_join(sep: str, items: Iterable[Any]) -> str:
    items = [x if isinstance(x, str) else str(x) for x in items]
    _check(sum(map(len, items)) + len(sep) * max(len(items) - 1, 0), "a joined string")
    return sep.join(items)


def _check_replace(s: str, old: str, new: str, count: Any = -1) -> None:
    n = len(s) + 1 if old == "" else s.count(old)
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    _check(len(s) + n * max(len(new) - len(old), 0), "a replaced string")


def _check_str_call(obj: Any, args: tuple, kwargs: dict) -> None:
    """Calls of str methods that can build a huge string in one step."""
    target = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
    owner, name = getattr(target, "__self__", None), getattr(target, "__name__", "")
    if not isinstance(owner, str):
        return
    if name == "replace" and len(args) >= 2:
        _check_replace(owner, str(args[0]), str(args[1]), args[2] if len(args) > 2 else -1)
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(size, int):
            _check(len(owner) + owner.count("\t") * size, "an expanded string")
    elif name in ("format", "format_map"):
        _check_str_format(owner)


class _LimitedCodeGenerator(CodeGenerator):
    """Routes ``a ~ b`` through a size check (Jinja joins it in one step)."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Any) -> None:
        if frame.eval_ctx.volatile or frame.eval_ctx.autoescape:
            return super().visit_Concat(node, frame)
        self.write("environment.limited_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _LimitedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with every step that could build a huge value in one go checked."""

    code_generator_class = _LimitedCodeGenerator
    intercepted_binops = frozenset({"*", "+", "%", "**"})

    @staticmethod
    def limited_concat(parts: tuple) -> str:
        return _checked_join("", parts)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        sized = (str, bytes, list, tuple)
        if operator == "*":
            seq, n = (left, right) if isinstance(left, sized) else (right, left)
            if isinstance(seq, sized) and isinstance(n, int) and n > 0:
                # Counting stops once n copies would pass the limit anyway.
                _check(_weight(seq, _size_limit() // n) * n, "a repeated string or list")
        elif operator == "+" and isinstance(left, str) and isinstance(right, str):
            _check(len(left) + len(right), "a joined string")
        elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
            limit = _size_limit()
            _check(_weight(left, limit) + _weight(right, limit), "a joined string or list")
        elif operator == "%" and isinstance(left, str):
            _check_printf(left, right)
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if abs(left) > 1 and right > 0:
                _check(left.bit_length() * right // 8, "a power")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _check_ints([*args, *kwargs.values()], f"{getattr(__obj, '__name__', 'a call')}()")
        _check_str_call(__obj, args, kwargs)
        target = getattr(__obj, "__wrapped__", __obj)
        if isinstance(getattr(target, "__self__", None), str) and \
                getattr(target, "__name__", "") == "join" and len(args) == 1 and not kwargs:
            return _checked_join(target.__self__, args[0])
        return super().call(__context, __obj, *args, **kwargs)


def _limited_filter(name: str, f: Any) -> Any:
    """`f` with its size and count arguments checked, and its result."""
    skip = 1 if _PassArg.from_obj(f) is not None else 0

    @functools.wraps(f)
    def checked(*args: Any, **kwargs: Any) -> Any:
        value, rest = (args[skip], args[skip + 1:]) if len(args) > skip else (None, ())
        _check_ints([*rest, *kwargs.values()], f"the '{name}' filter")
        if name == "join":
            sep = rest[0] if rest else kwargs.get("d", "")
            items = list(value)
            attribute = rest[1] if len(rest) > 1 else kwargs.get("attribute")
            if attribute is not None:
                env = args[0].environment
                items = list(map(jinja2.filters.make_attrgetter(env, attribute), items))
            return _checked_join(str(sep), items)
        if name == "replace" and len(rest) >= 2:
            _check_replace(str(value), str(rest[0]), str(rest[1]),
                           rest[2] if len(rest) > 2 else kwargs.get("count", -1))
        elif name == "indent":
            width = rest[0] if rest else kwargs.get("width", 4)
            width = len(width) if isinstance(width, str) else width
            if isinstance(width, int):
                text = str(value)
                _check(len(text) + (text.count("\n") + 1) * width, "an indented string")
        elif name == "wordwrap":
            wrap = kwargs.get("wrapstring", rest[2] if len(rest) > 2 else None)
            if isinstance(wrap, str):
                _check(len(str(value)) * (len(wrap) + 1), "a wrapped string")
        elif name == "format" and isinstance(value, str):
            _check_printf(value, tuple(rest) if rest else kwargs)
        elif name in ("string", "list", "pprint", "tojson", "safe", "e", "escape"):
            _check_value(value, f"the '{name}' filter's input")
        return f(*args, **kwargs)

    return checked


def _finalize(value: Any) -> Any:
    """Every value a template prints passes here, before str()."""
    if not isinstance(value, str):
        _check_value(value, "a printed value")
    return value


class _Watchdog:
    """One thread that stops renders running past their deadline or memory budget, by
    raising `_RenderAborted` in the rendering thread (checked between bytecodes, so a
    loop in a template stops; single huge steps are prevented by the size checks)."""

    interval = 0.01

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[int, dict] = {}  # thread id -> render
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, seconds: float, memory: int) -> dict:
        job = {"tid": threading.get_ident(), "deadline": time.monotonic() + seconds,
               "rss": _rss() + memory, "reason": None, "done": False}
        with self._lock:
            self._active[job["tid"]] = job
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name="qwen-mlx-template-watchdog")
                self._thread.start()
        self._wake.set()
        return job

    def finish(self, job: dict) -> None:
        with self._lock:
            job["done"] = True
            self._active.pop(job["tid"], None)
            if job["reason"] is not None:
                # Fired, maybe not delivered yet: clear it so it cannot land elsewhere.
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(job["tid"]), None)

    def _loop(self) -> None:
        while True:
            with self._lock:
                idle = not self._active
            if idle:
                self._wake.wait()
                self._wake.clear()
                continue
            time.sleep(self.interval)
            now, rss = time.monotonic(), _rss()
            with self._lock:
                for job in self._active.values():
                    if job["done"] or job["reason"] is not None:
                        continue
                    if now > job["deadline"]:
                        job["reason"] = "time"
                    elif rss > job["rss"]:
                        job["reason"] = "memory"
                    else:
                        continue
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(
                        ctypes.c_ulong(job["tid"]), ctypes.py_object(_RenderAborted))


def _rss() -> int:
    """This process's resident memory in bytes (its peak where the current is unknown)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


_WATCHDOG = _Watchdog()


def _make_environment() -> ImmutableSandboxedEnvironment:
    version = tuple(int(p) for p in re.findall(r"\d+", jinja2.__version__)[:3])
    if version < _MIN_JINJA:
        raise QwenMLXError(f"chat templates need jinja2 >= 3.1.6 (found {jinja2.__version__}): "
                           "older versions have sandbox escapes; run pip install -U jinja2")
    env = _LimitedEnvironment(
        trim_blocks=True, lstrip_blocks=True, finalize=_finalize,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters.update({name: _limited_filter(name, f) for name, f in env.filters.items()})
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
        except (RecursionError, MemoryError) as e:  # a pathologically nested source
            raise QwenMLXError(f"{origin}: the chat template cannot be compiled "
                               f"({type(e).__name__}); fix or remove it") from None

    def render(self, variables: Mapping[str, Any]) -> str:
        """Render with `variables`; any failure becomes a `QwenMLXError` naming the origin.

        The render is bounded (see the module docstring): values and the output may hold
        a few times the inputs' size (at least `MIN_RENDER_SIZE` items), it may take
        `RENDER_SECONDS` and grow the process by `RENDER_MEMORY_BYTES`."""
        limit = max(MIN_RENDER_SIZE, 4 * _weight(dict(variables), 1 << 40))
        previous = getattr(_limits, "size", None)
        _limits.size = limit
        job = None
        try:
            try:
                job = _WATCHDOG.start(RENDER_SECONDS, RENDER_MEMORY_BYTES)
                out, total = [], 0
                for chunk in self._template.generate(**variables):
                    total += len(chunk)
                    if total > limit:
                        raise _TemplateTooBig(f"the output passed {limit:,} characters")
                    out.append(chunk)
                return "".join(out)
            finally:
                if job is not None:
                    _WATCHDOG.finish(job)
                _limits.size = previous if previous is not None else MIN_RENDER_SIZE
        except _RenderAborted:
            why = (f"ran for more than {RENDER_SECONDS:g} s" if job and job["reason"] == "time"
                   else f"grew this process's memory by more than "
                        f"{RENDER_MEMORY_BYTES / 2 ** 20:,.0f} MB")
            raise QwenMLXError(f"the chat template from {self.origin} was stopped: it {why}; "
                               "it is broken or hostile, so fix or replace it") from None
        except _TemplateTooBig as e:
            raise QwenMLXError(f"the chat template from {self.origin} was stopped: {e}; it "
                               "is broken or hostile, so fix or replace it") from None
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
