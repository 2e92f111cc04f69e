"""The converter: exactness, the layer maps, streaming, output layout, and every bad input."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPTNeoXForCausalLM

from conftest import make_tiny_pythia
from helpers import invoke
from mesh_convert.convert import conversion as convert_module
from mesh_convert.convert import shards as shards_module
from mesh_convert.cli import main
from mesh_convert.convert.conversion import convert_model
from mesh_convert.convert.plan import layer_map, shared_sources
from mesh_convert.layout import Layout, resolve_layout
from mesh_convert.convert.source import cache_snapshot


def logits_of(path: Path, x: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(x).logits


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "tiny-pythia"
    model = make_tiny_pythia(path)
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return path, model, x, model(x).logits


# --- exactness ---------------------------------------------------------------------------


@pytest.mark.parametrize("tie", ["average", "stepwise", "lower", "upper"])
@pytest.mark.parametrize("loops", [2, 3])
def test_full_relaxation_reproduces_the_original(source, tmp_path, capsys, tie, loops):
    path, _, x, expected = source
    for variant in ("mesh", "base"):
        out = tmp_path / variant
        code, _, err = invoke(
            capsys, path, "--loops", loops, "--tie", tie, "--relax-rank", "full", "--variant", variant,
            "--router-gap", 40, "-o", out,
        )
        assert code == 0, err
        torch.testing.assert_close(logits_of(out, x), expected, atol=1e-4, rtol=0)


def test_one_loop_with_a_large_gap_is_exact(source, tmp_path, capsys):
    path, _, x, expected = source
    code, _, err = invoke(capsys, path, "--loops", 1, "--router-gap", 40, "-o", tmp_path / "k1")
    assert code == 0, err
    torch.testing.assert_close(logits_of(tmp_path / "k1", x), expected, atol=1e-4, rtol=0)


def test_tying_without_relaxation_changes_the_function_and_rank_interpolates(source):
    _, model, x, expected = source
    errors = {}
    for rank in (0, 4, 16, "full"):
        svd = {"relax_init": "svd"} if rank else {}
        converted = convert_model(model, loops=2, tie="average", relax_rank=rank, router_gap=40, **svd)
        errors[rank] = (converted(x).logits - expected).abs().max().item()
    assert errors[0] > 1e-2  # tying really ties
    assert errors[0] > errors[4] > errors[16] > errors["full"]
    assert errors["full"] < 1e-4


def test_low_rank_deltas_are_the_truncated_svd(source):
    _, model, _, _ = source
    rank = 3
    converted = convert_model(model, loops=2, relax_rank=rank, relax_init="svd")
    layer = converted.model.core[0].attention.dense
    original = model.gpt_neox.layers[1 + 1 * 3 + 0].attention.dense.weight  # loop 1 of core 0 in 1+3R2+1
    delta = (original - layer.weight).detach()
    best = torch.linalg.svd(delta)
    truncated = best.U[:, :rank] @ torch.diag(best.S[:rank]) @ best.Vh[:rank]
    produced = layer.weight_delta_out[1] @ layer.weight_delta_in[1]
    torch.testing.assert_close(produced, truncated, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("rank", [4, "full"])
def test_a_zero_start_relaxation_is_the_tie_until_its_deltas_learn(source, rank):
    _, model, x, _ = source
    tie = convert_model(model, loops=2)
    relaxed = convert_model(model, loops=2, relax_rank=rank, relax_init="zero")
    torch.testing.assert_close(relaxed(x).logits, tie(x).logits, atol=0, rtol=0)
    relaxed(x, labels=x).loss.backward()
    grads = {name: param.grad for name, param in relaxed.named_parameters() if "_delta" in name}
    assert grads and all(grad is not None for grad in grads.values())
    # The factors that start at zero get a gradient: they move in the first step.
    learning = [name for name, grad in grads.items() if name.endswith(("weight_delta_out", "weight_delta"))]
    assert learning and all(grads[name].abs().sum() > 0 for name in learning)


@pytest.mark.parametrize(
    "flags, started",
    [
        ([4], "zero"),  # the default for a rank N: it healed better than the SVD start (BENCHMARKS.md)
        ([4, "--relax-init", "svd"], "svd"),
        (["full"], "svd"),  # the default for full: the original layers themselves
        (["full", "--relax-init", "zero"], "zero"),
    ],
)
def test_the_record_and_card_say_how_the_deltas_started(source, tmp_path, capsys, flags, started):
    path, _, _, _ = source
    code, out, err = invoke(capsys, path, "--loops", 2, "--relax-rank", *flags, "-o", tmp_path / "z")
    assert code == 0, err
    rank = flags[0]
    assert f"{rank} ({started} start)" in out
    assert json.loads((tmp_path / "z" / "conversion.json").read_text())["relax_init"] == started
    assert f"- relaxation rank: `{rank} ({started} start)`" in (tmp_path / "z" / "README.md").read_text()


# --- plans and layer maps ----------------------------------------------------------------


def test_layer_map_of_each_tie_strategy():
    layout = Layout(4, 8, 2, 4)  # pythia-1.4b / 410m K=2
    assert shared_sources(layout, "average")[0] == [4, 12]
    assert shared_sources(layout, "lower") == [[4 + i] for i in range(8)]
    assert shared_sources(layout, "upper") == [[12 + i] for i in range(8)]
    # round(linspace(4, 19, 8)) = 4, 6.14, 8.29, 10.43, 12.57, 14.71, 16.86, 19
    assert shared_sources(layout, "stepwise") == [[4], [6], [8], [10], [13], [15], [17], [19]]
    mapping = layer_map(layout, "average")
    assert mapping["prelude"] == [[0], [1], [2], [3]]
    assert mapping["coda"] == [[20], [21], [22], [23]]
    assert mapping["core"] == [[4 + i, 12 + i] for i in range(8)]


def test_layout_options_and_their_errors():
    assert resolve_layout(24, 3).text == "3+6R3+3"
    assert resolve_layout(24, 2, prelude=2, coda=2).text == "2+10R2+2"
    assert resolve_layout(12, 2, prelude=4).text == "4+2R2+4"
    with pytest.raises(ValueError, match="--prelude 3 --coda 3 .*these would: .*4\\+4R4\\+4"):
        resolve_layout(24, 4, prelude=3, coda=3)
    with pytest.raises(ValueError, match="too few"):
        resolve_layout(2, 2)


def test_dry_run_json_for_pythia_1_4b_offline(capsys):
    code, out, err = invoke(capsys, "pythia-1.4b", "--loops", 2, "--dry-run", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["layout"] == "4+8R2+4"
    assert plan["params"]["original_nonembedding"] == 1_208_602_624
    assert plan["params"]["converted_nonembedding"] == 805_736_448
    assert plan["params"]["routers"] == 61_470
    assert plan["params"]["relax"] == 0
    # Routers and deltas are parameters the converted model keeps: the reduction counts them.
    assert plan["params"]["reduction"] == pytest.approx(1 - (805_736_448 + 61_470) / 1_208_602_624)


def test_the_users_command_line_works(capsys):
    code, out, err = invoke(capsys, "pythia-1.4b", "--loops", 3, "--dry-run")
    assert code == 0, err
    assert "3+6R3+3" in out and "1,208,602,624" in out
    assert re.search(r"core 0\s+│ 15\s+│ 3, 9, 15", out)  # the default upper tie: the last stand-in


def test_relaxation_is_counted(capsys):
    code, out, _ = invoke(capsys, "pythia-160m", "--loops", 2, "--relax-rank", 16, "--dry-run", "--json")
    plan = json.loads(out)
    D, K, C = 768, 2, 4
    per_layer = 16 * (D + 3 * D) + 16 * (D + D) + 16 * (D + 4 * D) + 16 * (4 * D + D)  # low-rank factors
    per_layer += 3 * D + D + 4 * D + D + 4 * D  # bias deltas and two norms' weight and bias deltas
    assert plan["params"]["relax"] == C * K * per_layer


# --- the written checkpoint --------------------------------------------------------------


@pytest.mark.parametrize(
    "options, copied_layers",
    [
        pytest.param({"relax_rank": 4, "relax_init": "svd"}, 2, id="svd-start"),  # copied prelude/coda, computed core
        pytest.param({"relax_rank": 4}, 5, id="zero-start"),  # the default for rank N: copies, new deltas
        pytest.param({"relax_rank": 0}, 5, id="copies"),  # every layer copied file to file
        pytest.param({"relax_rank": 0, "tie": "average"}, 2, id="average"),  # averaged core
        pytest.param({"relax_rank": 0, "dtype": "bfloat16"}, None, id="cast"),  # nothing copied as bytes
    ],
)
def test_streaming_output_equals_in_memory_conversion(source, tmp_path, capsys, monkeypatch, options, copied_layers):
    path, model, _, _ = source
    out = tmp_path / "streamed"
    copies = []  # tensors that went file to file without being read
    real_copy = shards_module._copy_bytes
    monkeypatch.setattr(shards_module, "_copy_bytes", lambda *args: copies.append(args) or real_copy(*args))
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]
    code, _, err = invoke(capsys, path, "--loops", 2, *flags, "--max-shard-size", "30KB", "-o", out)
    assert code == 0, err
    # 1+3R2+1: the embedding, head, final norm (2) and the unshared layers are copies, and the
    # core layers too when each is tied to one stand-in without deltas; a cast copies nothing.
    per_layer = len([name for name in model.state_dict() if name.startswith("gpt_neox.layers.0.")])
    assert len(copies) == (0 if copied_layers is None else 4 + copied_layers * per_layer)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3, "a small shard size must give several shards"
    in_memory = convert_model(model, loops=2, **options).state_dict()
    streamed = {}
    for shard in shards:
        with safe_open(out / shard, "pt") as handle:
            streamed.update({name: handle.get_tensor(name) for name in handle.keys()})
    assert streamed.keys() == in_memory.keys()
    for name, tensor in in_memory.items():
        torch.testing.assert_close(streamed[name], tensor, atol=0, rtol=0, msg=name)


def test_output_directory_contents(source, tmp_path, capsys):
    path, _, _, _ = source
    out = tmp_path / "out"
    code, _, err = invoke(capsys, path, "--loops", 2, "-o", out)
    assert code == 0, err
    for name in ("config.json", "generation_config.json", "model.safetensors", "configuration_mesh.py",
                 "modeling_mesh.py", "README.md", "conversion.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mesh.MeshForCausalLM"
    assert config["num_hidden_layers"] == 8 and config["num_loops"] == 2
    assert config["provenance"]["layer_map"]["core"] == [[4], [5], [6]]  # the default upper tie
    info = json.loads((out / "conversion.json").read_text())
    assert info["layout"] == "1+3R2+1" and info["tie"] == "upper"
    assert "--loops 2" in info["command"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging directory may remain"


def test_published_files_name_local_paths_by_their_folder(source, tmp_path, capsys):
    """config.json, conversion.json and the card go to the Hub with the weights: the user's absolute
    paths (home directory, project layout) must not be in them."""
    path, _, _, _ = source
    out = (tmp_path / "private-project" / "out").resolve()
    code, _, err = invoke(capsys, Path(path).resolve(), "--loops", 2, f"-o{out}")
    assert code == 0, err
    for name in ("config.json", "conversion.json", "README.md"):
        text = (out / name).read_text()
        assert str(Path(path).resolve()) not in text and "private-project" not in text, name
    info = json.loads((out / "conversion.json").read_text())
    assert info["source"]["model"] == Path(path).name and info["output"] == "out"
    assert info["command"] == f"mesh-convert {Path(path).name} --loops 2 -oout"


def test_a_snapshot_in_the_hub_cache_is_recorded_as_its_hub_id(source, tmp_path, capsys):
    """A checkpoint downloaded earlier and converted from the Hugging Face cache keeps its origin
    (id and revision: the card's base_model, the default learning rate of a Pythia size)."""
    path, _, _, _ = source
    snapshot = tmp_path / "hub" / "models--EleutherAI--pythia-14m" / "snapshots" / "0123abcd"
    shutil.copytree(path, snapshot)
    code, _, err = invoke(capsys, snapshot, "--loops", 2, "-o", tmp_path / "out")
    assert code == 0, err
    info = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert info["source"]["model"] == "EleutherAI/pythia-14m" and info["source"]["revision"] == "0123abcd"
    assert "base_model: EleutherAI/pythia-14m" in (tmp_path / "out" / "README.md").read_text()


def test_a_snapshot_in_the_hub_cache_names_the_default_output_after_the_model(source, tmp_path, capsys, monkeypatch):
    path, _, _, _ = source
    snapshot = tmp_path / "hub" / "models--EleutherAI--pythia-14m" / "snapshots" / "0123abcd"
    shutil.copytree(path, snapshot)
    monkeypatch.chdir(tmp_path)
    code, _, err = invoke(capsys, snapshot, "--loops", 2)
    assert code == 0, err
    out = tmp_path / "pythia-14m-mesh-1_3R2_1"  # not the revision's hash
    assert "\n# pythia-14m-mesh-1_3R2_1\n" in (out / "README.md").read_text()


@pytest.mark.parametrize("path, expected", [
    ("hub/models--EleutherAI--pythia-14m/snapshots/0123abcd", ("EleutherAI/pythia-14m", "0123abcd")),
    ("hub/models--gpt2/snapshots/0123abcd", ("gpt2", "0123abcd")),  # an id without namespace
    ("hub/datasets--someone--text/snapshots/0123abcd", None),
    ("hub/models--a--b--c/snapshots/0123abcd", None),  # no Hub id holds `--`
    ("hub/models--/snapshots/0123abcd", None),
    ("work/snapshots/0123abcd", None),
    ("work/pythia-14m", None),
])
def test_the_hub_cache_layout_is_recognised_in_one_place(path, expected):
    assert cache_snapshot(Path("/home/someone") / path) == expected


def test_bin_checkpoints_load_with_weights_only(source, tmp_path, capsys):
    path, model, x, _ = source
    bin_dir = tmp_path / "bin-src"
    _save_bin(model, bin_dir)
    assert not list(bin_dir.glob("*.safetensors"))
    code, _, err = invoke(capsys, bin_dir, "--loops", 2, "-o", tmp_path / "from-bin")
    assert code == 0, err
    invoke(capsys, path, "--loops", 2, "-o", tmp_path / "from-st")
    torch.testing.assert_close(logits_of(tmp_path / "from-bin", x), logits_of(tmp_path / "from-st", x))


def _save_bin(model: GPTNeoXForCausalLM, directory: Path) -> None:
    """A legacy pickled checkpoint, as older Pythia revisions ship (transformers 5 only writes safetensors)."""
    directory.mkdir(parents=True)
    model.config.save_pretrained(directory)
    state = {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in model.state_dict().items()}
    torch.save(state, directory / "pytorch_model.bin")


def test_real_gpt_neox_tokenizer_is_copied(shared_dir, source, tmp_path, capsys):
    path, _, _, _ = source
    src = tmp_path / "with-tokenizer"
    src.mkdir()
    for item in path.iterdir():
        (src / item.name).write_bytes(item.read_bytes())
    for item in (shared_dir / "tokenizers" / "gpt-neox-20b").iterdir():
        if item.name != "20B_tokenizer.json":
            (src / item.name).write_bytes(item.read_bytes())
    code, _, err = invoke(capsys, src, "--loops", 2, "-o", tmp_path / "out")
    assert code == 0, err
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer("Hello world")["input_ids"] == [12092, 1533]


# --- bad input: one line, non-zero exit, nothing left behind -------------------------------


def assert_clean_failure(code, out, err, workdir: Path, before: set, match: str):
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match.lower() in " ".join(err.split()).lower(), err
    assert set(workdir.iterdir()) == before, "a failed conversion must leave nothing behind"


def corrupt_copy(path: Path, tmp_path: Path, how: str) -> Path:
    target = tmp_path / f"src-{how}"
    target.mkdir()
    for item in path.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    weights = target / "model.safetensors"
    data = weights.read_bytes()
    if how == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "corrupt":
        weights.write_bytes(b"\xff" * 64 + data[64:])
    elif how == "no-weights":
        weights.unlink()
    elif how == "gpt2":
        (target / "config.json").write_text(GPT2Config(n_layer=8).to_json_string())
    elif how == "missing-tensor":
        from safetensors.torch import load_file, save_file

        tensors = load_file(weights)
        tensors.pop("gpt_neox.layers.5.mlp.dense_h_to_4h.weight")
        save_file(tensors, weights)
    return target


@pytest.mark.parametrize(
    "how,match",
    [
        ("truncated", "corrupt or truncated safetensors"),
        ("corrupt", "corrupt or truncated safetensors"),
        ("no-weights", "no weights found"),
        ("gpt2", "unsupported architecture 'gpt2'"),
        ("missing-tensor", "lacks tensor gpt_neox.layers.5.mlp.dense_h_to_4h.weight"),
    ],
)
def test_bad_checkpoints(source, tmp_path, capsys, how, match):
    path, _, _, _ = source
    bad = corrupt_copy(path, tmp_path, how)
    workdir = tmp_path / "work"
    workdir.mkdir()
    code, out, err = invoke(capsys, bad, "--loops", 2, "-o", workdir / "out")
    assert_clean_failure(code, out, err, workdir, set(), match)


@pytest.mark.parametrize(
    "args,match",
    [
        (["{tmp}/does-not-exist", "--loops", "2"], "no such checkpoint directory"),
        (["pythia-3b", "--loops", "2"], "unknown Pythia size '3b'"),
        (["pythia-14m-deduped", "--loops", "2"], "no deduplicated run"),
        (["{src}", "--loops", "4", "--prelude", "3", "--coda", "3"], "does not fit 8 layers"),
        (["{src}", "--loops", "2", "--relax-rank", "many"], "--relax-rank"),
        (["{src}", "--loops", "2", "--relax-init", "zero"], "--relax-init: zero needs deltas"),
        (["{src}", "--loops", "2", "--slots", "3"], "too few for 2 loops"),
        (["{src}", "--loops", "8"], "(set --prelude and --coda, 0 allowed, for another layout)"),
        (["{src}", "--loops", "2", "-o", "{file}/sub"], "which is a file: give a directory"),
    ],
)
def test_bad_options(source, tmp_path, capsys, args, match):
    path, _, _, _ = source
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    before = set(tmp_path.iterdir())
    filled = [arg.format(tmp=tmp_path, src=path, file=a_file) for arg in args]
    code, out, err = invoke(capsys, *filled)
    assert_clean_failure(code, out, err, tmp_path, before, match)


def test_existing_output_needs_overwrite(source, tmp_path, capsys):
    path, _, x, _ = source
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = invoke(capsys, path, "--loops", 2, "-o", out)
    assert code == 1 and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = invoke(capsys, path, "--loops", 2, "-o", out, "--overwrite")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_interrupted_conversion_leaves_nothing(source, tmp_path, capsys, monkeypatch):
    path, _, _, _ = source
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous result")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "write_metadata", interrupted)
    code, _, err = invoke(capsys, path, "--loops", 2, "-o", out, "--overwrite")
    assert code == 130 and "interrupted" in err
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["old.txt"], "the previous output must survive an interruption"


def test_console_script_reports_errors_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mesh_convert.cli", str(tmp_path / "nothing-here"), "--loops", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: no such checkpoint directory")
    assert "Traceback" not in result.stderr


