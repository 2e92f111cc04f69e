"""Bad input to `mesh-convert MODEL --loops K`: garbage weights, impossible configs, hostile paths and
out-of-range options. Each must end with exit 1, one `error:` line naming the problem, no traceback
and nothing written."""

import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_pythia
from helpers import assert_one_error_line, drop_file_permission_override
from mesh_convert.cli import main
from mesh_convert.convert import conversion

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pythia(tmp_path_factory) -> Path:
    """A tiny 8-layer GPT-NeoX checkpoint (fp32 safetensors), never modified: cases work on copies."""
    path = tmp_path_factory.mktemp("src") / "tiny-pythia"
    make_tiny_pythia(path)
    return path


def copy_of(source: Path, target: Path) -> Path:
    target.mkdir()
    for item in source.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    return target


def edit_config(directory: Path, **changes) -> None:
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config.update(changes)
    config_file.write_text(json.dumps(config))


def relabel_dtype(file: Path, tensor: str, dtype: str) -> None:
    """Rewrite one tensor's dtype in a safetensors header, keeping its bytes (a same-sized dtype)."""
    data = file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header[tensor]["dtype"] = dtype
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (length - len(text))
    assert len(text) == length
    file.write_bytes(data[:8] + text + data[8 + length :])


def as_bin(directory: Path, change=None) -> None:
    """Replace the safetensors weights by a pickled `pytorch_model.bin`, after `change(state)`."""
    state = load_file(directory / "model.safetensors")
    if change is not None:
        change(state)
    (directory / "model.safetensors").unlink()
    torch.save(state, directory / "pytorch_model.bin")


def sharded(directory: Path, shard_name: str) -> None:
    """Turn the weights into a one-shard index naming `shard_name` for every tensor."""
    names = list(load_file(directory / "model.safetensors"))
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, shard_name)}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


TENSOR = "gpt_neox.layers.3.attention.dense.weight"


# --- how each bad checkpoint is made: (src, tmp) -> extra arguments ---------------------------


def float_relabelled_as_int(src, tmp):
    relabel_dtype(src / "model.safetensors", TENSOR, "I32")


def int64_in_bin(src, tmp):
    as_bin(src, lambda state: state.update({TENSOR: state[TENSOR].to(torch.int64)}))


def complex_in_bin(src, tmp):
    as_bin(src, lambda state: state.update({TENSOR: state[TENSOR].to(torch.complex64)}))


def not_a_tensor_in_bin(src, tmp):
    as_bin(src, lambda state: state.update({TENSOR: 3}))


def fewer_layers_in_config(src, tmp):
    edit_config(src, num_hidden_layers=6)


def layers_as_string(src, tmp):
    edit_config(src, num_hidden_layers="6")


def config_is_a_list(src, tmp):
    (src / "config.json").write_text("[1, 2]")


def heads_do_not_divide_hidden(src, tmp):
    edit_config(src, num_attention_heads=5)


def hidden_size_missing(src, tmp):
    config = json.loads((src / "config.json").read_text())
    del config["hidden_size"], config["num_hidden_layers"]
    (src / "config.json").write_text(json.dumps(config))


def zero_layers(src, tmp):
    edit_config(src, num_hidden_layers=0)


def config(name: str, **changes):
    """A source whose config.json holds `changes`: values transformers takes but no model runs with."""
    def make(src, tmp):
        edit_config(src, **changes)
    make.__name__ = name
    return make


