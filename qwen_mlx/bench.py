"""The benchmark harness behind `qwen-mlx bench` and benchmarks/.

It measures qwen-mlx and, when installed, mlx-lm on the very same converted
folder, alternating runs so drift hits both alike, and reports medians,
spreads and ratios. Models are a folder, a hub id, or a synthetic shape with
random weights in the real layout (the speed does not depend on the values),
so it runs offline and in tests.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .errors import QwenMLXError

PREFILL_STEP = 2048  # mlx-lm's default prefill chunk; both tools run with it here

# Real widths; `layers` is cut short by default so that CPU runs stay minutes long.
SHAPES: dict[str, dict] = {
    "qwen3-0.6b-shape": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072,
                             num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                             vocab_size=151936, tie_word_embeddings=True,
                             num_hidden_layers=28),
    "qwen3-1.7b-shape": dict(model_type="qwen3", hidden_size=2048, intermediate_size=6144,
                             num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                             vocab_size=151936, tie_word_embeddings=True,
                             num_hidden_layers=28),
    "qwen3-30b-a3b-shape-small": dict(model_type="qwen3_moe", hidden_size=2048,
                                      intermediate_size=6144, moe_intermediate_size=768,
                                      num_experts=128, num_experts_per_tok=8,
                                      norm_topk_prob=True, num_attention_heads=32,
                                      num_key_value_heads=4, head_dim=128,
                                      vocab_size=151936, tie_word_embeddings=False,
                                      num_hidden_layers=48),
    # The hybrids (Gated DeltaNet + gated attention), written in the published layout:
    # nested text_config, model.language_model.* names, fused experts for Qwen3.5-MoE.
    "qwen3.5-0.8b-shape": dict(model_type="qwen3_5", hidden_size=1024, intermediate_size=3584,
                               num_attention_heads=8, num_key_value_heads=2, head_dim=256,
                               linear_num_key_heads=16, linear_num_value_heads=16,
                               linear_key_head_dim=128, linear_value_head_dim=128,
                               linear_conv_kernel_dim=4, vocab_size=248320,
                               tie_word_embeddings=True, num_hidden_layers=24),
    "qwen3.5-35b-a3b-shape-small": dict(model_type="qwen3_5_moe", hidden_size=2048,
                                        num_attention_heads=16, num_key_value_heads=2,
                                        head_dim=256, linear_num_key_heads=16,
                                        linear_num_value_heads=32, linear_key_head_dim=128,
                                        linear_value_head_dim=128, linear_conv_kernel_dim=4,
                                        num_experts=256, num_experts_per_tok=8,
                                        moe_intermediate_size=512,
                                        shared_expert_intermediate_size=512,
                                        vocab_size=248320, tie_word_embeddings=False,
                                        num_hidden_layers=40),
    "qwen3-next-80b-a3b-shape-small": dict(model_type="qwen3_next", hidden_size=2048,
                                           intermediate_size=5120, num_attention_heads=16,
                                           num_key_value_heads=2, head_dim=256,
                                           linear_num_key_heads=16, linear_num_value_heads=32,
                                           linear_key_head_dim=128, linear_value_head_dim=128,
                                           linear_conv_kernel_dim=4, num_experts=512,
                                           num_experts_per_tok=10, moe_intermediate_size=512,
                                           shared_expert_intermediate_size=512,
                                           norm_topk_prob=True, vocab_size=151936,
                                           tie_word_embeddings=False, num_hidden_layers=48),
    # For tests of the harness itself.
    "tiny-moe-shape": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=128,
                           moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                           norm_topk_prob=True, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, vocab_size=300, tie_word_embeddings=False,
                           num_hidden_layers=2),
    "tiny-hybrid-shape": dict(model_type="qwen3_5_moe", hidden_size=64, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=32, linear_num_key_heads=2,
                              linear_num_value_heads=4, linear_key_head_dim=32,
                              linear_value_head_dim=32, linear_conv_kernel_dim=4,
                              num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                              shared_expert_intermediate_size=64, vocab_size=300,
                              tie_word_embeddings=False, num_hidden_layers=4),
    "tiny-shape": dict(model_type="qwen3", hidden_size=64, intermediate_size=128,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       vocab_size=300, tie_word_embeddings=True, num_hidden_layers=2),
}


def synthetic_checkpoint(folder: Path, shape: str, layers: int | None = None,
                         shards: int = 1) -> Path:
    """Write a Hugging Face-layout checkpoint of `shape` with random weights, in
    `shards` safetensors files (with an index when more than one).

    bfloat16, as Qwen publishes its checkpoints: "each tool's defaults" then
    means what a user of a real Qwen model gets.
    """
    from .model.config import ModelConfig

    if shape not in SHAPES:
        raise QwenMLXError(f"unknown shape '{shape}'; choose one of: {', '.join(SHAPES)}")
    cfg = dict(SHAPES[shape], rope_theta=1e6, max_position_embeddings=40960,
               rms_norm_eps=1e-6, torch_dtype="bfloat16")
    if layers:
        cfg["num_hidden_layers"] = layers
    hybrid = "linear_num_key_heads" in cfg
    if hybrid:
        # Every fourth layer full attention, the rest Gated DeltaNet; with a few
        # layers, the last is the full one so that both kinds are measured.
        n = cfg["num_hidden_layers"]
        cfg.update(rope_theta=1e7, partial_rotary_factor=0.25, full_attention_interval=4,
                   layer_types=["full_attention" if (i + 1) % 4 == 0 or i == n - 1
                                else "linear_attention" for i in range(n)])
    c = ModelConfig.from_dict(cfg)
    rng = np.random.default_rng(0)

    def r(*s):
        return mx.array(rng.standard_normal(s, dtype=np.float32) * 0.02).astype(mx.bfloat16)

    def ones(n):
        # Zero-centred norms store w for a factor of 1 + w.
        return (mx.zeros if c.zero_centred_norms else mx.ones)((n,), mx.bfloat16)

    H, D = c.hidden_size, c.head_dim
    # Qwen3.5's published checkpoints nest the language model (hybrid spec §4.2).
    nested = c.family in ("qwen3_5", "qwen3_5_moe")
    root = "model.language_model." if nested else "model."
    t = {root + "embed_tokens.weight": r(c.vocab_size, H), root + "norm.weight": ones(H)}
    if not c.tie_word_embeddings:
        t["lm_head.weight"] = r(c.vocab_size, H)
    for i in range(c.num_layers):
        p = f"{root}layers.{i}."
        t.update({p + "input_layernorm.weight": ones(H),
                  p + "post_attention_layernorm.weight": ones(H)})
        if c.layer_kinds[i] == "linear":
            t.update(_linear_attention(c, p + "linear_attn.", r, rng))
        else:
            t.update({p + "self_attn.q_proj.weight": r(c.num_heads * D * (2 if c.attention_gate else 1), H),
                      p + "self_attn.k_proj.weight": r(c.num_kv_heads * D, H),
                      p + "self_attn.v_proj.weight": r(c.num_kv_heads * D, H),
                      p + "self_attn.o_proj.weight": r(H, c.num_heads * D),
                      p + "self_attn.q_norm.weight": ones(D),
                      p + "self_attn.k_norm.weight": ones(D)})
        if c.sparse_layers[i]:
            m = c.moe
            t[p + "mlp.gate.weight"] = r(m.num_experts, H)
            if nested:  # Qwen3.5-MoE's release fuses the experts: [E, 2I, H] and [E, H, I]
                t[p + "mlp.experts.gate_up_proj"] = r(m.num_experts, 2 * m.intermediate_size, H)
                t[p + "mlp.experts.down_proj"] = r(m.num_experts, H, m.intermediate_size)
            else:
                for e in range(m.num_experts):
                    q = p + f"mlp.experts.{e}."
                    t[q + "gate_proj.weight"] = r(m.intermediate_size, H)
                    t[q + "up_proj.weight"] = r(m.intermediate_size, H)
                    t[q + "down_proj.weight"] = r(H, m.intermediate_size)
            if m.shared_intermediate_size:
                q, width = p + "mlp.shared_expert.", m.shared_intermediate_size
                t.update({q + "gate_proj.weight": r(width, H), q + "up_proj.weight": r(width, H),
                          q + "down_proj.weight": r(H, width),
                          p + "mlp.shared_expert_gate.weight": r(1, H)})
        else:
            t[p + "mlp.gate_proj.weight"] = r(c.intermediate_size, H)
            t[p + "mlp.up_proj.weight"] = r(c.intermediate_size, H)
            t[p + "mlp.down_proj.weight"] = r(H, c.intermediate_size)
    folder.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        mx.save_safetensors(str(folder / "model.safetensors"), t, metadata={"format": "pt"})
    else:
        # Fill shards in order up to an equal share of the bytes, as transformers does.
        share = sum(v.nbytes for v in t.values()) / shards
        parts: list[dict] = [{}]
        for n, v in t.items():
            if parts[-1] and sum(x.nbytes for x in parts[-1].values()) + v.nbytes > share \
                    and len(parts) < shards:
                parts.append({})
            parts[-1][n] = v
        weight_map = {}
        for k, part in enumerate(parts):
            name = f"model-{k + 1:05d}-of-{len(parts):05d}.safetensors"
            mx.save_safetensors(str(folder / name), part, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, name))
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
    if nested:
        text = {k: v for k, v in cfg.items() if k not in ("torch_dtype",)}
        text["model_type"] = cfg["model_type"] + "_text"
        cfg = {"model_type": cfg["model_type"], "architectures": [
            "Qwen3_5MoeForConditionalGeneration" if c.moe else "Qwen3_5ForConditionalGeneration"],
            "text_config": text, "tie_word_embeddings": cfg["tie_word_embeddings"],
            "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(cfg))
    _byte_tokenizer(folder)
    return folder


def _linear_attention(c, p: str, r, rng) -> dict:
    """A Gated DeltaNet layer's tensors in the published (Hugging Face) layout."""
    lc, H = c.linear, c.hidden_size
    t = {p + "conv1d.weight": r(lc.conv_dim, 1, lc.conv_kernel) * 10,
         p + "A_log": mx.array(np.log(rng.uniform(1, 16, lc.num_value_heads)).astype(np.float32)),
         p + "dt_bias": mx.ones((lc.num_value_heads,), mx.bfloat16),
         p + "norm.weight": mx.ones((lc.value_head_dim,), mx.float32),
         p + "out_proj.weight": r(H, lc.value_dim)}
    if c.family == "qwen3_next":  # grouped by key head: a permutation of the rows below
        t[p + "in_proj_qkvz.weight"] = r(lc.conv_dim + lc.value_dim, H)
        t[p + "in_proj_ba.weight"] = r(2 * lc.num_value_heads, H)
    else:
        t.update({p + "in_proj_qkv.weight": r(lc.conv_dim, H),
                  p + "in_proj_z.weight": r(lc.value_dim, H),
                  p + "in_proj_b.weight": r(lc.num_value_heads, H),
                  p + "in_proj_a.weight": r(lc.num_value_heads, H)})
    return t


