"""Finding the source checkpoint: a local directory, a Hub id, or a `pythia-<size>` alias, and
fetching its config and files (`reader.py` reads its tensors). Light: torch and transformers load
only when a config is read."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError, hub_error
from ..io import TOKENIZER_FILES, is_hub_id
from .pythia import parse_alias

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

CONFIG_FILES = ["config.json", "generation_config.json"]
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


@dataclass(frozen=True)
class SourceRef:
    """What the user named: a local path or a Hub repo (with revision)."""

    name: str  # as the user typed it
    repo_id: str | None  # Hub id, None for a local directory
    revision: str | None
    local_dir: Path | None


def resolve_source(name: str, revision: str | None = None) -> SourceRef:
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{name} is a file; give the checkpoint's directory")
        return SourceRef(name, None, revision, path.resolve())
    try:
        alias = parse_alias(name)
    except ValueError as error:
        raise UserError(str(error)) from None
    if alias is not None:
        return SourceRef(name, alias.repo_id, revision, None)
    if not is_hub_id(name):
        raise UserError(f"no such checkpoint directory: {name} (nor is it a Hub id or a pythia-<size> alias)")
    return SourceRef(name, name, revision, None)


def _from_hub(ref: SourceRef, action):
    """Run a huggingface_hub call, turning its errors into one line."""
    try:
        return action()
    except Exception as error:
        user_error = hub_error(error, ref.repo_id, revision=ref.revision)
        if user_error is None:
            raise
        raise user_error from None


def fetch_config(ref: SourceRef) -> Path:
    """Directory holding the source's config.json (for plans that need no weights)."""
    if ref.local_dir is not None:
        return ref.local_dir
    from huggingface_hub import hf_hub_download

    path = _from_hub(ref, lambda: hf_hub_download(ref.repo_id, "config.json", revision=ref.revision))
    return Path(path).parent


def fetch_checkpoint(ref: SourceRef) -> Path:
    """Local directory with the source's config, tokenizer and weights (downloading what is needed:
    safetensors when the repo has them, else `.bin`)."""
    if ref.local_dir is not None:
        return ref.local_dir
    from huggingface_hub import list_repo_files, snapshot_download

    files = _from_hub(ref, lambda: list_repo_files(ref.repo_id, revision=ref.revision))
    weights = ["*.safetensors", SAFETENSORS_INDEX] if any(f.endswith(".safetensors") for f in files) else ["*.bin", BIN_INDEX]
    patterns = [*CONFIG_FILES, *TOKENIZER_FILES, *weights]
    return Path(_from_hub(ref, lambda: snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns)))


def load_source_config(directory: Path) -> PreTrainedConfig:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise UserError(f"{directory} has no config.json; is it a Hugging Face checkpoint?")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{config_file} is not valid JSON: {error}") from None
    from .families import source_family

    source_family(raw.get("model_type"))  # a clear error for architectures we do not convert
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory)
    except (ValueError, OSError, TypeError) as error:
        raise UserError(f"cannot read {config_file}: {str(error).splitlines()[0]}") from None