def shards_overlap(src, tmp):
    """Two shards both hold one tensor, with different values: which one converts was chance."""
    state = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    names = sorted(state)
    save_file({name: state[name] for name in names[: len(names) // 2]}, src / "model-00001-of-00002.safetensors")
    second = {name: state[name] for name in names[len(names) // 2:]}
    second[TENSOR] = state[TENSOR] + 1
    save_file(second, src / "model-00002-of-00002.safetensors")
    weight_map = {name: "model-00001-of-00002.safetensors" for name in names[: len(names) // 2]}
    weight_map.update({name: "model-00002-of-00002.safetensors" for name in second})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def absurd_layer_count(src, tmp):
    edit_config(src, num_hidden_layers=10000)
    return ["--dry-run"]


def index_points_up(src, tmp):
    (tmp / "x.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    sharded(src, "../x.safetensors")


def index_points_to_absolute_path(src, tmp):
    (tmp / "x.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    sharded(src, str(tmp / "x.safetensors"))


def tokenizer_links_out(src, tmp):
    secret = tmp / "secret.txt"
    secret.write_text("not for the Hub")
    (src / "tokenizer.json").symlink_to(secret)


def weights_link_out(src, tmp):
    (src / "model.safetensors").rename(tmp / "someone-elses.safetensors")
    (src / "model.safetensors").symlink_to(tmp / "someone-elses.safetensors")


def nested(depth: int):
    def config_nested_deeply(src, tmp):
        text = (src / "config.json").read_text().rstrip().removesuffix("}")
        (src / "config.json").write_text(text + ', "deep": ' + "[" * depth + "]" * depth + "}")

    config_nested_deeply.__name__ = f"config nested {depth} deep"
    return config_nested_deeply


def generation_config(text: str, name: str):
    def write(src, tmp):
        (src / "generation_config.json").write_text(text)

    write.__name__ = f"generation config {name}"
    return write


def weights_are_a_fifo(src, tmp):
    (src / "model.safetensors").unlink()
    fifo = src / "model.safetensors"
    os.mkfifo(fifo)
    # Were the FIFO opened for reading, this writer lets that read end (at once, with no data)
    # instead of hanging the test; the teardown below unblocks the writer if nothing ever read.
    writer = threading.Thread(target=lambda: os.close(os.open(fifo, os.O_WRONLY)), daemon=True)
    writer.start()
    return [], lambda: (os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)), writer.join(5))


def options(*args):
    def add_arguments(src, tmp):
        return list(args)

    add_arguments.__name__ = " ".join(args)
    return add_arguments


CASES = [
    (float_relabelled_as_int, f"tensor {TENSOR} is stored as I32"),
    (int64_in_bin, f"tensor {TENSOR} is stored as int64"),
    (complex_in_bin, f"tensor {TENSOR} is stored as complex64"),
    (not_a_tensor_in_bin, f"{TENSOR} in the checkpoint is not a tensor"),
    (fewer_layers_in_config, "tensors of layer 6 (gpt_neox.layers.6."),
    (layers_as_string, "num_hidden_layers must be a positive integer, not '6'"),
    (config_is_a_list, "does not hold a JSON object"),
    (heads_do_not_divide_hidden, "hidden size is not divisible by the number of attention heads! Make sure to update them! (hidden_size 32, num_attention_heads 5)"),
    (hidden_size_missing, "lacks hidden_size, num_hidden_layers"),
    (zero_layers, "num_hidden_layers must be a positive integer, not 0"),
    (absurd_layer_count, "num_hidden_layers 10000 is more than"),
    (shards_overlap, f"tensor {TENSOR} is in both model-00001-of-00002.safetensors and model-00002-of-00002"),
    (config("hidden_1e30", hidden_size=10**30), "hidden_size 1,000,000,000,000,000,000,000,000,000,000 is beyond any model"),
    (config("nan_norm_eps", layer_norm_eps=float("nan")), "layer_norm_eps must be a positive finite number, not nan"),
    (config("negative_norm_eps", layer_norm_eps=-1.0), "layer_norm_eps must be a positive finite number, not -1.0"),
    (config("infinite_rotary_base", rotary_emb_base=float("inf")), "rotary_emb_base must be a positive finite number"),
    (config("rotary_fraction_7", rotary_pct=7), "rotary_pct must be in (0, 1], not 7"),
    (config("unknown_rotary_scaling", rope_scaling={"rope_type": "evil", "factor": 2.0}), "unknown rotary scaling 'evil'"),
    (config("rotary_scaling_a_list", rope_scaling=[1]), "rope_scaling and rope_parameters must be objects"),
    (config("unknown_activation", hidden_act="os.system"), "unknown activation hidden_act 'os.system'"),
    (config("unknown_dtype", torch_dtype="float128"), "torch_dtype 'float128' is not a torch dtype"),
    (index_points_up, "outside the checkpoint"),
    (index_points_to_absolute_path, "outside the checkpoint"),
    (tokenizer_links_out, "tokenizer.json is a link to"),
    (weights_are_a_fifo, "is not a regular file"),
    (weights_link_out, "model.safetensors is a link to"),
    (nested(900), "config.json is not valid JSON: nested more than 64 levels deep"),  # transformers recursed
    (nested(100_000), "config.json is not valid JSON: nested more than 64 levels deep"),  # json itself did
    (generation_config("[1, 2]", "a list"), "generation_config.json is not a valid generation config"),
    (generation_config('"greedy"', "a string"), "generation_config.json is not a valid generation config"),
    (generation_config('{"max_new_tokens": "many"}', "a string for a number"), "is not a valid generation config"),
    (generation_config('{"watermarking_config": 5}', "a number for an object"), "is not a valid generation config"),
    (generation_config('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested deeply"), "is not a valid generation config: nested more"),
    (options("--router-gap", "inf"), "--router-gap: Input should be a finite number"),
    (options("--router-gap", "nan"), "--router-gap: Input should be a finite number"),
    (options("--router-gap", "1e300"), "--router-gap 1e+300 does not fit float32"),
    (options("--router-gap", "1e6", "--dtype", "float16"), "--router-gap 1e+06 does not fit float16"),
    (options("--slots", "1000000"), "--slots 1000000 is more than"),
    (options("--relax-rank", "abc"), "error: --relax-rank: must be a non-negative integer or 'full'"),
    (options("--push-to-hub", "not a/valid//id"), "--push-to-hub: invalid repository id 'not a/valid//id'"),
    (options("--revision", "main"), "--revision applies to Hub models"),
]


@pytest.mark.parametrize("make,match", CASES, ids=[make.__name__ for make, _ in CASES])
def test_bad_input_is_one_error_line_and_leaves_nothing(pythia, tmp_path, capsys, make, match):
    src = copy_of(pythia, tmp_path / "src")
    made = make(src, tmp_path) or []
    extra, cleanup = made if isinstance(made, tuple) else (made, None)
    work = tmp_path / "work"
    work.mkdir()
    try:
        code = main([str(src), "--loops", "2", "-o", str(work / "out"), *extra])
    finally:
        if cleanup is not None:
            cleanup()
    assert_one_error_line(code, capsys.readouterr().err, match)
    assert not list(work.iterdir()), "a refused conversion must leave nothing behind"


def test_a_bad_generation_config_is_refused_before_any_weight_is_written(pythia, tmp_path, capsys, monkeypatch):
    src = copy_of(pythia, tmp_path / "src")
    (src / "generation_config.json").write_text('{"max_new_tokens": "many"}')
    monkeypatch.setattr(conversion, "write_weights", lambda *args: pytest.fail("weights written before the check"))
    code = main([str(src), "--loops", "2", "-o", str(tmp_path / "out")])
    assert_one_error_line(code, capsys.readouterr().err, "not a valid generation config")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("what,match", [("config.json", "cannot read"), (".", "cannot read")])
def test_unreadable_checkpoint_is_one_error_line(pythia, tmp_path, what, match):
    src = copy_of(pythia, tmp_path / "src")
    work = tmp_path / "work"
    work.mkdir()
    (src / what).chmod(0)
    preexec = drop_file_permission_override if os.geteuid() == 0 else None
    try:
        result = subprocess.run(
            [sys.executable, "-m", "mesh_convert.cli", str(src), "--loops", "2", "-o", str(work / "out")],
            capture_output=True, text=True, timeout=300, cwd=ROOT, preexec_fn=preexec,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    except subprocess.SubprocessError as error:
        pytest.skip(f"cannot run the CLI without root's file-permission override here: {error}")
    finally:
        (src / what).chmod(0o755)
    assert_one_error_line(result.returncode, result.stderr, match)
    assert str(src) in result.stderr
    assert not list(work.iterdir())


def test_trainer_checkpoint_with_training_args_converts(pythia, tmp_path, capsys):
    """A Trainer checkpoint folder holds pickled `training_args.bin` (not weights-only loadable) beside
    the weights; only the weight files are read."""
    src = copy_of(pythia, tmp_path / "src")
    as_bin(src)
    (src / "training_args.bin").write_bytes(b"\x80\x04\x95not a state dict")
    code = main([str(src), "--loops", "2", "-o", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_non_finite_source_weights_warn_and_convert(pythia, tmp_path, capsys):
    src = copy_of(pythia, tmp_path / "src")
    state = load_file(src / "model.safetensors")
    state["gpt_neox.layers.5.mlp.dense_4h_to_h.weight"][0, 0] = float("nan")
    state["gpt_neox.layers.7.attention.dense.weight"][1, 1] = float("inf")
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    # The average tie passes core layers 3..6 through memory, and bfloat16 casts the coda layer 7.
    code = main([str(src), "--loops", "2", "--tie", "average", "--dtype", "bfloat16", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, err
    assert "NaN or inf" in warnings[0]
    assert "gpt_neox.layers.5.mlp.dense_4h_to_h.weight" in warnings[0]
    assert "gpt_neox.layers.7.attention.dense.weight" in warnings[0]


def test_non_finite_weights_that_are_copied_byte_for_byte_warn_too(pythia, tmp_path, capsys):
    """In the output dtype, a prelude or coda layer is copied file to file without being read: its
    NaN was converted without the warning."""
    src = copy_of(pythia, tmp_path / "src")
    state = load_file(src / "model.safetensors")
    state["gpt_neox.layers.7.attention.dense.weight"][1, 1] = float("nan")
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    code = main([str(src), "--loops", "2", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert code == 0 and len(warnings) == 1 and "gpt_neox.layers.7.attention.dense.weight" in warnings[0], err


def test_a_hub_cache_snapshot_named_as_a_folder_converts(pythia, tmp_path, capsys):
    """In the Hub cache, a snapshot's files are links into the repo's `blobs` folder: naming that
    snapshot folder as a local checkpoint is not a link out of the checkpoint."""
    repo = tmp_path / "models--someone--tiny"
    (repo / "snapshots").mkdir(parents=True)
    snapshot = copy_of(pythia, repo / "snapshots" / "0123abc")
    (repo / "blobs").mkdir()
    (repo / "blobs" / "f00d").write_text('{"model_max_length": 64}')
    (snapshot / "tokenizer_config.json").symlink_to("../../blobs/f00d")
    code = main([str(snapshot), "--loops", "2", "-o", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'
