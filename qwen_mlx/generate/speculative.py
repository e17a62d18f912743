"""Speculative decoding: a drafter proposes tokens, the target checks them in one forward.

Two drafters:
- `ModelDrafter`: a small Qwen with the target's tokenizer (Qwen3-0.6B for Qwen3-8B,
  Qwen2.5-0.5B for Qwen2.5-7B, a small Qwen3.5 for a large one), with its own cache.
- `MTPDrafter`: the target's own multi-token-prediction block (Qwen3-Next, Qwen3.5/3.6;
  hybrid spec §5), whose KV cache holds the pairs (trunk hidden state at p, token at p+1).

Each step drafts k tokens after the pending token y, runs the target once over
[y, d1..dk], and keeps the longest acceptable prefix plus one token of the target's own.
Greedy decoding accepts a draft while it equals the target's argmax, so the output is
the target's greedy output. Sampling uses the rejection rule of Leviathan et al. and
Chen et al. (2023): accept d with probability min(1, p(d)/q(d)), else draw from
max(0, p - q) renormalized, and draw from p after a fully accepted draft; p is the
target's distribution after every sampler option (penalties as if the earlier drafts had
been generated, temperature, top-k/p, min-p), so the output follows the target's
distribution exactly.

Rolling back what was not accepted costs no copy: KV caches trim, and the Gated DeltaNet
layers keep their state after each verified token (`LinearCache.keep_steps`), so rejected
drafts cost no second forward. Rotating caches that already dropped positions restore the
snapshot taken before the verify (views, see model.cache) and run the accepted tokens again.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx

from ..errors import QwenMLXError
from ..model.cache import (KVCache, LinearCache, RotatingKVCache, cache_arrays, restore_cache,
                           snapshot_cache)
from .sampling import Sampler, SamplingParams

MAX_DRAFT_TOKENS = 16
# Drafts per step when none is asked: the MTP block is trained for one step ahead and
# reused beyond it, so its later drafts are accepted less often than a draft model's.
DEFAULT_DRAFT_TOKENS = {"mtp": 2, "model": 3}
_FLUSH = 512  # observed tokens a drafter runs at once, bounding its memory in a prefill


@dataclass
class SpeculativeStats:
    """What speculation did in one reply."""

    draft_tokens: int = 0  # drafts proposed
    accepted_tokens: int = 0  # drafts the target accepted
    steps: int = 0  # verify forwards

    @property
    def acceptance(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0


class DraftSampler:
    """Draws drafts: the target's sampling without its penalties (any draft distribution
    keeps the rule exact; this one is close to the target's), over the ids both share."""

    def __init__(self, params: SamplingParams, width: int, limit: int, parent: Sampler):
        self.params = SamplingParams(temperature=params.temperature, top_p=params.top_p,
                                     top_k=params.top_k, min_p=params.min_p)
        self.filter = Sampler(self.params, width).filter
        self.limit, self.parent = limit, parent

    @property
    def greedy(self) -> bool:
        return self.params.temperature == 0

    def __call__(self, logits: mx.array) -> tuple[mx.array, mx.array | None]:
        """logits [1, V] -> (token [1], the draft distribution [V'] or None when greedy)."""
        logits = logits[..., :self.limit].astype(mx.float32)
        if self.greedy:
            return mx.argmax(logits, axis=-1), None
        filtered = self.filter(logits)
        key = self.parent.next_key()
        token = (mx.random.categorical(filtered) if key is None
                 else mx.random.categorical(filtered, key=key))
        return token, mx.softmax(filtered, axis=-1)[0]


