"""The converter under adversarial use: races at the target, targets that hold the source,
killed runs, unwritable or full disks, and weights that are not what they claim.

Multi-process cases run real converters in child processes, meet at barriers made of
files (waiting for a condition, never a fixed time) and assert the children's peak RSS.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import qwen_mlx
from conftest import build_checkpoint, hf_logits, write_tiny_tokenizer
from qwen_mlx.checkpoint import converter
from qwen_mlx.cli import build_parser, main
from qwen_mlx.errors import QwenMLXError
from test_convert_safety import make_hub_cache

IDS = np.random.RandomState(0).randint(0, 160, size=(1, 10))
ROOT = Path(__file__).resolve().parent.parent
# Peak RSS of one tiny conversion's process, imports included: 55-58 MB measured on a
# Linux runner (mlx 0.32.4, CPU). The bound leaves room for other platforms' allocators
# and still catches a conversion that holds several copies of its model or leaks.
CHILD_RSS_BOUND_MB = 256


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny 3-shard qwen3 checkpoint with a tokenizer (which needs 320 ids)."""
    root = tmp_path_factory.mktemp("src")
    hf, _ = build_checkpoint(root / "single", "qwen3", num_hidden_layers=2, intermediate_size=128,
                             vocab_size=320)
    folder = root / "Qwen3-Tiny"
    hf.save_pretrained(folder, max_shard_size="40KB")
    write_tiny_tokenizer(folder, vocab=320)
    assert len(list(folder.glob("*.safetensors"))) >= 3
    return hf, folder


def partials(parent: Path, name: str) -> list[Path]:
    return sorted(p for p in parent.iterdir() if p.name.startswith(f".{name}.")
                  and p.name.endswith(".partial"))


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def check_loads(folder: Path, hf) -> None:
    model, _ = qwen_mlx.load(folder)
    assert np.abs(np.array(model(mx.array(IDS))) - hf_logits(hf, IDS)).max() < 1e-4


# ------------------------------------------------------------------ children

# A converter in a child process. Gates (all optional) make the races deterministic:
#   --wait-at FUNC DIR N   on reaching converter.FUNC, write DIR/ready-<me>, then wait until
#                          DIR holds N ready files and no "hold" file, then run the real FUNC
#                          (_move_into_place: the final rename; _validate: mid-conversion);
#   --die-in-validate      SIGKILL itself while validating (a killed conversion).
CHILD = textwrap.dedent(r"""
    import json, os, signal, sys, time
    import qwen_mlx
    from qwen_mlx.checkpoint import converter
    from qwen_mlx.errors import QwenMLXError

    src, out, me = sys.argv[1:4]
    opts = sys.argv[4:]
    force = "--force" in opts

    def wait_for(cond, what):
        deadline = time.monotonic() + 120
        while not cond():
            if time.monotonic() > deadline:
                sys.exit(f"child {me}: timed out waiting for {what}")
            time.sleep(0.01)

    if "--wait-at" in opts:
        i = opts.index("--wait-at")
        func, sync, n = opts[i + 1], opts[i + 2], int(opts[i + 3])
        real = getattr(converter, func)

        def gated(*args, **kwargs):
            open(os.path.join(sync, f"ready-{me}"), "w").close()
            wait_for(lambda: sum(f.startswith("ready-") for f in os.listdir(sync)) >= n
                     and not os.path.exists(os.path.join(sync, "hold")), "the barrier")
            return real(*args, **kwargs)
        setattr(converter, func, gated)
    if "--die-in-validate" in opts:
        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        converter._validate = die

    logs = []
    try:
        if src.startswith("hub:"):  # what `qwen-mlx chat` does on a hub id's first run
            from qwen_mlx.checkpoint.models import prepare_model
            out = str(prepare_model(src[4:], progress=False, log=logs.append))
        else:
            qwen_mlx.convert(src, out, force=force, progress=False, log=logs.append)
        status = "ok"
    except QwenMLXError as e:
        status = f"error: {e}"
    print(json.dumps({"me": me, "status": status, "logs": logs, "path": out}))
""")

