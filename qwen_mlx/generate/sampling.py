"""Sampling: defaults from the checkpoint and Qwen's presets, then one MLX sampler.

Precedence, highest first: what the caller passes; the model card's
recommended preset for the family and the current thinking mode (Qwen3,
Qwen3-Next and Qwen3-VL share Qwen3's; Qwen3.5/3.6 have their own);
generation_config.json; our own fallbacks. mlx-lm samples greedily by default, which Qwen warns against
for thinking models (it loops); we follow the checkpoint instead.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Mapping

import mlx.core as mx

from ..errors import QwenMLXError

# Qwen3 model card: thinking and non-thinking presets.
QWEN3_THINKING = dict(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0)
QWEN3_NON_THINKING = dict(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0)
# Qwen3.5 model card (hybrid spec §9), the general-purpose rows of each mode.
QWEN35_THINKING = dict(temperature=1.0, top_p=0.95, top_k=20, min_p=0.0, presence_penalty=1.5)
QWEN35_NON_THINKING = dict(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0,
                           presence_penalty=1.5)
_QWEN3_PRESET_FAMILIES = ("qwen3", "qwen3_moe", "qwen3_next", "qwen3_vl", "qwen3_vl_moe")
_QWEN35_PRESET_FAMILIES = ("qwen3_5", "qwen3_5_moe")


def family_preset(family: str, thinking: bool) -> dict[str, Any]:
    """The model card's sampling for a family and mode; {} for families without one."""
    if family in _QWEN35_PRESET_FAMILIES:
        return dict(QWEN35_THINKING if thinking else QWEN35_NON_THINKING)
    if family in _QWEN3_PRESET_FAMILIES:
        return dict(QWEN3_THINKING if thinking else QWEN3_NON_THINKING)
    return {}


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

    def validate(self, origin: str | None = None) -> "SamplingParams":
        """Check every field's type and range; `origin` (a file) is named in the error."""
        where = f"{origin}: " if origin else ""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "seed":
                if value is not None and not (_is_int(value) and 0 <= value <= MAX_SEED):
                    raise QwenMLXError(f"{where}seed {value!r} must be a whole number from 0 "
                                       f"to {MAX_SEED}")
                continue
            kind = "a whole number" if f.name == "top_k" else "a number"
            ok_type = _is_int(value) if f.name == "top_k" else _is_real(value)
            if not ok_type:
                raise QwenMLXError(f"{where}{f.name} must be {kind}, got {value!r}")
            if not math.isfinite(value):
                raise QwenMLXError(f"{where}{f.name} must be a finite number, got {value!r}")
            low, high, rule = _RANGES[f.name]
            if not ((low is None or low(value)) and (high is None or high(value))):
                raise QwenMLXError(f"{where}{f.name} {value!r} is out of range: it must be {rule}")
        return self


# Largest seed mx.random.key takes (an unsigned 64-bit integer).
MAX_SEED = 2 ** 64 - 1
_RANGES: dict[str, tuple] = {
    "temperature": (lambda v: v >= 0, None, "at least 0 (0 means greedy)"),
    "top_p": (lambda v: v > 0, lambda v: v <= 1, "above 0 and at most 1"),
    "top_k": (lambda v: v >= 0, None, "at least 0 (0 turns it off)"),
    "min_p": (lambda v: v >= 0, lambda v: v < 1, "at least 0 and below 1"),
    "repetition_penalty": (lambda v: v > 0, None, "above 0 (1 turns it off)"),
    "presence_penalty": (None, None, "finite"),
    "frequency_penalty": (None, None, "finite"),
}
_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
           "frequency_penalty")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def generation_config_defaults(cfg: Mapping[str, Any],
                               origin: str = "generation_config.json") -> dict:
    """Sampling fields from a checkpoint's generation_config.json contents, checked.

    A value of the wrong type (``"temperature": "hot"``, ``"top_k": 20.5``) or out of
    range raises a `QwenMLXError` naming `origin` and the key."""
    out: dict[str, Any] = {}
    for key in _FIELDS:
        value = cfg.get(key)
        if value is None:
            continue
        if key == "top_k" and _is_real(value) and float(value).is_integer():
            value = int(value)  # 20.0 is a whole number; 20.5 is refused below
        out[key] = value
    do_sample = cfg.get("do_sample")
    if do_sample is not None and not isinstance(do_sample, bool):
        raise QwenMLXError(f"{origin}: do_sample must be true or false, got {do_sample!r}")
    if do_sample is False:
        out["temperature"] = 0.0
    replace(SamplingParams(), **out).validate(origin)
    return out