class ModelDrafter:
    """A small model drafting for a large one; its cache follows the target's ids."""

    kind = "model"

    def __init__(self, model, *, limit: int, kv_bits: int | None = None,
                 max_kv_size: int | None = None, prefill_step_size: int = 512):
        self.model, self.limit, self.step = model, limit, prefill_step_size
        self.cache = model.make_cache(kv_bits=kv_bits, max_kv_size=max_kv_size)
        self.ids: list[int] = []  # what its cache holds
        self.unfed: list[int] = []  # the target holds these after `ids`; not yet run here
        self._trimmable = all(isinstance(c, KVCache) for c in self.cache)
        self._snaps: list = []
        self._drafted = 0

    def reset(self) -> None:
        from .generation import clear_cache

        clear_cache(self.cache)
        self.ids, self.unfed = [], []

    def sync(self, held: Sequence[int]) -> None:
        """The target's cache now holds `held`: go back to what is shared, queue the rest."""
        from .generation import _shared

        common = _shared(self.ids, held)
        drop = len(self.ids) - common
        if drop and not all([c.trim(drop) for c in self.cache]):
            self.reset()
            common = 0
        self.ids = self.ids[:common]
        self.unfed = list(held[common:])

    def observe(self, tokens: Sequence[int], hidden: mx.array | None = None) -> None:
        """The target ran `tokens` into its cache."""
        self.unfed.extend(int(t) for t in tokens)
        if len(self.unfed) > _FLUSH:
            self._run(self.unfed)
            self.unfed = []

    def _run(self, tokens: list[int]) -> None:
        from .generation import prefill

        prefill(self.model, tokens, self.cache, step=self.step)
        self.ids.extend(tokens)

    def propose(self, y: int, k: int, draw: DraftSampler) -> tuple[list[int], mx.array | None]:
        """k drafts after the target's context and y; with their draft distributions [k, V']."""
        feed, self.unfed = self.unfed + [y], []
        if len(feed) > self.step:
            self._run(feed[:-1])
            feed = feed[-1:]
        self.ids.extend(feed[:-1])
        token = mx.array(feed)  # the queued tokens run with the first draft's forward
        self._snaps = []
        drafts, qs = [], []
        for i in range(k):
            logits = self.model(token[None], cache=self.cache, last_only=True)
            if not self._trimmable:
                self._snaps.append(snapshot_cache(self.cache))
            token, q = draw(logits[:, -1, :])
            drafts.append(token)
            qs.append(q)
        out = mx.concatenate(drafts)
        mx.eval(out, *(q for q in qs if q is not None))
        ids = out.tolist()
        self.ids.extend([y] + ids[:-1])
        self._drafted = k
        return ids, None if qs[0] is None else mx.stack(qs)

    def after_verify(self, kept: Sequence[int], hidden: mx.array | None = None) -> None:
        """The target kept `kept` (y and the accepted drafts) of its verify."""
        k = self._drafted
        held = min(len(kept), k)  # of y, d1..d(k-1), which this cache ran
        if held < k:
            if self._trimmable:
                for c in self.cache:
                    c.trim(k - held)
            else:
                restore_cache(self.cache, self._snaps[held - 1])
            del self.ids[len(self.ids) - (k - held):]
        self.unfed = list(kept[held:])
        self._snaps = []


