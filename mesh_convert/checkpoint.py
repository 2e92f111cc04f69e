"""Finding and reading the source checkpoint: a local directory, a Hub id, or a `pythia-<size>`
alias. Tensors are read lazily (safetensors memory-mapped, `.bin` with `weights_only=True`), so a
conversion holds one layer group in memory, not the whole model."""

import json
import math
import os
from contextlib import contextmanager
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
# Without an index, only these are weights: a Trainer checkpoint also holds training_args.bin,
# optimizer.pt and the like, which are pickles of other things.
WEIGHT_PATTERNS = ("model*.safetensors", "pytorch_model*.bin")
# Config fields that every supported family needs; a missing one would silently take the
# defaults of some other model size from transformers.
REQUIRED_CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# Far above any published checkpoint (the deepest Llama, Qwen2 and GPT-NeoX models have ~126
# layers), low enough that planning and checking a layout stays instant.
MAX_LAYERS = 1024


@dataclass(frozen=True)
class SourceRef:
    """What the user named: a local path or a Hub repo (with revision)."""

    name: str  # as the user typed it
    repo_id: str | None  # Hub id, None for a local directory
    revision: str | None
    local_dir: Path | None


def resolve_source(name: str, revision: str | None = None) -> SourceRef:
    path = Path(name).expanduser()
    try:
        exists = path.exists()
    except OSError as error:
        raise UserError(f"cannot read {name}: {error.strerror or error}") from None
    if exists:
        if not path.is_dir():
            raise UserError(f"{name} is a file; give the checkpoint's directory")
        if revision is not None:
            raise UserError(f"--revision applies to Hub models; {name} is a local directory")
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
    try:
        if not config_file.is_file():
            raise UserError(f"{directory} has no config.json; is it a Hugging Face checkpoint?")
        raw = json.loads(config_file.read_text())
    except OSError as error:
        raise UserError(f"cannot read {config_file}: {error.strerror or error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{config_file} is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{config_file} does not hold a JSON object (it holds a {type(raw).__name__})")
    from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassError

    from .families import source_family

    source_family(raw.get("model_type"))  # a clear error for architectures we do not convert
    missing = [field for field in REQUIRED_CONFIG_FIELDS if field not in raw]
    if missing:
        raise UserError(f"{config_file} lacks {', '.join(missing)}")
    try:
        config = AutoConfig.from_pretrained(directory)
    except StrictDataclassError as error:  # transformers checks field types and the architecture
        reason = str(error).splitlines()[-1].strip().split(": ", 1)[-1]
        if isinstance(error, StrictDataclassClassValidationError):  # names no values: add the sizes
            sizes = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")
            reason += " (" + ", ".join(f"{name} {raw[name]!r}" for name in sizes if name in raw) + ")"
        raise UserError(f"{config_file}: {reason}") from None
    except (ValueError, OSError, TypeError) as error:
        raise UserError(f"cannot read {config_file}: {str(error).splitlines()[0]}") from None
    check_sizes(config, str(config_file))
    return config


