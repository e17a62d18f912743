"""Model sources: a local folder or a Hugging Face hub repo id.

Hub repos go through `huggingface_hub.snapshot_download`, so HF_HOME,
HF_HUB_CACHE, HF_HUB_OFFLINE and HF tokens work as users expect, and only
the files a Qwen model needs are fetched: never pickles, never code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import QwenMLXError

# Everything qwen-mlx reads; *.bin/*.pt pickles and *.py remote code are never fetched.
HUB_FILES = [
    "*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "qwen.tiktoken",
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(source: str) -> bool:
    """'Qwen/Qwen3-0.6B' looks like a repo id; './x', '/x', 'x' and '~/x' do not."""
    return bool(_REPO_ID.match(source)) and not source.startswith((".", "~"))


def resolve_model_path(source: str | Path, *, revision: str | None = None) -> Path:
    """A local folder as is, or a hub repo id downloaded (or found in the cache)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise QwenMLXError(f"{path} is a file; give the model's folder")
        if revision is not None:
            raise QwenMLXError(f"--revision applies to hub repos, not to the local folder {path}")
        return path
    if not is_repo_id(str(source)):
        raise QwenMLXError(f"{source}: no such folder, and not a hub repo id like 'Qwen/Qwen3-0.6B'")
    return Path(download(str(source), revision=revision))


def download(repo_id: str, *, revision: str | None = None) -> str:
    """Fetch a repo's model files into the Hugging Face cache, with progress bars."""
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    where = f"{repo_id}" + (f" at revision {revision}" if revision else "")
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES,
                                 ignore_patterns=["*/*"])
        if not offline and not any(Path(path).glob("*.safetensors")):
            _refuse_pickle_only(repo_id, revision)
        return path
    except hf_errors.RevisionNotFoundError:
        raise QwenMLXError(f"{repo_id} has no revision '{revision}' on the hub") from None
    except hf_errors.GatedRepoError:
        raise QwenMLXError(f"{repo_id} is gated: accept its license on the hub, then log in "
                           "with `hf auth login`") from None
    except hf_errors.RepositoryNotFoundError:
        raise QwenMLXError(f"{repo_id}: no such repo on the hub (or it is private: log in "
                           "with `hf auth login`)") from None
    except hf_errors.LocalEntryNotFoundError:
        if offline:
            raise QwenMLXError(
                f"{where} is not in the Hugging Face cache ({_cache_dir()}) and HF_HUB_OFFLINE "
                "is set: download it once while online, or unset HF_HUB_OFFLINE") from None
        raise QwenMLXError(f"cannot reach the Hugging Face hub to fetch {where}, and it is not "
                           f"in the cache ({_cache_dir()}); check the network") from None
    except hf_errors.HfHubHTTPError as e:
        raise QwenMLXError(f"the hub refused {where}: {e}") from None


def _refuse_pickle_only(repo_id: str, revision: str | None) -> None:
    from huggingface_hub import list_repo_files

    pickles = [f for f in list_repo_files(repo_id, revision=revision)
               if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickles:
        raise QwenMLXError(
            f"{repo_id} on the hub has only PyTorch pickle weights ({pickles[0]}); qwen-mlx "
            "never unpickles checkpoints, since that can run code: use a safetensors release")


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)
