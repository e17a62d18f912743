"""`qwen-mlx bench --speculative mtp | --draft-model`: decode speed with and without
speculation, the acceptance rate, and mlx-lm's `--draft-model` on the same weights.

Random weights agree with a draft only by chance, so the benchmark builds agreement:
the target's layers from `keep` on have their output projections scaled by a factor
("damped"), and the draft is the target's first `keep` layers (`layers:N`). A smaller
factor makes the damped layers matter less, so the draft agrees more often; the rows
give the speed-up as a function of the acceptance rate that results. An MTP block with
random weights ("trained by nothing") is accepted almost never: its row is the cost of
drafting and verifying for nothing. The verify-cost row, one forward over k + 1 tokens
against k + 1 single steps, is what decides the speed-up on real weights: with
acceptance a per draft, a step yields (1 - a^(k+1)) / (1 - a) tokens.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from .bench import PREFILL_STEP, _timed, machine_info
from .errors import QwenMLXError


def _layers(model) -> list:
    inner = getattr(model, "language_model", model)
    return inner.model.layers


def _output_projections(layer) -> list:
    """The modules whose outputs a layer adds to the residual stream."""
    mixer = getattr(layer, "self_attn", None) or getattr(layer, "linear_attn", None)
    out = [getattr(mixer, "o_proj", None) or getattr(mixer, "out_proj", None)]
    mlp = layer.mlp
    out += [getattr(mlp, "down_proj", None),
            getattr(getattr(mlp, "switch_mlp", None), "down_proj", None),
            getattr(getattr(mlp, "shared_expert", None), "down_proj", None)]
    return [m for m in out if m is not None]


def damp(model, first: int, factor: float) -> Callable[[], None]:
    """Scale the output projections of layers `first`.. by `factor` (quantized ones through
    their scales and biases); returns what puts the weights back. Works on qwen-mlx and
    mlx-lm models alike: both use mlx-lm's module names."""
    saved = []
    for layer in _layers(model)[first:]:
        for m in _output_projections(layer):
            for name in ("weight", "scales", "biases", "bias"):
                if name == "weight" and "scales" in m:
                    continue  # packed integers: the scales and biases carry the size
                if name in m:
                    saved.append((m, name, m[name]))
                    m[name] = m[name] * factor
    mx.eval([m[n] for m, n, _ in saved])

    def undo() -> None:
        for m, name, value in saved:
            m[name] = value
    return undo


def mlx_lm_layer_draft(model, keep: int):
    """An mlx-lm model's first `keep` layers, sharing its weights."""
    draft = copy.copy(model)
    inner_name = "language_model" if "language_model" in model else None
    holder = copy.copy(model[inner_name]) if inner_name else draft
    holder.model = copy.copy(holder.model)
    holder.model.layers = holder.model.layers[:keep]
    if inner_name:
        draft[inner_name] = holder
    return draft


def random_mtp(model, bits: int | None, group_size: int) -> None:
    """Give a model without one an MTP block of random weights (quantized like the trunk)."""
    import mlx.nn as nn

    from .model.decoder import MTP

    model.mtp = MTP(model.config, 1)
    if bits:
        nn.quantize(model.mtp, group_size=group_size, bits=bits,
                    class_predicate=lambda _, m: isinstance(m, nn.Linear)
                    and m.weight.shape[-1] % group_size == 0)
    mx.eval(model.mtp.parameters())