def _byte_tokenizer(folder: Path) -> None:
    """A byte-level tokenizer (no merges) with Qwen's control tokens: enough for both tools."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True) for s in
                            ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>"}))


@dataclass
class Run:
    prompt_tokens: int
    ttft: float
    prefill_tps: float
    decode_tps: float
    peak_memory_gb: float
    kv_bytes: int


@dataclass
class Row:
    """One tool at one context length: medians over repetitions, and the spread of decode."""

    tool: str
    context: int
    ttft: float
    prefill_tps: float
    decode_tps: float
    decode_spread: float
    peak_memory_gb: float
    kv_bytes: int


@dataclass
class Report:
    machine: dict
    model: str
    settings: dict
    rows: list[Row] = field(default_factory=list)
    ratios: dict = field(default_factory=dict)
    multi_turn: dict = field(default_factory=dict)
    roofline: dict = field(default_factory=dict)
    moe_routing: dict = field(default_factory=dict)
    quality: list = field(default_factory=list)
    sampling: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def markdown(self) -> str:
        lines = [f"Model: {self.model} · {settings_text(self.settings)} · on the "
                 f"{self.machine['device'].upper()} ({self.machine.get('chip') or '?'})", "",
                 "| tool | context | TTFT s | prefill tok/s | decode tok/s | peak GB | KV MB |",
                 "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r.tool} | {r.context} | {r.ttft:.2f} | {r.prefill_tps:.1f} | "
                         f"{r.decode_tps:.2f} ± {r.decode_spread / 2:.2f} | "
                         f"{r.peak_memory_gb:.2f} | {r.kv_bytes / 2**20:.1f} |")
        if self.ratios:
            lines += ["", "qwen-mlx against mlx-lm (above 1: qwen-mlx is better; ratio of the "
                      "medians, then the lowest and highest of the alternating pairs):", "",
                      "| context | prefill tok/s | decode tok/s | TTFT (speed-up) | "
                      "peak memory (saving) |", "|---|---|---|---|---|"]
            def cell(q, key):
                lo, hi = q.get(f"{key}_range", (None, None))
                spread = f" ({lo:.2f}-{hi:.2f})" if lo is not None and hi != lo else ""
                return f"{q[key]:.2f}x{spread}"

            for ctx, q in sorted(self.ratios.items(), key=lambda kv: int(kv[0])):
                lines.append(f"| {ctx} | {cell(q, 'prefill')} | {cell(q, 'decode')} | "
                             f"{cell(q, 'ttft_speedup')} | {q['peak_memory_saving']:.2f}x |")
        if self.settings.get("skipped_contexts"):
            lines += ["", f"Skipped for lack of memory: contexts {self.settings['skipped_contexts']}"]
        if self.sampling:
            m = self.sampling
            lines += ["", f"Decode with Qwen3's thinking preset (temperature "
                      f"{m['params']['temperature']:g}, top-p {m['params']['top_p']:g}, top-k "
                      f"{m['params']['top_k']}), alternating with greedy at {m['context']} "
                      f"tokens: {m['preset_tps']:.2f} tok/s against {m['greedy_tps']:.2f} "
                      f"greedy ({m['ratio']:.0%})"]
        if self.multi_turn:
            m = self.multi_turn
            lines += ["", f"Multi-turn TTFT (turn {m['turns']}): {m['reused_ttft']:.2f} s with "
                      f"cache reuse vs {m['fresh_ttft']:.2f} s without ({m['speedup']:.1f}x)"]
            if "peer_fresh_ttft" in m:
                lines[-1] += (f"; mlx-lm, which cannot reuse a hybrid's cache: "
                              f"{m['peer_fresh_ttft']:.2f} s ({m['speedup_vs_peer']:.1f}x)")
        if self.moe_routing:
            m = self.moe_routing
            lines += ["", f"MoE routing (router, softmax, top-k) per token: {m['routing_ms']:.3f} ms "
                      f"of {m['moe_block_ms']:.3f} ms for a whole MoE block ({m['share']:.0%})"]
        if self.quality:
            lines += ["", "| quantization | bits per weight | KL nats/token | top-1 agreement |",
                      "|---|---|---|---|"]
            for q in self.quality:
                lines.append(f"| {q['name']} | {q['bits_per_weight']:.2f} | {q['kl']:.5f} | "
                             f"{q['top1']:.1%} |")
        if self.roofline:
            r = self.roofline
            lines += ["", f"Roofline: decode reads {r['bytes_per_token'] / 2**20:.1f} MB per "
                      f"token (active weights and the KV cache); at {r['decode_tps']:.2f} tok/s that is {r['achieved_gbps']:.2f} "
                      f"GB/s of a measured {r['bandwidth_gbps']:.1f} GB/s read bandwidth "
                      f"({r['percent']:.0f}%)"]
        return "\n".join(lines)


def machine_info() -> dict:
    info = {"os": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "mlx": mx.__version__,
            "device": mx.default_device().type.name,  # "cpu" or "gpu"
            "chip": mx.device_info().get("device_name", platform.processor())}
    try:
        info["memory_gb"] = round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return info


def measured_bandwidth(mb: int = 256) -> float:
    """GB/s of reading a large array on the default device, with every core the
    model's matmuls use (a sum per core on the CPU).

    A read, not a copy: a copy's output would be fresh memory, and on the CPU
    its page faults, not the memory, would set the figure (it swung from 4 to
    38 GB/s with the allocator's state).
    """
    from .model.parallel import split

    a = mx.random.uniform(shape=(mb * 2**20 // 4,))
    mx.eval(a)

    def read():
        parts = split(a.size, 1 << 62, lambda s: a[s].sum(keepdims=True), axis=0)  # always
        return a.sum() if parts is None else parts

    mx.eval(read())
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        mx.eval(read())
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9


def _timed(stream, prompt_tokens: int) -> tuple[float, float, float]:
    started = time.perf_counter()
    stamps = [time.perf_counter() for _ in stream]
    ttft = stamps[0] - started
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return ttft, prompt_tokens / ttft, decode


def run_ours(model, tokenizer, prompt: list[int], gen: int, sampling: dict | None = None) -> Run:
    """One qwen-mlx run: greedy, or with the `sampling` keywords of stream_generate."""
    from .generate.generation import stream_generate

    cache = model.make_cache()
    mx.reset_peak_memory()
    ttft, pre, dec = _timed((r for r in stream_generate(
        model, tokenizer, prompt, max_tokens=gen, prompt_cache=cache,
        prefill_step_size=PREFILL_STEP, **(sampling or {"temperature": 0.0}))
        if r.token is not None), len(prompt))
    return Run(len(prompt), ttft, pre, dec, mx.get_peak_memory() / 1e9,
               sum(c.nbytes for c in cache))


def run_mlx_lm(model, tokenizer, prompt: list[int], gen: int) -> Run:
    import mlx_lm
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import make_sampler

    cache = make_prompt_cache(model)
    mx.reset_peak_memory()
    ttft, pre, dec = _timed(mlx_lm.stream_generate(
        model, tokenizer, prompt, max_tokens=gen, sampler=make_sampler(temp=0.0),
        prompt_cache=cache), len(prompt))
    return Run(len(prompt), ttft, pre, dec, mx.get_peak_memory() / 1e9,
               sum(c.nbytes for c in cache))


def ratios(ours: Row, theirs: Row, pairs: list[tuple[Run, Run]] = ()) -> dict:
    """qwen-mlx against mlx-lm, each oriented so that above 1 means qwen-mlx is better:
    ratios of the medians and, from each alternating pair of runs, their spread."""
    out = {"prefill": ours.prefill_tps / theirs.prefill_tps,
           "decode": ours.decode_tps / theirs.decode_tps,
           "ttft_speedup": theirs.ttft / ours.ttft,
           "peak_memory_saving": theirs.peak_memory_gb / ours.peak_memory_gb}
    if pairs:
        for key, of in (("prefill", lambda a, b: a.prefill_tps / b.prefill_tps),
                        ("decode", lambda a, b: a.decode_tps / b.decode_tps),
                        ("ttft_speedup", lambda a, b: b.ttft / a.ttft)):
            each = [of(a, b) for a, b in pairs]
            out[f"{key}_range"] = [min(each), max(each)]
    return out


def settings_text(settings: dict) -> str:
    """The settings line of a report, in words."""
    contexts = settings.get("contexts", [])
    reps = settings.get("reps")
    return (f"{settings.get('dtype')}, {settings.get('gen')} new tokens, "
            f"{'median of ' if reps != 1 else ''}{reps} run{'s' if reps != 1 else ''} per point, "
            f"contexts {', '.join(f'{c:,}' for c in contexts)}")


def preset_decode(model, tokenizer, prompt: list[int], gen: int, reps: int) -> dict:
    """Decode tok/s with Qwen3's thinking preset (what chat and generate use by default)
    and greedy (what the tables show), alternating runs on one prompt."""
    from .generate.sampling import QWEN3_THINKING

    greedy, preset = [], []
    for _ in range(reps):
        greedy.append(run_ours(model, tokenizer, prompt, gen).decode_tps)
        preset.append(run_ours(model, tokenizer, prompt, gen,
                               dict(QWEN3_THINKING, seed=0)).decode_tps)
    g, p = statistics.median(greedy), statistics.median(preset)
    return {"params": dict(QWEN3_THINKING), "context": len(prompt), "greedy_tps": g,
            "preset_tps": p, "ratio": p / g if g else 0.0}


def _row(tool: str, context: int, runs: list[Run]) -> Row:
    dec = [r.decode_tps for r in runs]
    return Row(tool, context, statistics.median(r.ttft for r in runs),
               statistics.median(r.prefill_tps for r in runs), statistics.median(dec),
               max(dec) - min(dec), max(r.peak_memory_gb for r in runs), runs[-1].kv_bytes)


def multi_turn_ttft(model, tokenizer, turns: int = 3, words: int = 40, peer=None) -> dict:
    """TTFT of turn N with the session's cache reused, and with the history prefilled anew;
    with `peer` (mlx-lm's model and tokenizer), also mlx-lm's TTFT for that history."""
    from .generate.generation import ChatSession

    def message(i):
        return " ".join(f"word{i}x{j}" for j in range(words))

    session = ChatSession(model, tokenizer, enable_thinking=False)
    for i in range(turns - 1):
        for _ in session.send(message(i), max_tokens=8, temperature=0.0):
            pass
    session.messages.append({"role": "user", "content": message(turns)})
    history = [dict(m) for m in session.messages]
    reused = next(iter(session.respond(max_tokens=2, temperature=0.0))).ttft
    fresh_session = ChatSession(model, tokenizer, enable_thinking=False, messages=history)
    fresh = next(iter(fresh_session.respond(max_tokens=2, temperature=0.0))).ttft
    out = {"turns": turns, "reused_ttft": reused, "fresh_ttft": fresh, "speedup": fresh / reused}
    if peer is not None:
        # mlx-lm cannot trim a hybrid's state, so a chat's next turn prefills its
        # rendered history anew (its prompt cache serves only exact continuations).
        import mlx_lm
        from mlx_lm.sample_utils import make_sampler

        peer_model, peer_tok = peer
        ids = tokenizer.apply_chat_template(history, add_generation_prompt=True,
                                            enable_thinking=False)
        started = time.perf_counter()
        next(iter(mlx_lm.stream_generate(peer_model, peer_tok, ids, max_tokens=2,
                                         sampler=make_sampler(temp=0.0))))
        out["peer_fresh_ttft"] = time.perf_counter() - started
        out["speedup_vs_peer"] = out["peer_fresh_ttft"] / reused
    return out


def context_memory_bytes(model, context: int, step: int = PREFILL_STEP) -> int:
    """What one run at `context` tokens needs beyond the weights: the KV cache of
    both tools, and prefill's largest activation (one chunk's attention scores)."""
    c = model.config
    kv = 2 * c.num_layers * c.num_kv_heads * c.head_dim * context * 4
    scores = c.num_heads * min(step, context) * context * 4
    return 2 * kv + scores


def available_memory_bytes() -> int | None:
    """Memory a benchmark may use: Metal's recommended working set, else physical RAM."""
    info = mx.device_info()
    if "max_recommended_working_set_size" in info:
        return int(info["max_recommended_working_set_size"])
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def benchmark(folder: Path, *, label: str, contexts: list[int], gen: int = 32, reps: int = 3,
              dtype: str | None = "float32", peers: bool = True, progress: bool = True,
              log: Callable[[str], None] = print) -> Report:
    """Measure a converted folder with qwen-mlx and, when `peers`, mlx-lm on the same weights.

    `dtype`: "float32" compares at equal dtype; None gives each tool its defaults.
    Contexts that would not fit in memory next to the weights are skipped and named.
    """
    from huggingface_hub.utils import tqdm

    from .checkpoint.loader import load

    model, tok = load(folder, dtype=dtype)
    tok.detokenizer()  # build the byte table before timing, as mlx-lm does at load
    peer = None
    if peers:
        try:
            import mlx_lm
        except ImportError:
            log("mlx-lm is not installed: measuring qwen-mlx alone")
        else:
            peer_model, peer_tok = mlx_lm.load(str(folder))
            if dtype is not None:
                peer_model.set_dtype(getattr(mx, dtype))
            peer = (peer_model, peer_tok)
    report = Report(machine_info(), label, {"dtype": dtype or "defaults", "gen": gen,
                                            "reps": reps, "contexts": contexts})
    budget = available_memory_bytes()
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters())) * (2 if peer else 1)
    fitting = [c for c in contexts
               if budget is None or weights + context_memory_bytes(model, c) < 0.8 * budget]
    if skipped := [c for c in contexts if c not in fitting]:
        report.settings["skipped_contexts"] = skipped
        log(f"skipping contexts {skipped}: they need more memory than this machine has "
            f"({budget / 1e9:.0f} GB)")
    rng = np.random.default_rng(0)
    tools = 2 if peer else 1
    with tqdm(total=len(fitting) * reps * tools + 3, unit="run", desc="bench",
              disable=not progress) as bar:
        for ctx in fitting:
            prompt = rng.integers(0, min(model.config.vocab_size, 150000), ctx).tolist()
            ours, theirs = [], []
            for rep in range(reps):  # alternate, so drift hits both alike
                bar.set_postfix_str(f"context {ctx} · repetition {rep + 1}/{reps} · qwen-mlx")
                ours.append(run_ours(model, tok, prompt, gen))
                bar.update()
                if peer:
                    bar.set_postfix_str(f"context {ctx} · repetition {rep + 1}/{reps} · mlx-lm")
                    theirs.append(run_mlx_lm(*peer, prompt, gen))
                    bar.update()
            report.rows.append(_row("qwen-mlx", ctx, ours))
            if peer:
                report.rows.append(_row("mlx-lm", ctx, theirs))
                report.ratios[str(ctx)] = ratios(*report.rows[-2:], list(zip(ours, theirs)))
        if fitting:
            bar.set_postfix_str("decode with the thinking preset")
            prompt = rng.integers(0, min(model.config.vocab_size, 150000), fitting[0]).tolist()
            report.sampling = preset_decode(model, tok, prompt, gen, reps)
        bar.update()
        bar.set_postfix_str("multi-turn TTFT")
        report.multi_turn = multi_turn_ttft(model, tok, peer=peer if model.config.is_hybrid
                                            else None)
        report.moe_routing = moe_routing_cost(model)
        bar.update()
        bar.set_postfix_str("memory bandwidth")
        bandwidth = measured_bandwidth()
        bar.update()
    if report.rows:
        last = report.rows[0]
        per_token = decode_weight_bytes(model) + last.kv_bytes
        achieved = per_token * last.decode_tps / 1e9
        report.roofline = {"bytes_per_token": per_token, "decode_tps": last.decode_tps,
                           "achieved_gbps": achieved, "bandwidth_gbps": bandwidth,
                           "percent": 100 * achieved / bandwidth}
    return report


