"""The benchmark harness on a tiny synthetic shape: fields present, ratios computed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
    assert report["multi_turn"]["turns"] == 3 and report["multi_turn"]["reused_ttft"] > 0
    assert 0 < report["roofline"]["percent"] and report["roofline"]["bandwidth_gbps"] > 0
    assert "| qwen-mlx | 12 |" in (out / "bench.md").read_text()
    assert "decode ratio" in r.stdout


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
        "uniform 3-bit g32", "uniform 4-bit g32", "mixed_4_6 g32", "uniform 8-bit g32"]
    kl = {q["name"]: q["kl"] for q in report["quality"]}
    assert kl["uniform 8-bit g32"] < kl["uniform 4-bit g32"] < kl["uniform 3-bit g32"]
    assert {row["tool"] for row in report["rows"]} == {"qwen-mlx"} and report["ratios"] == {}
