"""Generation: prefill, the decode loop, streaming text, and chat sessions.

`stream_generate` yields one `GenerationResponse` per token (or per piece of
text when a token closes a reasoning block or a tool call), with live statistics.
Tool calls in the answer (``<tool_call>…</tool_call>``, in the template's JSON or XML
format, see `text.tool_calls`) are not streamed as text: each response carries the
calls completed at its step in `tool_calls`.
`ChatSession` keeps a conversation and its KV cache: each turn prefills only
what is new, and after a reply it re-renders the history as the template
will show it next turn (Qwen3 drops earlier reasoning), so the next turn's
prompt again shares everything but its new message with the cache.

Both run their MLX work on the library's one MLX thread (see `worker`), so calling
them from many threads leaves no idle OS threads behind.
"""

from __future__ import annotations

import numbers
import threading
import time
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import mlx.core as mx

from ..errors import QwenMLXError
from ..model.cache import KV_BITS, KVCache, cache_arrays, restore_cache, snapshot_cache
from ..text.thinking import ThinkingParser, thinking_enabled
from ..text.tool_calls import FORMATS, ToolCall, ToolCallParser, detect_tool_format
from ..text.tokenizer import check_fits_model
from .sampling import Sampler, generation_config_defaults, resolve_sampling
from .speculative import (DEFAULT_DRAFT_TOKENS, ModelDrafter, SpeculativeStats, check_num_draft,
                          make_drafter, speculative_tokens)
from .worker import WORKER

# MLX streams belong to one thread: this one exists in whichever thread generates.
_STREAM = mx.new_thread_local_stream(mx.default_device())


@dataclass
class GenerationResponse:
    """One step of a streamed reply."""

    text: str  # the text this step completed (may be empty)
    token: int | None
    phase: str  # "thinking" or "answer"
    prompt_tokens: int  # tokens prefilled for this request
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: str | None = None  # "stop", "length", "context" or "cancelled"
    cached_tokens: int = 0  # prompt tokens reused from the cache
    ttft: float = 0.0  # seconds from the call to the first token
    context_tokens: int = 0  # positions the cache holds after this step
    # The tool calls completed at this step ({"id", "name", "arguments"}); a call's text
    # is never in `text`. Collect them over the stream as you collect `text`.
    tool_calls: list[ToolCall] = field(default_factory=list)
    # Why a tool call's text came out as text at this step (a malformed call), or what
    # was odd about a call in `tool_calls`.
    warnings: list[str] = field(default_factory=list)
    # Speculative decoding, so far in this reply: drafts proposed, and drafts accepted.
    draft_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts over proposed ones (0 without speculation)."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0


