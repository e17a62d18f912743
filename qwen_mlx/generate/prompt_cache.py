"""Prompt cache files: a KV cache and the token ids it holds, kept to reuse a prompt's start.

A file is one safetensors: each layer's state arrays, plus string metadata. The
``qwen_mlx_cache`` entry (JSON) describes the layers generically: each cache class's
`state()` is a tuple of parts (None, an array, or a tuple of arrays, such as a quantized
cache's packed triples) and `set_state(*parts, offset)` puts them back, so a new cache kind
needs no code here. The CLI also stores the cached ids, the model's fingerprint (config
plus the identity of its weights) and the cache options, and reuses a file only when all
of them match; anything else (a truncated, empty, random or foreign file, another model,
other options) gives a notice and a fresh cache.

Files are written atomically: a temporary file in the same folder, fsynced, then renamed
over the target, so a crash or a full disk never leaves half a cache under the name.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import QwenMLXError
from ..model import cache as cache_kinds
from .worker import WORKER

FORMAT_KEY = "qwen_mlx_cache"
FORMAT_VERSION = 2
# A safetensors header this large is not one we wrote (ours are a few KB per layer).
_MAX_HEADER = 64 * 1024 * 1024


class PromptCacheError(QwenMLXError):
    """A prompt cache file that cannot be used (unreadable, foreign, or malformed)."""


# ------------------------------------------------------------------ paths


def cache_path(path: str | os.PathLike) -> Path:
    """The file `path` names, links followed (so a linked cache is updated in place).
    The name is used exactly as given: no suffix is added."""
    return Path(os.path.realpath(Path(path).expanduser()))


def check_writable(path: str | os.PathLike) -> Path:
    """Raise a clear error now, before any generating, when `path` cannot be written."""
    target = cache_path(path)
    if target.is_dir():
        raise QwenMLXError(f"--prompt-cache {path}: is a folder; give a file name")
    if not target.parent.is_dir():
        raise QwenMLXError(f"--prompt-cache {path}: the folder {target.parent} does not exist")
    if target.exists() and not os.access(target, os.W_OK):
        raise QwenMLXError(f"--prompt-cache {path}: the file is read-only; make it writable "
                           "or choose another path")
    try:
        fd, probe = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.",
                                     suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise QwenMLXError(f"--prompt-cache {path}: cannot write in {target.parent} "
                           f"({e.strerror}); choose a writable path") from None
    return target


# ------------------------------------------------------------ fingerprint


def model_fingerprint(model, folder: str | os.PathLike | None = None) -> str:
    """A short hash of what a cache depends on: the effective config (RoPE scaling
    included), every parameter's name, shape and dtype (bits, head size, compute
    dtype), and, with `folder`, the name, size and mtime of its config and weights."""
    h = hashlib.sha256()
    h.update(repr(model.config).encode())
    for name, a in tree_flatten(model.parameters()):
        h.update(f"{name}:{tuple(a.shape)}:{a.dtype};".encode())
    if folder is not None:
        root = Path(folder)
        for f in sorted([root / "config.json", *root.glob("*.safetensors")]):
            try:
                st = f.stat()
            except OSError:
                continue
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:32]


# ------------------------------------------------------------- save/load


def _parts(state: tuple) -> tuple[list, list[mx.array]]:
    """(layout, arrays) of a layer's state(): per part None, 0 (one array) or n (a tuple)."""
    layout, arrays = [], []
    for part in state:
        if part is None:
            layout.append(None)
        elif isinstance(part, tuple):
            layout.append(len(part))
            arrays.extend(part)
        else:
            layout.append(0)
            arrays.append(part)
    return layout, arrays


def _describe(cache: list) -> tuple[list[dict], dict[str, mx.array]]:
    layers, arrays = [], {}
    for i, c in enumerate(cache):
        layout, parts = _parts(tuple(c.state()))
        layers.append({"type": type(c).__name__, "offset": int(c.offset),
                       "bits": getattr(c, "bits", None), "window": getattr(c, "window", None),
                       "parts": layout})
        for j, a in enumerate(parts):
            arrays[f"{i}.{j}"] = a
    return layers, arrays


