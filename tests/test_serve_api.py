"""`qwen-mlx serve` through the official openai SDK (issue 13), on a real uvicorn on 127.0.0.1.

On tiny checkpoints of qwen3, qwen3_moe (transformers-built, conftest) and qwen3_5 (a
hybrid, hybrid_fixtures): greedy replies through the API, streamed or not, equal
`qwen_mlx.generate`/`stream_generate` on the same messages, with the reasoning in
`reasoning_content`; a follow-up request reports cached tokens (for the hybrid too, whose
DeltaNet state cannot be trimmed) and still equals a fresh generation; logprobs, usage,
tool definitions and tool results go through; concurrent requests decode in one batch.
"""

from __future__ import annotations

import json
import threading

import pytest

pytest.importorskip("torch")
openai = pytest.importorskip("openai")

from qwen_mlx.generate.generation import stream_generate  # noqa: E402
from qwen_mlx.serve.batching import Delta, Finished, Job  # noqa: E402
from qwen_mlx.text.tool_calls import ToolCallParser  # noqa: E402
from serve_fixtures import Running, load_tiny  # noqa: E402

MAX = 10
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


@pytest.fixture(scope="module", params=["qwen3", "qwen3_moe", "qwen3_5"])
def served(request, tmp_path_factory):
    model, tokenizer = load_tiny(tmp_path_factory.mktemp(request.param) / "m", request.param)
    with Running(model, tokenizer) as srv:
        client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=30)
        yield model, tokenizer, srv, client


def _reference(model, tokenizer, messages, **options) -> tuple[str, str]:
    """(reasoning, answer) of a greedy stream_generate."""
    parts = {"thinking": [], "answer": []}
    for r in stream_generate(model, tokenizer, messages, max_tokens=MAX, temperature=0.0,
                             **options):
        parts[r.phase].append(r.text)
    return "".join(parts["thinking"]), "".join(parts["answer"])


@pytest.mark.parametrize("thinking", [True, False], ids=["thinking", "no-thinking"])
def test_greedy_replies_equal_generate(served, thinking):
    model, tokenizer, srv, client = served
    messages = [{"role": "system", "content": "you are terse"},
                {"role": "user", "content": "the quick brown fox"}]
    reasoning, answer = _reference(model, tokenizer, messages, enable_thinking=thinking)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX,
                                       temperature=0, extra_body={"chat_template_kwargs":
                                                                  {"enable_thinking": thinking}})
    message = r.choices[0].message
    assert message.content == answer
    assert (getattr(message, "reasoning_content", None) or "") == reasoning
    assert r.usage.prompt_tokens == len(tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, enable_thinking=thinking))
    assert 0 < r.usage.completion_tokens <= MAX
    assert r.choices[0].finish_reason in ("stop", "length")
    # Streamed, with the usage as the last chunk.
    content, reasons, usage, finish = [], [], None, None
    for chunk in client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=MAX, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"enable_thinking": thinking}):
        if chunk.usage is not None:
            usage = chunk.usage
            assert not chunk.choices
            continue
        delta = chunk.choices[0].delta
        content.append(delta.content or "")
        reasons.append(getattr(delta, "reasoning_content", None) or "")
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(content) == answer and "".join(reasons) == reasoning
    assert usage.completion_tokens == r.usage.completion_tokens
    assert finish == r.choices[0].finish_reason


def test_a_follow_up_reuses_the_cache(served):
    model, tokenizer, srv, client = served
    first = [{"role": "user", "content": "hello world"}]
    r1 = client.chat.completions.create(model="tiny", messages=first, max_tokens=MAX,
                                        temperature=0)
    follow = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                      {"role": "user", "content": "def main"}]
    r2 = client.chat.completions.create(model="tiny", messages=follow, max_tokens=MAX,
                                        temperature=0)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    # At least the whole first prompt up to the reply's header is reused (the hybrid's
    # state is stored where the next turn's prompt parts from the first).
    header = len(tokenizer.apply_chat_template(first, add_generation_prompt=False))
    assert header <= cached < r2.usage.prompt_tokens
    assert r2.choices[0].message.content == _reference(model, tokenizer, follow)[1]
    # The same request again reuses all but its last token.
    r3 = client.chat.completions.create(model="tiny", messages=follow, max_tokens=MAX,
                                        temperature=0)
    assert r3.usage.prompt_tokens_details.cached_tokens == r3.usage.prompt_tokens - 1
    assert r3.choices[0].message.content == r2.choices[0].message.content


