"""Tensor and pipeline parallel on one machine's loopback: memory per rank, time per
decoded token and bytes on the link, for 1, 2 and 4 processes under `mlx.launch`.

    python benchmarks/distributed_speed.py [--ranks 1 2 4] [--steps 24] [--out FILE]

Writes a random Qwen3-MoE-shaped checkpoint (bf16 on disk, nothing downloaded), then for
each rank count and mode launches ring ranks on 127.0.0.1. Each rank reports its resident
memory after loading its share (VmRSS) and its peak (VmHWM); rank 0 times decode steps
after a prefill and counts what each rank sent per token (payload through the
collectives, ring all-reduce sending 2(N-1)/N of it), and how many sequential link hops a
token waits for. From those, the per-token link cost on Thunderbolt 5 (~80 Gb/s, ~5-10 µs
per hop) and 10 GbE (~10 Gb/s, ~50-100 µs). On a 2-core machine 4 ranks oversubscribe the
cores, so loopback times there measure scheduling as much as the model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPE = dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=12,
             num_key_value_heads=4, head_dim=64, num_experts=32, num_experts_per_tok=4,
             moe_intermediate_size=256, vocab_size=32000)
LINKS = {"Thunderbolt 5": (80e9, 5e-6, 10e-6), "10 GbE": (10e9, 50e-6, 100e-6)}
PROMPT = 64


def write_checkpoint(folder: Path) -> None:
    """A random qwen3_moe folder in the mlx-lm layout (experts stacked), bf16."""
    import mlx.core as mx

    s = SHAPE
    H, L, D = s["hidden_size"], s["num_hidden_layers"], s["head_dim"]
    E, I, V = s["num_experts"], s["moe_intermediate_size"], s["vocab_size"]
    q, kv = s["num_attention_heads"] * D, s["num_key_value_heads"] * D
    config = dict(s, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"],
                  intermediate_size=4 * H, rms_norm_eps=1e-6, rope_theta=1e6,
                  max_position_embeddings=4096, tie_word_embeddings=False,
                  norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                  torch_dtype="bfloat16")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    mx.random.seed(0)

    def mat(*shape):
        return (0.02 * mx.random.normal(shape)).astype(mx.bfloat16)

    w = {"model.embed_tokens.weight": mat(V, H), "lm_head.weight": mat(V, H),
         "model.norm.weight": mx.ones((H,), dtype=mx.bfloat16)}
    for i in range(L):
        p = f"model.layers.{i}"
        w.update({f"{p}.input_layernorm.weight": mx.ones((H,), dtype=mx.bfloat16),
                  f"{p}.post_attention_layernorm.weight": mx.ones((H,), dtype=mx.bfloat16),
                  f"{p}.self_attn.q_proj.weight": mat(q, H),
                  f"{p}.self_attn.k_proj.weight": mat(kv, H),
                  f"{p}.self_attn.v_proj.weight": mat(kv, H),
                  f"{p}.self_attn.o_proj.weight": mat(H, q),
                  f"{p}.self_attn.q_norm.weight": mx.ones((D,), dtype=mx.bfloat16),
                  f"{p}.self_attn.k_norm.weight": mx.ones((D,), dtype=mx.bfloat16),
                  f"{p}.mlp.gate.weight": mat(E, H),
                  f"{p}.mlp.switch_mlp.gate_proj.weight": mat(E, I, H),
                  f"{p}.mlp.switch_mlp.up_proj.weight": mat(E, I, H),
                  f"{p}.mlp.switch_mlp.down_proj.weight": mat(E, H, I)})
    tmp = folder / f"model.{os.getpid()}.tmp.safetensors"
    mx.save_safetensors(str(tmp), w)
    os.replace(tmp, folder / "model.safetensors")


def _memory() -> dict:
    """This process's resident and peak resident memory, MiB."""
    status = Path("/proc/self/status").read_text().splitlines()
    kb = {line.split(":")[0]: int(line.split()[1]) for line in status
          if line.startswith(("VmRSS", "VmHWM"))}
    return {"rss_mib": kb["VmRSS"] / 1024, "peak_mib": kb["VmHWM"] / 1024}


