"""Generation: prefill, the decode loop, streaming text, and chat sessions.

`stream_generate` yields one `GenerationResponse` per token (or per piece of
text when a token closes a reasoning block), with live statistics.
`ChatSession` keeps a conversation and its KV cache: each turn prefills only
what is new, and after a reply it re-renders the history as the template
will show it next turn (Qwen3 drops earlier reasoning), so the next turn's
prompt again shares everything but its new message with the cache.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx

from ..errors import QwenMLXError
from .sampling import Sampler, generation_config_defaults, resolve_sampling
from ..text.thinking import ThinkingParser, thinking_enabled

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


def _eval_cache(cache: list) -> None:
    mx.eval([a for c in cache for part in c.state() if part is not None
             for a in (part if isinstance(part, tuple) else (part,))])


def prefill(model, tokens: Sequence[int], cache: list, *, step: int = 512,
            prompt_length: int | None = None, cancel=None) -> bool:
    """Run `tokens` into the cache in chunks of `step`, producing no logits.

    Returns False when `cancel` stopped it between chunks."""
    total = prompt_length or len(tokens)
    with mx.stream(_STREAM):
        for i in range(0, len(tokens), step):
            if _cancelled(cancel):
                return False
            model(mx.array(tokens[i:i + step])[None], cache=cache, prompt_length=total,
                  last_only=True)
            _eval_cache(cache)
    return True


def generate_tokens(model, prompt: Sequence[int], cache: list, sampler: Sampler, *,
                    max_tokens: int, prefill_step_size: int = 512,
                    prompt_length: int | None = None, cancel=None) -> Iterator[int]:
    """Yield sampled token ids; the cache ends holding the prompt and every yielded token
    except, when `max_tokens` runs out, the last one. `cancel` can stop a long prefill
    between chunks (then nothing is yielded)."""
    if not prompt:
        raise QwenMLXError("the prompt is empty: give at least one token")
    if max_tokens < 1:
        raise QwenMLXError(f"max_tokens must be at least 1, got {max_tokens}")
    total = prompt_length or len(prompt)
    # Everything but the last token only fills the cache: evaluating just the
    # keys and values lets MLX skip the last layer's attention and MLP there,
    # and the vocabulary projection runs for one position.
    if not prefill(model, prompt[:-1], cache, step=prefill_step_size, prompt_length=total,
                   cancel=cancel):
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
                    ) -> Iterator[GenerationResponse]:
    """Stream a reply to `prompt`: raw text, token ids, or chat messages.

    Text is encoded as is (special-token strings in it are honoured); a list of
    message dicts goes through the chat template with a generation prompt. With
    `prompt_cache`, the prompt continues what the cache already holds.
    `cancel` (an Event or a callable) stops generation between tokens;
    `tokens_out` receives every sampled id, the final eos included.
    """
    messages = None
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, special=True)
    elif prompt and isinstance(prompt[0], dict):
        messages = list(prompt)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                            enable_thinking=enable_thinking)
    else:
        ids = list(prompt)
    cache = prompt_cache if prompt_cache is not None else model.make_cache(
        kv_bits=kv_bits, max_kv_size=max_kv_size)
    thinking = (thinking_enabled(messages, enable_thinking) if messages is not None
                else enable_thinking is not False)
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                    repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                    frequency_penalty=frequency_penalty, seed=seed)
    yield from _stream(model, tokenizer, ids, cache, context=ids, thinking=thinking,
                       max_tokens=max_tokens, stop=stop, prefill_step_size=prefill_step_size,
                       cancel=cancel, sampling=sampling, tokens_out=tokens_out)


def generate(model, tokenizer, prompt: str | Sequence[int] | list[dict], **options) -> str:
    """The reply's answer as text; `stream_generate` also gives the reasoning."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **options)
                   if r.phase == "answer")


def _opens_thinking(tokenizer, ids: Sequence[int]) -> bool:
    """Whether the prompt ends inside a <think> block the template opened."""
    tail = tokenizer.decode(list(ids[-8:]), skip_special_tokens=False)
    return tail.rfind("<think>") > tail.rfind("</think>")


