"""Tensor and pipeline parallel under `mlx.launch`: 2 and 4 local processes over the ring
backend on 127.0.0.1, against the single-process run of the same folders.

The tests build tiny qwen3, qwen3_moe, qwen3_5 and qwen3_5_moe checkpoints (and 4-bit
copies), compute the single-process logits and greedy tokens here, then launch this
file as the worker on every rank (`python tests/test_distributed.py check SPEC`); rank
0 writes what it saw and the tests compare. Each launch is bounded by a timeout; where
`mlx.launch` cannot start processes on this machine the tests skip, saying why.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve()
PROMPT = 30  # prefill, then single-token steps up to SEQ
SEQ = 35
TRIM = 2
GREEDY = 6
LAUNCH_TIMEOUT = 120


# --- the worker (runs on every rank under mlx.launch) ----------------------------------

def _ids() -> np.ndarray:
    return np.random.RandomState(0).randint(0, 250, size=(1, SEQ))


def _observe(model, tokenizer, light: bool = False) -> dict:
    """Full-forward logits, prefill + decode logits, decode logits after a trim, greedy
    tokens: the same calls on one process and on rank 0 of many. `light`: 2 decode
    steps, no trim and 3 greedy tokens (4 ranks share 2 cores: each collective waits
    for every rank to be scheduled)."""
    import mlx.core as mx

    from qwen_mlx.generate.generation import stream_generate

    ids = _ids()
    out = {"full": np.array(model(mx.array(ids)))}
    cache = model.make_cache()
    steps = [np.array(model(mx.array(ids[:, :PROMPT]), cache=cache))]
    for t in range(PROMPT, PROMPT + 2 if light else SEQ):
        steps.append(np.array(model(mx.array(ids[:, t:t + 1]), cache=cache)))
    out["incremental"] = np.concatenate(steps, axis=1)
    if not light and all(c.trim(TRIM) for c in cache):  # attention caches: rewind, again
        again = [np.array(model(mx.array(ids[:, t:t + 1]), cache=cache))
                 for t in range(SEQ - TRIM, SEQ)]
        out["after_trim"] = np.concatenate(again, axis=1)
    tokens: list[int] = []
    list(stream_generate(model, tokenizer, ids[0, :10].tolist(),
                         max_tokens=3 if light else GREEDY, temperature=0.0,
                         tokens_out=tokens))
    out["greedy"] = np.array(tokens)
    return out


def _worker_check(spec_path: str) -> int:
    from qwen_mlx.distributed import setup
    from qwen_mlx.distributed.group import init

    spec = json.loads(Path(spec_path).read_text())
    comm = init("ring")
    for case in spec["cases"]:
        loaded = setup(case["folder"], case["mode"], backend="ring")
        if loaded is None:
            continue  # a follower: rank 0 closed this case
        model, tokenizer = loaded
        before = comm.traffic.sent
        out = _observe(model, tokenizer, case["light"])
        out["sent"] = np.array(comm.traffic.sent - before)
        out["size"] = np.array(comm.size)
        model.close()
        np.savez(case["out"], **out)
    return 0


def _worker_fault(folder: str, mode: str, pid_dir: str) -> int:
    """Rank 0 generates until a rank dies; every rank writes its pid first."""
    from qwen_mlx.distributed import setup
    from qwen_mlx.distributed.group import init
    from qwen_mlx.errors import QwenMLXError
    from qwen_mlx.generate.generation import stream_generate

    comm = init("ring")
    Path(pid_dir, f"{comm.rank}.pid").write_text(str(os.getpid()))
    try:
        loaded = setup(folder.replace("{rank}", str(comm.rank)), mode, backend="ring")
        if loaded is None:
            return 0
        model, tokenizer = loaded
        n = 0
        while True:  # until a rank dies (the test kills one)
            for _ in stream_generate(model, tokenizer, [1, 2, 3], max_tokens=40,
                                     temperature=0.0):
                n += 1
                if n == 3:
                    Path(pid_dir, "generating").write_text("yes")
    except QwenMLXError as e:
        print(f"qwen-mlx: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


REQUESTS = [("/v1/completions", {"prompt": "the quick brown fox", "max_tokens": 8}),
            ("/v1/completions", {"prompt": "the quick brown dog jumps", "max_tokens": 8}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}],
                                      "max_tokens": 8})]


def _serve_replies(model, tokenizer) -> list:
    """The HTTP server (rank 0's, with the Driver as its model), asked REQUESTS greedily.
    No prompt cache: its copies of caches are made where the other ranks cannot see."""
    from serve_fixtures import Running

    replies = []
    with Running(model, tokenizer, max_batch=4, cache_memory=0) as srv:
        for path, body in REQUESTS:
            status, out = srv.post_json(path, dict(body, model="tiny", temperature=0))
            assert status == 200, out
            choice = out["choices"][0]
            replies.append(choice.get("text") or choice["message"]["content"])
    return replies


def _worker_serve(folder: str, mode: str, out: str) -> int:
    from qwen_mlx.distributed import setup

    loaded = setup(folder, mode, backend="ring")
    if loaded is not None:
        replies = _serve_replies(*loaded)
        loaded[0].close()
        Path(out).write_text(json.dumps(replies))
    return 0


# --- launching ---------------------------------------------------------------------------

def _launcher() -> str | None:
    found = Path(sys.executable).with_name("mlx.launch")
    return str(found) if found.exists() else shutil.which("mlx.launch")


def _free_base(n: int) -> int:
    """A port p with p .. p+n-1 free on 127.0.0.1 (the ring's listening ports)."""
    for _ in range(50):
        base = random.randint(20000, 50000)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def launch_command(n: int, *args: str) -> list[str]:
    return [_launcher(), "--backend", "ring", "--hosts", "127.0.0.1", "-n", str(n),
            "--starting-port", str(_free_base(n)), sys.executable, str(HERE), *args]


def launch(n: int, *args: str, timeout: int = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    env = dict(os.environ, QWEN_MLX_THREADS="1")  # n ranks share two cores
    return subprocess.run(launch_command(n, *args), capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=HERE.parent.parent)


@pytest.fixture(scope="module")
def launcher():
    if _launcher() is None:
        pytest.skip("mlx.launch is not installed with this mlx")
    r = launch(2, "probe", timeout=60)
    if r.returncode != 0 or r.stdout.count("probe ok") != 2:
        pytest.skip(f"mlx.launch cannot start 2 ring processes here: {r.stderr[-500:]}")


# --- fixtures ------------------------------------------------------------------------------

FAMILIES = ("qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_moe")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Float32 and 4-bit (group 32) tiny folders of the four families, with tokenizers.
    Widths split on 32-input groups across 2 ranks (the hybrids' 80-wide MLP and
    40-wide shared expert do not, so rank 0 runs those whole: that path is covered)."""
    from conftest import build_checkpoint, write_tiny_tokenizer
    from hybrid_fixtures import build_case_with_tokenizer

    from qwen_mlx.checkpoint.converter import convert

    root = tmp_path_factory.mktemp("dist")
    out = {}
    for fam in ("qwen3", "qwen3_moe"):
        extra = dict(moe_intermediate_size=32) if fam == "qwen3_moe" else {}
        _, f = build_checkpoint(root / fam, fam, vocab_size=320, head_dim=16,
                                intermediate_size=128, **extra)
        write_tiny_tokenizer(f, vocab=300)
        out[fam] = f
    out["qwen3_5"] = build_case_with_tokenizer("qwen3_5-nested-tied", root / "qwen3_5").folder
    out["qwen3_5_moe"] = build_case_with_tokenizer("qwen3_5_moe-fused",
                                                   root / "qwen3_5_moe").folder
    for fam in FAMILIES:
        convert(out[fam], root / f"{fam}-4bit", quantize=True, bits=4, group_size=32,
                progress=False, log=lambda s: None)
        out[f"{fam}-4bit"] = root / f"{fam}-4bit"
    return out


@pytest.fixture(scope="module")
def single(folders) -> dict[str, dict]:
    """What one process sees for each folder."""
    from qwen_mlx.checkpoint.loader import load

    refs = {}
    for name, folder in folders.items():
        model, tokenizer = load(folder)
        refs[name] = _observe(model, tokenizer)
    return refs


def _run_cases(tmp_path: Path, folders, n: int, cases: list[tuple[str, str]],
               light=lambda name: False) -> dict:
    spec = {"cases": [{"folder": str(folders[name]), "mode": mode, "light": light(name),
                       "out": str(tmp_path / f"{name}-{mode}.npz")} for name, mode in cases]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    r = launch(n, "check", str(tmp_path / "spec.json"))
    # mlx.launch exits 0 whatever its ranks did: rank 0's files are the evidence.
    for case in spec["cases"]:
        assert Path(case["out"]).exists(), r.stdout[-2000:] + r.stderr[-4000:]
    return {(name, mode): dict(np.load(tmp_path / f"{name}-{mode}.npz"))
            for name, mode in cases}


def _compare(got: dict, ref: dict, label: str) -> None:
    """Logits within 1e-4 and the same greedy tokens (a light run's are prefixes)."""
    for key in ("full", "incremental", "after_trim"):
        if key in got:
            width = got[key].shape[1]
            np.testing.assert_allclose(got[key], ref[key][:, :width], atol=1e-4, rtol=0,
                                       err_msg=f"{label}: {key} logits")
    assert got["greedy"].tolist() == ref["greedy"][:len(got["greedy"])].tolist(), label
    assert len(got["greedy"]) > 0, label


# --- tests ---------------------------------------------------------------------------------

def test_two_ranks_match_one_process(launcher, folders, single, tmp_path):
    """Every family, float32 and 4-bit, in tensor and pipeline mode: logits within 1e-4
    and the same greedy tokens as one process; trims of an attention cache are followed."""
    cases = [(name, mode) for name in FAMILIES for mode in ("tensor", "pipeline")]
    # 4-bit: tensor mode splits the packed weights; pipeline mode keeps whole layers, so
    # one family shows it.
    cases += [(f"{name}-4bit", "tensor") for name in FAMILIES]
    cases += [("qwen3_5_moe-4bit", "pipeline")]
    got = _run_cases(tmp_path, folders, 2, cases, light=lambda name: name.endswith("-4bit"))
    for (name, mode), out in got.items():
        _compare(out, single[name], f"{name} {mode} x2")
        trims = not name.startswith("qwen3_5") and not name.endswith("-4bit")
        assert ("after_trim" in out) == trims, name
        assert int(out["sent"]) > 0  # the ranks did talk


def test_four_ranks_match_one_process(launcher, folders, single, tmp_path):
    """4 ranks on the MoE hybrid: its KV heads (2) and DeltaNet key heads (2), fewer than
    the ranks, are replicated; 2 experts and 68 vocabulary rows per rank; in pipeline
    mode a layer per rank."""
    cases = [("qwen3_5_moe", "tensor"), ("qwen3_5_moe", "pipeline")]
    for (name, mode), out in _run_cases(tmp_path, folders, 4, cases,
                                        light=lambda name: True).items():
        _compare(out, single[name], f"{name} {mode} x4")


def test_killed_rank_stops_every_rank(launcher, folders, tmp_path):
    """SIGKILL one rank mid-generation: every rank ends within seconds, the dead rank is
    named, and no process is left."""
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    env = dict(os.environ, QWEN_MLX_THREADS="1")
    cmd = launch_command(2, "fault", str(folders["qwen3_5_moe"]), "tensor", str(pid_dir))
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, cwd=HERE.parent.parent)
    try:
        deadline = time.monotonic() + 60
        while not (pid_dir / "generating").exists():
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "generation never started"
            time.sleep(0.05)
        pids = [int((pid_dir / f"{r}.pid").read_text()) for r in range(2)]
        os.kill(pids[1], signal.SIGKILL)
        killed = time.monotonic()
        out, err = p.communicate(timeout=45)
        took = time.monotonic() - killed
    finally:
        if p.poll() is None:
            p.kill()
    assert took < 30, took  # seconds, not a hang; generous for a busy CI machine
    assert "rank 1 (" in err and "died" in err, err[-3000:]
    assert "rank 0 (" in err, err[-3000:]  # the survivor says who it is
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_missing_file_on_one_host_names_that_rank(launcher, folders, tmp_path):
    """Rank 1's copy lacks its weights: rank 1 says so, naming itself; rank 0 names it."""
    for r in range(2):
        shutil.copytree(folders["qwen3"], tmp_path / f"model-{r}")
    (tmp_path / "model-1" / "model.safetensors").unlink()
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    r = launch(2, "fault", str(tmp_path / "model-{rank}"), "pipeline", str(pid_dir),
               timeout=60)
    assert "rank 1 (" in r.stderr and "no *.safetensors" in r.stderr, r.stderr[-3000:]


def test_shares_that_do_not_divide_are_refused(folders):
    """A split that does not divide, or cuts a quantization group, names the rank, the
    host, the tensor and the count (checked in-process with a stand-in 3- or 4-rank group)."""
    from qwen_mlx.checkpoint.loader import load
    from qwen_mlx.distributed.group import Comm
    from qwen_mlx.distributed.tensor import shard_tensor
    from qwen_mlx.errors import QwenMLXError

    three = Comm(None, 1, 3, ["a", "b", "c"], [1, 2, 3])
    with pytest.raises(QwenMLXError, match=r"rank 1 \(b\).*vocab_size \(320\) does not divide"):
        load(folders["qwen3"], shard=lambda m: shard_tensor(m, three))
    four = Comm(None, 1, 4, ["a", "b", "c", "d"], [1, 2, 3, 4])
    with pytest.raises(QwenMLXError, match=r"rank 1 \(b\).*o_proj is quantized in groups of "
                                           r"32 inputs"):
        load(folders["qwen3-4bit"], shard=lambda m: shard_tensor(m, four))


def test_serve_under_mlx_launch(launcher, folders, tmp_path):
    """Rank 0 serves HTTP (one request at a time), rank 1 follows: the replies equal one
    process's."""
    from qwen_mlx.checkpoint.loader import load

    expected = _serve_replies(*load(folders["qwen3"]))
    assert all(expected), expected
    out = tmp_path / "replies.json"
    r = launch(2, "serve", str(folders["qwen3"]), "tensor", str(out))
    assert out.exists(), r.stdout[-2000:] + r.stderr[-4000:]
    assert json.loads(out.read_text()) == expected


def test_what_a_distributed_run_refuses(folders):
    """Options the other ranks cannot share are refused by name, before or at the forward
    (a one-rank group stands in: its collectives are the identity)."""
    import argparse

    import mlx.core as mx

    from qwen_mlx.checkpoint.loader import load
    from qwen_mlx.distributed.cli import check_arguments
    from qwen_mlx.distributed.group import Comm
    from qwen_mlx.distributed.runner import Driver, Stage
    from qwen_mlx.distributed.tensor import shard_tensor
    from qwen_mlx.errors import QwenMLXError

    for flag in ("prompt_cache", "draft_model", "speculative"):
        with pytest.raises(QwenMLXError, match="--" + flag.replace("_", "-")):
            check_arguments(argparse.Namespace(**{flag: "x"}))
    one = Comm(None, 0, 1, ["a"], [os.getpid()])
    model, _ = load(folders["qwen3"], shard=lambda m: shard_tensor(m, one))
    driver = Driver(Stage(model, one, "tensor"))
    ids = mx.array([[1, 2, 3]])
    with pytest.raises(QwenMLXError, match="must come from the model's make_cache"):
        driver(ids, cache=model.make_cache())  # made behind the followers' backs
    with pytest.raises(QwenMLXError, match="speculative decoding"):
        driver(ids, cache=driver.make_cache(), return_hidden=True)
    assert driver.can_batch is False
    ref, _ = load(folders["qwen3"])
    np.testing.assert_allclose(np.array(driver(ids, cache=driver.make_cache())),
                               np.array(ref(ids)), atol=1e-5)


def test_pipeline_needs_a_layer_per_rank():
    from qwen_mlx.distributed.pipeline import layer_ranges
    from qwen_mlx.errors import QwenMLXError

    assert layer_ranges(10, 4, "x") == [(0, 2), (2, 4), (4, 7), (7, 10)]
    with pytest.raises(QwenMLXError, match="4 layers, fewer than the 5 ranks"):
        layer_ranges(4, 5, "rank 0 (a)")


if __name__ == "__main__":
    if sys.argv[1] == "probe":
        print("probe ok", flush=True)
        sys.exit(0)
    sys.path.insert(0, str(HERE.parent))
    if sys.argv[1] == "check":
        sys.exit(_worker_check(sys.argv[2]))
    if sys.argv[1] == "serve":
        sys.exit(_worker_serve(*sys.argv[2:5]))
    sys.exit(_worker_fault(*sys.argv[2:5]))


def test_generate_command_under_mlx_launch(launcher, folders):
    """`mlx.launch -n 2 ... qwen-mlx generate --distributed tensor`: only rank 0 prints,
    and it prints the single process's greedy text."""
    base = ["-m", str(folders["qwen3_5"]), "--raw", "the quick brown fox", "--temperature",
            "0", "--max-tokens", "12"]
    env = dict(os.environ, QWEN_MLX_THREADS="1")
    single = subprocess.run([sys.executable, "-m", "qwen_mlx.cli", "generate", *base],
                            capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    cmd = [_launcher(), "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2",
           "--starting-port", str(_free_base(2)), sys.executable, "-m", "qwen_mlx.cli",
           "generate", *base, "--distributed", "tensor"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=env,
                       cwd=HERE.parent.parent)
    assert r.stdout == single.stdout, (r.stdout, single.stdout, r.stderr[-2000:])
    assert single.stdout.strip()
