"""Writing safetensors shards in place, so that tensors copied from the source never pass
through Python.

safetensors' `save_file` needs every tensor of a shard in memory and then writes the file in one
go. Most tensors of a conversion are copied unchanged (the embedding, the prelude and coda, a
core layer tied to one stand-in), so the converter lays each shard out first from the names and
shapes it already knows (8-byte header length, JSON header, data), and writes every tensor at its
offset as soon as it exists: a computed one from memory, a copied one straight from the source
file with `copy_file_range`, which the kernel does without a round trip through user space (and
on a reflinking file system without copying at all). The result is an ordinary safetensors file;
the tests read every shard back with the safetensors library.
"""

import errno
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}
# Errors after which copy_file_range cannot serve these two files, but reading and writing can.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM}
_CHUNK = 16 << 20


@dataclass(frozen=True)
class TensorSpan:
    """Where one tensor's bytes lie inside a safetensors file."""

    file: Path
    offset: int  # from the start of the file
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def read_spans(file: Path) -> dict[str, TensorSpan]:
    """The floating-point tensors of a safetensors file and where their bytes lie (header only)."""
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    spans = {}
    for name, info in header.items():
        dtype = DTYPES_BY_NAME.get(info.get("dtype")) if name != "__metadata__" else None
        if dtype is not None:
            begin, end = info["data_offsets"]
            spans[name] = TensorSpan(file, 8 + length + begin, end - begin, tuple(info["shape"]), dtype)
    return spans


def _write_at(file: BinaryIO, data: memoryview, position: int) -> None:
    file.seek(position)
    while data:
        data = data[file.write(data) :]  # an unbuffered write may take only part


def _copy_bytes(src: BinaryIO, dst: BinaryIO, count: int, src_position: int, dst_position: int) -> None:
    """Copy `count` bytes between unbuffered files, in the kernel where the platform and files allow."""
    while count and hasattr(os, "copy_file_range"):  # Linux
        try:
            copied = os.copy_file_range(src.fileno(), dst.fileno(), count, src_position, dst_position)
        except OSError as error:
            if error.errno not in _NO_KERNEL_COPY:
                raise
            break
        if copied == 0:
            raise OSError(errno.EIO, "the source file ended early (truncated?)")
        count, src_position, dst_position = count - copied, src_position + copied, dst_position + copied
    src.seek(src_position)
    while count:
        data = src.read(min(count, _CHUNK))
        if not data:
            raise OSError(errno.EIO, "the source file ended early (truncated?)")
        _write_at(dst, memoryview(data), dst_position)
        count, dst_position = count - len(data), dst_position + len(data)


class ShardWriter:
    """Safetensors shards laid out up front; `write` puts one tensor in place, in any order.

    `shards` maps file name -> {tensor name: shape}, in the order the tensors go in the file;
    every tensor has `dtype`. `close` checks that every tensor was written."""

    def __init__(self, directory: Path, shards: dict[str, dict[str, tuple[int, ...]]], dtype: torch.dtype, metadata: dict):
        self.dtype = dtype
        self._where: dict[str, tuple[BinaryIO, int, int]] = {}  # tensor -> (shard file, position, nbytes)
        self._sources: dict[Path, BinaryIO] = {}
        self._files: list[BinaryIO] = []
        self._unwritten: set[str] = set()
        try:
            for filename, tensors in shards.items():
                self._lay_out(directory / filename, tensors, metadata)
        except BaseException:
            self._close_files()
            raise

    def _lay_out(self, path: Path, tensors: dict[str, tuple[int, ...]], metadata: dict) -> None:
        header: dict = {"__metadata__": metadata}
        places, end = {}, 0
        for name, shape in tensors.items():
            nbytes = math.prod(shape) * self.dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[self.dtype], "shape": list(shape), "data_offsets": [end, end + nbytes]}
            places[name], end = (end, nbytes), end + nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        file = open(path, "wb", buffering=0)
        self._files.append(file)
        _write_at(file, memoryview(struct.pack("<Q", len(text)) + text), 0)
        file.truncate(8 + len(text) + end)  # full size now: every tensor has its place
        for name, (offset, nbytes) in places.items():
            self._where[name] = (file, 8 + len(text) + offset, nbytes)
        self._unwritten.update(places)

    def write(self, name: str, value: torch.Tensor | TensorSpan) -> None:
        file, position, nbytes = self._where[name]
        if value.dtype != self.dtype:
            raise ValueError(f"{name} is {value.dtype}, the shards hold {self.dtype}")
        if isinstance(value, TensorSpan):
            if value.nbytes != nbytes:
                raise ValueError(f"{name}: the source holds {value.nbytes} bytes, the shard expects {nbytes}")
            src = self._sources.get(value.file)
            if src is None:
                src = self._sources[value.file] = open(value.file, "rb", buffering=0)
            _copy_bytes(src, file, nbytes, value.offset, position)
        else:
            data = value.detach().contiguous().view(-1).view(torch.uint8).numpy()
            if data.nbytes != nbytes:
                raise ValueError(f"{name}: {data.nbytes} bytes, the shard expects {nbytes}")
            _write_at(file, memoryview(data), position)
        self._unwritten.discard(name)

    def close(self) -> None:
        self._close_files()
        if self._unwritten:
            raise RuntimeError(f"converter did not produce {sorted(self._unwritten)[:5]}")

    def _close_files(self) -> None:
        for file in [*self._files, *self._sources.values()]:
            file.close()
        self._files, self._sources = [], {}

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if kind is None:
            self.close()
        else:
            self._close_files()
