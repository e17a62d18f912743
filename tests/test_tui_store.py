"""The chat store and settings on disk: concurrent writers, merges, bad files, bad values.

No model here: these are the files the chat UI keeps (tui.store, tui.settings).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tui.settings import Settings, load_settings, save_settings, write_json
from tui.store import ChatStore

ROOT = Path(__file__).resolve().parent.parent

# One app instance, reduced to its saves: it holds the chat in memory, appends a turn,
# saves the whole record, and saves its settings, as the chat screen does.
WRITER = r"""
import sys, time
from pathlib import Path
from tui.settings import Settings
from tui.store import ChatStore

root, chat_id, k, turns = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
store = ChatStore(root)
record = store.load(chat_id)
(root / f"ready-{k}").touch()
deadline = time.monotonic() + 60
while not (root / "go").exists():  # start together, so the saves overlap
    if time.monotonic() > deadline:
        sys.exit("no go")
    time.sleep(0.001)
for i in range(turns):
    record.messages.append({"role": "user", "content": f"p{k}-{i}"})
    record.messages.append({"role": "assistant", "content": f"r{k}-{i}",
                            "reasoning_content": ""})
    record.meta = record.meta + [None] * (len(record.transcript) - len(record.meta))
    record.meta[-1] = {"writer": k, "turn": i}
    store.save(record)
    store.save_settings(Settings(system_prompt=f"p{k}-{i}", max_tokens=100 + i))
