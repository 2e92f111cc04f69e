"""Finding and reading the source checkpoint: a local directory, a Hub id, or a `pythia-<size>`
alias. Tensors are read lazily (safetensors memory-mapped, `.bin` with `weights_only=True`), so a
conversion holds one layer group in memory, not the whole model."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, PreTrainedConfig

from .errors import UserError
from .pythia import parse_alias
from .shards import DTYPES_BY_NAME, TensorSpan, read_spans

CONFIG_FILES = ["config.json", "generation_config.json"]
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
]
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
    looks_like_repo = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not looks_like_repo:
        raise UserError(f"no such checkpoint directory: {name} (nor is it a Hub id or a pythia-<size> alias)")
    return SourceRef(name, name, revision, None)


def _from_hub(ref: SourceRef, action):
    """Run a huggingface_hub call, turning its errors into one line."""
    from .hub import hub_timeout, resolve_endpoint, to_user_error

    try:
        with hub_timeout():
            return action()
    except Exception as error:
        user_error = to_user_error(error, ref.repo_id, resolve_endpoint(), fetching=True, revision=ref.revision)
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
    patterns = CONFIG_FILES + TOKENIZER_FILES + weights
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
    try:
        return AutoConfig.from_pretrained(directory)
    except (ValueError, OSError, TypeError) as error:
        raise UserError(f"cannot read {config_file}: {str(error).splitlines()[0]}") from None


def open_safetensors(file: Path):
    """A safetensors file opened lazily (memory-mapped); a damaged or truncated one is a UserError."""
    try:
        return safe_open(file, framework="pt")
    except (SafetensorError, OSError) as error:
        raise UserError(f"corrupt or truncated safetensors file {file}: {error}") from None


def check_safetensors(directory: Path) -> None:
    """Open every safetensors file in `directory`, so that a damaged one is named in one line
    before a library that loads the model fails on it with its own error."""
    for file in sorted(Path(directory).glob("*.safetensors")):
        with open_safetensors(file):
            pass


class CheckpointReader:
    """Lazy access to a checkpoint's tensors by name, across shards and formats."""

    def __init__(self, directory: Path | None = None, state_dict: dict[str, torch.Tensor] | None = None):
        """Read the checkpoint in `directory`, or (for in-memory conversion) a model's `state_dict`."""
        self.directory = directory
        self._where: dict[str, object] = {}  # tensor name -> open safetensors handle or a dict of tensors
        self._files: dict[str, Path] = {}  # tensor name -> its safetensors file
        self._spans: dict[Path, dict[str, TensorSpan]] = {}  # per file, read on first use
        if state_dict is not None:
            self._where = {name: state_dict for name in state_dict}
            return
        for file in self._weight_files(directory):
            if file.suffix == ".safetensors":
                self._open_safetensors(file)
            else:
                self._open_bin(file)

    @staticmethod
    def _weight_files(directory: Path) -> list[Path]:
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            index = directory / index_name
            if index.is_file():
                try:
                    shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                except (json.JSONDecodeError, KeyError, AttributeError) as error:
                    raise UserError(f"{index} is not a valid shard index: {error}") from None
                missing = [name for name in shard_names if not (directory / name).is_file()]
                if missing:
                    raise UserError(f"{index} lists shards that are missing: {', '.join(missing)}")
                return [directory / name for name in shard_names]
        for pattern in ("*.safetensors", "*.bin"):
            files = sorted(directory.glob(pattern))
            if files:
                return files
        raise UserError(f"no weights found in {directory} (expected *.safetensors or pytorch_model*.bin)")

    def _open_safetensors(self, file: Path):
        handle = open_safetensors(file)
        for name in handle.keys():
            self._where[name] = handle
            self._files[name] = file

    def _open_bin(self, file: Path):
        try:
            try:  # memory-mapped where the file format allows it
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many kinds for a damaged or unsafe pickle
            raise UserError(f"cannot read {file} as a weights-only PyTorch checkpoint: {str(error).splitlines()[0]}") from None
        if not isinstance(state, dict):
            raise UserError(f"{file} does not hold a state dict")
        for name in state:
            self._where[name] = state

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        source = self._where[name]
        if isinstance(source, dict):
            return tuple(source[name].shape)
        return tuple(source.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        source = self._where[name]
        if isinstance(source, dict):
            return source[name].dtype
        return DTYPES_BY_NAME.get(source.get_slice(name).get_dtype(), torch.float32)

    def span(self, name: str) -> TensorSpan | None:
        """Where the tensor's bytes lie in its safetensors file (None for .bin and in-memory sources)."""
        file = self._files.get(name)
        if file is None:
            return None
        if file not in self._spans:
            self._spans[file] = read_spans(file)
        return self._spans[file].get(name)

    def get(self, name: str) -> torch.Tensor:
        source = self._where[name]
        if isinstance(source, dict):
            return source[name]
        try:
            # A fresh mapping per tensor: its pages are released with the tensor, instead of the
            # whole source file staying resident through one long-lived mapping.
            with safe_open(self._files[name], framework="pt") as handle:
                return handle.get_tensor(name)
        except SafetensorError as error:
            raise UserError(f"cannot read tensor {name} from {self.directory}: {error}") from None