# Runs children as the test asks, in its own process, so that RUSAGE_CHILDREN's peak is
# this scenario's converters' and not any earlier test's subprocesses'.
DRIVER = textwrap.dedent(r"""
    import json, os, resource, subprocess, sys, time
    plan = json.loads(sys.argv[1])
    procs, results = {}, {}

    def wait_for(cond, what):
        deadline = time.monotonic() + 120
        while not cond():
            if time.monotonic() > deadline:
                sys.exit(f"driver: timed out waiting for {what}")
            time.sleep(0.01)

    for step in plan:
        kind = step[0]
        if kind == "start":
            _, me, args = step
            procs[me] = subprocess.Popen([sys.executable, "-c", CHILD, *args],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        elif kind == "wait":
            _, me = step
            out, err = procs[me].communicate(timeout=300)
            line = out.strip().splitlines()[-1] if out.strip() else "{}"
            results[me] = {"rc": procs[me].returncode, **json.loads(line), "stderr": err[-2000:]}
        elif kind == "until-file":
            wait_for(lambda: os.path.exists(step[1]), step[1])
        elif kind == "listdir":
            results[step[1]] = sorted(os.listdir(step[2]))
        elif kind == "remove":
            os.remove(step[1])
    results["maxrss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / (
        2**20 if sys.platform == "darwin" else 1024)
    print(json.dumps(results))
""")