def decode_weight_bytes(model) -> float:
    """Weight bytes one decode token reads: only k of E experts, one row of an untied embedding."""
    c = model.config
    share = c.moe.top_k / c.moe.num_experts if c.moe else 1.0
    total = 0.0
    for name, v in tree_flatten(model.parameters()):
        if ".switch_mlp." in name:
            total += v.nbytes * share
        elif name.startswith("model.embed_tokens.") and not c.tie_word_embeddings:
            total += v.nbytes / c.vocab_size
        else:
            total += v.nbytes
    return total


def moe_routing_cost(model, reps: int = 20) -> dict:
    """Time of routing a decode token (router, softmax, top-k) against the whole MoE block."""
    from .model.moe import SparseMoE

    block = next((layer.mlp for layer in model.model.layers if isinstance(layer.mlp, SparseMoE)),
                 None)
    if block is None:
        return {}
    x = mx.random.normal((1, 1, model.config.hidden_size)).astype(
        block.gate.weight.dtype if block.gate.weight.dtype != mx.uint32 else mx.float32)

    def route():
        probs = mx.softmax(block.gate(x).astype(mx.float32), axis=-1)
        return mx.argpartition(-probs, kth=block.top_k - 1, axis=-1)[..., :block.top_k]

    def best(fn):
        mx.eval(fn())
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            mx.eval(fn())
            times.append(time.perf_counter() - t)
        return 1000 * statistics.median(times)

    routing, whole = best(route), best(lambda: block(x))
    return {"routing_ms": routing, "moe_block_ms": whole, "share": routing / whole}


