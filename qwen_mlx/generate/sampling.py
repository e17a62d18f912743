"""Sampling: defaults from the checkpoint and Qwen's presets, then one MLX sampler.

Precedence, highest first: what the caller passes; Qwen3's recommended
preset for the current thinking mode; generation_config.json; our own
fallbacks. mlx-lm samples greedily by default, which Qwen warns against
for thinking models (it loops); we follow the checkpoint instead.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable

import mlx.core as mx

from ..errors import QwenMLXError

# Qwen3 model card: thinking and non-thinking presets.
QWEN3_THINKING = dict(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0)
QWEN3_NON_THINKING = dict(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0)


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. temperature 0 means greedy."""

    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def validate(self) -> "SamplingParams":
        checks = [("temperature", self.temperature >= 0), ("top_p", 0 < self.top_p <= 1),
                  ("top_k", self.top_k >= 0), ("min_p", 0 <= self.min_p < 1),
                  ("repetition_penalty", self.repetition_penalty > 0)]
        for name, ok in checks:
            if not ok:
                raise QwenMLXError(f"{name} {getattr(self, name)} is out of range")
        return self


def generation_config_defaults(cfg: dict) -> dict:
    """Sampling fields from a checkpoint's generation_config.json contents."""
    out = {k: cfg[k] for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                               "presence_penalty", "frequency_penalty") if cfg.get(k) is not None}
    if cfg.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def resolve_sampling(*, family: str, thinking: bool, generation_config: dict,
                     **overrides) -> SamplingParams:
    """The effective sampling parameters (see the module docstring for precedence)."""
    values = dict(generation_config)
    if family in ("qwen3", "qwen3_moe"):
        values.update(QWEN3_THINKING if thinking else QWEN3_NON_THINKING)
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(SamplingParams)}
    return replace(SamplingParams(), **{k: v for k, v in values.items() if k in known}).validate()


class Sampler:
    """Turns the last position's logits into a token, keeping penalty state on the device."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt: list[int] | None = None):
        self.params = params
        self._key = mx.random.key(params.seed) if params.seed is not None else None
        p = params
        self._penalize = (p.repetition_penalty != 1.0 or p.presence_penalty != 0.0
                          or p.frequency_penalty != 0.0)
        if self._penalize:
            # Repetition penalty (as transformers) looks at prompt and reply;
            # presence and frequency (as OpenAI and vLLM) at the reply only.
            self._seen = mx.zeros((vocab_size,), dtype=mx.bool_)
            if prompt:
                self._seen[mx.array(prompt)] = True
            self._counts = mx.zeros((vocab_size,), dtype=mx.float32)
        self._sample: Callable = _greedy if p.temperature == 0 else self._stochastic

    def __call__(self, logits: mx.array) -> mx.array:
        """logits [1, V] -> token [1]."""
        logits = logits.astype(mx.float32)
        if self._penalize:
            logits = self._apply_penalties(logits)
        return self._sample(logits)

    def observe(self, token: mx.array) -> None:
        """Record a generated token for the penalties."""
        if self._penalize:
            self._seen[token] = True
            self._counts[token] = self._counts[token] + 1

    def _apply_penalties(self, logits: mx.array) -> mx.array:
        p = self.params
        if p.repetition_penalty != 1.0:
            r = p.repetition_penalty
            penalized = mx.where(logits > 0, logits / r, logits * r)
            logits = mx.where(self._seen, penalized, logits)
        if p.presence_penalty:
            logits = logits - p.presence_penalty * (self._counts > 0)
        if p.frequency_penalty:
            logits = logits - p.frequency_penalty * self._counts
        return logits

    def _stochastic(self, logits: mx.array) -> mx.array:
        logits = self.filter(logits)
        if self._key is not None:
            self._key, sub = mx.random.split(self._key)
            return mx.random.categorical(logits, key=sub)
        return mx.random.categorical(logits)

    def filter(self, logits: mx.array) -> mx.array:
        """Temperature, then top-k, top-p and min-p masks (-inf), as transformers orders them."""
        p = self.params
        logits = logits / p.temperature
        if p.top_k and p.top_k < logits.shape[-1]:
            kth = mx.sort(logits, axis=-1)[..., -p.top_k][..., None]
            logits = mx.where(logits < kth, -mx.inf, logits)
        if p.min_p > 0 or p.top_p < 1:
            probs = mx.softmax(logits, axis=-1)
            if p.min_p > 0:
                threshold = p.min_p * probs.max(axis=-1, keepdims=True)
                logits = mx.where(probs < threshold, -mx.inf, logits)
            if p.top_p < 1:
                order = mx.argsort(-probs, axis=-1)
                sorted_probs = mx.take_along_axis(probs, order, axis=-1)
                # Keep the smallest prefix whose mass reaches top_p (at least one token).
                before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs
                drop_sorted = before >= p.top_p
                drop = mx.zeros_like(drop_sorted)
                drop = mx.put_along_axis(drop, order, drop_sorted, axis=-1)
                logits = mx.where(drop, -mx.inf, logits)
        return logits


def _greedy(logits: mx.array) -> mx.array:
    return mx.argmax(logits, axis=-1)