def run_plan(plan: list, timeout: int = 600, env: dict | None = None) -> dict:
    code = f"CHILD = {CHILD!r}\n{DRIVER}"
    r = subprocess.run([sys.executable, "-c", code, json.dumps(plan)], capture_output=True,
                       text=True, timeout=timeout, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ 1: races at the target

def test_folder_that_appears_while_converting_is_kept(tmp_path, source, monkeypatch):
    hf, folder = source
    target = tmp_path / "out"
    real_validate = converter._validate

    def user_creates_target(*args, **kwargs):
        target.mkdir()
        (target / "notes.txt").write_text("mine")
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(converter, "_validate", user_creates_target)
    with pytest.raises(QwenMLXError, match="already exists: it appeared while converting"):
        qwen_mlx.convert(folder, target, progress=False)
    assert tree(target) == {"notes.txt": b"mine"}
    assert partials(tmp_path, "out") == []


@pytest.mark.parametrize("what", ["empty folder", "file", "symlink"])
def test_nothing_that_appears_is_replaced_without_force(tmp_path, source, monkeypatch, what):
    """Even an empty folder, which a plain rename(2) would silently replace."""
    _, folder = source
    target = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    real_validate = converter._validate

    def appear(*args, **kwargs):
        if what == "empty folder":
            target.mkdir()
        elif what == "file":
            target.write_text("mine")
        else:
            target.symlink_to(elsewhere)
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(converter, "_validate", appear)
    with pytest.raises(QwenMLXError, match="already exists"):
        qwen_mlx.convert(folder, target, progress=False)
    if what == "empty folder":
        assert target.is_dir() and list(target.iterdir()) == []
    elif what == "file":
        assert target.read_text() == "mine"
    else:
        assert target.is_symlink() and os.readlink(target) == str(elsewhere)
    assert partials(tmp_path, "out") == []


@pytest.mark.parametrize("where", ["atomic call", "fallback"])
def test_rename_noreplace(tmp_path, monkeypatch, where):
    """Both the renameat2 path and the mkdir-claim fallback refuse whatever is there."""
    if where == "fallback":
        monkeypatch.setattr(converter, "_rename_call", lambda: None)
    elif converter._rename_call() is None:
        pytest.skip("no renameat2/renamex_np here")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("new")
    empty, full, file_, link = (tmp_path / n for n in ("empty", "full", "file", "link"))
    empty.mkdir()
    full.mkdir()
    (full / "b").write_text("old")
    file_.write_text("old")
    link.symlink_to(full)
    for dst in (empty, full, file_, link):
        with pytest.raises(FileExistsError):
            converter._rename_noreplace(src, dst)
    assert list(empty.iterdir()) == [] and (full / "b").read_text() == "old"
    assert file_.read_text() == "old" and link.is_symlink()
    converter._rename_noreplace(src, tmp_path / "new")
    assert (tmp_path / "new" / "a").read_text() == "new" and not src.exists()


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "move-aside"])
def test_force_replaces_a_folder_and_only_a_link_itself(tmp_path, source, monkeypatch, exchange):
    hf, folder = source
    if not exchange:
        monkeypatch.setattr(converter, "_rename_call", lambda: None)
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    qwen_mlx.convert(folder, target, force=True, progress=False)
    assert not (target / "old.txt").exists()
    check_loads(target, hf)
    # A link at the target is replaced as a link: the folder it points to is untouched.
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "keep.txt").write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(kept)
    qwen_mlx.convert(folder, link, force=True, progress=False)
    assert not link.is_symlink() and (link / "config.json").exists()
    assert tree(kept) == {"keep.txt": b"keep"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_two_concurrent_converts_leave_one_result(tmp_path, source):
    """Both pass the start's check, then rename at once: one wins, one says so; bounded RSS."""
    hf, folder = source
    target, sync = tmp_path / "out", tmp_path / "sync"
    sync.mkdir()
    args = [str(folder), str(target)]
    gate = ["--wait-at", "_move_into_place", str(sync), "2"]
    plan = [["start", "a", [*args, "a", *gate]], ["start", "b", [*args, "b", *gate]],
            ["wait", "a"], ["wait", "b"]]
    r = run_plan(plan)
    statuses = sorted(r[me]["status"] for me in "ab")
    assert statuses[1] == "ok", r
    assert statuses[0].startswith(f"error: {target} already exists: it appeared while "
                                  "converting"), r
    assert all(r[me]["rc"] == 0 for me in "ab"), r
    check_loads(target, hf)
    assert sorted(os.listdir(tmp_path)) == ["out", "sync"]  # no partial, no stray old
    assert 20 < r["maxrss_mb"] < CHILD_RSS_BOUND_MB, r["maxrss_mb"]


def test_two_first_chat_runs_share_one_conversion(tmp_path, source):
    """Two `qwen-mlx chat` windows converting the same hub model: both get the one result."""
    hf, folder = source
    make_hub_cache(tmp_path / "hf", "tiny-org/Qwen3-Tiny", folder, {})
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "QWEN_MLX_CACHE": str(tmp_path / "cache")}
    env.pop("HF_HUB_CACHE", None)
    sync = tmp_path / "sync"
    sync.mkdir()
    args = ["hub:tiny-org/Qwen3-Tiny", "-"]
    gate = ["--wait-at", "_move_into_place", str(sync), "2"]
    r = run_plan([["start", "a", [*args, "a", *gate]], ["start", "b", [*args, "b", *gate]],
                  ["wait", "a"], ["wait", "b"]], env=env)
    assert r["a"]["status"] == r["b"]["status"] == "ok", r
    assert r["a"]["path"] == r["b"]["path"]
    out = Path(r["a"]["path"])
    assert out.parent == tmp_path / "cache" / "models" and partials(out.parent, out.name) == []
    model, _ = qwen_mlx.load(out)
    assert np.isfinite(np.array(model(mx.array(IDS)))).all()


# ------------------------------------------------------------------ 2: targets holding the source

@pytest.fixture
def nested(tmp_path, source):
    """tmp/a/b/src, whose shards are links into tmp/store, with a file beside it."""
    _, folder = source
    src = tmp_path / "a" / "b" / "src"
    src.mkdir(parents=True)
    store = tmp_path / "store"
    store.mkdir()
    for f in folder.iterdir():
        if f.suffix == ".safetensors":
            shutil.copy(f, store / f.name)
            (src / f.name).symlink_to(store / f.name)
        else:
            shutil.copy(f, src / f.name)
    (tmp_path / "a" / "b" / "sibling.txt").write_text("sibling")
    (tmp_path / "link-to-a").symlink_to(tmp_path / "a")
    return tmp_path, src