def check_sizes(config: PreTrainedConfig, where: str) -> None:
    """Sizes that transformers accepts but no model can have (zero or negative), and layer counts
    beyond MAX_LAYERS."""
    for field in REQUIRED_CONFIG_FIELDS:
        value = getattr(config, field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{where}: {field} must be a positive integer, not {value!r}")
    if config.num_hidden_layers > MAX_LAYERS:
        raise UserError(
            f"{where}: num_hidden_layers {config.num_hidden_layers} is more than mesh-convert plans for "
            f"(at most {MAX_LAYERS}; the deepest published checkpoints of these families have about 126)"
        )


def tokenizer_files(directory: Path, local: bool) -> list[Path]:
    """The tokenizer files to copy into the output. In a local directory, a link to a file outside
    it is refused: the copy would carry that file into the output, and --push-to-hub onto the Hub.
    A Hub cache snapshot's files are links into the cache's blob store by design, whether we
    downloaded it (not `local`) or the user names the snapshot's folder."""
    directory = directory.resolve()
    allowed = [directory]
    if directory.parent.name == "snapshots":
        allowed.append(directory.parent.parent / "blobs")
    found = []
    for name in TOKENIZER_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if local and not any(path.resolve().is_relative_to(root) for root in allowed):
            raise UserError(
                f"{path} is a link to {path.resolve()}, outside the checkpoint; mesh-convert copies tokenizer "
                "files into the output, so copy that file into the checkpoint instead"
            )
        found.append(path)
    return found


@contextmanager
def one_thread():
    """Run torch on one thread: for memory-bound loops of small ops, where each op's parallel
    region waits for every thread, so a single busy core slows them many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
        self.non_finite: list[str] = []  # tensors read so far that hold NaN or inf
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
                except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as error:
                    raise UserError(f"{index} is not a valid shard index: {error}") from None
                for name in shard_names:
                    # The index names files in its own directory; anything else could read any file.
                    if not isinstance(name, str) or os.path.isabs(name) or ".." in Path(name).parts:
                        raise UserError(f"{index} names a shard outside the checkpoint: {name!r}")
                missing = [name for name in shard_names if not (directory / name).exists()]
                if missing:
                    raise UserError(f"{index} lists shards that are missing: {', '.join(missing)}")
                return _regular_files([directory / name for name in shard_names])
        for pattern in WEIGHT_PATTERNS:
            files = sorted(directory.glob(pattern))
            if files:
                return _regular_files(files)
        raise UserError(f"no weights found in {directory} (expected model*.safetensors or pytorch_model*.bin)")

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
        """The tensor's floating-point dtype; a UserError for anything else (integers and complex
        numbers are not weights of these models: casting them would make garbage)."""
        source = self._where[name]
        if isinstance(source, dict):
            value = source[name]
            if not isinstance(value, torch.Tensor):
                raise UserError(f"{name} in the checkpoint is not a tensor but a {type(value).__name__}")
            stored, dtype = str(value.dtype).removeprefix("torch."), value.dtype
            if not dtype.is_floating_point:
                dtype = None
        else:
            stored = source.get_slice(name).get_dtype()
            dtype = DTYPES_BY_NAME.get(stored)
        if dtype is None:
            raise UserError(f"tensor {name} is stored as {stored}, not as floating point: the checkpoint is damaged or not a model's weights")
        return dtype

    def span(self, name: str) -> TensorSpan | None:
        """Where the tensor's bytes lie in its safetensors file (None for .bin and in-memory sources)."""
        file = self._files.get(name)
        if file is None:
            return None
        if file not in self._spans:
            self._spans[file] = read_spans(file)
        return self._spans[file].get(name)

    def get(self, name: str) -> torch.Tensor:
        """The tensor, read into memory; a tensor holding NaN or inf is noted in `non_finite`."""
        source = self._where[name]
        if isinstance(source, dict):
            tensor = source[name]
        else:
            try:
                # A fresh mapping per tensor: its pages are released with the tensor, instead of the
                # whole source file staying resident through one long-lived mapping.
                with safe_open(self._files[name], framework="pt") as handle:
                    tensor = handle.get_tensor(name)
            except SafetensorError as error:
                raise UserError(f"cannot read tensor {name} from {self.directory}: {error}") from None
        if tensor.numel() and name not in self.non_finite:
            # One reduction pass, no full-size temporary (unlike isfinite): NaN propagates into the
            # minimum and maximum, and an inf is one of them. On one thread it adds ~5% to a
            # conversion that reads every tensor; on all threads it doubled it on a busy machine.
            with one_thread():
                low, high = torch.aminmax(tensor)
            if not (math.isfinite(low) and math.isfinite(high)):
                self.non_finite.append(name)
        return tensor


def _regular_files(files: list[Path]) -> list[Path]:
    """`files`, refusing anything but regular files (reading a FIFO or a device would hang or never end)."""
    for file in files:
        if not file.is_file():
            raise UserError(f"{file} is not a regular file")
    return files