def verify_cost(model, context: int, k: int, reps: int = 5) -> dict:
    """Seconds of one forward over k + 1 tokens (with its rollback) against k + 1 single
    steps, after a prefill of `context` tokens."""
    from .generate.speculative import _rewind
    from .model.cache import LinearCache, cache_arrays

    rng = np.random.default_rng(1)
    prompt = rng.integers(0, min(model.config.vocab_size, 150000), context).tolist()
    cache = model.make_cache()
    model(mx.array(prompt)[None], cache=cache, last_only=True)
    mx.eval(cache_arrays(cache))
    tokens = rng.integers(0, 1000, k + 1).tolist()
    linear = [c for c in cache if isinstance(c, LinearCache)]
    snap = [c.state() for c in cache]

    def back(n: int) -> None:
        """Back to the prefill, for the next repetition: the last `n` positions dropped."""
        for c, state in zip(cache, snap):
            if not c.trim(n):
                c.set_state(*state, context)

    def singles() -> float:
        t = time.perf_counter()
        for tok in tokens:
            mx.eval(model(mx.array([[tok]]), cache=cache, last_only=True))
        spent = time.perf_counter() - t
        back(k + 1)
        return spent

    def verify() -> float:
        t = time.perf_counter()
        for c in linear:
            c.keep_steps = True
        logits = model(mx.array(tokens)[None], cache=cache)
        for c in linear:
            c.keep_steps = False
        mx.eval(logits)
        _rewind(model, cache, None, tokens, 1, None)  # keep y only: the costliest rollback
        mx.eval(cache_arrays(cache))
        spent = time.perf_counter() - t
        back(1)
        return spent
    singles(), verify()  # warm up
    s = float(np.median([singles() for _ in range(reps)]))
    v = float(np.median([verify() for _ in range(reps)]))
    return {"context": context, "k": k, "single_steps_s": s, "verify_s": v,
            "verify_over_steps": v / s}


def expected_speedup(acceptance: float, k: int, verify_over_step: float,
                     draft_over_step: float) -> float:
    """Tokens per step over the step's cost in single target steps (the standard model)."""
    tokens = k + 1 if acceptance >= 1 else (1 - acceptance ** (k + 1)) / (1 - acceptance)
    return tokens / (verify_over_step + k * draft_over_step)


def _ours(model, tok, prompt, gen, **spec) -> tuple[float, Any]:
    from .generate.generation import stream_generate

    last = []

    def stream():
        for r in stream_generate(model, tok, prompt, max_tokens=gen, temperature=0.0,
                                 prefill_step_size=PREFILL_STEP, **spec):
            last[:] = [r]
            if r.token is not None:
                yield r
    _, _, decode = _timed(stream(), len(prompt))
    return decode, last[0]


def _theirs(model, tok, prompt, gen, draft=None, k: int = 2) -> float:
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    extra = dict(draft_model=draft, num_draft_tokens=k) if draft is not None else {}
    _, _, decode = _timed(mlx_lm.stream_generate(model, tok, prompt, max_tokens=gen,
                                                 sampler=make_sampler(temp=0.0), **extra),
                          len(prompt))
    return decode


