"""`qwen-mlx serve`: tool_choice forcing and json_object constrained decoding (issue 13).

Through the official openai SDK on a real uvicorn on 127.0.0.1, on tiny checkpoints of
qwen3 (JSON tool calls) and qwen3_5 (a hybrid whose template teaches the XML form).

- tool_choice: the forced call opening is in the prompt the model sees (the reply equals
  a plain completion of the template's prompt plus that opening); a model that then
  writes a valid rest (scripted here, since a random one writes none) gives a parsed call
  of the forced function with finish_reason "tool_calls"; an unknown name is a 400.
- json_object: with random sampling every reply that stops is a JSON object, and one cut
  by max_tokens is a valid JSON prefix; the checker itself on hand-written prefixes, and
  the per-state token masks against the checker run token by token.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
openai = pytest.importorskip("openai")

from qwen_mlx.serve.app import Limits, forced_tool_opening  # noqa: E402
from qwen_mlx.serve.json_mask import START, JsonVocabulary, advance, is_complete  # noqa: E402
from serve_fixtures import Running, load_tiny  # noqa: E402

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string"}}}}}]
ASK = [{"role": "user", "content": "weather in paris? answer in json"}]
LIMITS = Limits(max_body=64 << 10, max_tokens=96, default_max_tokens=16)
FORMAT = {"qwen3": "json", "qwen3_5": "xml"}


class Scripted:
    """A model that, in every decode step, puts the next token of `script` far on top of
    its real logits (prefill is untouched): a model that writes a known reply."""

    def __init__(self, model) -> None:
        self._model = model
        self.script: list[int] = []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, tokens, cache=None, **kwargs):
        import mlx.core as mx

        logits = self._model(tokens, cache=cache, **kwargs)
        if "prompt_length" in kwargs or not self.script:  # a prefill chunk
            return logits
        token = self.script.pop(0)
        boost = mx.zeros((logits.shape[-1],)).at[token].add(1e4)
        return logits + boost


@pytest.fixture(scope="module", params=["qwen3", "qwen3_5"])
def server(request, tmp_path_factory):
    model, tokenizer = load_tiny(tmp_path_factory.mktemp(request.param) / "m", request.param)
    scripted = Scripted(model)
    # One row at a time, so the script's tokens go to the one request that runs.
    with Running(scripted, tokenizer, limits=LIMITS, max_batch=1) as srv:
        client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=30)
        yield request.param, scripted, tokenizer, srv, client


@pytest.fixture
def served(server):
    yield server
    server[1].script = []  # what a failed test left unwritten must not leak into the next


# ------------------------------------------------------------------ tool_choice


def _forced_prompt(tokenizer, fmt: str, name: str | None) -> tuple[str, list[int]]:
    forced = forced_tool_opening(fmt, name)
    ids = tokenizer.apply_chat_template(ASK, add_generation_prompt=True,
                                        enable_thinking=False, tools=TOOLS)
    return forced, ids + tokenizer.encode(forced)


@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_opening_is_in_the_prompt(served, choice):
    family, model, tokenizer, srv, client = served
    name = "get_time" if choice == "named" else None
    tool_choice = ({"type": "function", "function": {"name": name}} if name else "required")
    forced, ids = _forced_prompt(tokenizer, FORMAT[family], name)
    assert forced.startswith("<tool_call>\n") and (name is None or name in forced)
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS,
                                       tool_choice=tool_choice, max_tokens=8, temperature=0)
    assert r.usage.prompt_tokens == len(ids)
    # The random model closes no call, so the unclosed call comes back as text: the
    # forced opening, then what a plain completion of the same prompt ids writes.
    plain = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == forced + plain.choices[0].text
    assert not r.choices[0].message.tool_calls


def _rest(fmt: str, name: str | None) -> str:
    """What a model writes after the forced opening to finish a call of get_time."""
    if fmt == "xml":
        head = "" if name else "get_time>\n"
        return head + "<parameter=zone>\nUTC\n</parameter>\n</function>\n</tool_call>"
    if name:
        return '{"zone": "UTC"}}\n</tool_call>'
    return '{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("choice", ["required", "named"])
def test_a_forced_call_that_the_model_finishes_parses(served, choice, stream):
    family, model, tokenizer, srv, client = served
    name = "get_time" if choice == "named" else None
    tool_choice = ({"type": "function", "function": {"name": name}} if name else "required")
    model.script = tokenizer.encode(_rest(FORMAT[family], name)) + [tokenizer.eos_token_ids[0]]
    kwargs = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice=tool_choice,
                  max_tokens=96, temperature=0)
    if stream:
        calls, content, finish = [], "", None
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            delta = chunk.choices[0].delta
            content += delta.content or ""
            calls += delta.tool_calls or []
            finish = chunk.choices[0].finish_reason or finish
        got = [(c.function.name, json.loads(c.function.arguments)) for c in calls]
    else:
        r = client.chat.completions.create(**kwargs)
        content, finish = r.choices[0].message.content or "", r.choices[0].finish_reason
        got = [(c.function.name, json.loads(c.function.arguments))
               for c in r.choices[0].message.tool_calls or []]
    assert not model.script, (content, finish)  # the whole script was written
    assert got == [("get_time", {"zone": "UTC"})]
    assert content.strip() == "" and finish == "tool_calls"


def test_an_unknown_function_is_a_400_naming_it(served):
    family, model, tokenizer, srv, client = served
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny", messages=ASK, tools=TOOLS, max_tokens=4,
            tool_choice={"type": "function", "function": {"name": "launch_rockets"}})
    assert "launch_rockets" in str(e.value) and "get_weather" in str(e.value)
    assert e.value.param == "tool_choice.function.name"
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(model="tiny", messages=ASK, tool_choice="required",
                                       max_tokens=4)
    assert client.chat.completions.create(model="tiny", messages=ASK, max_tokens=2)


# ------------------------------------------------------------------ json_object


def test_json_object_replies_are_json(served):
    family, model, tokenizer, srv, client = served
    messages = [{"role": "user", "content": "reply in JSON: the quick brown fox"}]
    reasons = []
    for seed in range(6):
        r = client.chat.completions.create(
            model="tiny", messages=messages, response_format={"type": "json_object"},
            max_tokens=96, temperature=1.0, seed=seed)
        content, finish = r.choices[0].message.content, r.choices[0].finish_reason
        reasons.append(finish)
        assert not getattr(r.choices[0].message, "reasoning_content", None)
        if finish == "stop":
            assert isinstance(json.loads(content), dict), content
        else:
            assert finish == "length" and advance(START, content.encode()) is not None
    assert "stop" in reasons  # seeded: some of these replies close their object
    # Streamed and greedy: the content still parses (or is a JSON prefix when cut).
    vocab = srv.server.json_vocabulary()
    outs = []
    for _ in range(2):
        content, finish = "", None
        for chunk in client.chat.completions.create(
                model="tiny", messages=messages, response_format={"type": "json_object"},
                max_tokens=96, temperature=0, stream=True):
            content += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        state = advance(START, content.encode())
        assert state is not None and (finish == "length" or is_complete(state))
        outs.append((content, vocab.computed))
    # The same reply again meets only states seen before: every mask came from the cache.
    assert outs[0] == outs[1]


def test_a_scripted_object_passes_the_mask_unchanged(served):
    """A model that writes a valid object is not bent: the mask lets every token through."""
    family, model, tokenizer, srv, client = served
    obj = {"city": "paris", "temps": [12, -3.5e1, 0], "ok": True, "note": None,
           "q": "say \"hi\"\\n"}
    text = json.dumps(obj)
    model.script = tokenizer.encode(text) + [tokenizer.eos_token_ids[0]]
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "JSON please"}],
        response_format={"type": "json_object"}, max_tokens=96, temperature=0)
    assert not model.script
    assert json.loads(r.choices[0].message.content) == obj
    assert r.choices[0].finish_reason == "stop"


VALID = [b"", b"{", b'{"a"', b'{"a": [1, 2.5e-3, -0, true, null, "x\\"y\\u00e9"], "b": {}}',
         b'{"k": "\xc3\xa9\xf0\x9f', b'{"n": -12.0E+5', b'{ "a" :\n\t{"b": []}}', b'{"a": 0.5}',
         b'{"a": fal', b'{"a": "\\/', b'{"a":[{}]}']
INVALID = [b" {", b"[", b'"a"', b'{"a" 1', b'{"a": 01', b'{"a": 1.}', b'{"a": -}',
           b'{"a": tru}', b'{"a\x01', b'{"\\x', b'{"\\u12g', b"{}}", b'{"a": 1]', b"{,",
           b'{"a": [1,]', b'{"a": 1,}', b"{} ", b'{"a": nul ', b"{\xc3", b'{"a": 1e}',
           b'{"a": [}', b"{'a': 1}"]


@pytest.mark.parametrize("prefix", VALID)
def test_checker_accepts_valid_prefixes(prefix):
    assert advance(START, prefix) is not None


@pytest.mark.parametrize("prefix", INVALID)
def test_checker_rejects_invalid_prefixes(prefix):
    assert advance(START, prefix) is None


def test_checker_completes_only_whole_objects():
    for obj in ({}, {"a": [1, {"b": None}]}, {"é": "😀", "n": -1.5e-7}):
        for indent in (None, 2):
            data = json.dumps(obj, ensure_ascii=False, indent=indent).encode()
            states = [advance(START, data[:i]) for i in range(len(data) + 1)]
            assert all(s is not None for s in states)
            assert [is_complete(s) for s in states] == [False] * len(data) + [True]


def test_masks_agree_with_the_checker():
    """Every id a mask allows keeps the prefix valid, every id it bans breaks it."""
    table = [bytes([b]) for b in range(256)] + [b'{"', b'":', b'", "', b"}}", b"]}", b"\\u",
                                                b"12.5", b"true,", b"\xe9\x80", b"", b"<x>"]
    end, banned = 300, [len(table) - 1]
    table += [b""] * (end - len(table)) + [b"<|im_end|>"]
    vocab = JsonVocabulary(table, [end], end + 1, banned=banned)
    prefixes = [b"", b"{", b'{"a', b'{"a\\', b'{"a\\u0', b'{"a":', b'{"a": 1', b'{"a": [',
                b'{"a": [1', b'{"a": {"b": 2}', b'{"a": t', b'{"a": -', b"{}"]
    for p in prefixes:
        state = advance(START, p)
        allowed = vocab.allowed(state)
        want = np.array([i != end and i not in banned and bool(data)
                         and advance(state, data) is not None
                         for i, data in enumerate(table)])
        want[end] = is_complete(state)
        assert (allowed == want).all(), p
        assert allowed.any()


def test_batched_rows_keep_their_own_constraint(served):
    """json_object rows and a plain row decoding in one batch each get what they get
    alone: the mask is per row, and a row without one is not masked."""
    import threading

    family, model, tokenizer, srv, client = served
    asks = [("reply in JSON: hello world", True), ("JSON for: def main", True),
            ("the quick brown fox", False)]

    def ask(c, text, constrained):
        extra = {"response_format": {"type": "json_object"}} if constrained else {}
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user",
                                                               "content": text}],
                                      max_tokens=24, temperature=0,
                                      extra_body={"enable_thinking": False}, **extra)
        return r.choices[0].message.content

    solo = [ask(client, t, c) for t, c in asks]  # this server runs one row at a time
    with Running(model._model, tokenizer, limits=LIMITS) as batched:
        other = openai.OpenAI(base_url=batched.url, api_key="unused", max_retries=0,
                              timeout=30)
        got: dict[int, str] = {}
        barrier = threading.Barrier(len(asks))

        def run(i):
            barrier.wait(timeout=30)
            got[i] = ask(other, *asks[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(asks))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        rows = batched.metrics()["qwen_mlx_decode_rows_total"]
        steps = batched.metrics()["qwen_mlx_decode_steps_total"]
    assert [got[i] for i in range(len(asks))] == solo
    for (text, constrained), content in zip(asks, solo):
        if constrained:
            assert advance(START, content.encode()) is not None
    assert advance(START, solo[2].encode()) is None  # the plain row was not bent
    if model.can_batch:
        assert rows > steps  # some step carried more than one row
