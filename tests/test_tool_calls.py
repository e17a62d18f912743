"""Tool calls: the streaming parser (qwen_mlx.text.tool_calls), `GenerationResponse.tool_calls`
and `ChatSession.send_tool_results`, in Qwen3's JSON format and Qwen3.5's XML one.

Round trips start from the chat template: an assistant message with tool calls is rendered,
its turn's text is fed to the parser (whole, one character at a time, and split at random),
and the calls must come back.

Generation needs a model that writes tool calls. A random tiny model never does, and the
library has no hook to force its output (nor should a test stub it), so `steered` builds a
real checkpoint whose weights make greedy decoding write a chosen reply: its attention and
MLP outputs are zeroed, so the last hidden state is the current token's embedding, and the
LM head maps each token of the reply to the next (a bigram chain). The reply is the
template's own rendering of an assistant message, cut into added tokens at odd places, so
tags and JSON arrive split across tokens. Everything else (prefill, cache, sampling,
detokenizer, parsers, session) is the library's normal path.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import qwen_mlx
from conftest import TEMPLATES, build_checkpoint, write_tiny_tokenizer
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.model.cache import KVCache
from qwen_mlx.generate.generation import ChatSession, stream_generate, tool_call_format
from qwen_mlx.text.thinking import ThinkingParser
from qwen_mlx.text.tool_calls import (
    ToolCallParser, convert_parameter, detect_tool_format, parse_tool_calls)
from qwen_mlx.text.tokenizer import QwenTokenizer

# A Qwen3.5-style template (spec §6): tools in the system block with the qwen3_coder XML
# instructions, assistant calls as <function=…><parameter=…>, string values raw, objects and
# lists as JSON and other scalars through `| string` (True, None), as Qwen3-Coder's template
# writes them; tool results in one user block, reasoning kept after the last user query,
# thinking on by default. The shared tests/fixtures/templates/qwen3_5.jinja writes scalars as
# JSON (true, null); both are tested ("xml" is the shared file when it is there).
QWEN3_CODER_STYLE_TEMPLATE = r"""
{%- if tools %}
    {{- '<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + tool | tojson }}
    {%- endfor %}
    {{- '\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n- Function calls MUST follow the specified format\n</IMPORTANT>' }}
    {%- if messages[0].role == 'system' and messages[0].content | trim %}
        {{- '\n\n' + messages[0].content | trim }}
    {%- endif %}
    {{- '<|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content | trim + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == 'user' %}
        {%- set content = message.content | trim %}
        {%- if not (content.startswith('<tool_response>') and content.endswith('</tool_response>')) %}
            {%- set ns.multi_step_tool = false %}
            {%- set ns.last_query_index = index %}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = (message.content or '') | trim %}
    {%- if message.role == 'system' %}
        {%- if not loop.first %}{{- raise_exception('System message must be at the beginning.') }}{%- endif %}
    {%- elif message.role == 'user' %}
        {{- '<|im_start|>user\n' + content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning = (message.reasoning_content or '') | trim %}
        {%- if loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>assistant\n<think>\n' + reasoning + '\n</think>\n\n' + content }}
        {%- else %}
            {{- '<|im_start|>assistant\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
                {%- if loop.first %}
                    {{- ('\n\n' if content else '') + '<tool_call>\n<function=' + tool_call.name + '>\n' }}
                {%- else %}
                    {{- '\n<tool_call>\n<function=' + tool_call.name + '>\n' }}
                {%- endif %}
                {%- for args_name, args_value in (tool_call.arguments or {}) | items %}
                    {{- '<parameter=' + args_name + '>\n' }}
                    {%- if args_value is mapping or (args_value is sequence and args_value is not string) %}
                        {{- args_value | tojson }}
                    {%- else %}
                        {{- args_value | string }}
                    {%- endif %}
                    {{- '\n</parameter>\n' }}
                {%- endfor %}
                {{- '</function>\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- else %}
        {{- '<think>\n' }}
    {%- endif %}
{%- endif %}
"""


def xml_template() -> str:
    shared = TEMPLATES / "qwen3_5.jinja"
    return shared.read_text() if shared.is_file() else QWEN3_CODER_STYLE_TEMPLATE


def json_template() -> str:
    return (TEMPLATES / "qwen3.jinja").read_text()


# template case -> its text; the parser format is "json" for Qwen3's, "xml" for the others.
FORMATS = {"json": json_template, "xml": xml_template,
           "xml_coder": lambda: QWEN3_CODER_STYLE_TEMPLATE}


def format_of(case: str) -> str:
    return "json" if case == "json" else "xml"

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"},
        "metric": {"type": "boolean"}, "scale": {"type": "number"},
        "options": {"type": "object"}, "hours": {"type": "array"},
        "note": {"type": ["string", "null"]}}}}},
    {"type": "function", "function": {
        "name": "search", "parameters": {"type": "object", "properties": {
            "query": {"type": "string"}, "limit": {"type": "integer"}}}}}]

CALLS = [
    ("get_weather", {"city": "Paris, France", "days": 3, "metric": True, "scale": 1.5,
                     "options": {"wind": [1, 2], "unit": "°C"}, "hours": [6, 12],
                     "note": "  two\nlines "}),
    ("search", {"query": "{\"not\": \"json\"} 42", "limit": 10}),
]


def as_message_calls(calls):
    return [{"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": a}}
            for i, (n, a) in enumerate(calls)]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """A tiny tokenizer per format, its template Qwen3's (JSON) or Qwen3.5-style (XML)."""
    out = {}
    for fmt, template in FORMATS.items():
        folder = tmp_path_factory.mktemp(f"tok_{fmt}")
        write_tiny_tokenizer(folder, vocab=300)
        (folder / "chat_template.jinja").write_text(template())
        out[fmt] = QwenTokenizer.from_folder(folder)
    return out


def turn_text(tok, messages, *, enable_thinking=None, tools=TOOLS):
    """The text the model writes for the last (assistant) message: the rendered chat minus
    the prompt that precedes it and the turn's closing <|im_end|>."""
    kw = dict(tokenize=False, enable_thinking=enable_thinking, tools=tools)
    prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, **kw)
    full = tok.apply_chat_template(messages, **kw)
    assert full.startswith(prompt) and full.endswith("<|im_end|>\n")
    return prompt, full[len(prompt):-len("<|im_end|>\n")]


def parse_stream(chunks, *, fmt, in_thinking, tools=TOOLS):
    """The reply pipeline generation uses: reasoning split off, the answer through the tool
    parser. Returns (reasoning, answer text, calls, warnings)."""
    thinking, tools_parser = ThinkingParser(in_thinking=in_thinking), ToolCallParser(fmt, tools)
    reasoning, answer, calls, warnings = [], [], [], []

    def take(pieces):
        for phase, text in pieces:
            if phase == "thinking":
                reasoning.append(text)
                continue
            for p in tools_parser.feed(text):
                answer.append(p.text)
                calls.extend([p.call] if p.call else [])
                warnings.extend(p.warnings)

    for chunk in chunks:
        take(thinking.feed(chunk))
    take(thinking.flush())
    for p in tools_parser.flush():
        answer.append(p.text)
        warnings.extend(p.warnings)
    assert tools_parser.calls == calls and tools_parser.warnings == warnings
    return "".join(reasoning), "".join(answer), calls, warnings


def random_splits(text, rng):
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 60))))
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


def plain(calls):
    return [(c["name"], c["arguments"]) for c in calls]


# ----------------------------------------------------------------------- detection


def test_the_format_is_read_from_the_template(tokenizers):
    assert detect_tool_format(json_template()) == "json"
    assert detect_tool_format((TEMPLATES / "qwen2_5.jinja").read_text()) == "json"
    assert detect_tool_format(xml_template()) == "xml"
    assert detect_tool_format("{{ messages[0].content }}") is None
    assert tool_call_format(tokenizers["xml"], TOOLS) == "xml"
    assert tool_call_format(tokenizers["json"], TOOLS) == "json"
    # Without tools nothing is parsed (nobody would answer a call), unless asked for.
    assert tool_call_format(tokenizers["xml"], None) is None
    assert tool_call_format(tokenizers["xml"], None, "json") == "json"
    assert tool_call_format(tokenizers["xml"], TOOLS, None) is None
    with pytest.raises(QwenMLXError, match="tool_format 'yaml'"):
        tool_call_format(tokenizers["xml"], TOOLS, "yaml")


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("thinking", [None, False])
@pytest.mark.parametrize("content", ["Let me check both.", ""])
def test_a_rendered_assistant_turn_parses_back_to_its_calls(tokenizers, fmt, thinking, content):
    tok = tokenizers[fmt]
    reasoning = "" if thinking is False else "The user wants weather; I may <tool_call> it."
    messages = [{"role": "user", "content": "weather in paris?"},
                {"role": "assistant", "content": content, "reasoning_content": reasoning,
                 "tool_calls": as_message_calls(CALLS)}]
    prompt, text = turn_text(tok, messages, enable_thinking=thinking)
    assert text.count("<tool_call>") == 2 + ("<tool_call>" in reasoning)
    in_thinking = prompt.endswith("<think>\n")
    whole = parse_stream([text], fmt=format_of(fmt), in_thinking=in_thinking)
    got_reasoning, answer, calls, warnings = whole
    assert plain(calls) == CALLS and warnings == []
    assert answer.strip() == content and "tool_call" not in answer
    assert got_reasoning == reasoning  # a call mentioned in the reasoning stays reasoning
    assert len({c["id"] for c in calls}) == 2 and all(c["id"].startswith("call_") for c in calls)
    # One character at a time, and at random places: the same result.
    for chunks in [list(text)] + [random_splits(text, random.Random(s)) for s in range(20)]:
        r, a, c, w = parse_stream(chunks, fmt=format_of(fmt), in_thinking=in_thinking)
        assert (r, a, plain(c), w) == (got_reasoning, answer, CALLS, [])


_ALPHABET = st.sampled_from(list("ab z<>/=\n\t{}[]\":,\\") + ["é", "中", "😀", "null", "</"])
_TEXT = st.lists(_ALPHABET, max_size=12).map("".join).filter(
    lambda s: all(bad not in s for bad in ("</parameter>", "</tool_call>", "<think>"))
    and s.lower() != "null")
_JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | _TEXT
                     | st.floats(allow_nan=False, allow_infinity=False),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(_TEXT, inner, max_size=3), max_leaves=8)
_ARGS = st.fixed_dictionaries({}, optional={
    "city": _TEXT, "days": st.integers(-10**9, 10**9), "metric": st.booleans(),
    "scale": st.floats(allow_nan=False, allow_infinity=False, width=64),
    "options": st.dictionaries(_TEXT, _JSON, max_size=3),
    "hours": st.lists(_JSON, max_size=3)})


@settings(max_examples=60, deadline=None)
@given(fmt=st.sampled_from(list(FORMATS)), args=st.lists(_ARGS, min_size=1, max_size=3),
       content=_TEXT, seed=st.integers(0, 2**32 - 1))
def test_any_arguments_round_trip_split_anywhere(tokenizers, fmt, args, content, seed):
    calls = [("get_weather", a) for a in args]
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": content, "tool_calls": as_message_calls(calls)}]
    prompt, text = turn_text(tokenizers[fmt], messages, enable_thinking=False)
    chunks = random_splits(text, random.Random(seed))
    _, answer, got, warnings = parse_stream(chunks, fmt=format_of(fmt), in_thinking=False)
    assert warnings == [] and plain(got) == calls
    assert answer.strip() == content.strip()


# ------------------------------------------------------------ malformed calls

MALFORMED = {
    "bad_json": ("json", 'Sure.\n<tool_call>\n{"name": "search", "arguments": {"query": }}\n'
                         '</tool_call>', "not valid JSON"),
    "json_list": ("json", '<tool_call>\n[1, 2]\n</tool_call>', "not an object"),
    "json_no_name": ("json", '<tool_call>\n{"arguments": {}}\n</tool_call>', "no \"name\""),
    "json_args_list": ("json", '<tool_call>{"name": "search", "arguments": [1]}</tool_call>',
                       "not an object"),
    "json_unclosed": ("json", 'x <tool_call>\n{"name": "search", "arguments": {}}',
                      "not closed"),
    "xml_unclosed": ("xml", "<tool_call>\n<function=search>\n<parameter=query>\ncats\n",
                     "not closed"),
    "xml_no_end_function": ("xml", "<tool_call>\n<function=search>\n<parameter=query>\ncats\n"
                                   "</parameter>\n</tool_call>", "not closed with </function>"),
    "unknown_function_tag": ("xml", "<tool_call>\n<fn=search>\n</fn>\n</tool_call> after",
                             "should start with <function=NAME>"),
    "xml_junk": ("xml", "<tool_call>\n<function=search>\nquery: cats\n</function>\n</tool_call>",
                 "unexpected text"),
    "json_in_xml": ("xml", '<tool_call>\n{"name": "search", "arguments": {}}\n</tool_call>',
                    "should start with <function=NAME>"),
    "xml_in_json": ("json", "<tool_call>\n<function=search>\n</function>\n</tool_call>",
                    "not valid JSON"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_call_is_text_with_a_warning(case):
    fmt, text, why = MALFORMED[case]
    for chunks in ([text], list(text)):
        _, answer, calls, warnings = parse_stream(chunks, fmt=fmt, in_thinking=False)
        assert calls == [] and answer == text
        assert len(warnings) == 1 and why in warnings[0]
    # The whole-text helper agrees.
    parsed = parse_tool_calls(text, fmt, TOOLS)
    assert parsed.text == text and parsed.calls == [] and why in parsed.warnings[0]


def test_a_good_call_after_a_bad_one_still_parses():
    text = ('<tool_call>{"name": oops}</tool_call>\n<tool_call>\n{"name": "search", '
            '"arguments": {"query": "x"}}\n</tool_call>')
    parsed = parse_tool_calls(text, "json", TOOLS)
    assert plain(parsed.calls) == [("search", {"query": "x"})]
    assert parsed.text == '<tool_call>{"name": oops}</tool_call>\n' and len(parsed.warnings) == 1


def test_odd_but_parseable_calls_are_kept_with_a_warning():
    parsed = parse_tool_calls('<tool_call>{"name": "launch", "arguments": {}}</tool_call>',
                              "json", TOOLS)
    assert plain(parsed.calls) == [("launch", {})] and "not among the tools" in parsed.warnings[0]
    xml = ("<tool_call>\n<function=search>\n<parameter=limit>\nten\n</parameter>\n"
           "</function>\n</tool_call>")
    parsed = parse_tool_calls(xml, "xml", TOOLS)
    assert plain(parsed.calls) == [("search", {"limit": "ten"})]
    assert "search.limit" in parsed.warnings[0] and "kept as text" in parsed.warnings[0]
    # JSON arguments written as a JSON string, as some models do.
    parsed = parse_tool_calls('<tool_call>{"name": "search", "arguments": "{\\"limit\\": 2}"}'
                              '</tool_call>', "json", TOOLS)
    assert plain(parsed.calls) == [("search", {"limit": 2})] and parsed.warnings == []


@pytest.mark.parametrize("value,schema,expected", [
    ("42", {"type": "integer"}, 42), ("4.0", {"type": "integer"}, 4), ("-3", {"type": "int"}, -3),
    ("2.5", {"type": "number"}, 2.5), ("2.0", {"type": "number"}, 2),
    ("true", {"type": "boolean"}, True), ("False", {"type": "boolean"}, False),
    ('{"a": [1]}', {"type": "object"}, {"a": [1]}), ("[1, 'x']", {"type": "array"}, [1, "x"]),
    ("null", {"type": "string"}, None), ("None", {"type": "integer"}, None),
    ("None", {"type": "string"}, "None"), (" 42 ", {"type": "string"}, " 42 "),
    ("42", None, "42"), ('{"a": 1}', None, '{"a": 1}'),  # no schema: text, as mlx-lm
    ('{"a": 1}', {"description": "untyped"}, {"a": 1}), ("42", {"description": "u"}, "42"),
    ("7", {"type": ["integer", "null"]}, 7), ("(1, 2)", {"type": "tuple"}, (1, 2)),
])
def test_xml_values_are_typed_by_the_schema(value, schema, expected):
    got, warning = convert_parameter(value, schema)
    assert got == expected and type(got) is type(expected) and warning is None


@pytest.mark.parametrize("value,schema", [
    ("1.5", {"type": "integer"}), ("abc", {"type": "number"}), ("inf", {"type": "integer"}),
    ("yes", {"type": "boolean"}), ("1" * 5000, {"type": "integer"})])
def test_xml_values_that_do_not_convert_stay_text(value, schema):
    got, warning = convert_parameter(value, schema)
    assert got == value and warning


_NOISE = st.lists(st.sampled_from(
    ["<tool_call>", "</tool_call>", "<tool_", "call>", "<", ">", "\n", "x", '{"name": "search"',
     ', "arguments": {}}', "<function=search>", "</function>", "<parameter=q>", "</parameter>",
     "{", "}", " ", "<tool_call>\n<function=f>\n</function>\n</tool_call>"]),
    max_size=25).map("".join)


@settings(max_examples=200, deadline=None)
@given(text=_NOISE, fmt=st.sampled_from(["json", "xml", "auto"]), seed=st.integers(0, 2**32))
def test_any_text_in_any_chunks_parses_the_same_and_loses_nothing(text, fmt, seed):
    def run(chunks):
        parser = ToolCallParser(fmt, TOOLS)
        pieces = [p for c in chunks for p in parser.feed(c)] + parser.flush()
        assert "".join(p.raw for p in pieces) == text  # every character accounted for
        assert all(p.text == p.raw for p in pieces if p.call is None)
        assert all(p.text == "" and p.raw.startswith("<tool_call>") for p in pieces if p.call)
        return ("".join(p.text for p in pieces), plain(parser.calls), parser.warnings)

    whole = run([text])
    assert run(random_splits(text, random.Random(seed)) if len(text) > 1 else [text]) == whole
    assert run(list(text)) == whole


# ----------------------------------------------- a real model that writes tool calls

VOCAB = 400  # the tiny tokenizer's 300 ids, then the reply's added tokens


def _chunk(text: str, rng: random.Random, keep: tuple[str, ...]) -> list[str]:
    """`text` cut at random into distinct pieces of 4-10 characters or more, each with a
    non-space character; the tokenizer's own added tokens in `keep` stay whole."""
    out: list[str] = []
    rest = text
    while rest:
        tag = next((t for t in keep if rest.startswith(t)), None)
        if tag:
            out.append(tag)
            rest = rest[len(tag):]
            continue
        n = rng.randint(4, 10)
        stop = min((rest.find(t) for t in keep if rest.find(t) > 0), default=len(rest))
        piece = rest[:min(n, stop)]
        while (not piece.strip() or piece in out) and len(piece) < stop:
            piece = rest[:len(piece) + 1]
        out.append(piece)
        rest = rest[len(piece):]
    return out


def tiny_transformers_model(folder: Path, hybrid: bool):
    """A random tiny Qwen3 or (`hybrid`) Qwen3.5 text model saved in `folder`, untied."""
    if hybrid:
        import transformers
        from hybrid_fixtures import DENSE_I, _build, _q35_text

        config = transformers.Qwen3_5TextConfig(
            **{**_q35_text(1e6, False, False), "vocab_size": VOCAB,
               "max_position_embeddings": 4096}, intermediate_size=DENSE_I)
        return _build(transformers.Qwen3_5ForCausalLM, config, folder, 0)
    hf, _ = build_checkpoint(folder, "qwen3", vocab_size=VOCAB, num_hidden_layers=2,
                             head_dim=32, max_position_embeddings=4096,
                             tie_word_embeddings=False)
    return hf


def steered(folder: Path, template: str, reply: str, *, prompt_ids, hybrid: bool = False,
            ) -> tuple:
    """A tiny Qwen3 (or, `hybrid`, Qwen3.5: DeltaNet and gated attention) checkpoint that
    greedily writes `reply` then <|im_end|> after a prompt ending in
    `prompt_ids(tokenizer)[-1]`. Returns (model, tokenizer, the reply's ids)."""
    from tokenizers import AddedToken, Tokenizer

    write_tiny_tokenizer(folder, vocab=300)
    (folder / "chat_template.jinja").write_text(template)
    path = folder / "tokenizer.json"
    base = path.read_text()
    keep = ("<think>", "</think>")
    for seed in range(200):  # pieces that encode back to themselves, each once
        pieces = _chunk(reply, random.Random(seed), keep)
        if len(set(pieces)) < len(pieces):
            continue
        raw = Tokenizer.from_str(base)
        raw.add_tokens([AddedToken(p, special=False, normalized=False)
                        for p in pieces if p not in keep])
        raw.save(str(path))
        tok = QwenTokenizer.from_folder(folder)
        chain = [tok.token_to_id(p) for p in pieces]
        start = prompt_ids(tok)[-1]
        if None not in chain and tok.encode(reply) == chain and start not in chain:
            break
    else:
        raise AssertionError("no chunking of the reply encodes back to itself")
    assert max(chain) < VOCAB
    hf = tiny_transformers_model(folder, hybrid)
    with torch.no_grad():
        for layer in hf.model.layers:  # the layers add nothing: the state is the embedding
            mixer = layer.linear_attn.out_proj if hasattr(layer, "linear_attn") else \
                layer.self_attn.o_proj
            mixer.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        hf.model.norm.weight.fill_(0.0 if hybrid else 1.0)  # Qwen3.5's norms scale by 1 + w
        emb, head = hf.model.embed_tokens.weight, hf.lm_head.weight
        for a, b in zip([start] + chain, chain + [tok.im_end_id]):
            head[b] = 4.0 * emb[a] / emb[a].norm()
    hf.save_pretrained(folder)
    model, tok = qwen_mlx.load(folder)
    return model, tok, chain


USER = [{"role": "user", "content": "weather in paris?"}]
STEERED_CALL = ("get_weather", {"city": "Paris, France", "days": 3, "metric": False,
                                "options": {"unit": "°C"}})
REPLY = {"role": "assistant", "content": "Let me look that up.",
         "reasoning_content": "The user asks about Paris; maybe <tool_call> a tool.",
         "tool_calls": as_message_calls([STEERED_CALL])}


@pytest.fixture(scope="module", params=list(FORMATS))
def writer(request, tmp_path_factory):
    """(format, model, tokenizer, the reply's text, its ids): thinking on, tools given."""
    fmt = request.param
    folder = tmp_path_factory.mktemp(f"steered_{fmt}")
    write_tiny_tokenizer(folder, vocab=300)
    (folder / "chat_template.jinja").write_text(FORMATS[fmt]())
    _, text = turn_text(QwenTokenizer.from_folder(folder), USER + [REPLY])
    model, tok, chain = steered(
        folder, FORMATS[fmt](), text,
        prompt_ids=lambda t: t.apply_chat_template(USER, add_generation_prompt=True, tools=TOOLS))
    return fmt, model, tok, text, chain


def test_generation_streams_the_calls_apart_from_the_answer(writer):
    fmt, model, tok, text, chain = writer
    out = []
    rs = list(stream_generate(model, tok, USER, tools=TOOLS, temperature=0.0,
                              max_tokens=len(chain) + 4, tokens_out=out))
    assert out == chain + [tok.im_end_id]  # the model writes what it was built to
    answer = "".join(r.text for r in rs if r.phase == "answer")
    reasoning = "".join(r.text for r in rs if r.phase == "thinking")
    assert answer.strip() == REPLY["content"] and "tool_call" not in answer
    assert reasoning == REPLY["reasoning_content"]
    with_calls = [r for r in rs if r.tool_calls]
    assert len(with_calls) == 1 and plain(with_calls[0].tool_calls) == [STEERED_CALL]
    # It arrives at the step of the token that completed </tool_call>.
    ends = tok.decode(chain[:chain.index(with_calls[0].token) + 1], skip_special_tokens=False)
    assert ends.endswith("</tool_call>") and rs[-1].finish_reason == "stop"
    assert all(not r.warnings for r in rs)
    # Without tools the call is not parsed (nothing would answer it) ...
    rs = list(stream_generate(model, tok, USER, temperature=0.0, max_tokens=len(chain) + 4))
    assert not any(r.tool_calls for r in rs)
    assert "<tool_call>" in "".join(r.text for r in rs if r.phase == "answer")
    # ... unless a format is asked for; raw text prompts parse too. Without the tools'
    # schemas XML values stay text (mlx-lm's rule); JSON carries its own types.
    prompt = tok.apply_chat_template(USER, add_generation_prompt=True, tools=TOOLS,
                                     tokenize=False)
    rs = list(stream_generate(model, tok, prompt, temperature=0.0, tool_format=format_of(fmt),
                              max_tokens=len(chain) + 4))
    name, args = STEERED_CALL
    as_written = {k: v if isinstance(v, str) else str(v) if fmt == "xml_coder"
                  and not isinstance(v, dict) else json.dumps(v, ensure_ascii=False)
                  for k, v in args.items()}
    assert [plain(r.tool_calls) for r in rs if r.tool_calls] == [
        [(name, args if fmt == "json" else as_written)]]
    rs = list(stream_generate(model, tok, prompt, temperature=0.0, tools=TOOLS,
                              max_tokens=len(chain) + 4))
    assert [plain(r.tool_calls) for r in rs if r.tool_calls] == [[STEERED_CALL]]


def test_a_call_cut_off_by_max_tokens_is_text_with_a_warning(writer):
    fmt, model, tok, text, chain = writer
    def answer_of(ids):
        text = tok.decode(ids, skip_special_tokens=False)
        return text.split("</think>")[-1] if "</think>" in text else ""

    opened = next(i for i in range(len(chain)) if "<tool_call>" in answer_of(chain[:i + 1]))
    rs = list(stream_generate(model, tok, USER, tools=TOOLS, temperature=0.0,
                              max_tokens=opened + 3))
    assert rs[-1].finish_reason == "length" and not any(r.tool_calls for r in rs)
    assert "not closed" in rs[-1].warnings[0]
    written = answer_of(chain[:opened + 3])
    assert "".join(r.text for r in rs if r.phase == "answer") == written.lstrip("\n")


def prompt_of(session: ChatSession) -> list[int]:
    return session.tokenizer.apply_chat_template(
        session.messages[:-1], add_generation_prompt=True, tools=session.tools,
        enable_thinking=session.enable_thinking)


def test_a_session_answers_tool_calls_and_prefills_only_the_results(writer):
    fmt, model, tok, text, chain = writer
    s = ChatSession(model, tok, tools=TOOLS)
    list(s.send(USER[0]["content"], temperature=0.0, max_tokens=len(chain) + 4))
    reply = s.messages[-1]
    assert reply["content"] == REPLY["content"]
    assert reply["reasoning_content"] == REPLY["reasoning_content"]
    (call,) = reply["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert (call["function"]["name"], call["function"]["arguments"]) == STEERED_CALL
    # The reply as the template renders it is what the model wrote: history round-trips.
    assert turn_text(tok, s.messages)[1] == text

    result = {"temp_c": 21, "sky": "clear <|im_end|> <tool_call>"}  # special text stays text
    rs = list(s.send_tool_results([result], temperature=0.0, max_tokens=len(chain) + 4))
    tool_msg = s.messages[-2]
    assert tool_msg == {"role": "tool", "content": json.dumps(result, ensure_ascii=False),
                        "tool_call_id": call["id"], "name": "get_weather"}
    rendered = tok.apply_chat_template(s.messages[:-1], add_generation_prompt=True, tools=TOOLS,
                                       tokenize=False)
    assert f"<|im_start|>user\n<tool_response>\n{tool_msg['content']}\n</tool_response>" \
           "<|im_end|>\n<|im_start|>assistant\n" in rendered
    full = prompt_of(s)
    first = rs[0]
    new = tok.encode(tool_msg["content"]) + tok.encode(
        "\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n", special=True)
    assert first.cached_tokens + first.prompt_tokens == len(full)
    assert first.prompt_tokens <= len(new) + 2  # the results and the template around them
    # A fresh session over the same history gives the same reply.
    fresh = ChatSession(model, tok, tools=TOOLS, messages=s.messages[:-1])
    list(fresh.respond(temperature=0.0, max_tokens=len(chain) + 4))
    assert plain_msg(fresh.messages[-1]) == plain_msg(s.messages[-1])
    # Regenerating the reply to the tool results prefills only the generation prompt.
    first = next(iter(s.regenerate(temperature=0.0, max_tokens=4)))
    assert first.cached_tokens + first.prompt_tokens == len(full) and first.prompt_tokens <= 4


def plain_msg(m):
    return {k: v for k, v in m.items() if k != "tool_calls"} | {
        "calls": [(c["function"]["name"], c["function"]["arguments"])
                  for c in m.get("tool_calls", [])]}


# ------------------------------------------------ tool results on a random model


@pytest.fixture(scope="module", params=["json", "xml"])
def random_model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"random_{request.param}")
    build_checkpoint(folder, "qwen3", vocab_size=320, num_hidden_layers=2, head_dim=32,
                     max_position_embeddings=4096)
    write_tiny_tokenizer(folder, vocab=320)
    (folder / "chat_template.jinja").write_text(FORMATS[request.param]())
    model, tok = qwen_mlx.load(folder)
    return model, tok


HISTORY = [{"role": "system", "content": "be brief"},
           {"role": "user", "content": "weather in paris and search cats"},
           {"role": "assistant", "content": "", "reasoning_content": "two calls",
            "tool_calls": as_message_calls(CALLS)}]


def test_tool_results_render_and_later_turns_reuse_the_cache(random_model):
    model, tok = random_model
    s = ChatSession(model, tok, tools=TOOLS, messages=HISTORY)
    list(s.send_tool_results(["sunny", {"role": "tool", "content": "3 cats",
                                        "tool_call_id": "c1"}],
                             temperature=0.0, max_tokens=8))
    assert [m["role"] for m in s.messages] == ["system", "user", "assistant", "tool", "tool",
                                               "assistant"]
    assert s.messages[3] == {"role": "tool", "content": "sunny", "tool_call_id": "c0",
                             "name": "get_weather"}
    assert s.messages[4] == {"role": "tool", "content": "3 cats", "tool_call_id": "c1",
                             "name": "search"}
    rendered = tok.apply_chat_template(s.messages[:-1], tools=TOOLS, tokenize=False)
    assert rendered.endswith("<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n"
                             "<tool_response>\n3 cats\n</tool_response><|im_end|>\n")
    # The next user turn prefills only its message, and replies as a fresh session would.
    rs = list(s.send("thanks, and tomorrow?", temperature=0.0, max_tokens=8))
    full = prompt_of(s)
    new = tok.encode("thanks, and tomorrow?<|im_end|>\n<|im_start|>assistant\n<think>\n",
                     special=True)
    assert rs[0].cached_tokens + rs[0].prompt_tokens == len(full)
    assert rs[0].prompt_tokens <= len(new) + 2
    fresh = ChatSession(model, tok, tools=TOOLS, messages=s.messages[:-1])
    list(fresh.respond(temperature=0.0, max_tokens=8))
    assert fresh.messages[-1] == s.messages[-1]


def test_bad_tool_results_are_refused_and_change_nothing(random_model):
    model, tok = random_model
    s = ChatSession(model, tok, tools=TOOLS, messages=HISTORY[:2])
    with pytest.raises(QwenMLXError, match="not a reply with tool calls"):
        list(s.send_tool_results(["x"]))
    s = ChatSession(model, tok, tools=TOOLS, messages=HISTORY)
    for bad, why in [("x", "must be a list"), ([], "at least one"),
                     ([{"role": "tool", "content": "x", "tool_call_id": "nope"}],
                      "no such call.*'c0', 'c1'"),
                     (["a", "b", "c"], "result 2 has no tool_call_id"),
                     ([{"role": "tool", "result": 1}], "without 'content'"),
                     ([{1, 2}], "neither text nor JSON")]:
        with pytest.raises(QwenMLXError, match=why):
            list(s.send_tool_results(bad))
        assert s.messages == HISTORY
    with pytest.raises(QwenMLXError, match="tool_format"):
        ChatSession(model, tok, tools=TOOLS, tool_format="yaml")


# ------------------------------------------------------ a hybrid (recurrent state)


@pytest.fixture(scope="module")
def hybrid_writer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("steered_hybrid")
    write_tiny_tokenizer(folder, vocab=300)
    (folder / "chat_template.jinja").write_text(xml_template())
    _, text = turn_text(QwenTokenizer.from_folder(folder), USER + [REPLY])
    model, tok, chain = steered(
        folder, xml_template(), text, hybrid=True,
        prompt_ids=lambda t: t.apply_chat_template(USER, add_generation_prompt=True, tools=TOOLS))
    assert any(not isinstance(c, KVCache) for c in model.make_cache())
    return model, tok, chain


def test_a_hybrid_session_prefills_only_the_tool_results(hybrid_writer):
    """Linear-attention state cannot be trimmed: the history must re-render as generated."""
    model, tok, chain = hybrid_writer
    s = ChatSession(model, tok, tools=TOOLS)
    list(s.send(USER[0]["content"], temperature=0.0, max_tokens=len(chain) + 4))
    assert [c["function"]["name"] for c in s.messages[-1]["tool_calls"]] == ["get_weather"]
    rs = list(s.send_tool_results(["sunny, 21 C"], temperature=0.0, max_tokens=len(chain) + 4))
    full = prompt_of(s)
    new = tok.encode("sunny, 21 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n",
                     special=True)
    assert rs[0].cached_tokens + rs[0].prompt_tokens == len(full)
    assert rs[0].prompt_tokens <= len(new) + 2
    fresh = ChatSession(model, tok, tools=TOOLS, messages=s.messages[:-1])
    list(fresh.respond(temperature=0.0, max_tokens=len(chain) + 4))
    assert plain_msg(fresh.messages[-1]) == plain_msg(s.messages[-1])


def test_a_hybrid_user_turn_prefills_only_its_message(tmp_path):
    """After a reply the cache is brought to the next turn's shared start; with a byte-level
    BPE that start must not end inside the probe message's bytes, which a linear state
    could not trim back (it then re-ran the reply from a snapshot)."""
    write_tiny_tokenizer(tmp_path, vocab=300)
    (tmp_path / "chat_template.jinja").write_text(xml_template())
    tiny_transformers_model(tmp_path, hybrid=True)
    model, tok = qwen_mlx.load(tmp_path)
    s = ChatSession(model, tok, enable_thinking=False)
    list(s.send("hello there", temperature=0.0, max_tokens=6))
    rs = list(s.send("the quick brown fox", temperature=0.0, max_tokens=6))
    new = tok.encode("the quick brown fox<|im_end|>\n<|im_start|>assistant\n<think>\n\n"
                     "</think>\n\n", special=True)
    assert rs[0].cached_tokens + rs[0].prompt_tokens == len(prompt_of(s))
    assert rs[0].prompt_tokens <= len(new)
    fresh = ChatSession(model, tok, enable_thinking=False, messages=s.messages[:-1])
    list(fresh.respond(temperature=0.0, max_tokens=6))
    assert fresh.messages[-1] == s.messages[-1]