def test_logprobs(served):
    model, tokenizer, srv, client = served
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user",
                                                               "content": "def main"}],
                                       max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3,
                                       extra_body={"enable_thinking": False})
    content = r.choices[0].logprobs.content
    assert len(content) >= r.usage.completion_tokens - 1  # a final eos has no entry
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.logprob == pytest.approx(tops[0], abs=1e-5)  # greedy takes the top
        assert entry.logprob <= 0


def test_completions_endpoint(served):
    model, tokenizer, srv, client = served
    prompt = "the quick brown fox"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX, temperature=0)
    reasoning, answer = _reference(model, tokenizer, prompt)
    assert r.choices[0].text == reasoning + answer
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=prompt, max_tokens=MAX, temperature=0, stream=True))
    assert streamed == r.choices[0].text
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_tools_and_tool_results_render_and_match_generate(served):
    model, tokenizer, srv, client = served
    messages = [{"role": "user", "content": "weather in paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS,
                                       max_tokens=MAX, temperature=0)
    template_messages = [messages[0], {**messages[1], "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "paris"}}}]}, messages[2]]
    assert r.usage.prompt_tokens == len(tokenizer.apply_chat_template(
        template_messages, add_generation_prompt=True, tools=TOOLS))
    assert r.choices[0].message.content == _reference(model, tokenizer, template_messages,
                                                      tools=TOOLS)[1]


def test_concurrent_requests_decode_together(served):
    model, tokenizer, srv, client = served
    prompts = ["hello world", "the quick brown fox", "def main", "user assistant"]
    want = {p: _reference(model, tokenizer, [{"role": "user", "content": p}],
                          enable_thinking=False)[1] for p in prompts}
    before = srv.metrics()
    got: dict[str, str] = {}
    barrier = threading.Barrier(len(prompts))

    def ask(p: str) -> None:
        barrier.wait(timeout=30)
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user",
                                                                   "content": p}],
                                           max_tokens=MAX, temperature=0,
                                           extra_body={"enable_thinking": False})
        got[p] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == want
    after = srv.metrics()
    steps = after["qwen_mlx_decode_steps_total"] - before["qwen_mlx_decode_steps_total"]
    rows = after["qwen_mlx_decode_rows_total"] - before["qwen_mlx_decode_rows_total"]
    assert rows > steps  # some forward carried more than one request


def test_tool_calls_come_out_in_openai_shape(served):
    """A reply that writes a call (fed token by token through a request's pipeline, since
    a random model writes none) gives a structured call, streamed as one delta."""
    model, tokenizer, srv, client = served
    text = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": ' \
           '"paris"}}\n</tool_call>'
    events = []
    job = Job([1, 2], sampler=lambda: None, max_tokens=100, stop=[], tokenizer=tokenizer,
              tool_parser=ToolCallParser("json", TOOLS), logprobs=None, emit=events.append)
    for token in tokenizer.encode(text) + [tokenizer.eos_token_ids[0]]:
        deltas, finish = job.feed(token, None)
        events += deltas
    assert finish == "stop"
    events += job.flush(finish)
    calls = [c for d in events if isinstance(d, Delta) for c in d.tool_calls]
    answer = "".join(d.text for d in events if isinstance(d, Delta) and d.phase == "answer")
    assert answer == "Let me check."
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", {"city": "paris"})]
    result = job.finished(finish)
    assert isinstance(result, Finished) and result.finish_reason == "tool_calls"
    from qwen_mlx.serve.app import _Output
    from qwen_mlx.serve.schema import parse_chat

    req = parse_chat({"messages": [{"role": "user", "content": "x"}], "tools": TOOLS},
                     ["tiny"], 64)
    out = _Output(srv.server, req, job, "chatcmpl-x", True, 0.0, "/v1/chat/completions")
    chunk = json.loads(out._delta(Delta("answer", "", calls))[len("data: "):])
    call = chunk["choices"][0]["delta"]["tool_calls"][0]
    assert call["index"] == 0 and call["type"] == "function" and call["id"].startswith("call_")
    assert json.loads(call["function"]["arguments"]) == {"city": "paris"}
