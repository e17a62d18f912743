"""The OpenAI-compatible HTTP API on Starlette: routes, auth, limits, SSE, metrics.

Handlers validate (`schema`), render the prompt in a worker thread (the tokenizer is not
MLX), hand a `Job` to the `Scheduler` and relay what it emits through an asyncio queue.
A client that disconnects cancels its job at the scheduler's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import QwenMLXError
from ..generate.generation import check_token_ids, make_tool_parser, tool_call_format
from ..generate.sampling import Sampler, generation_config_defaults, resolve_sampling
from ..text.thinking import thinking_enabled
from ..text.tokenizer import check_fits_model
from .batching import Delta, Finished, Job, Scheduler
from .json_mask import JsonConstraint, JsonVocabulary
from .schema import GenerationRequest, RequestError, parse_chat, parse_completion

log = logging.getLogger("qwen_mlx.serve")
# Where the next turn's prompt parts from this one (as ChatSession probes it): a hybrid's
# state is stored there, since a recurrence cannot go back.
_PROBE = [{"role": "assistant", "content": "\ue002", "reasoning_content": "\ue003"},
          {"role": "user", "content": "\ue000"}]


def forced_tool_opening(kind: str | None, name: str | None) -> str:
    """The start of a tool call that `tool_choice` forces onto the reply, in the format
    the template teaches: a call of `name`, or of any function when `name` is None.

    JSON (Qwen2.5/Qwen3): the model writes on from the arguments (or from the name); the
    XML form (Qwen3.5): from the first parameter (or from the function's name)."""
    if kind == "xml":
        return "<tool_call>\n<function=" + (f"{name}>\n" if name is not None else "")
    if name is None:
        return "<tool_call>\n"
    return '<tool_call>\n{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '


@dataclass
class Limits:
    """What one request may ask for."""

    max_body: int = 4 << 20  # bytes
    max_tokens: int = 4096  # the most tokens a reply may ask for
    default_max_tokens: int = 2048  # a chat request that gives none


class Server:
    """A loaded model served under `names`; `app` is its Starlette application."""

    def __init__(self, model, tokenizer, names: list[str], *, api_key: str | None = None,
                 limits: Limits | None = None, max_batch: int = 8, prefill_step: int = 512,
                 cache_memory: int = 1 << 30) -> None:
        self.model, self.tokenizer, self.names = model, tokenizer, list(names)
        self.api_key = api_key
        self.limits = limits or Limits()
        self.scheduler = Scheduler(model, max_batch=max_batch, prefill_step=prefill_step,
                                   cache_memory=cache_memory)
        self.created = int(time.time())
        self.http_errors = 0
        self._json_vocab: JsonVocabulary | None = None
        self._json_lock = threading.Lock()
        self.hybrid = any(k != "attention" for k in model.config.layer_kinds) or any(
            model.config.sliding_windows)
        check_fits_model(tokenizer, model.config.vocab_size, getattr(tokenizer, "origin", None))
        self.sampling_defaults = generation_config_defaults(
            tokenizer.generation_config,
            getattr(tokenizer, "generation_config_origin", "generation_config.json"))
        self.app = Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ], lifespan=self._lifespan, exception_handlers={404: self._not_found,
                                                         405: self._not_allowed})

    # -------------------------------------------------------------- plumbing

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        self.scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(self.scheduler.stop)

    def _error(self, e: RequestError) -> JSONResponse:
        self.http_errors += 1
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    async def _not_found(self, request: Request, exc) -> Response:
        return self._error(RequestError(f"no route {request.url.path}: see /v1/models, "
                                        "/v1/chat/completions, /v1/completions", status=404,
                                        code="not_found"))

    async def _not_allowed(self, request: Request, exc) -> Response:
        return self._error(RequestError(f"{request.method} is not allowed on "
                                        f"{request.url.path}", status=405))

    def _check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise RequestError("this server needs an API key: send Authorization: Bearer KEY",
                               status=401, code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise RequestError("the API key is wrong", status=401, code="invalid_api_key")

    async def _body(self, request: Request) -> Any:
        limit = self.limits.max_body
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise RequestError(f"the request body is {length} bytes; at most {limit} are "
                               "accepted (--max-body)", status=413, code="body_too_large")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise RequestError(f"the request body is over {limit} bytes (--max-body)",
                                   status=413, code="body_too_large")
        try:
            return json.loads(bytes(data))
        except (ValueError, RecursionError) as e:
            raise RequestError(f"the request body is not valid JSON ({str(e)[:80]})") from None

    # ---------------------------------------------------------------- routes

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "models": self.names})

    async def models(self, request: Request) -> Response:
        try:
            self._check_key(request)
        except RequestError as e:
            return self._error(e)
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "created": self.created, "owned_by": "qwen-mlx"}
            for n in self.names]})

    async def metrics(self, request: Request) -> Response:
        try:
            self._check_key(request)
        except RequestError as e:
            return self._error(e)
        import mlx.core as mx

        counts = self.scheduler.metrics.snapshot()
        lines = [f"qwen_mlx_{k}_total {v}" for k, v in counts.items()]
        lines += [f"qwen_mlx_http_errors_total {self.http_errors}",
                  f"qwen_mlx_busy_requests {self.scheduler.busy}",
                  f"qwen_mlx_prompt_cache_bytes {self.scheduler.lru.nbytes}",
                  f"qwen_mlx_prompt_cache_entries {len(self.scheduler.lru)}",
                  f"qwen_mlx_prompt_cache_hits_total {self.scheduler.lru.hits}",
                  f"qwen_mlx_active_memory_bytes {mx.get_active_memory()}",
                  f"qwen_mlx_peak_memory_bytes {mx.get_peak_memory()}"]
        return PlainTextResponse("\n".join(lines) + "\n")

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    # ------------------------------------------------------------ generation

    def _prepare(self, req: GenerationRequest, chat: bool, emit) -> Job:
        """The job for a validated request (tokenizing; no MLX). RequestError on bad input."""
        tok, model = self.tokenizer, self.model
        tools = req.tools
        snapshot_at = None
        forced, constraint = "", None
        enable_thinking = req.enable_thinking
        if chat and (req.json_object or req.tool_choice == "required"):
            # The constraint and the forced opening start the answer itself.
            enable_thinking = False
        try:
            if chat:
                thinking = thinking_enabled(req.messages, enable_thinking,
                                            soft_switch=tok.has_soft_switch(tools=tools))
                ids = tok.apply_chat_template(req.messages, add_generation_prompt=True,
                                              enable_thinking=enable_thinking, tools=tools)
                if req.tool_choice == "required":
                    forced = forced_tool_opening(tool_call_format(tok, tools, "auto"),
                                                 req.tool_name)
                    ids = ids + tok.encode(forced)
                if req.json_object:
                    constraint = JsonConstraint(self.json_vocabulary())
                if self.hybrid:
                    probe = tok.apply_chat_template(req.messages + _PROBE,
                                                    add_generation_prompt=True,
                                                    enable_thinking=enable_thinking,
                                                    tools=tools)
                    p = next((i for i, (a, b) in enumerate(zip(ids, probe)) if a != b),
                             min(len(ids), len(probe)))
                    snapshot_at = p if 0 < p < len(ids) - 1 else None
            else:
                thinking = True
                ids = (tok.encode(req.prompt, special=True) if isinstance(req.prompt, str)
                       else list(req.prompt))
            ids = check_token_ids(ids, model.config.vocab_size)
            model.check_prompt(ids)
        except QwenMLXError as e:
            raise RequestError(str(e), "messages" if chat else "prompt") from None
        if not ids:
            raise RequestError("the prompt is empty", "prompt")
        limit = model.max_context
        if len(ids) >= limit:
            raise RequestError(f"the prompt is {len(ids)} tokens, but the context holds "
                               f"{limit}: shorten it", "messages" if chat else "prompt",
                               code="context_length_exceeded")
        max_tokens = req.max_tokens or min(self.limits.default_max_tokens,
                                           self.limits.max_tokens)
        max_tokens = min(max_tokens, limit - len(ids))
        try:
            params = resolve_sampling(family=model.config.family, thinking=thinking,
                                      generation_config=self.sampling_defaults,
                                      **req.sampling)
        except QwenMLXError as e:
            field = str(e).split(" ")[0]
            raise RequestError(str(e), field) from None
        rows, allowed = model.config.vocab_size, getattr(tok, "id_limit", None)
        return Job(ids, sampler=lambda: Sampler(params, rows, prompt=ids, allowed=allowed),
                   max_tokens=max_tokens, stop=req.stop, tokenizer=tok,
                   tool_parser=make_tool_parser(tok, tools, "auto") if chat else None,
                   logprobs=req.top_logprobs if req.logprobs else None, emit=emit,
                   snapshot_at=snapshot_at, forced=forced, constraint=constraint)

    def json_vocabulary(self) -> JsonVocabulary:
        """The tokenizer's JSON masks, built on the first json_object request."""
        with self._json_lock:
            if self._json_vocab is None:
                self._json_vocab = JsonVocabulary.for_tokenizer(self.tokenizer,
                                                                self.model.config.vocab_size)
            return self._json_vocab

    async def _generate(self, request: Request, *, chat: bool) -> Response:
        started = time.perf_counter()
        try:
            self._check_key(request)
            body = await self._body(request)
            parse = parse_chat if chat else parse_completion
            req = parse(body, self.names, self.limits.max_tokens)
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()

            def emit(item) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, item)

            job = await run_in_threadpool(self._prepare, req, chat, emit)
            try:
                self.scheduler.submit(job)
            except RuntimeError as e:
                raise RequestError(str(e), status=503, type="server_error") from None
        except RequestError as e:
            log.info("%s %d %s", request.url.path, e.status, e.message)
            return self._error(e)
        kind = "chat.completion" if chat else "text_completion"
        rid = ("chatcmpl-" if chat else "cmpl-") + job.id
        out = _Output(self, req, job, rid, chat, started, request.url.path)
        watcher = asyncio.create_task(_watch_disconnect(request, job, self.scheduler))
        if req.stream:
            return StreamingResponse(out.sse(queue, watcher), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
        try:
            result = await out.collect(queue)
        finally:
            watcher.cancel()
            job.cancel()  # no-op when it finished; stops it when this handler is cancelled
            self.scheduler.wake()
        if isinstance(result, RequestError):
            return self._error(result)
        return JSONResponse({"id": rid, "object": kind, "created": int(time.time()),
                             "model": req.model, **result})

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)