def save_prompt_cache(path: str | os.PathLike, cache: list,
                      metadata: dict[str, str] | None = None) -> None:
    """Write `cache` (and string `metadata`, e.g. the cached token ids) to `path`, a
    safetensors file under exactly that name, atomically."""
    meta = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise QwenMLXError("prompt cache metadata must map strings to strings")
    target = cache_path(path)
    if target.is_dir():
        raise QwenMLXError(f"{path}: is a folder; a prompt cache needs a file name")

    def write() -> None:
        layers, arrays = _describe(cache)
        meta[FORMAT_KEY] = json.dumps({"version": FORMAT_VERSION, "layers": layers})
        # mlx adds ".safetensors" to names without it: the temporary name has it.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.",
                                   suffix=".tmp.safetensors")
        os.close(fd)
        try:
            mx.save_safetensors(tmp, arrays, metadata=meta)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            if target.is_dir():  # something appeared at the target meanwhile
                raise QwenMLXError(f"{path}: became a folder while the cache was written")
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    # A cache the caller filled on its own thread is evaluated there first: its arrays'
    # graph runs on that thread's stream, which the library's thread cannot use.
    mx.eval(cache_kinds.cache_arrays(cache))
    try:
        WORKER.run(write)
    except OSError as e:
        raise QwenMLXError(f"{path}: cannot write the prompt cache ({e.strerror or e})") from None


