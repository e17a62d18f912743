"""A bounded load test of `qwen-mlx serve` on loopback (issue 13).

8 concurrent streaming clients send 50 requests each (prompts and lengths mixed, every
seventh cancelled after its first piece of text) to a tiny qwen3: no request is lost, none
is mixed up with another (each greedy stream equals its solo run, or for a cancelled one a
start of it), the batch really carries several rows, the prompt cache stays within its
bound, and once the prompt cache is cleared MLX memory is back to its baseline.
"""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("torch")
openai = pytest.importorskip("openai")

import mlx.core as mx  # noqa: E402

import qwen_mlx  # noqa: E402
from conftest import build_checkpoint, write_tiny_tokenizer  # noqa: E402
from qwen_mlx.generate.worker import WORKER  # noqa: E402
from serve_fixtures import DEADLINE, Running, wait_for  # noqa: E402

CLIENTS, REQUESTS = 8, 50
PROMPTS = ["hello world", "the quick brown fox", "def main", "user assistant system",
           "jumps over the lazy dog", "return 42"]
LENGTHS = [1, 3, 6, 10]
CACHE_BOUND = 256 << 10


def _plan(client: int, i: int) -> tuple[str, int, bool]:
    """(prompt, max_tokens, cancel midway) of request i of a client."""
    k = client * REQUESTS + i
    return PROMPTS[k % len(PROMPTS)], LENGTHS[(k // 3) % len(LENGTHS)], k % 7 == 3


def test_load(tmp_path):
    folder = tmp_path / "m"
    build_checkpoint(folder, "qwen3", vocab_size=300, max_position_embeddings=512)
    write_tiny_tokenizer(folder, vocab=300, chat_template="qwen3")
    model, tokenizer = qwen_mlx.load(folder, dtype="float32")
    solo = {(p, n): qwen_mlx.generate(model, tokenizer, [{"role": "user", "content": p}],
                                      max_tokens=n, temperature=0.0, enable_thinking=False)
            for p in PROMPTS for n in LENGTHS}
    with Running(model, tokenizer, max_batch=8, cache_memory=CACHE_BOUND) as srv:
        client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0,
                               timeout=DEADLINE)

        def ask(prompt: str, n: int, cancel: bool) -> tuple[str, str | None]:
            stream = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=n,
                temperature=0, stream=True, extra_body={"enable_thinking": False})
            text, finish = [], None
            for chunk in stream:
                delta = chunk.choices[0].delta
                text.append(delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
                if cancel and "".join(text):
                    stream.close()
                    return "".join(text), "cancelled"
            return "".join(text), finish

        ask(PROMPTS[0], 2, False)  # warm up, then measure from an empty prompt cache
        srv.server.scheduler.clear_cache()
        baseline = WORKER.run(mx.get_active_memory)

        results: dict[tuple[int, int], tuple[str, str | None]] = {}
        errors: list[BaseException] = []

        def run(c: int) -> None:
            try:
                for i in range(REQUESTS):
                    results[c, i] = ask(*_plan(c, i))
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(c,)) for c in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors[0]
        assert len(results) == CLIENTS * REQUESTS  # none lost
        cancelled = 0
        for (c, i), (text, finish) in results.items():
            prompt, n, cancel = _plan(c, i)
            want = solo[prompt, n]
            if finish == "cancelled":
                cancelled += 1
                assert want.startswith(text), (c, i)
            else:
                assert text == want, (c, i, prompt, n)
                assert finish in ("stop", "length")
        assert cancelled > 0
        wait_for(lambda: srv.server.scheduler.busy == 0, "the scheduler to go idle")
        m = srv.metrics()
        assert m["qwen_mlx_requests_total"] == CLIENTS * REQUESTS + 1
        assert m["qwen_mlx_finished_total"] == m["qwen_mlx_requests_total"]
        assert m["qwen_mlx_failed_total"] == 0
        assert m["qwen_mlx_decode_rows_total"] > 2 * m["qwen_mlx_decode_steps_total"]
        assert 0 < srv.server.scheduler.lru.nbytes <= CACHE_BOUND
        srv.server.scheduler.clear_cache()
        after = WORKER.run(mx.get_active_memory)
        assert after <= baseline + (64 << 10), (baseline, after)
