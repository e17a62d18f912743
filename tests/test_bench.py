"""The benchmark harness on a tiny synthetic shape: fields present, ratios computed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qwen_mlx.generate.sampling import QWEN3_THINKING

pytestmark = pytest.mark.bench


def test_bench_harness_on_a_tiny_shape(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "qwen_mlx.cli", "bench", "--shape", "tiny-shape",
                        "--layers", "2", "--group-size", "32", "--contexts", "12,24",
                        "--gen", "3", "--reps", "1", "--out", str(out), "--work",
                        str(tmp_path / "work")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "bench.json").read_text())
    assert {"os", "mlx", "device", "processor"} <= report["machine"].keys()
    tools = {(row["tool"], row["context"]) for row in report["rows"]}
    assert tools == {(t, c) for t in ("qwen-mlx", "mlx-lm") for c in (12, 24)}
    for row in report["rows"]:
        assert row["prefill_tps"] > 0 and row["decode_tps"] > 0 and row["ttft"] > 0
        assert row["kv_bytes"] > 0
    ours = {row["context"]: row for row in report["rows"] if row["tool"] == "qwen-mlx"}
    peer = {row["context"]: row for row in report["rows"] if row["tool"] == "mlx-lm"}
    for ctx in (12, 24):
        ratio = report["ratios"][str(ctx)]
        assert ratio["decode"] == pytest.approx(ours[ctx]["decode_tps"] / peer[ctx]["decode_tps"])
        assert ratio["prefill"] == pytest.approx(ours[ctx]["prefill_tps"] / peer[ctx]["prefill_tps"])
        assert ratio["ttft_speedup"] == pytest.approx(peer[ctx]["ttft"] / ours[ctx]["ttft"])
        low, high = ratio["decode_range"]  # one repetition: one pair
        assert low == high == pytest.approx(ratio["decode"])
        assert ratio["peak_memory_saving"] == pytest.approx(
            peer[ctx]["peak_memory_gb"] / ours[ctx]["peak_memory_gb"])
    assert report["multi_turn"]["turns"] == 3 and report["multi_turn"]["reused_ttft"] > 0
    assert 0 < report["roofline"]["percent"] and report["roofline"]["bandwidth_gbps"] > 0
    md = (out / "bench.md").read_text()
    assert "| qwen-mlx | 12 |" in md
    # The header in words: no Python dicts, no Device(cpu, 0).
    header = md.splitlines()[0]
    assert header.startswith("Model: tiny-shape, 2 layers, 4-bit · float32, 3 new tokens, "
                             "1 run per point, contexts 12, 24 · on the ")
    assert "{" not in header and "Device(" not in header
    # Decode with Qwen3's thinking preset beside greedy, alternating on one prompt.
    sampling = report["sampling"]
    assert sampling["params"] == QWEN3_THINKING and sampling["context"] == 12
    assert sampling["greedy_tps"] > 0 and sampling["preset_tps"] > 0
    assert sampling["ratio"] == pytest.approx(sampling["preset_tps"] / sampling["greedy_tps"])
    assert (f"Decode with Qwen3's thinking preset (temperature 0.6, top-p 0.95, top-k 20), "
            f"alternating with greedy at 12 tokens: {sampling['preset_tps']:.2f} tok/s") in md
    assert "| 12 | " in r.stdout and "TTFT (speed-up)" in r.stdout
    assert "bench:" in r.stderr and "run/s" in r.stderr  # the progress bar
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_contexts_that_do_not_fit_in_memory_are_skipped(tmp_path, monkeypatch):
    from qwen_mlx import bench

    folder = bench.synthetic_checkpoint(tmp_path / "tiny", "tiny-shape")
    monkeypatch.setattr(bench, "available_memory_bytes", lambda: 4 * 2**20)
    # 12 tokens need a few MB beside the weights; 50,000 need ~1 GB of attention scores.
    report = bench.benchmark(folder, label="tiny", contexts=[12, 50_000], gen=2, reps=1,
                             peers=False, progress=False, log=lambda m: None)
    assert [r.context for r in report.rows] == [12]
    assert report.settings["skipped_contexts"] == [50_000]
    assert "Skipped for lack of memory: contexts [50000]" in report.markdown()


def test_bench_rejects_bad_options(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qwen_mlx.cli", "bench", "--shape", "nope",
                        "--work", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown shape 'nope'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "qwen_mlx.cli", "bench", "--shape", "tiny-shape",
                        "--contexts", "a,b"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--contexts" in r.stderr


def test_moe_routing_cost_and_quantization_quality(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "qwen_mlx.cli", "bench", "--shape",
                        "tiny-moe-shape", "--layers", "2", "--group-size", "32", "--contexts",
                        "12", "--gen", "3", "--reps", "1", "--no-peers", "--quality", "--out",
                        str(out), "--work", str(tmp_path / "work")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "bench.json").read_text())
    routing = report["moe_routing"]
    assert 0 < routing["routing_ms"] and 0 < routing["share"] < 1
    assert [q["name"] for q in report["quality"]] == [
        "uniform 3-bit g32", "uniform 4-bit g32", "uniform 4-bit g64", "uniform 4-bit g128",
        "mixed_4_6 g32", "uniform 8-bit g32"]
    kl = {q["name"]: q["kl"] for q in report["quality"]}
    assert kl["uniform 8-bit g32"] < kl["uniform 4-bit g32"] < kl["uniform 3-bit g32"]
    assert {row["tool"] for row in report["rows"]} == {"qwen-mlx"} and report["ratios"] == {}


def test_ratios_above_one_favour_qwen_mlx_and_pairs_give_the_spread():
    from qwen_mlx.bench import Run, _row, ratios

    ours = [Run(100, 2.0, 50.0, 10.0, 1.0, 8), Run(100, 2.5, 40.0, 12.0, 1.0, 8)]
    theirs = [Run(100, 4.0, 25.0, 5.0, 1.2, 8), Run(100, 4.0, 25.0, 8.0, 1.1, 8)]
    a, b = _row("qwen-mlx", 100, ours), _row("mlx-lm", 100, theirs)
    q = ratios(a, b, list(zip(ours, theirs)))
    assert q["decode"] == pytest.approx(11.0 / 6.5) and q["ttft_speedup"] == pytest.approx(4 / 2.25)
    assert q["peak_memory_saving"] == pytest.approx(1.2)
    assert q["decode_range"] == pytest.approx([1.5, 2.0])
    assert q["prefill_range"] == pytest.approx([1.6, 2.0])
    assert q["ttft_speedup_range"] == pytest.approx([1.6, 2.0])