class StopMatcher:
    """Finds stop strings in a text stream, holding back text that may begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [(i, s) for s in self.stops if (i := self.pending.find(s)) >= 0]
        if hits:
            i, _ = min(hits)
            out, self.pending = self.pending[:i], ""
            return out, True
        hold = max((k for s in self.stops for k in range(1, len(s))
                    if self.pending.endswith(s[:k])), default=0)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _cancelled(cancel: threading.Event | Callable[[], bool] | None) -> bool:
    if cancel is None:
        return False
    return cancel.is_set() if isinstance(cancel, threading.Event) else bool(cancel())


def _or_stopped(cancel, stopped: Callable[[], bool]) -> Callable[[], bool]:
    """A cancel check that is also true once the consumer went away (see worker.iterate)."""
    return lambda: stopped() or _cancelled(cancel)


def _eval_cache(cache: list) -> None:
    mx.eval(cache_arrays(cache))


def check_token_ids(ids: Sequence[Any], rows: int) -> list[int]:
    """`ids` as ints, each checked to be a row of the model's embedding (0 to rows - 1).

    An id past the embedding would read outside it: a crash or silent garbage."""
    out = []
    for i, t in enumerate(ids):
        if not isinstance(t, numbers.Integral) or isinstance(t, bool):
            raise QwenMLXError(f"the prompt's token {i} is {t!r}, not a token id")
        t = int(t)
        if not 0 <= t < rows:
            raise QwenMLXError(f"token id {t} (position {i} of the prompt) is outside the "
                               f"model's vocabulary: ids run from 0 to {rows - 1}")
        out.append(t)
    return out


def check_cache_options(model, kv_bits: Any = None, max_kv_size: Any = None) -> None:
    """Refuse KV-cache options the cache cannot honour, before anything runs."""
    if kv_bits is not None:
        if (not isinstance(kv_bits, numbers.Integral) or isinstance(kv_bits, bool)
                or kv_bits not in KV_BITS):
            raise QwenMLXError(f"kv_bits {kv_bits!r} is not supported: choose "
                               f"{' or '.join(map(str, KV_BITS))}, or none for a float cache")
        head = model.config.head_dim
        if head % 32:
            raise QwenMLXError(
                f"kv_bits {kv_bits}: this model's KV cache cannot be quantized, since its head "
                f"size {head} is not a multiple of 32 (the quantizer's smallest group); "
                "leave the cache unquantized")
    if max_kv_size is not None and (not isinstance(max_kv_size, numbers.Integral)
                                    or isinstance(max_kv_size, bool) or max_kv_size < 1):
        raise QwenMLXError(f"max_kv_size must be a whole number of positions, at least 1, "
                           f"got {max_kv_size!r}")


def tool_call_format(tokenizer, tools: Sequence[Mapping[str, Any]] | None = None,
                     requested: str | None = "auto") -> str | None:
    """The tool-call format to parse replies with: "json", "xml", "auto" or None (none).

    `requested` None turns parsing off and "json"/"xml" force a format. "auto" parses
    only when `tools` are given (without them a call has nobody to answer it, so its
    text stays text), in the chat template's format (its "tool_use" template when the
    folder has one); when the template shows no ``<tool_call>``, each call's own text
    decides."""
    if requested is None:
        return None
    if requested not in FORMATS:
        raise QwenMLXError(f"tool_format {requested!r} is not one of "
                           f"{', '.join(map(repr, FORMATS))} or None")
    if requested != "auto":
        return requested
    if tools is None:
        return None
    templates = getattr(tokenizer, "chat_templates", None) or {}
    template = templates.get("tool_use") or templates.get("default")
    return detect_tool_format(getattr(template, "source", None)) or "auto"


def make_tool_parser(tokenizer, tools, requested) -> ToolCallParser | None:
    kind = tool_call_format(tokenizer, tools, requested)
    return None if kind is None else ToolCallParser(kind, tools)


def _sampling_origin(tokenizer) -> str:
    return getattr(tokenizer, "generation_config_origin", "generation_config.json")


def prefill(model, tokens: Sequence[int], cache: list, *, step: int = 512,
            prompt_length: int | None = None, cancel=None,
            observer: Callable[[list[int], mx.array], None] | None = None) -> bool:
    """Run `tokens` into the cache in chunks of `step`, producing no logits.

    `observer(chunk, hidden)` sees each chunk with its final hidden states (a speculative
    drafter following the target). Returns False when `cancel` stopped it between chunks."""
    total = prompt_length or len(tokens)
    with mx.stream(_STREAM):
        for i in range(0, len(tokens), step):
            if _cancelled(cancel):
                return False
            chunk = list(tokens[i:i + step])
            out = model(mx.array(chunk)[None], cache=cache, prompt_length=total,
                        last_only=True, return_hidden=observer is not None)
            if observer is not None:
                observer(chunk, out[1])
            _eval_cache(cache)
            mx.clear_cache()  # the chunk's temporaries go back now, not at the end
    return True


def prefill_head(model, prompt: Sequence[int], cache: list, *, max_tokens: int, step: int,
                 prompt_length: int, cancel=None, mark: int | None = None,
                 on_mark: Callable[[], None] | None = None,
                 observer: Callable[[list[int], mx.array], None] | None = None) -> bool:
    """Check a generation's prompt and `max_tokens`, then run all but the prompt's last
    token into the cache, calling `on_mark` once the first `mark` are in (see `prefill`
    for `observer`). False when `cancel` stopped it."""
    if not prompt:
        raise QwenMLXError("the prompt is empty: give at least one token")
    if max_tokens < 1:
        raise QwenMLXError(f"max_tokens must be at least 1, got {max_tokens}")
    # Everything but the last token only fills the cache: evaluating just the
    # keys and values lets MLX skip the last layer's attention and MLP there,
    # and the vocabulary projection runs for one position.
    head = list(prompt[:-1])
    options = dict(step=step, prompt_length=prompt_length, cancel=cancel, observer=observer)
    if on_mark is not None and mark is not None and 0 <= mark <= len(head):
        if not prefill(model, head[:mark], cache, **options):
            return False
        on_mark()
        head = head[mark:]
    return prefill(model, head, cache, **options)


def generate_tokens(model, prompt: Sequence[int], cache: list, sampler: Sampler, *,
                    max_tokens: int, prefill_step_size: int = 512,
                    prompt_length: int | None = None, cancel=None,
                    mark: int | None = None, on_mark: Callable[[], None] | None = None,
                    ) -> Iterator[int]:
    """Yield sampled token ids; the cache ends holding the prompt and every yielded token
    except, when `max_tokens` runs out, the last one. `cancel` can stop a long prefill
    between chunks (then nothing is yielded). `on_mark` is called once the cache holds
    the first `mark` prompt tokens (at most all but the last)."""
    total = prompt_length or len(prompt)
    if not prefill_head(model, prompt, cache, max_tokens=max_tokens, step=prefill_step_size,
                        prompt_length=total, cancel=cancel, mark=mark, on_mark=on_mark):
        return

    def step(tokens: mx.array) -> mx.array:
        """Queue the next token's computation; MLX runs it while the caller works."""
        with mx.stream(_STREAM):
            logits = model(tokens[None], cache=cache, prompt_length=total, last_only=True)
            token = sampler(logits[:, -1, :])
            sampler.observe(token)
        mx.async_eval(token)
        return token

    y = step(mx.array(prompt[-1:]))
    for produced in range(1, max_tokens + 1):
        next_y = step(y) if produced < max_tokens else None
        yield int(y.item())
        y = next_y