@pytest.mark.parametrize("target, match", [
    ("a/b/src", "is the source folder"),
    ("a/b/src/../src", "is the source folder"),
    ("a", "contains the source"),
    ("a/b", "contains the source"),
    ("a/b/src/..", "contains the source"),
    ("link-to-a", "contains the source"),
    ("link-to-a/b", "contains the source"),
    ("store", "holds the source's files"),  # the folder its shards live in
    (".", "contains the source"),
    ("a/b/src/mlx", "is inside the source folder"),
    ("link-to-a/b/src/mlx", "is inside the source folder"),
])
def test_target_that_holds_the_source_is_refused(nested, target, match):
    root, src = nested
    before = {p: tree(p) for p in (root / "a", root / "store")}
    with pytest.raises(QwenMLXError, match=match):
        qwen_mlx.convert(src, root / target, force=True, progress=False)
    assert {p: tree(p) for p in (root / "a", root / "store")} == before
    assert not (src / "mlx").exists()


def test_target_beside_the_files_the_source_links_to_is_fine(nested, source):
    """Inside a folder the shards link into: nothing there is replaced, so it is allowed."""
    root, src = nested
    before = tree(root / "store")
    out = qwen_mlx.convert(src, root / "store" / "mlx", force=True, progress=False).path
    check_loads(out, source[0])
    assert {k: v for k, v in tree(root / "store").items() if not k.startswith("mlx/")} == before


HUB_CHILD = textwrap.dedent(r"""
    import json, sys
    import qwen_mlx
    from qwen_mlx.errors import QwenMLXError
    out = {}
    for target in sys.argv[1:]:
        try:
            qwen_mlx.convert("tiny-org/Qwen3-Tiny", target, force=True, progress=False)
            out[target] = "ok"
        except QwenMLXError as e:
            out[target] = str(e)
    print(json.dumps(out))
""")


