"""Continuous batching: the scheduler that decodes every running request in one forward.

One scheduler thread drives the loop; each of its steps runs on the library's MLX thread
(`generate.worker.WORKER`), so no other thread of the server touches MLX arrays. A step:

1. drops the requests whose client went away (they finish "cancelled" at once);
2. prefills at most `prefill_step` prompt tokens of the requests waiting to start, each
   alone in its own single-row cache, after taking the longest reusable start from the
   prompt cache (`PromptLRU`); a request whose prompt is all in joins the batch;
3. runs one forward over the batch ([B, 1] tokens; per-row positions, masks and DeltaNet
   states, see `model.cache`'s batch classes), samples each row with its own sampler, and
   turns each row's token into text, reasoning and tool calls as `stream_generate` does;
4. lets the finished rows leave, storing their caches in the prompt cache.

A failure inside one request's work ends that request with an error; the others go on.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import mlx.core as mx

from ..generate.generation import ReplyText, end_ids, prefill
from ..generate.sampling import Sampler
from ..generate.worker import WORKER
from ..model.cache import cache_arrays
from ..text.tool_calls import ToolCallParser
from .json_mask import JsonConstraint
from .prompt_lru import PromptLRU, copy_prefix

log = logging.getLogger("qwen_mlx.serve")
_STREAM = mx.new_thread_local_stream(mx.default_device())


@dataclass
class Delta:
    """What one step of a request produced for its client."""

    phase: str = "answer"  # "thinking" or "answer"
    text: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)  # {"id", "logprob", "top": [(id, lp)]}


@dataclass
class Finished:
    """A request's end: why, and its numbers."""

    finish_reason: str  # "stop", "length", "tool_calls", "cancelled" or "error"
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft: float
    decode_tps: float
    error: str | None = None


class Job:
    """One request in the scheduler: its prompt, sampling and text pipeline.

    `emit` is called on the scheduler's thread with each `Delta`, then one `Finished`.
    `sampler` makes the request's Sampler; it runs on the MLX thread, where its arrays live.
    `forced` is reply text the prompt already ends with (a forced tool-call opening): it
    goes through the reply's parsers first, so a call it opens parses whole. `constraint`
    masks each step's logits (json_object)."""

    def __init__(self, ids: list[int], *, sampler: Callable[[], Sampler], max_tokens: int,
                 stop: list[str], tokenizer, tool_parser: ToolCallParser | None,
                 logprobs: int | None, emit: Callable[[Any], None],
                 snapshot_at: int | None = None, forced: str = "",
                 constraint: JsonConstraint | None = None) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.ids, self.make_sampler, self.max_tokens = ids, sampler, max_tokens
        self.sampler: Sampler | None = None
        self.logprobs = logprobs  # None: none; k: the chosen token's and the top k
        self.emit = emit
        self.snapshot_at = snapshot_at
        self.cancel_event = threading.Event()
        self.submitted = time.perf_counter()
        self.first_token: float | None = None
        # Text pipeline, as generation._stream runs it.
        self._reply = ReplyText(tokenizer, ids, stop)
        self._tools = tool_parser
        self._eos = end_ids(tokenizer)
        self.called_tools = False
        self.constraint = constraint
        self._pending = self._split([("answer", forced)]) if forced else []
        # Scheduler state.
        self.cache: list | None = None  # the single-row cache while prefilling
        self.cached = 0  # prompt tokens reused from the prompt cache
        self.pos = 0  # prompt tokens the cache holds
        self.generated: list[int] = []
        self.next_input: int | None = None
        self.done = False

    def cancel(self) -> None:
        """Stop this request at the scheduler's next step (the client went away)."""
        self.cancel_event.set()

    # ------------------------------------------------------------------ text

    def _split(self, pieces: list[tuple[str, str]]) -> list[Delta]:
        out = []
        for phase, text in pieces:
            if self._tools is None or phase != "answer":
                out.append(Delta(phase, text))
                continue
            for p in self._tools.feed(text) if text else []:
                if p.call:
                    self.called_tools = True
                    out.append(Delta(phase, "", [dict(p.call)]))
                elif p.text:
                    out.append(Delta(phase, p.text))
        return out

    def feed(self, token: int, logprob: dict | None) -> tuple[list[Delta], str | None]:
        """The deltas a new token gives, and the finish reason when it ends the reply."""
        self.generated.append(token)
        if self.first_token is None:
            self.first_token = time.perf_counter()
        if self.constraint is not None:
            self.constraint.advance(token)
        pending, self._pending = self._pending, []
        if token in self._eos:
            return pending, "stop"
        pieces, stopped = self._reply.feed(token)
        deltas = pending + self._split(pieces)
        if logprob is not None:
            if not deltas:
                deltas.append(Delta(self._reply.phase))
            deltas[0].logprobs.append(logprob)
        if stopped:
            return deltas, "stop"
        if len(self.generated) >= self.max_tokens:
            return deltas, "length"
        return deltas, None

    def flush(self, finish: str) -> list[Delta]:
        """The text held back (partial stop strings, tags, an unclosed call)."""
        pending, self._pending = self._pending, []
        deltas = pending + self._split(self._reply.flush(finish))
        if self._tools is not None:
            deltas += [Delta("answer", p.text) for p in self._tools.flush() if p.text]
        return deltas

    def finished(self, reason: str, error: str | None = None) -> Finished:
        now = time.perf_counter()
        n = len(self.generated)
        tps = (n - 1) / (now - self.first_token) if self.first_token and n > 1 and \
            now > self.first_token else 0.0
        ttft = (self.first_token or now) - self.submitted
        if reason == "stop" and self.called_tools:
            reason = "tool_calls"
        return Finished(reason, len(self.ids), self.cached, n, ttft, tps, error)