def stream_generate(model, tokenizer, prompt: str | Sequence[int] | list[dict], *,
                    max_tokens: int = 512, temperature: float | None = None,
                    top_p: float | None = None, top_k: int | None = None,
                    min_p: float | None = None, repetition_penalty: float | None = None,
                    presence_penalty: float | None = None,
                    frequency_penalty: float | None = None, seed: int | None = None,
                    stop: Sequence[str] = (), prompt_cache: list | None = None,
                    kv_bits: int | None = None, max_kv_size: int | None = None,
                    prefill_step_size: int = 512, enable_thinking: bool | None = None,
                    cancel: threading.Event | Callable[[], bool] | None = None,
                    tokens_out: list[int] | None = None,
                    tools: Sequence[Mapping[str, Any]] | None = None,
                    tool_format: str | None = "auto", draft_model: Any = None,
                    num_draft_tokens: int | None = None, speculative: str | None = None,
                    ) -> Iterator[GenerationResponse]:
    """Stream a reply to `prompt`: raw text, token ids, or chat messages.

    Text is encoded as is (special-token strings in it are honoured); a list of
    message dicts goes through the chat template with a generation prompt (and
    `tools`, JSON schemas); token ids must be rows of the model's embedding. With
    `prompt_cache`, the prompt continues what the cache already holds. `cancel` (an
    Event or a callable) stops generation between tokens; `tokens_out` receives every
    sampled id, the final eos included. Tool calls in the answer come out in the
    responses' `tool_calls`, parsed in `tool_format` (see `tool_call_format`; None
    leaves them as text); with a text or id prompt, `tools` only type the parsed calls.
    Speculative decoding: `draft_model` (a folder, hub id or `load`'s (model, tokenizer)
    pair, same tokenizer) or `speculative="mtp"` (the checkpoint's own MTP block) drafts
    `num_draft_tokens` per step; greedy output is unchanged, sampled output keeps its
    distribution (see `speculative`). The work runs on the library's MLX thread (see `worker`).
    """
    if prompt_cache is not None:
        # Arrays made lazily on this thread cannot be evaluated on the MLX thread.
        _eval_cache(prompt_cache)
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                    repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                    frequency_penalty=frequency_penalty, seed=seed)

    def run(stopped: Callable[[], bool]) -> Iterator[GenerationResponse]:
        check_cache_options(model, kv_bits, max_kv_size)
        tool_parser = make_tool_parser(tokenizer, tools, tool_format)
        messages = None
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt, special=True)
        elif prompt and isinstance(prompt[0], dict):
            messages = list(prompt)
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                enable_thinking=enable_thinking, tools=tools)
        else:
            ids = list(prompt)
        cache = prompt_cache if prompt_cache is not None else model.make_cache(
            kv_bits=kv_bits, max_kv_size=max_kv_size)
        drafter = make_drafter(model, tokenizer, draft_model=draft_model,
                               speculative=speculative, kv_bits=kv_bits,
                               max_kv_size=max_kv_size, prefill_step_size=prefill_step_size)
        num_draft = _num_draft(drafter, num_draft_tokens)
        held = cache[0].offset
        if drafter is not None and held:
            if isinstance(drafter, ModelDrafter):
                raise QwenMLXError(
                    "a draft model cannot follow a prompt_cache that already holds tokens "
                    "(it does not say which): use ChatSession, which keeps both caches in step")
            drafter.sync([0] * held)
        thinking = (thinking_enabled(messages, enable_thinking,
                                     soft_switch=_soft_switch(tokenizer, tools))
                    if messages is not None
                    else enable_thinking is not False)
        return _stream(model, tokenizer, ids, cache, context=ids, thinking=thinking,
                       max_tokens=max_tokens, stop=stop, prefill_step_size=prefill_step_size,
                       cancel=_or_stopped(cancel, stopped), sampling=sampling,
                       tokens_out=tokens_out, tool_parser=tool_parser, drafter=drafter,
                       num_draft=num_draft)

    yield from WORKER.iterate(run)


