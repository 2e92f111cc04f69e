"""Reading the source checkpoint's tensors lazily (safetensors memory-mapped, `.bin` with
`weights_only=True`), so a conversion holds one layer group in memory, not the whole model."""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import UserError
from .shards import DTYPES_BY_NAME, TensorSpan, read_spans
from .source import BIN_INDEX, SAFETENSORS_INDEX


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
        try:
            handle = safe_open(file, framework="pt")
        except (SafetensorError, OSError) as error:
            raise UserError(f"corrupt or truncated safetensors file {file}: {error}") from None
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