class MTPDrafter:
    """The target's MTP block drafting for it (hybrid spec §5).

    The block's cache holds one entry per pair (trunk hidden at p, token at p+1), at
    position p, so it is one position behind the target's; `h_prev` is the trunk's hidden
    state at the last position the target holds, waiting for the token after it.
    Pairs are run lazily, with the next draft (one forward for both)."""

    kind = "mtp"

    def __init__(self, model, *, limit: int, kv_bits: int | None = None):
        if getattr(model, "mtp", None) is None:
            raise QwenMLXError(
                "speculative 'mtp' needs the checkpoint's MTP block (mtp.* weights), and this "
                "model has none: convert the hub checkpoint again without --no-mtp (a Qwen3.5, "
                "Qwen3.6 or Qwen3-Next one), or use --draft-model with a small Qwen instead")
        self.model, self.limit = model, limit
        self.cache = model.make_mtp_cache(kv_bits=kv_bits)
        self.h_prev: mx.array | None = None
        self._todo: list[tuple[mx.array, list[int]]] = []
        self._base = 0

    def _pending(self) -> int:
        return sum(len(t) for _, t in self._todo)

    def _covered(self) -> int:
        """Target positions whose hidden state this drafter has seen."""
        return self.cache[0].offset + self._pending() + (self.h_prev is not None)

    def reset(self) -> None:
        for c in self.cache:
            c.trim(c.offset)
        self.h_prev, self._todo = None, []

    def sync(self, held: Sequence[int]) -> None:
        """The target's cache now holds `held` positions. Going back, the hidden state at
        the new last position is not kept (it is not worth memory for every position): a
        zero stands in for it, which only weakens the next draft. Positions the target ran
        without this drafter (a prompt cache from a file) get zeros too."""
        n, covered = len(held), self._covered()
        if covered > n:
            self._flush()
            keep = max(n - 1, 0)
            for c in self.cache:
                c.trim(c.offset - keep)
            self.h_prev = self._zeros(1) if n else None
        elif covered < n:
            self.observe(held[covered:], self._zeros(n - covered))

    def _zeros(self, n: int) -> mx.array:
        w = self.model.model.embed_tokens
        return mx.zeros((1, n, self.model.config.hidden_size), dtype=_dtype(w))

    def observe(self, tokens: Sequence[int], hidden: mx.array) -> None:
        """The target ran `tokens` with final hidden states `hidden` [1, len, H]."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            return
        if self.h_prev is None:
            pairs_h, pairs_t = hidden[:, :-1], tokens[1:]
        else:
            pairs_h = mx.concatenate([self.h_prev, hidden[:, :-1]], axis=1)
            pairs_t = tokens
        self.h_prev = hidden[:, -1:]
        if pairs_t:
            self._todo.append((pairs_h, pairs_t))
        if self._pending() > _FLUSH:
            self._flush()

    def _flush(self) -> None:
        if not self._todo:
            return
        h = mx.concatenate([x for x, _ in self._todo], axis=1)
        t = [i for _, ids in self._todo for i in ids]
        self._todo = []
        positions = self.model.positions(self.cache[0].offset, len(t))
        self.model.mtp(h, self.model.model.embed_tokens(mx.array(t)[None]), positions, self.cache)
        mx.eval(cache_arrays(self.cache))

    def propose(self, y: int, k: int, draw: DraftSampler) -> tuple[list[int], mx.array | None]:
        h = mx.concatenate([x for x, _ in self._todo] + [self.h_prev], axis=1)
        tokens = mx.array([i for _, ids in self._todo for i in ids] + [y])[None]
        self._todo = []
        self._base = self.cache[0].offset + tokens.shape[1] - 1  # before the (h_prev, y) pair
        drafts, qs = [], []
        for i in range(k):
            logits, h = self.model.mtp_forward(h, tokens, self.cache, last_only=True)
            token, q = draw(logits[:, -1, :])
            drafts.append(token)
            qs.append(q)
            tokens = token[None]
        out = mx.concatenate(drafts)
        mx.eval(out, *(q for q in qs if q is not None))
        return out.tolist(), None if qs[0] is None else mx.stack(qs)

    def after_verify(self, kept: Sequence[int], hidden: mx.array) -> None:
        """The target kept `kept` (y and the accepted drafts), with hidden [1, len, H]: the
        pairs the block drafted from its own hidden states are replaced by the trunk's."""
        for c in self.cache:
            c.trim(c.offset - self._base)
        self.observe(kept, hidden)


def _dtype(embedding) -> mx.Dtype:
    scales = getattr(embedding, "scales", None)
    return (scales if scales is not None else embedding.weight).dtype


def check_draft_vocabulary(tokenizer, draft_tokenizer) -> int:
    """The ids both tokenizers give the same tokens: the range a draft may propose in.

    Refuses a draft whose tokenizer differs inside the shared range (another family's)."""
    inner_t = getattr(tokenizer, "tokenizer", None)
    inner_d = getattr(draft_tokenizer, "tokenizer", None)
    limit = min(tokenizer.id_limit, draft_tokenizer.id_limit)
    if inner_t is None or inner_d is None:
        return limit
    target = {i: t for t, i in inner_t.get_vocab(with_added_tokens=True).items() if i < limit}
    draft = {i: t for t, i in inner_d.get_vocab(with_added_tokens=True).items() if i < limit}
    if target != draft:
        differ = sorted(i for i in set(target) | set(draft) if target.get(i) != draft.get(i))
        shown = ", ".join(f"{i} ({target.get(i)!r} vs {draft.get(i)!r})" for i in differ[:3])
        raise QwenMLXError(
            f"the draft model's tokenizer does not match the target's: {len(differ)} of the "
            f"{limit} shared ids differ, e.g. {shown}. A draft must use the same tokenizer: "
            "pick a small model of the same generation (Qwen3-0.6B for Qwen3, Qwen2.5-0.5B "
            "for Qwen2.5, a small Qwen3.5 for Qwen3.5)")
    return limit


def check_num_draft(n: Any) -> int:
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or not (
            1 <= n <= MAX_DRAFT_TOKENS):
        raise QwenMLXError(f"num_draft_tokens must be a whole number from 1 to "
                           f"{MAX_DRAFT_TOKENS}, got {n!r}")
    return int(n)