def generate(model, tokenizer, prompt: str | Sequence[int] | list[dict], **options) -> str:
    """The reply's answer as text; `stream_generate` also gives the reasoning."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **options)
                   if r.phase == "answer")


def _num_draft(drafter, requested: Any) -> int:
    """Drafts per step: as asked, else the drafter kind's default."""
    if drafter is None:
        if requested is not None:
            check_num_draft(requested)
        return 0
    return check_num_draft(DEFAULT_DRAFT_TOKENS[drafter.kind] if requested is None
                           else requested)


def _opens_thinking(tokenizer, ids: Sequence[int]) -> bool:
    """Whether the prompt ends inside a <think> block the template opened."""
    tail = tokenizer.decode(list(ids[-8:]), skip_special_tokens=False)
    return tail.rfind("<think>") > tail.rfind("</think>")


def end_ids(tokenizer) -> set[int]:
    """The ids that end a reply: ChatML models end a turn with <|im_end|>, and one that
    opens another turn is done too."""
    return set(tokenizer.eos_token_ids) | {i for i in (tokenizer.im_start_id,) if i is not None}


class ReplyText:
    """A reply's tokens as (phase, text) pieces: detokenized, held back and cut at stop
    strings, split into reasoning and answer. Tool calls are the consumer's to parse."""

    def __init__(self, tokenizer, context: Sequence[int], stop: Sequence[str]):
        self._detok = tokenizer.detokenizer()
        self._thinking = ThinkingParser(in_thinking=_opens_thinking(tokenizer, context))
        self._stops = StopMatcher(stop)

    @property
    def phase(self) -> str:
        return self._thinking.phase

    def feed(self, token: int) -> tuple[list[tuple[str, str]], bool]:
        """The pieces a token completes, and whether it reached a stop string."""
        text, stopped = self._stops.feed(self._detok.add_token(token))
        return (self._thinking.feed(text) if text else []), stopped

    def flush(self, finish: str | None) -> list[tuple[str, str]]:
        """The text held back (a partial stop string, an open tag); after a stop string,
        what followed it is dropped."""
        tail = "" if finish == "stop" else self._stops.flush() + self._detok.finalize()
        return (self._thinking.feed(tail) if tail else []) + self._thinking.flush()