def _decode_steps(model, steps: int, traffic=None) -> tuple[list[float], list[int]]:
    """Seconds per decode step after a prefill; with `traffic`, what the steps sent:
    (bytes sent, payload bytes, hops)."""
    import mlx.core as mx

    cache = model.make_cache()
    ids = mx.array([[(7 * i) % 1000 for i in range(PROMPT)]])
    mx.eval(model(ids, cache=cache, last_only=True))
    token = mx.array([[1]])
    times = []
    counters = lambda: [traffic.sent, traffic.payload, traffic.hops] if traffic else [0] * 3
    before = counters()
    for _ in range(steps):
        t = time.perf_counter()
        logits = model(token, cache=cache, last_only=True)
        token = mx.argmax(logits[:, -1:], axis=-1)
        mx.eval(token)
        times.append(time.perf_counter() - t)
    return times, [(a - b) / steps for a, b in zip(counters(), before)]


def worker(folder: str, mode: str, steps: int, out: str) -> None:
    """One rank (or the single process, mode 'single')."""
    from qwen_mlx.checkpoint.loader import load

    if mode == "single":
        model, _ = load(folder)
        report = {"rank": 0, "size": 1, **_memory()}
        report["step_s"] = statistics.median(_decode_steps(model, steps)[0])
        Path(out, "0.json").write_text(json.dumps(report))
        return
    from qwen_mlx.distributed.cli import load_share
    from qwen_mlx.distributed.runner import Driver, follow

    stage, _ = load_share(folder, mode, backend="ring")
    comm = stage.comm
    report = {"rank": comm.rank, "size": comm.size, **_memory()}
    if comm.lead:
        model = Driver(stage)
        _decode_steps(model, 2)  # warm-up
        times, per = _decode_steps(model, steps, comm.traffic)
        report["step_s"] = statistics.median(times)
        if mode == "pipeline":  # each other rank's one send per forward is on the path
            per[2] += comm.size - 1
        report.update(sent_per_token=per[0], payload_per_token=per[1], hops_per_token=per[2])
        model.close()
    else:
        follow(stage)
        report["sent_per_token"] = None
    report.update(_memory())
    Path(out, f"{comm.rank}.json").write_text(json.dumps(report))


def run(folder: Path, ranks: int, mode: str, steps: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        me = [sys.executable, str(Path(__file__).resolve()), "--worker", str(folder), mode,
              str(steps), out]
        if ranks > 1:
            launcher = Path(sys.executable).with_name("mlx.launch")
            me = [str(launcher), "--backend", "ring", "--hosts", "127.0.0.1", "-n",
                  str(ranks), "--starting-port", str(41000 + 10 * ranks), *me]
        env = dict(os.environ, QWEN_MLX_THREADS=str(max(1, 2 // ranks)))
        subprocess.run(me, check=True, timeout=1800, env=env, stdout=subprocess.DEVNULL)
        return [json.loads(Path(out, f"{r}.json").read_text()) for r in range(ranks)]


def link_cost(sent: float, hops: float) -> dict:
    """Per-token time a link adds: bytes over bandwidth plus hops times latency (µs)."""
    return {name: [round((sent * 8 / bw + hops * lat) * 1e6, 1) for lat in (lo, hi)]
            for name, (bw, lo, hi) in LINKS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--folder", type=Path, default=None,
                        help="reuse this checkpoint folder (written if missing)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" /
                        "linux-cpu" / "distributed.json")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        folder, mode, steps, out = args.worker
        worker(folder, mode, int(steps), out)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    folder = args.folder or Path(tempfile.gettempdir()) / "qwen-mlx-dist-bench"
    if not (folder / "model.safetensors").exists():
        write_checkpoint(folder)
    results = []
    for n in args.ranks:
        for mode in (["single"] if n == 1 else ["tensor", "pipeline"]):
            reports = run(folder, n, mode, args.steps)
            lead = reports[0]
            row = {"ranks": n, "mode": mode, "step_ms": round(lead["step_s"] * 1e3, 2),
                   "rss_mib": [round(r["rss_mib"]) for r in reports],
                   "peak_mib": [round(r["peak_mib"]) for r in reports]}
            if n > 1:
                row.update(sent_bytes_per_token=round(lead["sent_per_token"]),
                           payload_bytes_per_token=round(lead["payload_per_token"]),
                           hops_per_token=round(lead["hops_per_token"]),
                           link_us_per_token=link_cost(lead["sent_per_token"],
                                                       lead["hops_per_token"]))
            results.append(row)
            print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"shape": SHAPE, "results": results}, indent=2))
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