def test_a_refused_conversion_writes_exactly_one_line_to_a_log(source, tmp_path):
    """stderr redirected to a file (a batch job's log): the refusal is the only line, with no
    blank line left by a progress display that never drew."""
    path, _, _, _ = source
    target = tmp_path / "full"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    result = subprocess.run(
        [sys.executable, "-m", "mesh_convert.cli", str(path), "--loops", "2", "-o", str(target)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: output directory {target} exists and is not empty (use --overwrite to replace it)"]


@pytest.mark.parametrize("args", [["pythia-160m"], ["pythia-160m", "--loops", "two"], ["pythia-160m", "--loops", "2", "--bogus"]])
def test_usage_errors_are_short(capsys, args):
    code, _, err = invoke(capsys, *args)
    assert code == 2
    assert "Traceback" not in err and "internal error" not in err
    assert err.strip().splitlines()[-1].startswith("Error:")


def test_debug_flag_goes_before_the_model(source, tmp_path, capsys):
    path, _, _, _ = source
    code, _, err = invoke(capsys, "--debug", path, "--loops", 2, "-o", tmp_path / "out")
    assert code == 0, err
    with pytest.raises(Exception, match="no such checkpoint directory"):
        main(["--debug", str(tmp_path / "missing"), "--loops", "2"])