def resolve_sampling(*, family: str, thinking: bool, generation_config: dict,
                     **overrides) -> SamplingParams:
    """The effective sampling parameters (see the module docstring for precedence)."""
    values = dict(generation_config)
    values.update(family_preset(family, thinking))
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(SamplingParams)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise QwenMLXError(f"unknown sampling option(s): {', '.join(unknown)}")
    return replace(SamplingParams(), **{k: v for k, v in values.items() if k in known}).validate()


class Sampler:
    """Turns the last position's logits into a token, keeping penalty state on the device."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt: list[int] | None = None,
                 *, allowed: int | None = None):
        """`vocab_size`: the logits' width (the model's embedding rows). `allowed`: ids from
        it up are never sampled: checkpoints pad the embedding past the tokenizer's last id
        (Qwen: 151,936 rows for 151,665 ids), and those rows decode to nothing."""
        self.params = params
        self._allowed = allowed if allowed is not None and 0 < allowed < vocab_size else None
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
        if self._allowed is not None:
            # A prefix, so the sampled index is the token id.
            logits = logits[..., :self._allowed]
        return self._sample(logits)

    def observe(self, token: mx.array) -> None:
        """Record generated tokens (an array of one or more ids) for the penalties."""
        if self._penalize:
            self._seen[token] = True
            self._counts = self._counts.at[token].add(1.0)

    @property
    def greedy(self) -> bool:
        return self.params.temperature == 0

    def process_rows(self, logits: mx.array, drafts: list[int]) -> mx.array:
        """Logits [n, V] of n successive positions, penalized as if `drafts[:i]` had been
        generated before row i (what sampling row i one token at a time would see), and cut
        to the ids that may be sampled. For verifying n - 1 speculative drafts."""
        logits = logits.astype(mx.float32)
        if self._penalize:
            n = logits.shape[0]
            pairs = [(i, t) for i in range(n) for t in drafts[:i]]
            counts = mx.broadcast_to(self._counts, logits.shape)
            if pairs:
                rows, ids = mx.array([r for r, _ in pairs]), mx.array([t for _, t in pairs])
                counts = counts.at[rows, ids].add(1.0)
            logits = self._penalties(logits, self._seen | (counts > 0), counts)
        if self._allowed is not None:
            logits = logits[..., :self._allowed]
        return logits

    def probabilities(self, processed: mx.array) -> mx.array:
        """The distribution sampling draws from, for logits `process_rows` returned
        (temperature > 0: after temperature, top-k, top-p and min-p)."""
        return mx.softmax(self.filter(processed), axis=-1)

    def next_key(self) -> mx.array | None:
        """A fresh random key from the seed's stream, or None without a seed."""
        if self._key is None:
            return None
        self._key, sub = mx.random.split(self._key)
        return sub

    def _apply_penalties(self, logits: mx.array) -> mx.array:
        return self._penalties(logits, self._seen, self._counts)

    def _penalties(self, logits: mx.array, seen: mx.array, counts: mx.array) -> mx.array:
        p = self.params
        if p.repetition_penalty != 1.0:
            r = p.repetition_penalty
            penalized = mx.where(logits > 0, logits / r, logits * r)
            logits = mx.where(seen, penalized, logits)
        if p.presence_penalty:
            logits = logits - p.presence_penalty * (counts > 0)
        if p.frequency_penalty:
            logits = logits - p.frequency_penalty * counts
        return logits

    def _stochastic(self, logits: mx.array) -> mx.array:
        logits = self.filter(logits)
        key = self.next_key()
        return mx.random.categorical(logits) if key is None else mx.random.categorical(logits, key=key)

    def filter(self, logits: mx.array) -> mx.array:
        """Temperature, then top-k, top-p and min-p masks (-inf), as transformers orders them.

        Tokens tied with the k-th largest survive top-k (as in transformers); top-p keeps
        the smallest prefix of the tokens ranked by probability, ties by id, whose mass
        reaches top_p. With top-k on nothing sorts the vocabulary (see `_top_k_filter`)."""
        p = self.params
        logits = logits / p.temperature
        if p.top_k and p.top_k < logits.shape[-1]:
            return self._top_k_filter(logits)
        if p.min_p > 0 or p.top_p < 1:
            probs = mx.softmax(logits, axis=-1)
            if p.min_p > 0:
                threshold = p.min_p * probs.max(axis=-1, keepdims=True)
                logits = mx.where(probs < threshold, -mx.inf, logits)
            if p.top_p < 1:
                order = mx.argsort(-probs, axis=-1)  # stable: ties in id order
                sorted_probs = mx.take_along_axis(probs, order, axis=-1)
                # Keep the smallest prefix whose mass reaches top_p (at least one token).
                before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs
                drop_sorted = before >= p.top_p
                drop = mx.zeros_like(drop_sorted)
                drop = mx.put_along_axis(drop, order, drop_sorted, axis=-1)
                logits = mx.where(drop, -mx.inf, logits)
        return logits

    def _top_k_filter(self, logits: mx.array) -> mx.array:
        """`filter` with top-k on, keeping what the whole-vocabulary sort kept.

        A partition finds the k largest; top-p and min-p rank only those (every other
        token has no probability left), in the sort's order: by value, ties by id.
        Tokens outside the partition that tie with the k-th survive top-k too: they
        are counted into the mass, and where top-p's cut falls among the k-th's ties,
        the lowest ids are kept, as the sort ranked them."""
        p, k = self.params, self.params.top_k
        top = mx.sort(mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k], axis=-1)
        order = mx.argsort(-mx.take_along_axis(logits, top, axis=-1), axis=-1)  # stable
        ids = mx.take_along_axis(top, order, axis=-1)
        ranked = mx.take_along_axis(logits, ids, axis=-1)
        kth = ranked[..., -1:]
        keep = logits >= kth
        if not (p.min_p > 0 or p.top_p < 1):
            return mx.where(keep, logits, -mx.inf)
        ties = keep.sum(axis=-1, keepdims=True) - k  # outside the partition
        e = mx.exp(ranked - ranked[..., :1])
        probs = e / (e.sum(axis=-1, keepdims=True) + ties.astype(e.dtype) * e[..., -1:])
        if p.min_p > 0:
            n = (probs >= p.min_p * probs[..., :1]).sum(axis=-1, keepdims=True)
            keep = keep & (logits >= mx.take_along_axis(ranked, n - 1, axis=-1))
        if p.top_p < 1:
            cumulative = mx.cumsum(probs, axis=-1)
            n = (cumulative - probs < p.top_p).sum(axis=-1, keepdims=True)  # >= 1
            # Past the partition the sort's ranking goes on through the k-th's ties, each
            # adding the k-th's probability.
            last = probs[..., -1:]
            room = mx.where(last > 0, (p.top_p - cumulative[..., -1:]) / last, 0.0)
            n = n + mx.where(n == k, mx.clip(mx.ceil(room), 0, ties).astype(n.dtype), 0)
            above = ranked > kth
            first = above & (mx.arange(k) < n)
            chosen = mx.put_along_axis(mx.zeros(logits.shape, mx.bool_), ids, first, axis=-1)
            tied = logits == kth
            reach = n - above.sum(axis=-1, keepdims=True)  # how many of the ties the cut keeps
            keep = keep & (chosen | (tied & (mx.cumsum(tied.astype(mx.int32), axis=-1) <= reach)))
        return mx.where(keep, logits, -mx.inf)


def _greedy(logits: mx.array) -> mx.array:
    return mx.argmax(logits, axis=-1)
