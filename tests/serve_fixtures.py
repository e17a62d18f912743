"""A real uvicorn serving a `qwen_mlx.serve` app on 127.0.0.1, for the serve tests."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import uvicorn

from qwen_mlx.serve.app import Limits, Server

DEADLINE = 30.0  # seconds any wait may take before the test fails


class Running:
    """`Server` on a free loopback port in a thread; `url` is its /v1 base."""

    def __init__(self, model, tokenizer, names=("tiny",), **options) -> None:
        limits = options.pop("limits", Limits(max_body=64 << 10, max_tokens=64,
                                              default_max_tokens=16))
        self.server = Server(model, tokenizer, list(names), limits=limits, **options)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = self.base + "/v1"
        config = uvicorn.Config(self.server.app, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=5)
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> "Running":
        self.thread.start()
        wait_for(lambda: self.get("/health")[0] == 200, "the server to answer /health")
        return self

    def __exit__(self, *exc) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(DEADLINE)
        self.sock.close()
        assert not self.thread.is_alive(), "the server did not stop"

    def get(self, path: str, headers: dict | None = None) -> tuple[int, bytes]:
        return self.request("GET", path, None, headers)

    def request(self, method: str, path: str, body: bytes | None,
                headers: dict | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.base + path, data=body, method=method,
                                     headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=DEADLINE) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, ConnectionError):
            return 0, b""

    def post_json(self, path: str, body, headers: dict | None = None) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, out = self.request("POST", path, data,
                                   {"Content-Type": "application/json", **(headers or {})})
        return status, json.loads(out) if out else {}

    def metrics(self) -> dict[str, float]:
        status, text = self.get("/metrics", {"Authorization": "Bearer "
                                             + (self.server.api_key or "")})
        assert status == 200
        out = {}
        for line in text.decode().splitlines():
            name, value = line.split(" ")
            out[name] = float(value)
        return out


def load_tiny(folder, family: str):
    """(model, tokenizer) of a tiny random `family` checkpoint built in `folder`: qwen3 or
    qwen3_moe (transformers-built, conftest) or qwen3_5 (a hybrid, hybrid_fixtures), with
    the tiny tokenizer and the family's template."""
    import qwen_mlx
    from conftest import build_checkpoint, write_tiny_tokenizer
    from hybrid_fixtures import build_case_with_tokenizer

    if family == "qwen3_5":
        folder = build_case_with_tokenizer("qwen3_5-flat", folder, "qwen3_5").folder
    else:
        build_checkpoint(folder, family, vocab_size=300, max_position_embeddings=512)
        write_tiny_tokenizer(folder, vocab=300, chat_template="qwen3")
    # The tool-use templates' instructions alone run past the fixtures' 512 positions.
    return qwen_mlx.load(folder, dtype="float32", max_context=2048)


def wait_for(condition, what: str, deadline: float = DEADLINE) -> None:
    """Poll `condition` until it holds; fail after `deadline` seconds."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
