"""The in-place safetensors shard writer: files the safetensors library reads back bit for bit."""

import errno
import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mesh_convert.convert import shards as shards_module
from mesh_convert.convert.shards import ShardWriter, read_spans


def read_back(path):
    with safe_open(path, "pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}, handle.metadata()


def read_header(path):
    raw = path.read_bytes()
    return json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])


@pytest.fixture
def source(tmp_path):
    """A safetensors file with tensors of three dtypes, written by the library itself."""
    torch.manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.randn(2, 2, 3).to(torch.float16),
        "empty": torch.randn(0, 4),
        "ids": torch.arange(6),
    }
    path = tmp_path / "source.safetensors"
    save_file(tensors, path)
    return path, tensors


def test_spans_point_at_each_tensors_bytes(source):
    path, tensors = source
    spans = read_spans(path)
    assert "ids" not in spans, "only floating-point tensors are copied as bytes"
    raw = path.read_bytes()
    for name, span in spans.items():
        expected = tensors[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        assert raw[span.offset : span.offset + span.nbytes] == expected, name
        assert span.shape == tuple(tensors[name].shape) and span.dtype == tensors[name].dtype


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "read-write"])
def test_tensors_and_spans_in_any_order_read_back_exactly(source, tmp_path, monkeypatch, kernel_copy):
    path, tensors = source
    if not kernel_copy:  # as across file systems on older kernels
        def refuse(*args):
            raise OSError(errno.EXDEV, "cross-device")

        monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    spans = read_spans(path)
    computed = {"x": torch.randn(4, 3), "y": torch.randn(1), "z": torch.randn(2, 8)}
    layout = {
        "one.safetensors": {"x": (4, 3), "a": (3, 5), "empty": (0, 4)},
        "two.safetensors": {"y": (1,), "z": (2, 8)},
    }
    with ShardWriter(tmp_path, layout, torch.float32, metadata={"format": "pt"}) as writer:
        writer.write("z", computed["z"])
        writer.write("a", spans["a"])
        writer.write("empty", spans["empty"])
        writer.write("y", computed["y"])
        writer.write("x", computed["x"].t().contiguous().t())  # a non-contiguous view is written by value
    one, metadata = read_back(tmp_path / "one.safetensors")
    two, _ = read_back(tmp_path / "two.safetensors")
    assert metadata == {"format": "pt"}
    header = read_header(tmp_path / "one.safetensors")
    starts = [header[name]["data_offsets"][0] for name in ("x", "a", "empty")]
    assert starts == sorted(starts), "tensors lie in the layout's order"
    for name, tensor in {**one, **two}.items():
        expected = tensors[name] if name in tensors else computed[name]
        assert torch.equal(tensor, expected), name
    assert struct.unpack("<Q", (tmp_path / "two.safetensors").read_bytes()[:8])[0] % 8 == 0, "data starts 8-byte aligned"


def test_half_precision_shards(source, tmp_path):
    path, tensors = source
    layout = {"model.safetensors": {"b": (7,), "w": (2, 3)}}
    w = torch.randn(2, 3).to(torch.bfloat16)
    with ShardWriter(tmp_path, layout, torch.bfloat16, metadata={}) as writer:
        writer.write("b", read_spans(path)["b"])
        writer.write("w", w)
    back, _ = read_back(tmp_path / "model.safetensors")
    assert torch.equal(back["b"], tensors["b"]) and torch.equal(back["w"], w)
    assert read_header(tmp_path / "model.safetensors")["w"]["dtype"] == "BF16"


def test_mismatches_and_missing_tensors_are_errors(source, tmp_path):
    path, _ = source
    spans = read_spans(path)
    writer = ShardWriter(tmp_path, {"s.safetensors": {"a": (3, 5), "c": (2, 2, 3)}}, torch.float32, metadata={})
    with pytest.raises(ValueError, match="float16"):
        writer.write("c", spans["c"])
    with pytest.raises(ValueError, match="bytes"):
        writer.write("a", torch.zeros(2, 5))
    writer.write("a", spans["a"])
    with pytest.raises(RuntimeError, match=r"did not produce \['c'\]"):
        writer.close()


def test_a_truncated_source_is_an_error(source, tmp_path):
    path, _ = source
    span = read_spans(path)["a"]
    with open(path, "r+b") as handle:
        handle.truncate(span.offset + 4)
    with ShardWriter(tmp_path, {"s.safetensors": {"a": (3, 5)}}, torch.float32, metadata={}) as writer:
        with pytest.raises(OSError, match="ended early"):
            writer.write("a", span)
        writer.write("a", torch.zeros(3, 5))  # the writer stays usable


def test_chunked_fallback_copies_large_spans(source, tmp_path, monkeypatch):
    """The read/write fallback copies in chunks; a chunk smaller than the tensor exercises the loop."""
    path, tensors = source
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    monkeypatch.setattr(shards_module, "_CHUNK", 8)
    with ShardWriter(tmp_path, {"s.safetensors": {"a": (3, 5)}}, torch.float32, metadata={}) as writer:
        writer.write("a", read_spans(path)["a"])
    assert torch.equal(read_back(tmp_path / "s.safetensors")[0]["a"], tensors["a"])