def _stream(model, tokenizer, new_ids: Sequence[int], cache: list, *, context: Sequence[int],
            thinking: bool, max_tokens: int, stop: Sequence[str], prefill_step_size: int,
            cancel, sampling: dict, tokens_out: list[int] | None = None,
            mark: int | None = None, on_mark: Callable[[], None] | None = None,
            tool_parser: ToolCallParser | None = None, drafter=None, num_draft: int = 0,
            ) -> Iterator[GenerationResponse]:
    """Generate after `new_ids`; `context` is the whole prompt the cache will then hold.
    Every sampled id, the final eos included, is appended to `tokens_out`. The answer
    goes through `tool_parser` (reasoning does not: a call it mentions is text). A
    `drafter` (in step with the cache) drafts `num_draft` tokens per step."""
    started = time.perf_counter()
    rows = model.config.vocab_size
    check_fits_model(tokenizer, rows, getattr(tokenizer, "origin", None))
    same = context is new_ids
    new_ids = check_token_ids(new_ids, rows)
    context = new_ids if same else check_token_ids(context, rows)
    if hasattr(model, "check_prompt"):
        model.check_prompt(new_ids)  # vision placeholders need the vision tower
    cached = cache[0].offset
    limit = getattr(model, "max_context", None)
    if limit and cached + len(new_ids) >= limit:
        raise QwenMLXError(
            f"the prompt needs {cached + len(new_ids)} positions but the context limit is "
            f"{limit}; shorten it, raise --max-context, or extend the context with "
            "--rope-scaling yarn")
    max_tokens = min(max_tokens, limit - cached - len(new_ids)) if limit else max_tokens
    defaults = generation_config_defaults(tokenizer.generation_config, _sampling_origin(tokenizer))
    params = resolve_sampling(family=model.config.family, thinking=thinking,
                              generation_config=defaults, **sampling)
    sampler = Sampler(params, rows, prompt=list(context),
                      allowed=getattr(tokenizer, "id_limit", None))
    reply = ReplyText(tokenizer, context, stop)
    eos = end_ids(tokenizer)
    mx.reset_peak_memory()
    first = None
    n = 0

    def split(pieces: list[tuple[str, str]]) -> list[tuple[str, str, list, list]]:
        """(phase, text) pieces as (phase, text, tool calls, warnings) items."""
        items = []
        for phase, text in pieces:
            if tool_parser is None or phase != "answer":
                items.append((phase, text, [], []))
                continue
            items.extend((phase, p.text, [p.call] if p.call else [], p.warnings)
                         for p in tool_parser.feed(text))
        return items

    def response(text, token, phase, finish=None, calls=(), warnings=()):
        now = time.perf_counter()
        prefill_time = (first or now) - started
        return GenerationResponse(
            text=text, token=token, phase=phase, prompt_tokens=len(new_ids),
            prompt_tps=len(new_ids) / max(prefill_time, 1e-9), generation_tokens=n,
            generation_tps=(n - 1) / (now - first) if first and n > 1 and now > first else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish, cached_tokens=cached,
            ttft=prefill_time, context_tokens=cache[0].offset, tool_calls=list(calls),
            warnings=list(warnings), draft_tokens=spec.draft_tokens,
            accepted_tokens=spec.accepted_tokens)

    finish = "length"
    spec = SpeculativeStats()
    if drafter is not None:
        tokens = speculative_tokens(model, list(new_ids), cache, sampler, drafter,
                                    num_draft=num_draft, max_tokens=max_tokens,
                                    prefill_step_size=prefill_step_size,
                                    prompt_length=len(context), cancel=cancel, mark=mark,
                                    on_mark=on_mark, stats=spec, stream=_STREAM)
    else:
        tokens = generate_tokens(model, list(new_ids), cache, sampler, max_tokens=max_tokens,
                                 prefill_step_size=prefill_step_size,
                                 prompt_length=len(context), cancel=cancel, mark=mark,
                                 on_mark=on_mark)
    for token in tokens:
        if first is None:
            first = time.perf_counter()
        n += 1
        if tokens_out is not None:
            tokens_out.append(token)
        if token in eos:
            finish = "stop"
            break
        pieces, stopped = reply.feed(token)
        items = split(pieces)
        for phase, piece, calls, warnings in items:
            yield response(piece, token, phase, calls=calls, warnings=warnings)
        if not items:
            yield response("", token, reply.phase)
        if stopped:
            finish = "stop"
            break
        if _cancelled(cancel):
            finish = "cancelled"
            break
    else:
        if n == 0 and _cancelled(cancel):
            finish = "cancelled"  # during the prefill
        elif limit and cache[0].offset + 1 >= limit:
            finish = "context"
    tokens.close()  # a speculative step rolls back the drafts it did not hand out
    # The caller's thread may read or reuse the cache next: leave nothing in flight.
    _eval_cache(cache)
    items = split(reply.flush(finish))
    if tool_parser is not None:  # an unclosed call is text now
        items += [("answer", p.text, [p.call] if p.call else [], p.warnings)
                  for p in tool_parser.flush()]
    for phase, piece, calls, warnings in items[:-1]:
        yield response(piece, None, phase, calls=calls, warnings=warnings)
    phase, piece, calls, warnings = items[-1] if items else (reply.phase, "", [], [])
    yield response(piece, None, phase, finish, calls=calls, warnings=warnings)


def clear_cache(cache: list) -> None:
    """Empty every layer's cache."""
    for c in cache:
        if not c.trim(c.offset):
            c.set_state(None, None, 0)


def _shared(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the common prefix of `a` and `b`."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def reuse_cache(cache: list, cached: list[int], ids: list[int], *,
                keep_one: bool = True) -> tuple[list[int], list[int]]:
    """Trim `cache` (holding `cached`) to what it shares with `ids`.

    Returns (the ids the cache now holds, the ids still to run). With
    `keep_one`, at least one id is left to run, since the last prompt token
    must run to give the first logits.
    """
    common = _shared(cached, ids)
    if keep_one and common == len(ids):
        common -= 1
    drop = len(cached) - common
    if drop and not all(c.trim(drop) for c in cache):
        clear_cache(cache)  # a rotating cache that already dropped positions
        common = 0
    return list(ids[:common]), list(ids[common:])


def _soft_switch(tokenizer, tools) -> bool:
    """Whether /think and /no_think switch this template (Qwen3's do; Qwen3.5's do not)."""
    has = getattr(tokenizer, "has_soft_switch", None)
    return True if has is None else has(tools=tools)


# Turn snapshots a session keeps for hybrid (and windowed) caches: each holds a DeltaNet
# layer's constant-size state (2 MiB per layer at Qwen3.5-35B-A3B's size).
MAX_SNAPSHOTS = 8


