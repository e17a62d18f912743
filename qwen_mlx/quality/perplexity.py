"""Perplexity over a text, and mean KL divergence against a reference model.

The token sequence is scored in windows of at most `context` tokens. Each
window predicts the next `stride` tokens that no earlier window scored, with
the tokens before them in the window as context, as Hugging Face's guide to
fixed-length models does (the default stride, context - 1, gives windows that
share one token; a smaller one gives every scored token more context). The
text's first token is never predicted. A chunk is one window's scored tokens: the standard error is that of the per-token negative log
likelihood's mean, estimated from the spread of the chunks' means, and the
95% interval is exp(mean ± 1.96 SE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import numpy as np

from ..errors import QwenMLXError


@dataclass
class Window:
    begin: int  # first token of the window
    end: int  # one past its last token
    scored: int  # the window's last `scored` positions' next tokens are scored


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log likelihood, nats per token
    stderr: float | None  # of `nll`, over chunks; None with a single chunk
    tokens: int  # scored tokens
    chunks: int
    kl: float | None = None  # mean KL(reference || model), nats per token
    kl_stderr: float | None = None

    @property
    def interval(self) -> tuple[float, float] | None:
        """The perplexity's 95% confidence interval, from the chunks' spread."""
        if self.stderr is None:
            return None
        return math.exp(self.nll - 1.96 * self.stderr), math.exp(self.nll + 1.96 * self.stderr)

    def summary(self) -> str:
        lines = [f"perplexity  {self.perplexity:.4f}"
                 + (f"  (95% CI {self.interval[0]:.4f} - {self.interval[1]:.4f})"
                    if self.interval else ""),
                 f"nll         {self.nll:.5f} nats/token"
                 + (f" ± {self.stderr:.5f}" if self.stderr is not None else ""),
                 f"tokens      {self.tokens} scored in {self.chunks} chunk(s)"]
        if self.kl is not None:
            lines.append(f"KL          {self.kl:.6f} nats/token vs the reference"
                         + (f" ± {self.kl_stderr:.6f}" if self.kl_stderr is not None else ""))
        return "\n".join(lines)


def windows(n_tokens: int, context: int, stride: int | None = None) -> list[Window]:
    """The windows that score tokens 1 .. n_tokens-1 once each: each scores the next
    `stride` tokens (default context - 1) with up to `context` tokens in all, so every
    scored token sees at least context - stride tokens before it in its window."""
    stride = stride or context - 1
    if context < 2:
        raise QwenMLXError(f"--context {context} is too small: a window needs 2 tokens")
    if not 1 <= stride < context:
        raise QwenMLXError(f"--stride {stride} must be between 1 and --context {context} - 1")
    if n_tokens < 2:
        raise QwenMLXError(f"the text gives {n_tokens} token(s); perplexity needs at least 2")
    out, done = [], 1  # token 0 has no prediction
    while done < n_tokens:
        end = min(done + stride, n_tokens)
        out.append(Window(max(0, end - context), end, end - done))
        done = end
    return out


def _log_probs(model, ids: Sequence[int]) -> mx.array:
    logits = model(mx.array([list(ids)]))[0].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _stderr(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def perplexity(model, tokens: Sequence[int], *, context: int = 512, stride: int | None = None,
               reference=None, progress: bool = True) -> PerplexityResult:
    """Perplexity of `model` over `tokens` in sliding windows; with `reference` (another
    model over the same vocabulary), also the mean KL(reference || model) per token."""
    from huggingface_hub.utils import tqdm

    tokens = list(tokens)
    wins = windows(len(tokens), context, stride)
    vocab = model.config.vocab_size
    if max(tokens) >= vocab:
        raise QwenMLXError(f"token id {max(tokens)} is beyond the model's vocab_size {vocab}: "
                           "the tokenizer does not belong to the model")
    if reference is not None and reference.config.vocab_size != vocab:
        raise QwenMLXError(f"the reference model's vocab_size {reference.config.vocab_size} "
                           f"differs from the model's {vocab}: KL needs the same vocabulary")
    nll_sum, kl_sum, count = 0.0, 0.0, 0
    chunk_nll, chunk_kl = [], []
    with tqdm(total=sum(w.scored for w in wins), unit="tok", desc="perplexity",
              disable=not progress) as bar:
        for w in wins:
            ids = tokens[w.begin:w.end]
            lp = _log_probs(model, ids)[-w.scored - 1:-1]
            targets = mx.array(ids[-w.scored:])
            nll = -mx.take_along_axis(lp, targets[:, None], axis=-1)[:, 0]
            total = float(nll.sum().item())
            nll_sum += total
            chunk_nll.append(total / w.scored)
            if reference is not None:
                ref = _log_probs(reference, ids)[-w.scored - 1:-1]
                kl = float((mx.exp(ref) * (ref - lp)).sum().item())
                kl_sum += kl
                chunk_kl.append(kl / w.scored)
            count += w.scored
            bar.update(w.scored)
    nll_mean = nll_sum / count
    return PerplexityResult(
        perplexity=math.exp(nll_mean), nll=nll_mean, stderr=_stderr(chunk_nll), tokens=count,
        chunks=len(wins), kl=kl_sum / count if reference is not None else None,
        kl_stderr=_stderr(chunk_kl) if reference is not None else None)


def read_tokens(tokenizer, file: str | Path, max_tokens: int | None = None) -> list[int]:
    """A UTF-8 text file's token ids (the first `max_tokens`)."""
    if tokenizer is None:
        raise QwenMLXError("the model has no tokenizer (tokenizer.json), so the text cannot "
                           "be read; add one to the model folder")
    try:
        text = Path(file).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise QwenMLXError(f"--file {file}: cannot be read as UTF-8 text ({e})") from None
    ids = list(tokenizer.encode(text))
    return ids[:max_tokens] if max_tokens else ids


def perplexity_file(model_path: str | Path, file: str | Path, *, context: int = 512,
                    stride: int | None = None, reference: str | Path | None = None,
                    max_tokens: int | None = None, dtype: str | None = None,
                    progress: bool = True) -> PerplexityResult:
    """`perplexity` of the model at `model_path` (local folder or hub id) over a text file."""
    from ..checkpoint.hub import resolve_model_path
    from ..checkpoint.loader import load

    model, tokenizer = load(resolve_model_path(model_path), dtype=dtype)
    tokens = read_tokens(tokenizer, file, max_tokens)
    ref = load(resolve_model_path(reference), dtype=dtype)[0] if reference else None
    return perplexity(model, tokens, context=context, stride=stride, reference=ref,
                      progress=progress)