def load_draft(source: str | Path, *, dtype: str | None = None) -> tuple[Any, Any]:
    """A draft model and its tokenizer (which its vocabulary is checked by) from a
    folder or a hub repo id."""
    from ..checkpoint.hub import resolve_model_path
    from ..checkpoint.loader import load

    folder = resolve_model_path(source)
    model, tokenizer = load(folder, dtype=dtype)
    if tokenizer is None:
        raise QwenMLXError(f"the draft model {folder} has no tokenizer.json, so its "
                           "vocabulary cannot be checked against the target's")
    return model, tokenizer


def make_drafter(model, tokenizer, *, draft_model: Any = None, speculative: str | None = None,
                 kv_bits: int | None = None, max_kv_size: int | None = None,
                 prefill_step_size: int = 512) -> ModelDrafter | MTPDrafter | None:
    """The drafter the options ask for, or None. `draft_model`: a folder or hub id, or
    the (model, tokenizer) pair `qwen_mlx.load` returns; `speculative`: "mtp"."""
    if speculative is not None and speculative != "mtp":
        raise QwenMLXError(f"speculative {speculative!r} is not known: the one method is "
                           "'mtp' (use draft_model for a draft model)")
    if speculative and draft_model is not None:
        raise QwenMLXError("choose one way to draft: speculative 'mtp' or a draft model")
    limit = getattr(tokenizer, "id_limit", None) or model.config.vocab_size
    limit = min(limit, model.config.vocab_size)
    if speculative == "mtp":
        return MTPDrafter(model, limit=limit, kv_bits=kv_bits)
    if draft_model is None:
        return None
    if isinstance(draft_model, (str, Path)):
        draft_model = load_draft(draft_model)
    if not (isinstance(draft_model, tuple) and len(draft_model) == 2):
        raise QwenMLXError("draft_model must be a model folder, a hub id, or the "
                           "(model, tokenizer) pair qwen_mlx.load returns")
    dmodel, dtok = draft_model
    limit = min(limit, check_draft_vocabulary(tokenizer, dtok), dmodel.config.vocab_size)
    return ModelDrafter(dmodel, limit=limit, kv_bits=kv_bits, max_kv_size=max_kv_size,
                        prefill_step_size=prefill_step_size)


def accept(sampler: Sampler, logits: mx.array, drafts: list[int], q: mx.array | None,
           ) -> tuple[int, int]:
    """(how many drafts to accept, the target's token after them) for verify logits
    [k + 1, V] over [y, d1..dk]."""
    processed = sampler.process_rows(logits, drafts)
    k = len(drafts)
    if sampler.greedy:
        best = mx.argmax(processed, axis=-1).tolist()
        a = next((i for i in range(k) if drafts[i] != best[i]), k)
        return a, best[a]
    p = sampler.probabilities(processed)  # [k + 1, V']
    width = p.shape[-1]
    if q is None:  # a greedy draft: q is one-hot on it
        q = mx.zeros((k, width)).at[mx.arange(k), mx.array(drafts)].add(1.0)
    elif q.shape[-1] != width:
        q = (q[:, :width] if q.shape[-1] > width
             else mx.pad(q, [(0, 0), (0, width - q.shape[-1])]))
    ids = mx.array(drafts)
    ratio = p[mx.arange(k), ids] / q[mx.arange(k), ids]
    key = sampler.next_key()
    u = mx.random.uniform(shape=(k,)) if key is None else mx.random.uniform(shape=(k,), key=key)
    residual = mx.maximum(p[:k] - q, 0.0)
    # Where p and q agree exactly nothing is rejected, but keep the row drawable anyway.
    residual = mx.where(residual.sum(axis=-1, keepdims=True) > 0, residual, p[:k])
    rows = mx.concatenate([residual, p[k:]], axis=0)
    key = sampler.next_key()
    logs = mx.log(rows)
    draws = mx.random.categorical(logs) if key is None else mx.random.categorical(logs, key=key)
    ok, draws = (u < ratio).tolist(), draws.tolist()
    a = next((i for i in range(k) if not ok[i]), k)
    return a, draws[a]


def _rewind(model, cache: list, snaps: list | None, fed: list[int], keep: int,
            prompt_length: int | None) -> None:
    """Keep the first `keep` of the `fed` verify tokens in the target's cache."""
    drop = len(fed) - keep
    rotating = [c for c in cache if isinstance(c, RotatingKVCache)]
    if drop and not all([c.trim(drop) for c in rotating]):
        # A rotating cache already dropped the positions a trim would need.
        restore_cache(cache, snaps)
        model(mx.array(fed[:keep])[None], cache=cache, prompt_length=prompt_length,
              last_only=True)
        mx.eval(cache_arrays(cache))
        return
    for c in cache:
        if isinstance(c, KVCache):
            c.trim(drop)
        elif isinstance(c, LinearCache):
            c.keep(keep)