def quantization_quality(source: Path, work: Path, recipes: list[tuple[str, int, int]],
                         log: Callable[[str], None] = print) -> list[dict]:
    """KL and top-1 agreement against the float source for (recipe, bits, group) choices."""
    from .checkpoint.converter import convert

    out = []
    for recipe, bits, group in recipes:
        name = f"{recipe} {bits}-bit g{group}" if recipe == "uniform" else f"{recipe} g{group}"
        log(f"quantization quality: {name}")
        folder = work / f"{source.name}-quality-{recipe}-{bits}-{group}"
        r = convert(source, folder, quantize=True, bits=bits, group_size=group,
                    recipe=None if recipe == "uniform" else recipe, check=True, force=True,
                    progress=False, log=lambda m: None)
        out.append({"name": name, "bits_per_weight": r.bits_per_weight,
                    "kl": r.check.kl_divergence, "top1": r.check.top1_agreement})
    return out


def plot(report: Report, path: Path) -> bool:
    """Prefill and decode tok/s and peak memory against context length, as a PNG.

    False when matplotlib (the `plots` extra) is missing.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [("prefill_tps", "prefill tok/s"), ("decode_tps", "decode tok/s"),
              ("peak_memory_gb", "peak memory GB")]
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 4))
    for tool in sorted({r.tool for r in report.rows}):
        rows = sorted((r for r in report.rows if r.tool == tool), key=lambda r: r.context)
        for ax, (key, _) in zip(axes, panels):
            ax.plot([r.context for r in rows], [getattr(r, key) for r in rows], marker="o",
                    label=tool)
    contexts = sorted({r.context for r in report.rows})
    for ax, (_, title) in zip(axes, panels):
        ax.set(xlabel="context tokens", ylabel=title, xscale="log")
        ax.set_xticks(contexts, [f"{c:,}" for c in contexts])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{report.model} · {report.settings['dtype']} · "
                 f"{report.machine['device'].upper()}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