def _stream(model, tokenizer, new_ids: Sequence[int], cache: list, *, context: Sequence[int],
            thinking: bool, max_tokens: int, stop: Sequence[str], prefill_step_size: int,
            cancel, sampling: dict, tokens_out: list[int] | None = None,
            ) -> Iterator[GenerationResponse]:
    """Generate after `new_ids`; `context` is the whole prompt the cache will then hold.
    Every sampled id, the final eos included, is appended to `tokens_out`."""
    started = time.perf_counter()
    cached = cache[0].offset
    limit = getattr(model, "max_context", None)
    if limit and cached + len(new_ids) >= limit:
        raise QwenMLXError(
            f"the prompt needs {cached + len(new_ids)} positions but the context limit is "
            f"{limit}; shorten it, raise --max-context, or extend the context with "
            "--rope-scaling yarn")
    max_tokens = min(max_tokens, limit - cached - len(new_ids)) if limit else max_tokens
    defaults = generation_config_defaults(tokenizer.generation_config)
    params = resolve_sampling(family=model.config.family, thinking=thinking,
                              generation_config=defaults, **sampling)
    sampler = Sampler(params, model.config.vocab_size, prompt=list(context))
    detok = tokenizer.detokenizer()
    parser = ThinkingParser(in_thinking=_opens_thinking(tokenizer, context))
    stops = StopMatcher(stop)
    # ChatML models end a turn with <|im_end|>; one that opens another turn is done too.
    eos = set(tokenizer.eos_token_ids) | {i for i in (tokenizer.im_start_id,) if i is not None}
    mx.reset_peak_memory()
    first = None
    n = 0

    def response(text, token, phase, finish=None):
        now = time.perf_counter()
        prefill_time = (first or now) - started
        return GenerationResponse(
            text=text, token=token, phase=phase, prompt_tokens=len(new_ids),
            prompt_tps=len(new_ids) / max(prefill_time, 1e-9), generation_tokens=n,
            generation_tps=(n - 1) / (now - first) if first and n > 1 and now > first else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish, cached_tokens=cached,
            ttft=prefill_time, context_tokens=cache[0].offset)

    finish = "length"
    for token in generate_tokens(model, list(new_ids), cache, sampler, max_tokens=max_tokens,
                                 prefill_step_size=prefill_step_size,
                                 prompt_length=len(context), cancel=cancel):
        if first is None:
            first = time.perf_counter()
        n += 1
        if tokens_out is not None:
            tokens_out.append(token)
        if token in eos:
            finish = "stop"
            break
        text, stopped = stops.feed(detok.add_token(token))
        pieces = parser.feed(text) if text else []
        for phase, piece in pieces:
            yield response(piece, token, phase)
        if not pieces:
            yield response("", token, parser.phase)
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
    tail = stops.flush() if finish != "stop" else ""
    tail += detok.finalize() if finish != "stop" else ""
    pieces = (parser.feed(tail) if tail else []) + parser.flush()
    for phase, piece in pieces[:-1]:
        yield response(piece, None, phase)
    last_phase, last_text = pieces[-1] if pieces else (parser.phase, "")
    yield response(last_text, None, last_phase, finish)


def clear_cache(cache: list) -> None:
    """Empty every layer's cache."""
    for c in cache:
        if not c.trim(c.offset):
            c.restore(None, None, 0)


def reuse_cache(cache: list, cached: list[int], ids: list[int], *,
                keep_one: bool = True) -> tuple[list[int], list[int]]:
    """Trim `cache` (holding `cached`) to what it shares with `ids`.

    Returns (the ids the cache now holds, the ids still to run). With
    `keep_one`, at least one id is left to run, since the last prompt token
    must run to give the first logits.
    """
    common = 0
    for a, b in zip(cached, ids):
        if a != b:
            break
        common += 1
    if keep_one and common == len(ids):
        common -= 1
    drop = len(cached) - common
    if drop and not all(c.trim(drop) for c in cache):
        clear_cache(cache)  # a rotating cache that already dropped positions
        common = 0
    return list(ids[:common]), list(ids[common:])


