"""Request validation for the OpenAI-compatible endpoints.

Every field a request may carry is checked for type and range here, before anything
reaches the model; a bad one raises `RequestError`, which the app turns into OpenAI's
error shape (``{"error": {"message", "type", "param", "code"}}``) with status 400 (404
for a model the server does not serve). Messages name the field as a path
(``messages[2].content``) and quote at most a short piece of the bad value. Fields
OpenAI defines that do not change the reply here (``user``, ``metadata``, ...) are
accepted and ignored, as clients send them.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 4  # as OpenAI
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20
MAX_SEED = 2 ** 63 - 1
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")


class RequestError(Exception):
    """A request the server refuses: `status`, a message naming `param`, OpenAI's type/code."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status
        self.type, self.code = type, code

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI's clients parse."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def show(value: Any, limit: int = 40) -> str:
    """A short, safe rendering of a client's value for an error message."""
    text = json.dumps(value, ensure_ascii=True, default=lambda v: type(v).__name__) \
        if not isinstance(value, str) else json.dumps(value, ensure_ascii=True)
    return text if len(text) <= limit else text[:limit] + "..."


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null", int: "an integer", float: "a number"}.get(type(value),
                                                                         type(value).__name__)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _need(ok: bool, param: str, what: str, value: Any) -> None:
    if not ok:
        raise RequestError(f"{param} must be {what}, got {_type_name(value)} {show(value)}",
                           param)


def _bool(body: Mapping, key: str, default: bool | None = None, where: str = "") -> Any:
    v = body.get(key)
    if v is None:
        return default
    _need(isinstance(v, bool), where + key, "true or false", v)
    return v


def _int(body: Mapping, key: str, low: int | None = None, high: int | None = None,
         where: str = "") -> int | None:
    v = body.get(key)
    if v is None:
        return None
    name = where + key
    _need(_is_int(v), name, "an integer", v)
    if (low is not None and v < low) or (high is not None and v > high):
        rule = (f"from {low} to {high}" if low is not None and high is not None
                else f"at least {low}" if low is not None else f"at most {high}")
        raise RequestError(f"{name} {v} is out of range: it must be {rule}", name)
    return int(v)


def _num(body: Mapping, key: str, low: float | None = None, high: float | None = None, *,
         low_open: bool = False, high_open: bool = False) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    _need(_is_num(v) and math.isfinite(v), key, "a finite number", v)
    bad = ((low is not None and (v <= low if low_open else v < low))
           or (high is not None and (v >= high if high_open else v > high)))
    if bad:
        lo = "" if low is None else f"{'above' if low_open else 'at least'} {low:g}"
        hi = "" if high is None else f"{'below' if high_open else 'at most'} {high:g}"
        raise RequestError(f"{key} {v!r} is out of range: it must be "
                           f"{' and '.join(x for x in (lo, hi) if x)}", key)
    return float(v)


def _str(value: Any, param: str, *, empty: bool = True) -> str:
    _need(isinstance(value, str), param, "a string", value)
    if not empty and not value:
        raise RequestError(f"{param} must not be empty", param)
    return value


@dataclass
class GenerationRequest:
    """What both endpoints ask for, validated."""

    model: str
    max_tokens: int | None
    stream: bool
    include_usage: bool
    sampling: dict[str, Any]  # stream_generate's sampling keywords that the request gives
    stop: list[str]
    logprobs: bool
    top_logprobs: int
    # chat only
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str = "auto"  # "none", "auto" or "required" (a named function too)
    tool_name: str | None = None  # the function a named tool_choice forces
    enable_thinking: bool | None = None
    json_object: bool = False
    # completions only
    prompt: str | list[int] | None = None


def check_model(body: Mapping, served: list[str]) -> str:
    """The served model the request names (the first served name when it names none).

    Only names the server was started with are accepted: never a path to load."""
    v = body.get("model")
    if v is None:
        return served[0]
    _str(v, "model")
    if v not in served:
        raise RequestError(f"the model {show(v)} is not served here; this server serves "
                           f"{', '.join(map(repr, served))} (see GET /v1/models)", "model",
                           status=404, code="model_not_found")
    return v


