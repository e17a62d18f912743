"""One long-lived thread for all of the chat's MLX work.

MLX gives every thread that evaluates arrays streams of its own and keeps
them (and their OS threads) for the life of the process. Textual starts a
new thread per worker, so running each turn in its own worker would leave a
few idle threads behind per turn; here every load and turn runs on one.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable


class MLXThread:
    """Runs callables one at a time on a single daemon thread."""

    def __init__(self, name: str = "qwen-mlx") -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            fn, future = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as e:  # handed to the caller, which decides
                future.set_exception(e)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call `fn(*args, **kwargs)` on the MLX thread; wait for and return its result."""
        future: Future = Future()
        self._jobs.put((lambda: fn(*args, **kwargs), future))
        return future.result()

    @property
    def ident(self) -> int | None:
        return self._thread.ident
