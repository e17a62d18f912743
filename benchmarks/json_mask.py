"""Cost of json_object's constrained decoding at Qwen's vocabulary size.

A synthetic byte table of 151,643 tokens shaped like a byte-level BPE vocabulary (words
with and without a leading space, digit runs, punctuation runs, whitespace runs, UTF-8
fragments) stands in for Qwen's (no weights or tokenizers are downloaded). Measures the
table's set-up, building one state's mask (a cache miss), a cache hit, and the per-step
cost of masking [1, V] logits, and runs a random walk of 400 sampled-and-masked tokens to
count how many distinct states a reply meets.

    python benchmarks/json_mask.py
"""

from __future__ import annotations

import json
import random
import string
import time

import mlx.core as mx
import numpy as np

from qwen_mlx.serve.json_mask import START, JsonConstraint, JsonVocabulary, advance

V = 151_643


def synthetic_table(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    table = [bytes([b]) for b in range(256)]
    letters = string.ascii_letters
    while len(table) < n:
        kind = rng.random()
        if kind < 0.55:
            w = "".join(rng.choice(letters) for _ in range(rng.randint(2, 10)))
            table.append(((" " if rng.random() < 0.5 else "") + w).encode())
        elif kind < 0.65:
            table.append("".join(rng.choice(string.digits) for _ in range(rng.randint(1, 3)))
                         .encode())
        elif kind < 0.78:
            table.append("".join(rng.choice('{}[]":,.\\()<>/-_=+*#') for _ in
                                 range(rng.randint(1, 4))).encode())
        elif kind < 0.83:
            table.append("".join(rng.choice(" \t\n") for _ in range(rng.randint(2, 16)))
                         .encode())
        else:
            ch = chr(rng.randint(0x4E00, 0x9FFF)).encode()
            table.append(ch if rng.random() < 0.7 else ch[:rng.randint(1, 2)])
    return table


def main() -> None:
    table = synthetic_table(V - 1) + [b"<|im_end|>"]
    t = time.perf_counter()
    vocab = JsonVocabulary(table, [V - 1], V)
    setup = time.perf_counter() - t
    states = {"start": b"", "object": b"{", "key": b'{"ab', "colon": b'{"a"',
              "value": b'{"a":', "number": b'{"a": 12', "string": b'{"a": "x',
              "next": b'{"a": true'}
    miss = {}
    for name, prefix in states.items():
        state = advance(START, prefix)
        t = time.perf_counter()
        m = vocab.mask(state)
        mx.eval(m)
        miss[name] = (time.perf_counter() - t) * 1e3
    state = advance(START, b'{"a": "x')
    t = time.perf_counter()
    for _ in range(1000):
        vocab.mask(state)
    hit_us = (time.perf_counter() - t) * 1e3
    logits = mx.random.normal((1, V))
    c = JsonConstraint(vocab)
    c.state = state
    mx.eval(c.apply(logits))
    t = time.perf_counter()
    for _ in range(200):
        mx.eval(c.apply(logits))
    apply_us = (time.perf_counter() - t) / 200 * 1e6
    # A random reply: sample masked uniform logits, count the states it meets.
    rng = np.random.default_rng(0)
    c = JsonConstraint(vocab)
    before, seen = vocab.computed, set()
    t = time.perf_counter()
    for _ in range(400):
        seen.add(c.state)
        row = c.apply(mx.array(rng.standard_normal((1, V)).astype(np.float32)))
        token = int(mx.argmax(row, axis=-1).item())
        if token == V - 1:
            break
        c.advance(token)
    walk = time.perf_counter() - t
    out = {"vocab": V, "setup_s": round(setup, 3),
           "mask_miss_ms": {k: round(v, 1) for k, v in miss.items()},
           "mask_hit_us": round(hit_us, 2), "apply_us": round(apply_us, 1),
           "walk_tokens": 400, "walk_states": len(seen),
           "walk_masks_built": vocab.computed - before, "walk_s": round(walk, 2)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