def _common(body: Mapping, served: list[str], max_tokens_limit: int) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {_type_name(body)}")
    n = _int(body, "n", 1)
    if n not in (None, 1):
        raise RequestError(f"n {n} is not supported: this server returns one choice (n=1)",
                           "n")
    limit = max_tokens_limit
    max_tokens = _int(body, "max_completion_tokens", 1, limit)
    legacy = _int(body, "max_tokens", 1, limit)
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        _need(isinstance(options, dict), "stream_options", "an object", options)
        include_usage = bool(_bool(options, "include_usage", False, "stream_options."))
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    else:
        _need(isinstance(stop, list), "stop", "a string or an array of strings", stop)
        stops = [_str(s, f"stop[{i}]") for i, s in enumerate(stop)]
    if len(stops) > MAX_STOP:
        raise RequestError(f"stop has {len(stops)} strings; at most {MAX_STOP} are allowed",
                           "stop")
    for i, s in enumerate(stops):
        if len(s) > MAX_STOP_CHARS:
            raise RequestError(f"stop[{i}] is {len(s)} characters; at most {MAX_STOP_CHARS}",
                               f"stop[{i}]")
    top_k = _int(body, "top_k", -1)
    values = dict(
        temperature=_num(body, "temperature", 0, 2),
        top_p=_num(body, "top_p", 0, 1, low_open=True),
        top_k=0 if top_k == -1 else top_k,  # vLLM's -1 means off, as our 0
        min_p=_num(body, "min_p", 0, 1, high_open=True),
        repetition_penalty=_num(body, "repetition_penalty", 0, None, low_open=True),
        presence_penalty=_num(body, "presence_penalty", -2, 2),
        frequency_penalty=_num(body, "frequency_penalty", -2, 2),
        seed=_int(body, "seed", 0, MAX_SEED))
    sampling = {k: v for k, v in values.items() if v is not None}
    return dict(model=check_model(body, served), max_tokens=max_tokens or legacy,
                stream=stream, include_usage=include_usage, sampling=sampling, stop=stops)


def _content(value: Any, param: str) -> str | None:
    """Message content as text: a string, null, or an array of text parts."""
    if value is None or isinstance(value, str):
        return value
    _need(isinstance(value, list), param, "a string or an array of content parts", value)
    texts = []
    for i, part in enumerate(value):
        where = f"{param}[{i}]"
        _need(isinstance(part, dict), where, "an object", part)
        kind = part.get("type")
        if kind != "text":
            what = show(kind)
            raise RequestError(f"{where}.type {what} is not supported: this server runs "
                               "the language model only, so send text parts (\"text\")",
                               f"{where}.type")
        texts.append(_str(part.get("text"), f"{where}.text"))
    return "".join(texts)


def _tool_calls(value: Any, param: str) -> list[dict[str, Any]]:
    _need(isinstance(value, list), param, "an array", value)
    calls = []
    for j, call in enumerate(value):
        where = f"{param}[{j}]"
        _need(isinstance(call, dict), where, "an object", call)
        fn = call.get("function")
        _need(isinstance(fn, dict), f"{where}.function", "an object", fn)
        name = _str(fn.get("name"), f"{where}.function.name", empty=False)
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise RequestError(f"{where}.function.arguments is not valid JSON: "
                                   f"{show(args)}", f"{where}.function.arguments") from None
        _need(isinstance(args, dict), f"{where}.function.arguments",
              "a JSON object (as a string)", args)
        out = {"type": "function", "function": {"name": name, "arguments": args}}
        if call.get("id") is not None:
            out["id"] = _str(call["id"], f"{where}.id")
        calls.append(out)
    return calls