async def _watch_disconnect(request: Request, job: Job, scheduler: Scheduler) -> None:
    """Cancel `job` as soon as its client disconnects."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancel()
                scheduler.wake()
                return
    except Exception:  # the connection is gone either way
        job.cancel()
        scheduler.wake()


class _Output:
    """Turns a job's `Delta`s and `Finished` into OpenAI's response and stream chunks."""

    def __init__(self, server: Server, req: GenerationRequest, job: Job, rid: str, chat: bool,
                 started: float, path: str) -> None:
        self.server, self.req, self.job, self.rid, self.chat = server, req, job, rid, chat
        self.started, self.path = started, path
        self.created = int(time.time())
        self.calls = 0

    def _logprobs(self, entries: list[dict]) -> list[dict]:
        text = self.server.token_text
        out = []
        for e in entries:
            t = text(e["id"])
            item = {"token": t, "logprob": e["logprob"], "bytes": list(t.encode()),
                    "top_logprobs": [{"token": text(i), "logprob": lp,
                                      "bytes": list(text(i).encode())} for i, lp in e["top"]]}
            out.append(item)
        return out

    def _completion_logprobs(self, entries: list[dict]) -> dict:
        text = self.server.token_text
        return {"tokens": [text(e["id"]) for e in entries],
                "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{text(i): lp for i, lp in e["top"]} for e in entries],
                "text_offset": []}

    def _tool_call(self, call: dict, index: int) -> dict:
        return {"index": index, "id": call["id"], "type": "function",
                "function": {"name": call["name"],
                             "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}

    def usage(self, f: Finished) -> dict:
        return {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
                "total_tokens": f.prompt_tokens + f.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": f.cached_tokens}}

    def _log(self, f: Finished) -> None:
        log.info("%s 200 %s prompt=%d cached=%d completion=%d ttft=%.3fs %.1f tok/s "
                 "finish=%s%s", self.path, self.rid, f.prompt_tokens, f.cached_tokens,
                 f.completion_tokens, f.ttft, f.decode_tps, f.finish_reason,
                 f" error={f.error}" if f.error else "")

    async def collect(self, queue: asyncio.Queue) -> "dict | RequestError":
        texts = {"thinking": [], "answer": []}
        calls, logprobs = [], []
        while True:
            item = await queue.get()
            if isinstance(item, Finished):
                break
            texts[item.phase].append(item.text)
            calls += item.tool_calls
            logprobs += item.logprobs
        self._log(item)
        if item.finish_reason == "error":
            return RequestError(f"generation failed: {item.error}", status=500,
                                type="server_error")
        reason = "stop" if item.finish_reason == "cancelled" else item.finish_reason
        answer, thinking = "".join(texts["answer"]), "".join(texts["thinking"])
        if not self.chat:
            choice = {"index": 0, "text": thinking + answer, "finish_reason": reason,
                      "logprobs": self._completion_logprobs(logprobs) if self.req.logprobs
                      else None}
            return {"choices": [choice], "usage": self.usage(item)}
        message: dict[str, Any] = {"role": "assistant", "content": answer or
                                   (None if calls else "")}
        if thinking:
            message["reasoning_content"] = thinking
        if calls:
            message["tool_calls"] = [self._tool_call(c, i) for i, c in enumerate(calls)]
            for c in message["tool_calls"]:
                del c["index"]
        choice = {"index": 0, "message": message, "finish_reason": reason,
                  "logprobs": {"content": self._logprobs(logprobs)} if self.req.logprobs
                  else None}
        return {"choices": [choice], "usage": self.usage(item)}

    def _chunk(self, delta: dict | None, finish: str | None = None,
               logprobs: list | None = None, text: str | None = None) -> str:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "delta": delta or {},
                                      "finish_reason": finish}
            if logprobs is not None:
                choice["logprobs"] = {"content": self._logprobs(logprobs)}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish,
                      "logprobs": self._completion_logprobs(logprobs) if logprobs else None}
            kind = "text_completion"
        body = {"id": self.rid, "object": kind, "created": self.created,
                "model": self.req.model, "choices": [choice]}
        return "data: " + json.dumps(body, ensure_ascii=False) + "\n\n"

    def _delta(self, d: Delta) -> str | None:
        lp = d.logprobs if self.req.logprobs and d.logprobs else None
        if not self.chat:
            return self._chunk(None, text=d.text, logprobs=lp) if d.text or lp else None
        delta: dict[str, Any] = {}
        if d.text:
            delta["reasoning_content" if d.phase == "thinking" else "content"] = d.text
        if d.tool_calls:
            delta["tool_calls"] = []
            for c in d.tool_calls:
                delta["tool_calls"].append(self._tool_call(c, self.calls))
                self.calls += 1
        if not delta and lp is None:
            return None
        return self._chunk(delta, logprobs=lp)

    async def sse(self, queue: asyncio.Queue, watcher: asyncio.Task) -> AsyncIterator[str]:
        finished = False
        try:
            if self.chat:
                yield self._chunk({"role": "assistant", "content": ""})
            while True:
                item = await queue.get()
                if isinstance(item, Finished):
                    break
                chunk = self._delta(item)
                if chunk:
                    yield chunk
            finished = True
            self._log(item)
            if item.finish_reason == "error":
                err = RequestError(f"generation failed: {item.error}", status=500,
                                   type="server_error")
                yield "data: " + json.dumps(err.body()) + "\n\n"
            else:
                reason = "stop" if item.finish_reason == "cancelled" else item.finish_reason
                yield self._chunk({}, reason) if self.chat else self._chunk(None, reason)
                if self.req.include_usage:
                    body = {"id": self.rid, "object": "chat.completion.chunk" if self.chat
                            else "text_completion", "created": self.created,
                            "model": self.req.model, "choices": [], "usage": self.usage(item)}
                    yield "data: " + json.dumps(body) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            if not finished:
                self.job.cancel()  # the client went away mid-stream
                self.server.scheduler.wake()
