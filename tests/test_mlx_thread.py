"""The library's MLX thread, which the chat UI uses too: results, errors, one thread."""

from __future__ import annotations

import threading

import mlx.core as mx
import pytest

from qwen_mlx.generate.worker import MLXWorker


def test_jobs_run_on_one_thread_from_any_caller():
    runner = MLXWorker()
    seen = []

    def job(x):
        seen.append(threading.get_ident())
        return (mx.array([x]) * 2).item()

    results = []
    callers = [threading.Thread(target=lambda i=i: results.append(runner.run(job, i)))
               for i in range(4)]
    for t in callers:
        t.start()
        t.join()
    assert sorted(results) == [0, 2, 4, 6]
    assert set(seen) == {runner.ident} and runner.ident != threading.get_ident()


def test_errors_reach_the_caller_and_the_thread_survives():
    runner = MLXWorker()

    def fail():
        raise ValueError("bad config")

    with pytest.raises(ValueError, match="bad config"):
        runner.run(fail)
    assert runner.run(lambda: 7) == 7
