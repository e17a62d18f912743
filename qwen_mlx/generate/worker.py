"""The library's one MLX thread: generation runs there, whichever thread asks for it.

MLX gives every thread that evaluates arrays streams of its own, each with an OS
thread, and keeps them for the life of the process. A library called from thread
pools (a web server's workers, `concurrent.futures`) would then leave a few idle OS
threads behind per calling thread. So `stream_generate`, `ChatSession` and the prompt
cache's files run their MLX work on one daemon thread owned by the library; callers
wait for it. Requests from several threads are served one step at a time, in turn.

Arrays cannot cross threads unevaluated (MLX: "There is no Stream(cpu, N) in current
thread"), so what goes in or comes out is evaluated at the boundary.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


class MLXWorker:
    """Runs callables one at a time on a single daemon thread, started on first use."""

    def __init__(self, name: str = "qwen-mlx-generate") -> None:
        self._name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def _loop(self) -> None:
        while True:
            fn, future = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as e:  # handed to the caller, which decides
                future.set_exception(e)
            del fn, future  # drop references (a generator, a cache) between jobs

    def _ensure_started(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()

    @property
    def ident(self) -> int | None:
        """The worker thread's id, once it has started."""
        return None if self._thread is None else self._thread.ident

    def on_thread(self) -> bool:
        """Whether the caller is this worker's thread."""
        return self._thread is not None and threading.get_ident() == self._thread.ident

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call `fn(*args, **kwargs)` on the worker thread; wait for and return its result.

        Called from the worker thread itself (a nested call), `fn` runs at once."""
        if self.on_thread():
            return fn(*args, **kwargs)
        self._ensure_started()
        future: Future = Future()
        self._jobs.put((lambda: fn(*args, **kwargs), future))
        return future.result()

    def iterate(self, make: Callable[[Callable[[], bool]], Iterator[T]]) -> Iterator[T]:
        """Yield what `make(stopped)` yields, each step computed on the worker thread.

        `stopped()` turns True once the consumer is gone (it closed this iterator or was
        interrupted, say by Ctrl+C, while waiting): the inner iterator should then stop
        at its next chance, as it does for a cancel request."""
        if self.on_thread():
            yield from make(lambda: False)
            return
        gone = threading.Event()
        inner = self.run(make, gone.is_set)
        try:
            while True:
                item = self.run(next, inner, _DONE)
                if item is _DONE:
                    return
                yield item
        finally:
            gone.set()
            # The inner generator's own cleanup (a ChatSession's history) runs there too.
            close = getattr(inner, "close", None)
            if close is not None:
                self.run(close)


WORKER = MLXWorker()
