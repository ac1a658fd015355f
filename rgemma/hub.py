"""Where a model named on the command line lives: a path, a Hugging Face hub id, or the embedded default."""

from __future__ import annotations

import os
import re
from pathlib import Path

# The small Griffin trained by rgemma and shipped inside the package.
DEFAULT_MODEL = Path(__file__).parent / "assets" / "default"
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.model", "*.pt"]


class ModelNotFound(ValueError):
    pass


def _download(repo_id: str) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError as error:
        raise ModelNotFound(f"{repo_id}: no such directory here; reading it as a hub id needs huggingface_hub: "
                            "pip install huggingface_hub") from error
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:  # not in the cache: try the network below
        pass
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as error:  # offline, gated, unknown id: the library raises many types
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelNotFound(
            f"{repo_id}: no such directory here, and as a hub id not in the Hugging Face cache ({HF_HUB_CACHE}) "
            f"and cannot be downloaded ({reason}); download it where a network and your credentials allow "
            f"(huggingface-cli download {repo_id}) into that cache, or pass a local path"
        ) from error


def resolve_model(spec: str | os.PathLike | None) -> Path:
    """A local path, a hub id like google/recurrentgemma-2b-it, or None for the embedded default."""
    if spec is None:
        if not (DEFAULT_MODEL / "config.json").is_file():
            raise ModelNotFound("no --model given and this installation has no embedded default model")
        return DEFAULT_MODEL
    if not str(spec).strip():
        raise ModelNotFound("the model name is empty: give a checkpoint path or a hub id, or leave --model out")
    path = Path(spec).expanduser()
    if path.exists():
        return path
    # A hub id looks like a relative path of two parts; where the first part is a local directory
    # (models/tiny-v2 mistyped), the user meant a path, and a download attempt would only confuse.
    if HUB_ID.fullmatch(str(spec)) and not str(spec).startswith((".", "/")) and not path.parent.is_dir():
        return _download(str(spec))
    raise ModelNotFound(f"{spec}: no such file or directory")


def model_files(path: Path) -> list[Path]:
    """The files a model at `path` (a checkpoint file or directory) is read from: what nothing may overwrite."""
    if path.is_dir():
        return [file for file in path.iterdir() if file.is_file()]
    return [path]