def _read_header(path: Path) -> dict:
    """The safetensors header's metadata, read without loading any tensor."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) < 8:
                raise PromptCacheError(f"{path}: is empty or truncated, not a prompt cache")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, _MAX_HEADER):
                raise PromptCacheError(f"{path}: is not a safetensors file (or is truncated)")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise PromptCacheError(f"{path}: cannot be read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PromptCacheError(f"{path}: is not a safetensors file (its header is not "
                               "JSON)") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or FORMAT_KEY not in meta:
        raise PromptCacheError(f"{path}: is a safetensors file but not a qwen-mlx prompt "
                               "cache (maybe model weights)")
    return meta


def _new_layer(info: dict) -> Any:
    cls = getattr(cache_kinds, str(info.get("type")), None)
    if not isinstance(cls, type) or not callable(getattr(cls, "set_state", None)):
        raise PromptCacheError(f"unknown cache kind {info.get('type')!r}")
    accepted = inspect.signature(cls).parameters
    return cls(**{k: info.get(k) for k in ("window", "bits") if k in accepted})


def _load(path: Path) -> tuple[list, dict[str, str]]:
    meta = _read_header(path)
    try:
        spec = json.loads(meta[FORMAT_KEY])
        if not isinstance(spec, dict) or spec.get("version") != FORMAT_VERSION:
            raise PromptCacheError(f"{path}: was written by another version of qwen-mlx")
        layers = spec["layers"]
        arrays = mx.load(str(path), format="safetensors")
        cache = []
        for i, info in enumerate(layers):
            c = _new_layer(info)
            parts, j = [], 0
            for kind in info["parts"]:
                if kind is None:
                    parts.append(None)
                elif kind == 0:
                    parts.append(arrays[f"{i}.{j}"])
                    j += 1
                else:
                    parts.append(tuple(arrays[f"{i}.{j + k}"] for k in range(int(kind))))
                    j += int(kind)
            c.set_state(*parts, int(info["offset"]))
            cache.append(c)
        mx.eval(cache_kinds.cache_arrays(cache))
    except PromptCacheError:
        raise
    except Exception as e:  # a truncated or hand-edited file: mlx and json raise anything
        raise PromptCacheError(f"{path}: is damaged ({type(e).__name__}: {e})") from None
    if not cache:
        raise PromptCacheError(f"{path}: holds no layers")
    meta = {k: v for k, v in meta.items() if k != FORMAT_KEY}
    return cache, meta


def load_prompt_cache(path: str | os.PathLike) -> tuple[list, dict[str, str]]:
    """Read a cache written by `save_prompt_cache`; returns (cache, metadata).

    Raises `PromptCacheError` for a file that is unreadable, truncated, foreign (not
    written by save_prompt_cache) or damaged."""
    return WORKER.run(_load, cache_path(path))


# ------------------------------------------------------------ the CLI's use


def _options(kv_bits: int | None, max_kv_size: int | None) -> str:
    return f"--kv-bits {kv_bits or 'none'}, --max-kv-size {max_kv_size or 'none'}"


def _matches_model(cache: list, model, kv_bits: int | None, max_kv_size: int | None) -> bool:
    """Whether `cache` has the layers, kinds and array shapes this model would make."""
    fresh = model.make_cache(kv_bits=kv_bits, max_kv_size=max_kv_size)
    if len(fresh) != len(cache):
        return False
    if len({c.offset for c in cache}) != 1:
        return False
    kind = lambda c: (type(c).__name__, getattr(c, "bits", None),  # noqa: E731
                      getattr(c, "window", None))
    if any(kind(a) != kind(b) for a, b in zip(fresh, cache)):
        return False
    # One token through a fresh cache shows each state array's dtype and shape; only
    # the positions axis (-2) may differ.
    model(mx.array([[0]]), cache=fresh)
    for a, b in zip(fresh, cache):
        sa, sb = _parts(tuple(a.state())), _parts(tuple(b.state()))
        if sb[1] and sa[0] != sb[0]:
            return False
        for x, y in zip(sa[1], sb[1]):
            if x.dtype != y.dtype or x.ndim != y.ndim or (
                    x.shape[:-2] + x.shape[-1:] != y.shape[:-2] + y.shape[-1:]):
                return False
    return True


def open_prompt_cache(path: str | os.PathLike, model, *, fingerprint: str,
                      kv_bits: int | None = None, max_kv_size: int | None = None,
                      ) -> tuple[list, list[int], str | None]:
    """The cache at `path` and the ids it holds when it fits this model and these
    options; else a fresh cache, no ids, and a notice saying why."""

    def fresh(reason: str | None) -> tuple[list, list[int], str | None]:
        note = None if reason is None else f"{reason}; starting a fresh prompt cache"
        return model.make_cache(kv_bits=kv_bits, max_kv_size=max_kv_size), [], note

    target = cache_path(path)
    if not target.exists():
        return fresh(None)
    try:
        cache, meta = load_prompt_cache(target)
    except PromptCacheError as e:
        return fresh(str(e))
    if meta.get("model") != fingerprint:
        return fresh(f"{path}: was made for another model (or the model's files changed)")
    stored = (meta.get("kv_bits", ""), meta.get("max_kv_size", ""))
    wanted = (str(kv_bits or ""), str(max_kv_size or ""))
    if stored != wanted:
        made = _options(*(int(v) if v.isdigit() else None for v in stored))
        return fresh(f"{path}: was made with {made}, but this run asks for "
                     f"{_options(kv_bits, max_kv_size)}")
    try:
        tokens = [int(t) for t in meta.get("tokens", "").split()]
    except ValueError:
        return fresh(f"{path}: its token list is damaged")
    if len(tokens) != cache[0].offset or not WORKER.run(_matches_model, cache, model,
                                                         kv_bits, max_kv_size):
        return fresh(f"{path}: does not fit this model's cache layout")
    return cache, tokens, None


def write_prompt_cache(path: str | os.PathLike, cache: list, tokens: list[int], *,
                       fingerprint: str, kv_bits: int | None = None,
                       max_kv_size: int | None = None) -> None:
    """Save the cache with what `open_prompt_cache` checks before reusing it."""
    save_prompt_cache(path, cache, {
        "tokens": " ".join(map(str, tokens)), "model": fingerprint,
        "kv_bits": str(kv_bits or ""), "max_kv_size": str(max_kv_size or "")})