class ChatSession:
    """A conversation with its KV cache, reused across turns, regenerations and edits."""

    def __init__(self, model, tokenizer, *, system: str | None = None,
                 enable_thinking: bool | None = None, tools: list | None = None,
                 kv_bits: int | None = None, max_kv_size: int | None = None,
                 prefill_step_size: int = 512, messages: list[dict] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.enable_thinking, self.tools = enable_thinking, tools
        self.prefill_step_size = prefill_step_size
        self.messages: list[dict[str, Any]] = [dict(m) for m in messages or []]
        if system and not (self.messages and self.messages[0]["role"] == "system"):
            self.messages.insert(0, {"role": "system", "content": system})
        self.cache = model.make_cache(kv_bits=kv_bits, max_kv_size=max_kv_size)
        self.cached: list[int] = []  # the token ids whose keys and values the cache holds

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt,
            enable_thinking=self.enable_thinking, tools=self.tools)

    def _reuse(self, ids: list[int], *, keep_one: bool) -> list[int]:
        self.cached, new = reuse_cache(self.cache, self.cached, ids, keep_one=keep_one)
        return new

    def reset_cache(self) -> None:
        clear_cache(self.cache)
        self.cached = []

    def send(self, text: str, **options) -> Iterator[GenerationResponse]:
        """Add a user message and stream the reply."""
        self.messages.append({"role": "user", "content": text})
        yield from self.respond(**options)

    def regenerate(self, **options) -> Iterator[GenerationResponse]:
        """Replace the last reply with a new one."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if not self.messages or self.messages[-1]["role"] != "user":
            raise QwenMLXError("there is no user message to reply to")
        yield from self.respond(**options)

    def edit(self, index: int, text: str, **options) -> Iterator[GenerationResponse]:
        """Change the user message at `index`, drop what followed it, and reply anew."""
        if not (0 <= index < len(self.messages)) or self.messages[index]["role"] != "user":
            raise QwenMLXError(f"message {index} is not a user message")
        self.messages = self.messages[:index] + [{"role": "user", "content": text}]
        yield from self.respond(**options)

    def clear(self) -> None:
        """Start over, keeping the system prompt."""
        self.messages = [m for m in self.messages[:1] if m["role"] == "system"]
        self.reset_cache()

    def respond(self, *, max_tokens: int = 2048, stop: Sequence[str] = (), cancel=None,
                prepare_next_turn: bool = True, **sampling) -> Iterator[GenerationResponse]:
        """Stream a reply to the conversation as it stands, and add it to the history.

        Options are stream_generate's sampling keywords. With `prepare_next_turn`,
        the cache is brought to the history as the next turn will render it.
        """
        ids = self._render(self.messages, True)
        new = self._reuse(ids, keep_one=True)
        generated: list[int] = []
        thinking_parts, answer_parts = [], []
        thinking = thinking_enabled(self.messages, self.enable_thinking)
        replied = False
        try:
            for r in _stream(self.model, self.tokenizer, new, self.cache, context=ids,
                             thinking=thinking, max_tokens=max_tokens, stop=stop,
                             prefill_step_size=self.prefill_step_size, cancel=cancel,
                             sampling=sampling, tokens_out=generated):
                replied = True
                (thinking_parts if r.phase == "thinking" else answer_parts).append(r.text)
                yield r
        finally:
            # Whatever happened, the history and the cache's ids stay consistent; a
            # turn that failed before replying (say, past the context limit) adds nothing.
            self.cached = (ids + generated)[: self.cache[0].offset]
            if replied:
                self.messages.append({"role": "assistant",
                                      "content": "".join(answer_parts).strip(),
                                      "reasoning_content": "".join(thinking_parts).strip()})
        if prepare_next_turn:
            self.prepare_next_turn()

    def prepare_next_turn(self) -> None:
        """Bring the cache to the history as the next turn's prompt will render it."""
        a = self._render(self.messages + [{"role": "user", "content": "\ue000"}], True)
        b = self._render(self.messages + [{"role": "user", "content": "\ue001"}], True)
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        canonical = a[:n]
        new = self._reuse(canonical, keep_one=False)
        prefill(self.model, new, self.cache, step=self.prefill_step_size)
        self.cached = canonical
