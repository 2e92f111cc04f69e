"""Reading the source checkpoint's tensors lazily (safetensors memory-mapped, `.bin` with
`weights_only=True`), so a conversion holds one layer group in memory, not the whole model."""

import math
import mmap
import os
import pickle
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import UserError, unpickling_refusal
from ..io import open_safetensors, parse_json
from .shards import DTYPES_BY_NAME, TensorSpan, read_spans
from .source import BIN_INDEX, SAFETENSORS_INDEX, WEIGHT_PATTERNS, refuse_links_out


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


class CheckpointReader:
    """Lazy access to a checkpoint's tensors by name, across shards and formats."""

    def __init__(self, directory: Path | None = None, state_dict: dict[str, torch.Tensor] | None = None):
        """Read the checkpoint in `directory`, or (for in-memory conversion) a model's `state_dict`."""
        self.directory = directory
        self._where: dict[str, object] = {}  # tensor name -> open safetensors handle or a dict of tensors
        self._files: dict[str, Path] = {}  # tensor name -> its safetensors file
        self._origin: dict[str, Path] = {}  # tensor name -> the weight file that holds it
        self._spans: dict[Path, dict[str, TensorSpan]] = {}  # per file, read on first use
        self.non_finite: list[str] = []  # tensors read so far that hold NaN or inf
        if state_dict is not None:
            self._where = {name: state_dict for name in state_dict}
            return
        files = self._weight_files(directory)
        refuse_links_out(directory, files, "its tensors would go into the output")
        for file in files:
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
                    shard_names = sorted(set(parse_json(index.read_text())["weight_map"].values()))
                except (ValueError, KeyError, AttributeError, TypeError) as error:
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
            self._claim(name, file)
            self._where[name] = handle
            self._files[name] = file

    def _open_bin(self, file: Path):
        try:
            try:  # memory-mapped where the file format allows it
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                state = torch.load(file, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as error:
            raise UserError(f"cannot read {file} as a weights-only PyTorch checkpoint: {unpickling_refusal(error)}") from None
        if not isinstance(state, dict):
            raise UserError(f"{file} does not hold a state dict")
        for name in state:
            self._claim(name, file)
            self._where[name] = state

    def _claim(self, name: str, file: Path) -> None:
        """Refuse a tensor that a second file holds too: which one is the weight would be chance."""
        if name in self._origin:
            raise UserError(f"tensor {name} is in both {self._origin[name].name} and {file.name}: the checkpoint's "
                            "weight files overlap")
        self._origin[name] = file

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
        span = self._spans[file].get(name)
        if span is not None and span.nbytes:
            # Its bytes are copied file to file, never read here: look at them in place once.
            with open(span.file, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                with warnings.catch_warnings():  # torch warns that a read-only buffer must not be written to
                    warnings.simplefilter("ignore", UserWarning)
                    tensor = torch.frombuffer(mapped, dtype=span.dtype, count=span.nbytes // span.dtype.itemsize,
                                              offset=span.offset)
                self._note_non_finite(name, tensor)
                del tensor  # before the mapping closes
        return span

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
        self._note_non_finite(name, tensor)
        return tensor

    def _note_non_finite(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.numel() and name not in self.non_finite:
            # One reduction pass, no full-size temporary (unlike isfinite): NaN propagates into the
            # minimum and maximum, and an inf is one of them. On one thread it adds ~5% to a
            # conversion that reads every tensor; on all threads it doubled it on a busy machine.
            with one_thread():
                low, high = torch.aminmax(tensor)
            if not (math.isfinite(low) and math.isfinite(high)):
                self.non_finite.append(name)


def _regular_files(files: list[Path]) -> list[Path]:
    """`files`, refusing anything but regular files (reading a FIFO or a device would hang or never end)."""
    for file in files:
        if not file.is_file():
            raise UserError(f"{file} is not a regular file")
    return files