"""


def test_concurrent_instances_keep_every_turn_and_never_show_half_a_file(tmp_path):
    writers, turns = 3, 60
    store = ChatStore(tmp_path)
    record = store.new_chat(system="Be brief.")
    record.messages.append({"role": "user", "content": "start"})
    store.save(record)
    save_settings(store.settings_path, Settings(system_prompt="start"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), record.id, str(k),
                               str(turns)], env=env, cwd=ROOT, stderr=subprocess.PIPE,
                              text=True) for k in range(writers)]
    chat_file, reads, torn = store.path(record.id), 0, []
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready-{k}").exists() for k in range(writers)):
            assert all(p.poll() is None for p in procs), "a writer died before starting"
            assert time.monotonic() < deadline, "the writers never started"
            time.sleep(0.01)
        (tmp_path / "go").touch()
        # Read both files as long as the writers run: every read must be whole JSON.
        while any(p.poll() is None for p in procs):
            assert time.monotonic() < deadline, "the writers did not finish in time"
            for path in (chat_file, store.settings_path):
                text = path.read_text(encoding="utf-8")
                try:
                    json.loads(text)
                except ValueError:
                    torn.append(text[-80:])
                reads += 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
    errors = [p.stderr.read() for p in procs]
    assert [p.returncode for p in procs] == [0] * writers, errors
    assert reads > 10 and torn == []
    saved = store.load(record.id)
    users = [m["content"] for m in saved.transcript if m["role"] == "user"]
    assert len(users) == 1 + writers * turns
    for k in range(writers):  # every turn of every writer, each in its own order
        assert [u for u in users if u.startswith(f"p{k}-")] == [f"p{k}-{i}" for i in range(turns)]
    # Each reply still follows its own question, and its metadata stays beside it.
    pairs = list(zip(saved.transcript[1::2], saved.transcript[2::2], saved.meta[2::2]))
    assert len(pairs) == writers * turns
    for user, reply, meta in pairs:
        k, i = user["content"][1:].split("-")
        assert reply["content"] == f"r{k}-{i}" and meta == {"writer": k, "turn": int(i)}
    assert saved.messages[0] == {"role": "system", "content": "Be brief."}
    settings, warning = load_settings(store.settings_path)
    assert warning is None and settings.system_prompt.startswith("p")
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary file left behind


def turn(record, text: str) -> None:
    record.messages += [{"role": "user", "content": text},
                        {"role": "assistant", "content": f"re: {text}", "reasoning_content": ""}]


def contents(record) -> list[str]:
    return [m["content"] for m in record.transcript]


def test_two_instances_on_one_chat_merge_their_turns(tmp_path):
    store = ChatStore(tmp_path)
    a = store.new_chat()
    turn(a, "one")
    store.save(a)
    b = store.load(a.id)
    turn(a, "two from a")
    assert store.save(a).merged == 0
    turn(b, "two from b")
    result = store.save(b)
    assert result.merged == 2 and result.copy_id is None
    expected = ["one", "re: one", "two from a", "re: two from a", "two from b", "re: two from b"]
    assert contents(b) == expected  # b's record now holds a's turn too
    assert contents(store.load(a.id)) == expected
    turn(a, "three from a")  # and a, on its next save, picks up b's
    assert store.save(a).merged == 2
    assert contents(store.load(a.id)) == expected + ["three from a", "re: three from a"]
    assert [s.id for s in store.summaries()] == [a.id]


def test_diverged_histories_keep_the_other_instances_version_as_a_copy(tmp_path):
    store = ChatStore(tmp_path)
    a = store.new_chat()
    turn(a, "one")
    store.save(a)
    b = store.load(a.id)
    turn(b, "two from b")
    store.save(b)
    a.messages[-1] = {"role": "assistant", "content": "regenerated", "reasoning_content": ""}
    result = store.save(a)  # a rewrote history that b had extended: no merge possible
    assert result.merged == 0 and result.copy_id
    assert contents(store.load(a.id)) == ["one", "regenerated"]
    assert contents(store.load(result.copy_id)) == ["one", "re: one", "two from b",
                                                    "re: two from b"]
    # Clearing a chat another instance has extended keeps that version too.
    c = store.load(a.id)
    turn(a, "three from a")
    store.save(a)
    c.messages, c.dropped, c.meta = [], [], []
    assert store.save(c) is None and not store.path(a.id).exists()
    kept = {tuple(contents(store.load(s.id))) for s in store.summaries()}
    assert ("one", "regenerated", "three from a", "re: three from a") in kept


def test_write_json_uses_a_temporary_file_of_its_own(tmp_path, monkeypatch):
    # Two writers must never share a temporary name (the old `.name.tmp` did).
    import tempfile

    made = []
    real = tempfile.mkstemp

    def spy(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        made.append(name)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", spy)
    path = tmp_path / "settings.json"
    write_json(path, {"a": 1})
    write_json(path, {"a": 2})
    assert len(set(made)) == 2 and all(Path(m).parent == tmp_path for m in made)
    assert json.loads(path.read_text()) == {"a": 2} and not list(tmp_path.glob(".*tmp"))


# ---------------------------------------------------------------- settings.json

BAD_VALUES = [
    ("temperature", "hot"), ("temperature", -1), ("temperature", True),
    ("temperature", float("nan")), ("top_p", 5), ("top_p", "0.9"), ("top_k", 20.5),
    ("top_k", "20"), ("top_k", -3), ("min_p", 1.5), ("repetition_penalty", 0),
    ("presence_penalty", [1]), ("max_tokens", 0), ("max_tokens", "many"),
    ("max_tokens", None), ("rope_scaling", "wild"), ("rope_scaling", 4),
    ("rope_factor", 0.5), ("rope_factor", float("inf")), ("max_context", 1),
    ("max_context", 2.5), ("kv_bits", 3), ("kv_bits", "8"), ("system_prompt", 42),
    ("speculative", "eagle"), ("num_draft_tokens", 0), ("num_draft_tokens", "3"),
    ("draft_model", 7),
]


@pytest.mark.parametrize("name,value", BAD_VALUES, ids=lambda v: repr(v))
def test_one_bad_setting_drops_only_that_field_and_names_it(tmp_path, name, value):
    good = {"system_prompt": "You are a pirate.", "temperature": 0.3, "top_p": 0.8,
            "top_k": 12, "min_p": 0.05, "repetition_penalty": 1.1, "presence_penalty": 0.5,
            "max_tokens": 300, "rope_scaling": "yarn", "rope_factor": 2.0,
            "max_context": 4096, "kv_bits": 8, "speculative": None,
            "draft_model": "./Qwen3-0.6B", "num_draft_tokens": 4}
    data = {**good, name: value}
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(data))  # NaN and Infinity as Python's json writes them
    settings, warning = load_settings(path)
    assert warning and name in warning and "other settings are kept" in warning
    expected = {**good, name: getattr(Settings(), name)}
    assert settings.to_dict() == expected
    # The next save keeps the user's values, the system prompt first of all.
    save_settings(path, settings)
    again, warning = load_settings(path)
    assert warning is None and again == settings
    if name != "system_prompt":
        assert again.system_prompt == "You are a pirate."


def test_settings_that_are_not_an_object_fall_back_with_a_warning(tmp_path):
    path = tmp_path / "settings.json"
    for text in ("[1, 2]", "null", "{not json", "[" * 100000):
        path.write_text(text)
        settings, warning = load_settings(path)
        assert settings == Settings() and str(path) in warning


# ------------------------------------------------------------------- chat files

def test_the_chat_list_skips_and_names_files_that_are_not_chats(tmp_path):
    store = ChatStore(tmp_path)
    record = store.new_chat()
    turn(record, "hello")
    store.save(record)
    bad = {"list.json": "[1, 2, 3]", "null.json": "null", "number.json": "42",
           "text.json": '"a chat"', "broken.json": "{", "messages.json":
           json.dumps({"id": "x", "messages": [1, 2]}), "deep.json": "[" * 100000,
           "binary.json": b"\xff\xfe".decode("latin-1")}
    for name, text in bad.items():
        (store.chats_dir / name).write_text(text, encoding="latin-1")
    summaries, skipped = store.scan()
    assert [s.id for s in summaries] == [record.id]
    assert sorted(name for name, _ in skipped) == sorted(bad)
    assert all(reason for _, reason in skipped)
    assert store.summaries() == summaries


def test_two_files_with_one_id_are_two_chats(tmp_path):
    store = ChatStore(tmp_path)
    record = store.new_chat()
    turn(record, "original")
    store.save(record)
    backup = store.chats_dir / f"{record.id} (copy).json"
    data = json.loads(store.path(record.id).read_text())
    data["messages"][0]["content"] = "the backup"
    backup.write_text(json.dumps(data))
    summaries, skipped = store.scan()
    assert skipped == [] and sorted(s.id for s in summaries) == sorted(
        [record.id, backup.stem])
    copy = store.load(backup.stem)
    assert copy.id == backup.stem and contents(copy)[0] == "the backup"
    turn(copy, "more")  # saving the copy writes the copy, never the original
    store.save(copy)
    assert contents(store.load(record.id)) == ["original", "re: original"]
    assert contents(store.load(backup.stem))[-2:] == ["more", "re: more"]