class ChatSession:
    """A conversation with its KV cache, reused across turns, regenerations and edits.

    A turn that fails (an error, or a cancel before the first token) leaves the history
    as it was; a reply that was stopped or cut short is kept as far as it got. The MLX
    work runs on the library's MLX thread (see `worker`).

    With `tools`, a reply's tool calls (parsed in `tool_format`, see `tool_call_format`)
    are stored on its message as ``tool_calls`` (OpenAI's shape) and come out in the
    responses' `tool_calls`; `send_tool_results` answers them.

    `draft_model`, `num_draft_tokens` and `speculative` are stream_generate's: speculative
    decoding for every turn, the drafter's cache kept in step with the session's.
    """

    def __init__(self, model, tokenizer, *, system: str | None = None,
                 enable_thinking: bool | None = None, tools: list | None = None,
                 kv_bits: int | None = None, max_kv_size: int | None = None,
                 prefill_step_size: int = 512, messages: list[dict] | None = None,
                 tool_format: str | None = "auto", draft_model: Any = None,
                 num_draft_tokens: int | None = None, speculative: str | None = None):
        check_cache_options(model, kv_bits, max_kv_size)
        # A draft model's cache follows this one's ids across turns (see _reuse).
        self.drafter = make_drafter(model, tokenizer, draft_model=draft_model,
                                    speculative=speculative, kv_bits=kv_bits,
                                    max_kv_size=max_kv_size, prefill_step_size=prefill_step_size)
        self.num_draft_tokens = _num_draft(self.drafter, num_draft_tokens)
        tool_call_format(tokenizer, tools, tool_format)  # a bad format shows now
        self.tool_format = tool_format
        # A bad generation_config.json shows now, not at the first message.
        generation_config_defaults(tokenizer.generation_config, _sampling_origin(tokenizer))
        self.model, self.tokenizer = model, tokenizer
        self.enable_thinking, self.tools = enable_thinking, tools
        self.prefill_step_size = prefill_step_size
        self.messages: list[dict[str, Any]] = [dict(m) for m in messages or []]
        if system and not (self.messages and self.messages[0]["role"] == "system"):
            self.messages.insert(0, {"role": "system", "content": system})
        self.cache = model.make_cache(kv_bits=kv_bits, max_kv_size=max_kv_size)
        self.cached: list[int] = []  # the token ids whose keys and values the cache holds
        # Layers that cannot trim (rotating ones once they dropped a position, linear
        # attention's state) are snapshotted where each next turn's prompt will part from
        # the turn before: (the ids held then, the snapshots), shortest first, at most
        # `max_snapshots` (the latest turns), so an edit goes back to the nearest one.
        self._snapshots: list[tuple[list[int], list]] = []
        self.max_snapshots = MAX_SNAPSHOTS

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt,
            enable_thinking=self.enable_thinking, tools=self.tools)

    def _sync(self) -> None:
        """Make `cached` and the cache agree (after a turn that failed part way)."""
        offset = self.cache[0].offset
        if offset < len(self.cached):
            self.cached = self.cached[:offset]
        elif offset > len(self.cached):
            extra = offset - len(self.cached)
            if not all(c.trim(extra) for c in self.cache):
                self.reset_cache()

    def _reuse(self, ids: list[int], *, keep_one: bool) -> list[int]:
        """Bring the cache to the longest prefix of `ids` it can hold; the ids left to run."""
        self._sync()
        common = _shared(self.cached, ids)
        if keep_one and common == len(ids):
            common -= 1
        drop = len(self.cached) - common
        if drop:
            if not all([c.trim(drop) for c in self.cache]):  # every layer, no short cut
                held = self._restore_snapshot(ids, common)
                if held is None:
                    clear_cache(self.cache)
                    held = 0
                common = held
        self.cached = list(ids[:common])
        if self.drafter is not None:
            self.drafter.sync(self.cached)
        return list(ids[common:])

    def _restore_snapshot(self, ids: list[int], common: int) -> int | None:
        """Put back the longest snapshot that is a prefix of `ids`; the positions then held.

        Snapshots past the one restored describe a history that is gone: they are dropped.
        """
        for k in range(len(self._snapshots) - 1, -1, -1):
            snap_ids, snaps = self._snapshots[k]
            p = len(snap_ids)
            if p <= common and list(ids[:p]) == snap_ids and restore_cache(self.cache, snaps):
                # Restored layers write into the snapshot's own arrays from now on: keep
                # fresh views instead, so the snapshot can serve again (another regenerate).
                self._snapshots[k:] = [(snap_ids, snapshot_cache(self.cache))]
                return p
        self._snapshots.clear()
        return None

    def _take_snapshot(self, ids: list[int]) -> None:
        ids = list(ids)
        # Keep the earlier snapshots this history still starts with, then this one.
        kept = [s for s in self._snapshots if len(s[0]) < len(ids) and ids[:len(s[0])] == s[0]]
        self._snapshots = (kept + [(ids, snapshot_cache(self.cache))])[-self.max_snapshots:]

    @property
    def snapshot_bytes(self) -> int:
        """Memory the turn snapshots keep alive beyond the cache itself (an upper bound:
        arrays they share with the live cache are counted)."""
        return sum(s.nbytes for _, snaps in self._snapshots for s in snaps)

    def _next_turn_prefix(self, ids: list[int]) -> int:
        """How much of `ids` the next turn's prompt will share (templates re-render the
        reply: Qwen3 drops its reasoning, so the cache parts there)."""
        probe = [{"role": "assistant", "content": "\ue002", "reasoning_content": "\ue003"},
                 {"role": "user", "content": "\ue000"}]
        return _shared(self._render(self.messages + probe, True), ids)

    def reset_cache(self) -> None:
        clear_cache(self.cache)
        self.cached = []
        self._snapshots = []
        if self.drafter is not None:
            self.drafter.reset()

    def send(self, text: str, **options) -> Iterator[GenerationResponse]:
        """Add a user message and stream the reply."""
        before = list(self.messages)
        self.messages.append({"role": "user", "content": text})
        yield from self.respond(_restore=before, **options)

    def send_tool_results(self, results: Sequence[Any], **options,
                          ) -> Iterator[GenerationResponse]:
        """Answer the last reply's tool calls and stream the model's next reply.

        `results` has one item per call, in the calls' order: the result itself (a string,
        or any other JSON value, which is sent as JSON text), or a tool message
        ``{"role": "tool", "content": ..., "tool_call_id": ...}`` (OpenAI's shape; the id
        picks the call it answers, else the item's position does). Each becomes a
        ``{"role": "tool", "content", "tool_call_id", "name"}`` message.
        """
        last = self.messages[-1] if self.messages else {}
        calls = last.get("tool_calls") if last.get("role") == "assistant" else None
        if not calls:
            raise QwenMLXError("the last message is not a reply with tool calls, so there is "
                               "nothing to send tool results for")
        if isinstance(results, (str, bytes, Mapping)) or not isinstance(results, Sequence):
            raise QwenMLXError("tool results must be a list, one item per tool call")
        if not results:
            raise QwenMLXError("give at least one tool result")
        by_id = {c.get("id"): c for c in calls if isinstance(c, Mapping)}
        before = list(self.messages)
        self.messages = before + [_tool_message(r, i, calls, by_id)
                                  for i, r in enumerate(results)]
        yield from self.respond(_restore=before, **options)

    def regenerate(self, **options) -> Iterator[GenerationResponse]:
        """Replace the last reply with a new one."""
        before = list(self.messages)
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if not self.messages or self.messages[-1]["role"] not in ("user", "tool"):
            self.messages = before
            raise QwenMLXError("there is no user message or tool result to reply to")
        yield from self.respond(_restore=before, **options)

    def edit(self, index: int, text: str, **options) -> Iterator[GenerationResponse]:
        """Change the user message at `index`, drop what followed it, and reply anew."""
        if not (0 <= index < len(self.messages)) or self.messages[index]["role"] != "user":
            raise QwenMLXError(f"message {index} is not a user message")
        before = list(self.messages)
        self.messages = self.messages[:index] + [{"role": "user", "content": text}]
        yield from self.respond(_restore=before, **options)

    def clear(self) -> None:
        """Start over, keeping the system prompt."""
        self.messages = [m for m in self.messages[:1] if m["role"] == "system"]
        self.reset_cache()

    def respond(self, *, max_tokens: int = 2048, stop: Sequence[str] = (), cancel=None,
                prepare_next_turn: bool = True, _restore: list[dict] | None = None,
                **sampling) -> Iterator[GenerationResponse]:
        """Stream a reply to the conversation as it stands, and add it to the history.

        Options are stream_generate's sampling keywords. With `prepare_next_turn`,
        the cache is brought to the history as the next turn will render it. When the
        turn fails, or is cancelled before its first token, the history goes back to
        `_restore` (send, edit and regenerate pass what it was before they changed it).
        """
        before = list(self.messages) if _restore is None else _restore
        yield from WORKER.iterate(lambda stopped: self._respond(
            before, max_tokens=max_tokens, stop=stop, cancel=_or_stopped(cancel, stopped),
            prepare_next_turn=prepare_next_turn, sampling=sampling))

    def _respond(self, before: list[dict], *, max_tokens: int, stop: Sequence[str], cancel,
                 prepare_next_turn: bool, sampling: dict) -> Iterator[GenerationResponse]:
        try:
            tool_parser = make_tool_parser(self.tokenizer, self.tools, self.tool_format)
            ids = self._render(self.messages, True)
            new = self._reuse(ids, keep_one=True)
            mark = on_mark = None
            if any(not isinstance(c, KVCache) for c in self.cache):
                held = len(self.cached)
                p = min(self._next_turn_prefix(ids), len(ids) - 1)
                if p >= held:
                    mark, on_mark = p - held, lambda: self._take_snapshot(ids[:p])
        except BaseException:
            self.messages = before
            raise
        start = self.cache[0].offset
        generated: list[int] = []
        thinking_parts, answer_parts, calls = [], [], []
        thinking = thinking_enabled(self.messages, self.enable_thinking,
                                    soft_switch=_soft_switch(self.tokenizer, self.tools))
        outcome = "failed"
        try:
            for r in _stream(self.model, self.tokenizer, new, self.cache, context=ids,
                             thinking=thinking, max_tokens=max_tokens, stop=stop,
                             prefill_step_size=self.prefill_step_size, cancel=cancel,
                             sampling=sampling, tokens_out=generated, mark=mark,
                             on_mark=on_mark, tool_parser=tool_parser, drafter=self.drafter,
                             num_draft=self.num_draft_tokens):
                (thinking_parts if r.phase == "thinking" else answer_parts).append(r.text)
                calls.extend(r.tool_calls)
                yield r
            outcome = "done"
        except GeneratorExit:
            outcome = "stopped"  # the reader went away: keep the reply so far, as a stop
            raise
        finally:
            if outcome == "failed" and self.cache[0].offset != start:
                self.reset_cache()  # a computation that failed part way: trust nothing
            else:
                # The history and the cache's ids stay consistent.
                self.cached = (ids + generated)[: self.cache[0].offset]
            if outcome != "failed" and generated:
                reply = {"role": "assistant", "content": "".join(answer_parts).strip(),
                         "reasoning_content": "".join(thinking_parts).strip()}
                if calls:
                    reply["tool_calls"] = [
                        {"id": c["id"], "type": "function",
                         "function": {"name": c["name"], "arguments": c["arguments"]}}
                        for c in calls]
                self.messages.append(reply)
            else:
                self.messages = before  # failed, or cancelled before the first token
        if prepare_next_turn and generated:
            self._prepare_next_turn()

    def prepare_next_turn(self) -> None:
        """Bring the cache to the history as the next turn's prompt will render it."""
        WORKER.run(self._prepare_next_turn)

    def _prepare_next_turn(self) -> None:
        # After tool calls the next message is their result, which templates may render
        # differently from a user's (Qwen3 keeps the reasoning of a reply that called tools).
        last = self.messages[-1] if self.messages else {}
        calls = last.get("tool_calls") if last.get("role") == "assistant" else None
        role = "tool" if calls else "user"
        # Probes whose UTF-8 starts with different bytes (EE…, E2…): with "\ue000" and
        # "\ue001" a byte-level BPE can share a token of their common lead bytes, which
        # the next message does not have, and a linear-attention state cannot trim it.
        a = self._render(self.messages + [{"role": role, "content": "\ue000"}], True)
        b = self._render(self.messages + [{"role": role, "content": "\u2603"}], True)
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        canonical = a[:n]
        new = self._reuse(canonical, keep_one=False)
        observer = self.drafter.observe if self.drafter is not None else None
        try:
            prefill(self.model, new, self.cache, step=self.prefill_step_size, observer=observer)
        finally:
            self.cached = canonical[: self.cache[0].offset]