def test_hub_cache_holding_the_source_is_refused(tmp_path, source):
    _, folder = source
    hf_home = tmp_path / "hf"
    snapshot = make_hub_cache(hf_home, "tiny-org/Qwen3-Tiny", folder, {})
    repo = snapshot.parent.parent
    targets = {hf_home: "contains the source", hf_home / "hub": "contains the source",
               repo: "holds the source's files", repo / "blobs": "holds the source's files",
               repo / "snapshots": "contains the source", snapshot: "is the source folder",
               repo / "refs": "is inside the source folder",
               tmp_path: "contains the source"}
    before = tree(hf_home)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    r = subprocess.run([sys.executable, "-c", HUB_CHILD, *map(str, targets)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for target, match in targets.items():
        assert match in got[str(target)], (target, got[str(target)])
    assert tree(hf_home) == before
    # And a folder beside the cache still works.
    r = subprocess.run([sys.executable, "-c", HUB_CHILD, str(tmp_path / "out")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {str(tmp_path / "out"): "ok"}


# ------------------------------------------------------------------ 13: unwritable, mounts, full

def mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir(exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")


@pytest.fixture
def mounts(tmp_path):
    """Mounts tmpfs file systems (root only); unmounts them afterwards."""
    made: list[Path] = []

    def mount(path: Path, options: str = "size=4m") -> Path:
        mount_tmpfs(path, options)
        made.append(path)
        return path

    yield mount
    for path in reversed(made):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen_mlx.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def test_read_only_file_system(tmp_path, source, mounts):
    _, folder = source
    ro = mounts(tmp_path / "ro")
    (ro / "old").mkdir()
    (ro / "old" / "keep.txt").write_text("keep")
    r = subprocess.run(["mount", "-o", "remount,ro", str(ro)], capture_output=True)
    assert r.returncode == 0, r.stderr
    for args, name in ([str(ro / "new")], "new"), ([str(ro / "old"), "--force"], "old"):
        r = cli("convert", str(folder), "-o", *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert f"cannot create the output folder {ro / name}" in r.stderr
        assert "Read-only file system" in r.stderr
    assert tree(ro) == {"old/keep.txt": b"keep"}


def test_unwritable_parent_folder(tmp_path, source):
    _, folder = source
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        try:
            (parent / "probe").mkdir()
        except PermissionError:
            pass
        else:
            pytest.skip("this user writes through folder permissions (root)")
        r = cli("convert", str(folder), "-o", str(parent / "out"))
    finally:
        parent.chmod(0o755)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"cannot create the output folder {parent / 'out'}" in r.stderr
    assert "Permission denied" in r.stderr and list(parent.iterdir()) == []


def test_force_over_a_folder_whose_files_cannot_be_deleted(tmp_path, source):
    hf, folder = source
    target = tmp_path / "out"
    (target / "locked").mkdir(parents=True)
    (target / "locked" / "old.bin").write_bytes(b"old")
    (target / "locked").chmod(0o555)
    try:
        try:
            (target / "locked" / "probe").mkdir()
        except PermissionError:
            pass
        else:
            pytest.skip("this user deletes through folder permissions (root)")
        logs: list[str] = []
        qwen_mlx.convert(folder, target, force=True, progress=False, log=logs.append)
        check_loads(target, hf)
        warning = [m for m in logs if "could not all be removed" in m]
        assert warning and "delete" in warning[0] and "by hand" in warning[0], logs
    finally:
        for p in tmp_path.rglob("locked"):
            p.chmod(0o755)


def test_mount_point_with_force(tmp_path, source, mounts):
    _, folder = source
    mnt = mounts(tmp_path / "mnt")
    (mnt / "keep.txt").write_text("keep")
    r = cli("convert", str(folder), "-o", str(mnt), "--force")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"{mnt} is a mount point, which cannot be replaced" in r.stderr
    assert tree(mnt) == {"keep.txt": b"keep"}
    assert [p.name for p in tmp_path.iterdir()] == ["mnt"]


def test_bind_mount_with_force(tmp_path, source, mounts):
    """A bind mount of a folder on the same file system, which ismount() cannot see."""
    _, folder = source
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("keep")
    bound = tmp_path / "bound"
    bound.mkdir()
    r = subprocess.run(["mount", "--bind", str(real), str(bound)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {r.stderr.decode().strip()}")
    try:
        with pytest.raises(QwenMLXError, match="is a mount point or in use, so it cannot be "
                                               "replaced"):
            qwen_mlx.convert(folder, bound, force=True, progress=False)
        assert tree(bound) == {"keep.txt": b"keep"}
    finally:
        subprocess.run(["umount", "-l", str(bound)], capture_output=True)
    assert tree(real) == {"keep.txt": b"keep"} and partials(tmp_path, "bound") == []


def test_disk_full_while_copying_the_tokenizer(tmp_path, source, mounts):
    _, folder = source
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    # Pad tokenizer.json (trailing whitespace is valid JSON) past the disk's free space.
    with open(src / "tokenizer.json", "a") as f:
        f.write(" " * (3 * 2**20))
    weights = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    disk = mounts(tmp_path / "disk", f"size={weights + 512 * 1024}")
    r = cli("convert", str(src), "-o", str(disk / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert (f"no space left on the device holding {disk} while writing tokenizer.json"
            in r.stderr)
    assert list(disk.iterdir()) == []


# ------------------------------------------------------------------ 14: weights that lie

@pytest.fixture
def corrupt(tmp_path, source):
    """A copy of the sharded source with one tensor of its second shard replaced."""
    _, folder = source

    def make(value=None, dtype=None, name="model.layers.1.self_attn.q_proj.weight"):
        src = tmp_path / "corrupt"
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(folder, src)
        index = json.loads((src / "model.safetensors.index.json").read_text())
        shard = src / index["weight_map"][name]
        tensors = load_file(shard)
        t = tensors[name].copy()
        if value is not None:
            t.reshape(-1)[7] = value
        if dtype is not None:
            t = (t * 100).astype(dtype)
        tensors[name] = t
        save_file(tensors, shard, metadata={"format": "pt"})
        return src, shard

    return make


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("mode", [dict(), dict(quantize=True, group_size=32),
                                  dict(dtype="bfloat16"),
                                  dict(recipe="mixed_4_6", group_size=32)],
                         ids=["float", "4bit", "bf16", "mixed"])
def test_non_finite_weights_are_refused(tmp_path, corrupt, value, mode):
    src, shard = corrupt(value=value)
    name = "model.layers.1.self_attn.q_proj.weight"
    with pytest.raises(QwenMLXError) as e:
        qwen_mlx.convert(src, tmp_path / "out", progress=False, **mode)
    assert f"tensor '{name}' in {shard}" in str(e.value)
    assert "1 NaN or infinite value(s)" in str(e.value) and "corrupt" in str(e.value)
    assert not (tmp_path / "out").exists() and partials(tmp_path, "out") == []


def test_non_finite_scales_are_refused_on_dequantize(tmp_path, source):
    _, folder = source
    q = qwen_mlx.convert(folder, tmp_path / "q", quantize=True, group_size=32,
                         progress=False).path
    shard = q / "model.safetensors"
    tensors = dict(mx.load(str(shard)))
    name = "model.layers.0.mlp.up_proj.scales"
    scales = np.array(tensors[name].astype(mx.float32))
    scales[0, 0] = np.nan
    tensors[name] = mx.array(scales).astype(tensors[name].dtype)
    mx.save_safetensors(str(shard), tensors, metadata={"format": "mlx"})
    with pytest.raises(QwenMLXError, match=f"tensor '{name}' in {shard} holds 1 NaN"):
        qwen_mlx.convert(q, tmp_path / "out", dequantize=True, progress=False)


@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.uint16])
@pytest.mark.parametrize("mode", [dict(), dict(quantize=True, group_size=32)],
                         ids=["float", "4bit"])
def test_integer_dtype_on_a_float_tensor_is_refused(tmp_path, corrupt, dtype, mode):
    src, shard = corrupt(dtype=dtype)
    name = "model.layers.1.self_attn.q_proj.weight"
    with pytest.raises(QwenMLXError) as e:
        qwen_mlx.convert(src, tmp_path / "out", progress=False, **mode)
    assert f"tensor '{name}' in {shard} has dtype {np.dtype(dtype).name}" in str(e.value)
    assert "floating point" in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", [dict(dtype="float16"),
                                  dict(dtype="float16", quantize=True, group_size=32)],
                         ids=["float16", "4bit-float16"])
def test_values_beyond_float16_are_refused(tmp_path, corrupt, mode):
    src, shard = corrupt(value=1e6)  # finite in float32, infinite in float16
    with pytest.raises(QwenMLXError, match=(
            r"tensor 'model.layers.1.self_attn.q_proj.weight' in .* (does not fit float16|"
            r"does not quantize in float16) \(choose a wider --dtype\)")):
        qwen_mlx.convert(src, tmp_path / "out", progress=False, **mode)
    # The same source converts in bfloat16, whose range holds the value.
    qwen_mlx.convert(src, tmp_path / "bf16", progress=False, dtype="bfloat16")


# ------------------------------------------------------------------ 15: messages and leftovers

def test_validation_errors_name_the_target_not_the_partial(tmp_path, source):
    _, folder = source
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 1  # the weights hold 2: only loading the result tells
    cfg.pop("layer_types", None)
    (src / "config.json").write_text(json.dumps(cfg))
    target = tmp_path / "out"
    with pytest.raises(QwenMLXError) as e:
        qwen_mlx.convert(src, target, progress=False)
    msg = str(e.value)
    assert ".partial" not in msg and msg.startswith(f"{target}: the converted model does not "
                                                    "load, so nothing was written")
    assert f"{src / 'config.json'} says num_hidden_layers 1" in msg
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_killed_conversion_is_cleaned_on_the_next_run(tmp_path, source):
    """Killed mid-way, then a live conversion and a rerun: only the dead one's partial goes."""
    hf, folder = source
    target, sync = tmp_path / "out", tmp_path / "sync"
    sync.mkdir()
    (sync / "hold").write_text("")
    args = [str(folder), str(target)]
    plan = [["start", "live", [*args, "live", "--wait-at", "_validate", str(sync), "1"]],
            ["until-file", str(sync / "ready-live")],
            ["listdir", "with-live", str(tmp_path)],
            ["start", "killed", [*args, "killed", "--die-in-validate"]], ["wait", "killed"],
            ["listdir", "after-kill", str(tmp_path)],
            ["start", "rerun", [*args, "rerun"]], ["wait", "rerun"],
            ["listdir", "after-rerun", str(tmp_path)],
            ["remove", str(sync / "hold")], ["wait", "live"]]
    r = run_plan(plan)
    assert r["killed"]["rc"] == -9
    live = [n for n in r["with-live"] if n.endswith(".partial")]
    dead = [n for n in r["after-kill"] if n.endswith(".partial") and n not in live]
    assert len(live) == 1 and len(dead) == 1 and dead[0].startswith(".out."), r
    assert not any(live[0] in m for m in r["rerun"]["logs"])
    assert r["rerun"]["status"] == "ok", r["rerun"]
    assert any(m.startswith(f"removed {tmp_path / dead[0]}: a conversion into {target} "
                            "(process ") and "stopped before finishing" in m
               for m in r["rerun"]["logs"]), r["rerun"]["logs"]
    assert sorted(r["after-rerun"]) == sorted(["out", "sync", live[0]])  # the live one stays
    assert r["live"]["status"].startswith(f"error: {target} already exists"), r["live"]
    assert sorted(os.listdir(tmp_path)) == ["out", "sync"]
    check_loads(target, hf)
    assert not (target / converter.OWNER_FILE).exists()
    assert 20 < r["maxrss_mb"] < CHILD_RSS_BOUND_MB, r["maxrss_mb"]


def test_unowned_partial_is_reported_not_removed(tmp_path, source):
    _, folder = source
    stray = tmp_path / ".out.abcd1234.partial"  # e.g. an older version's, killed
    stray.mkdir()
    (stray / "model.safetensors").write_bytes(b"x")
    # Where renames cannot exchange, a --force run killed between its two renames
    # leaves the old folder aside: possibly the only copy, so it is only reported.
    aside = tmp_path / ".out.0123abcd.old"
    aside.mkdir()
    (aside / "config.json").write_text("{}")
    other = tmp_path / ".out.v2.abcd1234.partial"  # target "out.v2"'s, not ours
    other.mkdir()
    logs: list[str] = []
    qwen_mlx.convert(folder, tmp_path / "out", progress=False, log=logs.append)
    assert any(f"note: {stray} looks left over" in m for m in logs), logs
    assert any(f"note: {aside} holds the folder an interrupted --force" in m for m in logs)
    assert not any(str(other) in m for m in logs)
    assert (stray / "model.safetensors").exists() and (aside / "config.json").exists()
    assert other.exists()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_output_honours_the_umask(tmp_path, source, umask):
    _, folder = source
    old = os.umask(umask)
    try:
        out = qwen_mlx.convert(folder, tmp_path / "out", progress=False).path
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (out / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_folder_without_tokenizer(tmp_path, capsys):
    hf, src = build_checkpoint(tmp_path / "src", "qwen3", num_hidden_layers=2, vocab_size=320)
    logs: list[str] = []
    out = qwen_mlx.convert(src, tmp_path / "out", progress=False, log=logs.append).path
    warning = [m for m in logs if m.startswith("warning:")]
    assert warning and f"{src} has no tokenizer (tokenizer.json)" in warning[0]
    assert "original Hugging Face repo" in warning[0]
    assert main(["generate", "-m", str(out), "hello"]) == 2
    err = capsys.readouterr().err
    assert f"{out} has no tokenizer.json, and converting does not make one" in err
    assert "copy tokenizer.json and tokenizer_config.json" in err
    write_tiny_tokenizer(src, vocab=320)
    logs.clear()
    qwen_mlx.convert(src, tmp_path / "out2", progress=False, log=logs.append)
    assert not [m for m in logs if m.startswith("warning:")]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_rope_factor_nan_blames_the_flag(tmp_path, source, capsys, value):
    _, folder = source
    with pytest.raises(SystemExit) as e:
        main(["generate", "-m", str(folder), "hi", "--rope-scaling", "yarn",
              f"--rope-factor={value}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --rope-factor: must be a finite number, got '{value}'" in err
    assert "config.json" not in err
    # chat takes the same flag: only parsed here, since a passing parse opens the UI.
    with pytest.raises(SystemExit):
        build_parser().parse_args(["chat", "--rope-scaling", "yarn", f"--rope-factor={value}"])
    assert "argument --rope-factor: must be a finite number" in capsys.readouterr().err
