"""Hostile chat templates: every render is bounded in size, time and memory.

Each case renders in a child process (so its peak RSS is its own) from a model folder's
chat_template.jinja, and must end with a clear error naming that file, within a time
bound and under a peak-RSS bound.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import write_tiny_tokenizer

# The watchdog's budgets in the child, and the bounds asserted: the child's peak RSS may
# exceed its idle baseline by the memory budget plus a margin for one poll interval.
BUDGET_SECONDS, BUDGET_BYTES = 2.0, 256 * 2 ** 20
GROWTH_BOUND = BUDGET_BYTES + 200 * 2 ** 20
SECONDS = 20  # per render

CASES = {
    "multiply": "{{ 'x' * 10000000000 }}",
    "nested_ranges": "{% for i in range(99999) %}{% for j in range(99999) %}"
                     "{% endfor %}{% endfor %}",
    "doubling_concat": "{% set ns = namespace(s='x') %}{% for i in range(60) %}"
                       "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "doubling_plus": "{% set ns = namespace(s='x') %}{% for i in range(60) %}"
                     "{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "list_multiply": "{{ ([1] * 3000000) * 3000000 }}",
    "printed_list": "{% set l = ['x' * 3000000] * 3000000 %}{{ l }}",
    "center_filter": "{{ 'x'|center(10000000000) }}",
    "ljust_method": "{{ 'x'.ljust(10000000000) }}",
    "format_width": "{{ '{:>9999999999}'.format(1) }}",
    "printf_width": "{{ '%10000000000d' % 1 }}",
    "format_filter": "{{ '%10000000000d'|format(1) }}",
    "power": "{{ 2 ** (10 ** 10) }}",
    "join_filter": "{{ (['a'] * 3000000)|join('y' * 3000000) }}",
    "join_method": "{{ ('y' * 3000000).join(['a'] * 3000000) }}",
    "replace": "{{ ('a' * 3000000).replace('a', 'b' * 3000000) }}",
    "indent": "{{ ('a\\n' * 2000000)|indent(3000000) }}",
    "expandtabs": "{{ ('\\t' * 3000000).expandtabs(3000000) }}",
    "tojson_indent": "{{ [1, 2]|tojson(indent=100000000) }}",
    "output_flood": "{% for i in range(99999) %}{{ 'x' * 99999 }}{% endfor %}",
    # Each step is small, but every string is kept: only the memory watchdog sees it.
    "linked_growth": "{% set ns = namespace(l=[]) %}{% for i in range(99999) %}"
                     "{% set ns.l = [ns.l, 'x' * 1000000 ~ i] %}{% endfor %}",
}

CHILD = textwrap.dedent("""
    import json, re, sys, time
    from qwen_mlx.text import templates
    from qwen_mlx.text.tokenizer import QwenTokenizer
    from qwen_mlx.errors import QwenMLXError

    # Smaller budgets than the defaults (10 s, 1 GiB) keep the suite fast; the checks
    # that stop a render are the same.
    templates.RENDER_SECONDS = float(sys.argv[2])
    templates.RENDER_MEMORY_BYTES = int(sys.argv[3])

    def hwm():
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024

    tok = QwenTokenizer.from_folder(sys.argv[1])
    baseline = hwm()
    started = time.monotonic()
    try:
        tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
        error = None
    except QwenMLXError as e:
        error = str(e)
    print(json.dumps({"error": error, "seconds": time.monotonic() - started,
                      "baseline": baseline, "peak": hwm()}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for peak RSS")
@pytest.mark.parametrize("name", list(CASES))
def test_hostile_template_is_stopped_with_bounded_time_and_memory(tmp_path, name):
    write_tiny_tokenizer(tmp_path, vocab=300)
    template = tmp_path / "chat_template.jinja"
    template.write_text(CASES[name])
    # The memory case gets time enough that its memory budget, not the clock, stops it.
    seconds = SECONDS if name == "linked_growth" else BUDGET_SECONDS
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(seconds),
                        str(BUDGET_BYTES)], capture_output=True, text=True, timeout=SECONDS + 60)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["error"] is not None, f"{name} rendered without an error"
    assert str(template) in out["error"] and "stopped" in out["error"]
    assert out["seconds"] < SECONDS
    assert out["peak"] - out["baseline"] < GROWTH_BOUND, \
        f"{name}: peak RSS grew by {(out['peak'] - out['baseline']) / 2**20:.0f} MB"
    if name == "linked_growth":
        assert "memory" in out["error"]
    if name == "nested_ranges":
        assert "more than 2 s" in out["error"]


def test_limits_leave_real_templates_and_big_inputs_alone(tmp_path):
    # A Qwen3 chat with long messages (6 MB of text) renders as before, well past the
    # minimum size limit: the limit scales with the inputs.
    from qwen_mlx.text.tokenizer import QwenTokenizer

    write_tiny_tokenizer(tmp_path, vocab=300, chat_template="qwen3")
    tok = QwenTokenizer.from_folder(tmp_path)
    long = "the quick brown fox " * 300_000
    text = tok.apply_chat_template([{"role": "user", "content": long},
                                    {"role": "assistant", "content": long}],
                                   tokenize=False)
    assert text.count(long) == 2 and len(text) > 12_000_000


def test_a_stopped_render_leaves_the_thread_usable(tmp_path, monkeypatch):
    # The watchdog's interruption must not land later, outside the render.
    from qwen_mlx.text import templates

    monkeypatch.setattr(templates, "RENDER_SECONDS", 0.2)
    slow = templates.ChatTemplate("{% for i in range(99999) %}{% for j in range(99999) %}"
                                  "{% endfor %}{% endfor %}", "/m/slow.jinja")
    fast = templates.ChatTemplate("{{ messages|length }}", "/m/fast.jinja")
    for _ in range(3):
        with pytest.raises(templates.QwenMLXError, match="/m/slow.jinja.*more than 0.2 s"):
            slow.render({})
        total = 0
        for i in range(200_000):  # plenty of bytecodes for a stray exception to hit
            total += i
        assert fast.render({"messages": [1, 2]}) == "2"


def test_errors_name_the_file_for_every_entry_point(tmp_path):
    from qwen_mlx.errors import QwenMLXError
    from qwen_mlx.text.tokenizer import QwenTokenizer

    write_tiny_tokenizer(tmp_path, vocab=300)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ 'x' * 10000000000 }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = QwenTokenizer.from_folder(tmp_path)
    with pytest.raises(QwenMLXError, match="tokenizer_config.json.*stopped"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