def speculative_benchmark(folder: Path, *, draft: str | None, speculative: str | None,
                          num_draft: int | None, factors: list[float], context: int = 128,
                          gen: int = 64, reps: int = 2, dtype: str | None = "float32",
                          peers: bool = True, bits: int | None = None, group_size: int = 64,
                          log: Callable[[str], None] = print) -> dict:
    """Decode tok/s with and without speculation (see the module docstring)."""
    from .checkpoint.loader import load
    from .generate.speculative import DEFAULT_DRAFT_TOKENS, layer_draft, load_draft

    model, tok = load(folder, dtype=dtype)
    n = model.config.num_layers
    k = num_draft or DEFAULT_DRAFT_TOKENS["mtp" if speculative else "model"]
    keep = None
    if speculative == "mtp":
        how = "the checkpoint's MTP block"
        if model.mtp is None:
            random_mtp(model, bits, group_size)
            how = "a random MTP block (trained by nothing)"
        spec = dict(speculative="mtp", num_draft_tokens=k)
        factors = [1.0]
    elif draft and draft.startswith("layers:"):
        try:
            keep = int(draft.split(":", 1)[1])
        except ValueError:
            raise QwenMLXError(f"--draft-model {draft!r}: write layers:N, N a number") from None
        spec = dict(draft_model=(layer_draft(model, keep), tok), num_draft_tokens=k)
        how = f"the target's first {keep} of {n} layers, the rest damped"
    else:
        from .checkpoint.hub import resolve_model_path

        spec = dict(draft_model=load_draft(draft, dtype=dtype), num_draft_tokens=k)
        how = f"the draft model {draft}"
        factors = [1.0]
    peer = peer_draft = None
    refused = None
    if peers:
        try:
            import mlx_lm
        except ImportError:
            log("mlx-lm is not installed: measuring qwen-mlx alone")
        else:
            peer = mlx_lm.load(str(folder))
            if dtype is not None:
                peer[0].set_dtype(getattr(mx, dtype))
            if speculative == "mtp":
                refused = "mlx-lm drops the MTP weights (no MTP decoding)"
            elif keep is not None:
                peer_draft = mlx_lm_layer_draft(peer[0], keep)
            else:
                peer_draft = mlx_lm.load(str(resolve_model_path(draft)))[0]
    prompt = np.random.default_rng(0).integers(0, min(model.config.vocab_size, 150000),
                                               context).tolist()
    rows = []
    for factor in factors:
        undo = damp(model, keep, factor) if keep is not None and factor != 1.0 else None
        peer_undo = (damp(peer[0], keep, factor) if peer and keep is not None
                     and factor != 1.0 else None)
        plain, fast, accepted, theirs, theirs_fast = [], [], [], [], []
        for rep in range(reps):
            log(f"damping {factor}: repetition {rep + 1}/{reps}")
            plain.append(_ours(model, tok, prompt, gen)[0])
            d, last = _ours(model, tok, prompt, gen, **spec)
            fast.append(d)
            accepted.append(last.acceptance_rate)
            if peer is not None:
                theirs.append(_theirs(*peer, prompt, gen))
                if peer_draft is not None:
                    try:
                        theirs_fast.append(_theirs(*peer, prompt, gen, peer_draft, k))
                    except ValueError as e:  # hybrids: "requires a trimmable prompt cache"
                        refused = str(e)
                        peer_draft = None
        row = {"damping": factor, "acceptance": float(np.median(accepted)),
               "plain_tps": float(np.median(plain)), "speculative_tps": float(np.median(fast))}
        row["speedup"] = row["speculative_tps"] / row["plain_tps"]
        if theirs:
            row["mlx_lm_plain_tps"] = float(np.median(theirs))
        if theirs_fast:
            row["mlx_lm_speculative_tps"] = float(np.median(theirs_fast))
            row["mlx_lm_speedup"] = row["mlx_lm_speculative_tps"] / row["mlx_lm_plain_tps"]
            row["ours_over_mlx_lm"] = row["speculative_tps"] / row["mlx_lm_speculative_tps"]
        rows.append(row)
        log(f"damping {factor}: acceptance {row['acceptance']:.2f}, "
            f"{row['plain_tps']:.1f} -> {row['speculative_tps']:.1f} tok/s "
            f"({row['speedup']:.2f}x)")
        for u in (undo, peer_undo):
            if u is not None:
                u()
    cost = verify_cost(model, context, k)
    return {"machine": machine_info(), "folder": str(folder), "draft": how, "k": k,
            "context": context, "gen": gen, "reps": reps, "dtype": dtype or "defaults",
            "rows": rows, "verify": cost, "mlx_lm_refused": refused}


def markdown(report: dict) -> str:
    """The report as a Markdown table."""
    v = report["verify"]
    lines = [f"Speculative decoding, {report['folder']}: {report['draft']}, "
             f"{report['k']} drafts per step, {report['context']}-token prompt, "
             f"{report['gen']} new tokens, greedy, {report['dtype']}, "
             f"{report['reps']} repetitions (medians).", "",
             "| damping | acceptance | decode tok/s | speculative tok/s | speed-up "
             "| mlx-lm tok/s | mlx-lm speculative | mlx-lm speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        def f(key, fmt="{:.1f}"):
            return fmt.format(r[key]) if key in r else "–"
        lines.append(f"| {r['damping']} | {r['acceptance']:.2f} | {f('plain_tps')} | "
                     f"{f('speculative_tps')} | {f('speedup', '{:.2f}x')} | "
                     f"{f('mlx_lm_plain_tps')} | {f('mlx_lm_speculative_tps')} | "
                     f"{f('mlx_lm_speedup', '{:.2f}x')} |")
    lines += ["", f"One verify over {v['k'] + 1} tokens (with its rollback): "
              f"{1000 * v['verify_s']:.1f} ms, against {1000 * v['single_steps_s']:.1f} ms for "
              f"{v['k'] + 1} single steps ({v['verify_over_steps']:.2f} of their cost), at "
              f"{v['context']} tokens of context."]
    if report.get("mlx_lm_refused"):
        lines.append(f"mlx-lm: {report['mlx_lm_refused']}")
    return "\n".join(lines)