def _messages(value: Any) -> list[dict[str, Any]]:
    _need(isinstance(value, list), "messages", "an array of messages", value)
    if not value:
        raise RequestError("messages must hold at least one message", "messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        _need(isinstance(m, dict), where, "an object", m)
        role = m.get("role")
        _str(role, f"{where}.role")
        if role not in ROLES:
            raise RequestError(f"{where}.role {show(role)} is not one of "
                               f"{', '.join(ROLES)}", f"{where}.role")
        msg: dict[str, Any] = {"role": "system" if role == "developer" else role,
                               "content": _content(m.get("content"), f"{where}.content")}
        if role == "assistant":
            if m.get("tool_calls") is not None:
                msg["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
            for key in ("reasoning_content", "reasoning"):
                if m.get(key) is not None:
                    msg["reasoning_content"] = _str(m[key], f"{where}.{key}")
        elif msg["content"] is None:
            raise RequestError(f"{where}.content is missing: a {role} message needs text",
                               f"{where}.content")
        if role == "tool":
            if m.get("tool_call_id") is not None:
                msg["tool_call_id"] = _str(m["tool_call_id"], f"{where}.tool_call_id")
        if m.get("name") is not None:
            msg["name"] = _str(m["name"], f"{where}.name")
        if role == "assistant" and msg["content"] is None and "tool_calls" not in msg:
            msg["content"] = ""
        out.append(msg)
    return out


def _tools(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    _need(isinstance(value, list), "tools", "an array of tools", value)
    tools = []
    for i, t in enumerate(value):
        where = f"tools[{i}]"
        _need(isinstance(t, dict), where, "an object", t)
        if t.get("type", "function") != "function":
            raise RequestError(f"{where}.type {show(t.get('type'))} is not supported: only "
                               "\"function\" tools", f"{where}.type")
        fn = t.get("function")
        _need(isinstance(fn, dict), f"{where}.function", "an object", fn)
        name = _str(fn.get("name"), f"{where}.function.name")
        if not _TOOL_NAME.match(name):
            raise RequestError(f"{where}.function.name {show(name)} must be 1 to 64 letters, "
                               "digits, underscores or dashes", f"{where}.function.name")
        clean: dict[str, Any] = {"name": name}
        if fn.get("description") is not None:
            clean["description"] = _str(fn["description"], f"{where}.function.description")
        params = fn.get("parameters")
        if params is not None:
            _need(isinstance(params, dict), f"{where}.function.parameters",
                  "a JSON schema object", params)
            clean["parameters"] = params
        tools.append({"type": "function", "function": clean})
    return tools or None


def _tool_choice(value: Any, tools: list | None) -> tuple[str, str | None]:
    """("none" | "auto" | "required", the function a named choice forces or None)."""
    if value is None:
        return "auto", None
    if isinstance(value, str):
        if value not in ("none", "auto", "required"):
            raise RequestError(f"tool_choice {show(value)} is not none, auto, required or a "
                               "function", "tool_choice")
        if value == "required" and not tools:
            raise RequestError("tool_choice \"required\" needs tools to call", "tool_choice")
        return value, None
    _need(isinstance(value, dict), "tool_choice", "a string or an object", value)
    if value.get("type", "function") != "function":
        raise RequestError(f"tool_choice.type {show(value.get('type'))} is not supported: "
                           "only \"function\"", "tool_choice.type")
    fn = value.get("function")
    _need(isinstance(fn, dict), "tool_choice.function", "an object", fn)
    name = _str(fn.get("name"), "tool_choice.function.name")
    names = [t["function"]["name"] for t in tools or ()]
    if name not in names:
        given = f"tools has {', '.join(map(show, names))}" if names else "no tools are given"
        raise RequestError(f"tool_choice names the function {show(name)}, which is not in "
                           f"tools ({given})", "tool_choice.function.name")
    return "required", name


def parse_chat(body: Any, served: list[str], max_tokens_limit: int) -> GenerationRequest:
    """A /v1/chat/completions body, validated."""
    common = _common(body, served, max_tokens_limit)
    messages = _messages(body.get("messages"))
    tools = _tools(body.get("tools"))
    choice, tool_name = _tool_choice(body.get("tool_choice"), tools)
    thinking = _bool(body, "enable_thinking")
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        _need(isinstance(kwargs, dict), "chat_template_kwargs", "an object", kwargs)
        inner = _bool(kwargs, "enable_thinking", None, "chat_template_kwargs.")
        thinking = inner if inner is not None else thinking
    fmt = body.get("response_format")
    json_object = False
    if fmt is not None:
        _need(isinstance(fmt, dict), "response_format", "an object", fmt)
        kind = fmt.get("type")
        if kind not in ("text", "json_object"):
            raise RequestError(f"response_format.type {show(kind)} is not supported: use "
                               "\"text\" or \"json_object\"", "response_format.type")
        json_object = kind == "json_object"
        if json_object and choice == "required":
            raise RequestError("response_format json_object cannot be combined with a forced "
                               "tool_choice: the reply would be a tool call, not JSON content",
                               "response_format")
        if json_object and not any("json" in (m.get("content") or "").lower()
                                   for m in messages):
            raise RequestError("response_format json_object needs the messages to ask for "
                               "JSON (say \"JSON\" in a message), as OpenAI requires",
                               "messages")
    logprobs = bool(_bool(body, "logprobs", False))
    top = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
    if top and not logprobs:
        raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
    return GenerationRequest(**common, logprobs=logprobs, top_logprobs=top, messages=messages,
                             tools=None if choice == "none" else tools, tool_choice=choice,
                             tool_name=tool_name,
                             enable_thinking=thinking, json_object=json_object)


def parse_completion(body: Any, served: list[str], max_tokens_limit: int,
                     ) -> GenerationRequest:
    """A /v1/completions body, validated (one prompt: a string or token ids)."""
    common = _common(body, served, max_tokens_limit)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list):
        if not prompt or not all(_is_int(t) for t in prompt):
            raise RequestError("prompt must be a string or an array of token ids (integers), "
                               "one prompt per request", "prompt")
        prompt = [int(t) for t in prompt]
    else:
        _str(prompt, "prompt", empty=False)
    if _bool(body, "echo", False):
        raise RequestError("echo is not supported", "echo")
    if body.get("suffix") is not None:
        raise RequestError("suffix is not supported", "suffix")
    top = _int(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    if common["max_tokens"] is None:
        common["max_tokens"] = 16  # OpenAI's default for completions
    return GenerationRequest(**common, logprobs=top is not None, top_logprobs=top or 0,
                             prompt=prompt)