def speculative_tokens(model, prompt: Sequence[int], cache: list, sampler: Sampler,
                       drafter: ModelDrafter | MTPDrafter, *, num_draft: int, max_tokens: int,
                       prefill_step_size: int = 512, prompt_length: int | None = None,
                       cancel=None, mark: int | None = None,
                       on_mark: Callable[[], None] | None = None,
                       stats: SpeculativeStats | None = None, stream=None) -> Iterator[int]:
    """`generation.generate_tokens` with speculation: the same tokens under greedy
    decoding, the same distribution under sampling. The drafter must be in step with the
    cache (`drafter.sync(ids the cache holds)`). The cache ends holding the prompt and
    every yielded token except, possibly, the last."""
    from .generation import prefill_head

    stats = stats if stats is not None else SpeculativeStats()
    stream = stream or mx.default_stream(mx.default_device())
    total = prompt_length or len(prompt)
    if not prefill_head(model, prompt, cache, max_tokens=max_tokens, step=prefill_step_size,
                        prompt_length=total, cancel=cancel, mark=mark, on_mark=on_mark,
                        observer=drafter.observe):
        return
    draw = DraftSampler(sampler.params, drafter.model.config.vocab_size, drafter.limit, sampler)
    linear = [c for c in cache if isinstance(c, LinearCache)]
    rotating = any(isinstance(c, RotatingKVCache) for c in cache)

    def step(token: int) -> int:
        logits, h = model(mx.array([[token]]), cache=cache, prompt_length=total, last_only=True,
                          return_hidden=True)
        drafter.observe([token], h)
        y = sampler(logits[:, -1, :])
        sampler.observe(y)
        return int(y.item())

    with mx.stream(stream):
        y = step(prompt[-1])
    yield y
    produced = 1
    while produced < max_tokens:
        k = min(num_draft, max_tokens - produced - 1)
        if k < 1:
            with mx.stream(stream):
                y = step(y)
            yield y
            produced += 1
            continue
        with mx.stream(stream):
            drafts, q = drafter.propose(y, k, draw)
            fed = [y] + drafts
            snaps = snapshot_cache(cache) if rotating else None
            for c in linear:
                c.keep_steps = True
            try:
                logits, hidden = model(mx.array(fed)[None], cache=cache, prompt_length=total,
                                       return_hidden=True)
            finally:
                for c in linear:
                    c.keep_steps = False
            a, nxt = accept(sampler, logits[0], drafts, q)
        stats.steps += 1
        stats.draft_tokens += k
        stats.accepted_tokens += a
        out = drafts[:a] + [nxt]
        sampler.observe(mx.array(out))
        consumed = 0
        try:
            for t in out:
                yield t
                consumed += 1
                produced += 1
        finally:
            keep = 1 + min(consumed, a)
            with mx.stream(stream):
                _rewind(model, cache, snaps, fed, keep, total)
                drafter.after_verify(fed[:keep], hidden[:, :keep])
        y = nxt


def layer_draft(model, num_layers: int):
    """A draft that is `model`'s own first `num_layers` layers with its norm and head,
    sharing the weights (no memory of its own but its cache): self-speculation, and the
    benchmark's draft that agrees with its target by construction."""
    from dataclasses import replace

    from ..model.decoder import Model

    c = model.config
    if not 1 <= num_layers < c.num_layers:
        raise QwenMLXError(f"a layer draft takes 1 to {c.num_layers - 1} of the model's "
                           f"{c.num_layers} layers, not {num_layers}")
    config = replace(c, num_layers=num_layers, sliding_windows=c.sliding_windows[:num_layers],
                     sparse_layers=c.sparse_layers[:num_layers],
                     layer_kinds=c.layer_kinds[:num_layers] if c.layer_kinds else ())
    draft = Model(config)  # its own weights are lazy and never evaluated: replaced here
    draft.model.embed_tokens, draft.model.norm = model.model.embed_tokens, model.model.norm
    draft.model.layers = model.model.layers[:num_layers]
    if not c.tie_word_embeddings:
        draft.lm_head = model.lm_head
    # What was switched on the target after loading (DCA, Qwen1 windows) holds here too.
    draft.max_context, draft.dca = model.max_context, model.dca
    draft.windows = model.windows[:num_layers]
    return draft