def _tool_message(result: Any, index: int, calls: Sequence[Any],
                  by_id: Mapping[Any, Any]) -> dict[str, Any]:
    """The ``tool`` message for result `index` of the replies to `calls`."""
    if isinstance(result, Mapping) and result.get("role") == "tool":
        if "content" not in result:
            raise QwenMLXError(f"tool result {index} is a tool message without 'content'")
        content, call_id = result["content"], result.get("tool_call_id")
        name = result.get("name")
    else:
        content, call_id, name = result, None, None
    if call_id is not None:
        call = by_id.get(call_id)
        if call is None:
            known = ", ".join(repr(k) for k in by_id if k is not None) or "none"
            raise QwenMLXError(f"tool result {index} answers tool_call_id {call_id!r}, but the "
                               f"last reply made no such call (its ids: {known})")
    elif index < len(calls):
        call = calls[index]
    else:
        raise QwenMLXError(f"tool result {index} has no tool_call_id and the last reply made "
                           f"only {len(calls)} tool call(s)")
    fn = call.get("function", call) if isinstance(call, Mapping) else {}
    if not isinstance(content, str):
        try:
            content = json.dumps(content, ensure_ascii=False)
        except (TypeError, ValueError) as e:
            raise QwenMLXError(f"tool result {index} is neither text nor JSON ({e})") from None
    message = {"role": "tool", "content": content}
    if call_id is None and isinstance(call, Mapping):
        call_id = call.get("id")
    if call_id is not None:
        message["tool_call_id"] = call_id
    name = name if name is not None else (fn.get("name") if isinstance(fn, Mapping) else None)
    if name is not None:
        message["name"] = name
    return message