class Metrics:
    """Running totals the server reports at /metrics."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts = dict(requests=0, finished=0, cancelled=0, failed=0, prompt_tokens=0,
                           cached_tokens=0, completion_tokens=0, decode_steps=0,
                           decode_rows=0, prefill_tokens=0)

    def add(self, **values: int) -> None:
        with self.lock:
            for k, v in values.items():
                self.counts[k] += v

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counts)


def _logprob_of(logprobs: mx.array, token: int, top: int) -> dict:
    """The chosen token's log-probability and the `top` most likely (id, logprob)."""
    row = logprobs
    entry = {"id": token, "logprob": float(row[token].item()), "top": []}
    if top:
        ids = mx.argsort(-row)[:top]
        entry["top"] = [(int(i), float(v)) for i, v in
                        zip(ids.tolist(), row[ids].tolist())]
    return entry


class Scheduler:
    """Continuous batching over one model; see the module docstring."""

    def __init__(self, model, *, max_batch: int = 8, prefill_step: int = 512,
                 cache_memory: int = 1 << 30) -> None:
        self.model = model
        self.batched = model.can_batch
        self.max_batch = max_batch if self.batched else 1
        self.prefill_step = prefill_step
        self.lru = PromptLRU(cache_memory)
        self.metrics = Metrics()
        self._waiting: list[Job] = []
        self._rows: list[Job] = []
        self._batch: list | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --------------------------------------------------------------- control

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="qwen-mlx-serve", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            self._waiting.append(job)
            self.metrics.add(requests=1)
            self._cond.notify()

    def wake(self) -> None:
        """Let the loop see a cancel promptly."""
        with self._cond:
            self._cond.notify()

    @property
    def busy(self) -> int:
        """Requests waiting or decoding."""
        with self._cond:
            return len(self._waiting) + len(self._rows)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is left and end the loop."""
        with self._cond:
            self._stopping = True
            for job in self._waiting + self._rows:
                job.cancel()
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def idle_memory(self) -> dict[str, int]:
        """MLX memory now, and what the prompt cache holds of it."""
        return dict(active=mx.get_active_memory(), cache=self.lru.nbytes,
                    entries=len(self.lru))

    def clear_cache(self) -> None:
        WORKER.run(self._clear)

    def _clear(self) -> None:
        self.lru.clear()
        mx.clear_cache()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._rows or self._stopping):
                    self._cond.wait()
                if self._stopping and not (self._waiting or self._rows):
                    return
            try:
                WORKER.run(self._step)
            except Exception:  # a bug in the step itself: fail what runs, keep serving
                log.exception("scheduler step failed")
                with self._cond:
                    jobs, self._rows, self._batch = self._rows, [], None
                for job in jobs:
                    self._end(job, "error", "internal error in the batch step")

    # ------------------------------------------------------------------ step

    def _end(self, job: Job, reason: str, error: str | None = None) -> None:
        if job.done:
            return
        job.done = True
        if reason not in ("error", "cancelled"):
            for d in job.flush(reason):
                job.emit(d)
        result = job.finished(reason, error)
        self.metrics.add(finished=1, cancelled=int(reason == "cancelled"),
                         failed=int(reason == "error"), prompt_tokens=result.prompt_tokens,
                         cached_tokens=result.cached_tokens,
                         completion_tokens=result.completion_tokens)
        job.emit(result)

    def _step(self) -> None:
        with self._cond:
            for job in [j for j in self._waiting if j.cancel_event.is_set()]:
                self._waiting.remove(job)
                self._end(job, "cancelled")
        gone = [i for i, j in enumerate(self._rows) if j.cancel_event.is_set()]
        if gone:
            for i in gone:
                self._end(self._rows[i], "cancelled")
            self._leave(gone, store=False)
        with mx.stream(_STREAM):
            self._prefill_some()
            if self._rows:
                self._decode()

    def _prefill_some(self) -> None:
        budget = self.prefill_step
        while budget > 0 and len(self._rows) < self.max_batch:
            with self._cond:
                if not self._waiting:
                    return
                job = self._waiting[0]
            try:
                budget -= self._prefill(job, budget)
            except Exception as e:  # this request only
                log.exception("prefill failed")
                with self._cond:
                    self._waiting.remove(job)
                self._end(job, "error", f"prefill failed: {e}")
                continue
            if job.next_input is not None:
                with self._cond:
                    self._waiting.remove(job)
                self._join(job)

    def _prefill(self, job: Job, budget: int) -> int:
        """Prefill up to `budget` more tokens of `job`'s prompt; the tokens run."""
        head = len(job.ids) - 1  # the last prompt token runs in the first decode step
        if job.cache is None:
            job.sampler = job.make_sampler()
            cache, n = self.lru.lookup(job.ids)
            job.cache = cache if cache is not None else self.model.make_cache()
            job.cached = job.pos = n
        stop = min(head, job.pos + budget)
        if job.snapshot_at is not None and job.pos < job.snapshot_at <= head:
            stop = min(stop, job.snapshot_at)
        ran = stop - job.pos
        if ran:
            prefill(self.model, job.ids[job.pos:stop], job.cache, step=self.prefill_step,
                    prompt_length=len(job.ids))
            job.pos = stop
            self.metrics.add(prefill_tokens=ran)
        if job.snapshot_at is not None and job.pos == job.snapshot_at and ran:
            self.lru.insert(job.ids[:job.pos], copy_prefix(job.cache, job.pos))
        if job.pos == head:
            job.next_input = job.ids[-1]
            if job.snapshot_at is not None and ran and head > job.snapshot_at:
                # The same prompt again (a regenerate) needs the state before its last token.
                self.lru.insert(job.ids[:head], copy_prefix(job.cache, head))
        return max(ran, 1)

    def _join(self, job: Job) -> None:
        self._rows.append(job)
        if not self.batched:
            return
        one = self.model.batch_cache(job.cache)
        job.cache = None
        if self._batch is None:
            self._batch = one
        else:
            for c, o in zip(self._batch, one):
                c.extend(o)

    def _leave(self, rows: list[int], *, store: bool) -> None:
        """Take `rows` out of the batch; with `store`, keep their caches in the LRU."""
        drop = set(rows)
        for i in sorted(drop):
            job = self._rows[i]
            if store:
                cache = ([c.extract(i) for c in self._batch] if self.batched else job.cache)
                held = (job.ids + job.generated)[: cache[0].offset]
                mx.eval(cache_arrays(cache))
                self.lru.insert(held, cache)
            job.cache = None
        keep = [i for i in range(len(self._rows)) if i not in drop]
        with self._cond:
            self._rows = [self._rows[i] for i in keep]
        if self.batched:
            if keep:
                for c in self._batch:
                    c.filter(keep)
            else:
                self._batch = None

    def _decode(self) -> None:
        rows = self._rows
        tokens = mx.array([[j.next_input] for j in rows])
        if self.batched:
            logits = self.model(tokens, cache=self._batch, last_only=True)[:, -1, :]
            arrays = cache_arrays(self._batch)
        else:
            logits = mx.concatenate([self.model(tokens[i:i + 1], cache=j.cache,
                                                last_only=True)[:, -1, :]
                                     for i, j in enumerate(rows)])
            arrays = [a for j in rows for a in cache_arrays(j.cache)]
        picked = []
        for i, job in enumerate(rows):
            row = logits[i:i + 1]
            if job.constraint is not None:
                row = job.constraint.apply(row)
            t = job.sampler(row)
            job.sampler.observe(t)
            picked.append(t)
        chosen = mx.concatenate(picked)
        wants = [j.logprobs is not None for j in rows]
        lps = None
        if any(wants):
            lf = logits.astype(mx.float32)
            lps = lf - mx.logsumexp(lf, axis=-1, keepdims=True)
        mx.eval(chosen, arrays, *([lps] if lps is not None else []))
        self.metrics.add(decode_steps=1, decode_rows=len(rows))
        ended: list[int] = []
        for i, (job, token) in enumerate(zip(rows, chosen.tolist())):
            try:
                lp = _logprob_of(lps[i], token, job.logprobs) if wants[i] else None
                deltas, finish = job.feed(token, lp)
                for d in deltas:
                    job.emit(d)
                limit = getattr(self.model, "max_context", None)
                if finish is None and limit and len(job.ids) + len(job.generated) >= limit:
                    finish = "length"
                if finish is None and job.cancel_event.is_set():
                    finish = "cancelled"
            except Exception as e:  # this request only
                log.exception("request %s failed", job.id)
                self._end(job, "error", str(e))
                ended.append(i)
                continue
            if finish is not None:
                self._end(job, finish)
                ended.append(i)
            else:
                job.next_input = token
        if ended:
            self._leave(ended, store=True)

