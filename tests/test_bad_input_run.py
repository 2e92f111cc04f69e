"""Bad input to the training, eval, diagnose, inspect and init commands, through the CLI's entry
point: each ends with exit 1 and one `error:` line, no traceback, and nothing written."""

import json
import math
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from mesh_convert.cli import main
from helpers import assert_one_error_line, char_tokenizer, recipe, tiny_converted, write_recipe, write_text


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    """A converted tiny model and its data, a recipe training it, and hostile companions."""
    root = tmp_path_factory.mktemp("bad-input")
    tokenizer = char_tokenizer(root / "tokenizer")
    text = write_text(root / "train.txt")
    model = tiny_converted(root / "mesh", tokenizer)

    truncated = root / "truncated"
    shutil.copytree(model, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    # Ids 0..299 are filler, so every character has an id past the tiny models' 128 embeddings.
    vocab = {"<eos>": 0, **{f"<filler-{i}>": i + 1 for i in range(299)}, "<unk>": 300}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    large = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=large, eos_token="<eos>").save_pretrained(root / "large-tokenizer")

    good = json.dumps({"text": "the king said to my lord good sir come go now here there"})
    for name, value in (("number", 5), ("null", None), ("list", ["a"])):
        (root / f"{name}.jsonl").write_text("\n".join([good] * 20 + [json.dumps({"text": value})] + [good] * 20) + "\n")
    pq.write_table(pa.table({"text": list(range(400))}), root / "numbers.parquet")

    lacking = root / "lacking"  # a checkpoint without one of its weights (transformers would fill it at random)
    shutil.copytree(model, lacking)
    weights = load_file(lacking / "model.safetensors")
    save_file({name: tensor for name, tensor in weights.items() if "final_norm" not in name},
              lacking / "model.safetensors", metadata={"format": "pt"})

    (root / "a-file").write_text("not a directory\n")
    return {"root": root, "tokenizer": tokenizer, "text": text, "model": model, "truncated": truncated}


def run(argv: list[str], capfd) -> tuple[int, str, str]:
    capfd.readouterr()
    code = main(argv)
    out, err = capfd.readouterr()
    return code, out, err


def files_under(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def train_argv(work, tmp_path, *overrides: str) -> list[str]:
    path = write_recipe(tmp_path / "recipe.yaml", recipe(work["model"], work["text"], tmp_path / "run"))
    return ["train", str(path), *overrides]


# (case, overrides of the training recipe, words the error must contain). Each of these used to
# crash as an internal error after --dry-run accepted it, or to train on without a word.
TRAINING = [
    ("betas above 1", ["optim.betas=[2,3]"], ["optim.betas"]),
    ("negative eps", ["optim.eps=-1"], ["optim.eps"]),
    ("negative seed", ["seed=-1"], ["seed"]),
    ("seed past 32 bits", ["seed=4294967296"], ["seed"]),
    ("infinite lr", ["optim.lr=inf"], ["optim.lr", "finite"]),
    ("lr past float32 arithmetic", ["optim.lr=1e39"], ["optim.lr", "less than or equal"]),
    ("output_dir is a file", ["output_dir={root}/a-file"], ["output_dir", "a-file", "is a file"]),
    ("output_dir inside a file", ["output_dir={root}/a-file/run"], ["output_dir", "which is a file"]),
    ("tokenizer past the vocabulary", ["tokenizer={root}/large-tokenizer"], ["token id", "128 embeddings", "tokenizer"]),
    ("JSONL number", ["data.train=[{root}/number.jsonl]"], ["number.jsonl line 21", "int", "not a string"]),
    ("JSONL null", ["data.train=[{root}/null.jsonl]"], ["null.jsonl line 21", "null"]),
    ("JSONL list", ["data.train=[{root}/list.jsonl]"], ["list.jsonl line 21", "list"]),
    ("parquet of numbers", ["data.train=[{root}/numbers.parquet]"], ["numbers.parquet", "'text'", "not strings"]),
]


# --dry-run reads neither the tokenizer nor the data, so only the other cases run with it too.
TRAINING_RUNS = [
    pytest.param(overrides, needles, dry_run, id=f"{name}{' --dry-run' if dry_run else ''}")
    for name, overrides, needles in TRAINING
    for dry_run in ((False,) if any(o.startswith(("tokenizer=", "data.train=")) for o in overrides) else (False, True))
]


@pytest.mark.parametrize(("overrides", "needles", "dry_run"), TRAINING_RUNS)
def test_bad_training_input_is_one_line(work, tmp_path, capfd, monkeypatch, overrides, needles, dry_run):
    monkeypatch.chdir(tmp_path)
    argv = train_argv(work, tmp_path, *(o.format(root=work["root"]) for o in overrides)) + (["--dry-run"] if dry_run else [])
    before = files_under(tmp_path), files_under(work["root"])
    code, _, err = run(argv, capfd)
    assert_one_error_line(code, err, *needles)
    assert (files_under(tmp_path), files_under(work["root"])) == before


def test_a_tracker_that_is_not_installed_is_refused_up_front(work, tmp_path, capfd, monkeypatch):
    from accelerate.utils import is_wandb_available

    if is_wandb_available():
        pytest.skip("wandb is installed here")
    monkeypatch.chdir(tmp_path)
    code, _, err = run(train_argv(work, tmp_path, "trackers=[wandb]"), capfd)
    assert_one_error_line(code, err, "wandb", "not installed")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("lr", "what", "checkpoints"),
    [("1e6", "the loss is nan at step 2", ["step-00000001"]),  # finite weights after step 1, a NaN loss after
     ("1e3", "the weights hold NaN or inf after step 2", ["step-00000001"])],  # caught before checkpoint 2
)
def test_a_diverging_run_stops_and_exports_nothing(work, tmp_path, capfd, monkeypatch, lr, what, checkpoints):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(train_argv(work, tmp_path, f"optim.lr={lr}", "checkpoint.every=1"), capfd)
    assert code == 1 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training diverged" in errors[0] and what in errors[0], err
    run_dir = tmp_path / "run"
    assert not (run_dir / "model").exists()
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(record["loss"]) for record in logged)
    # No checkpoint of broken weights is written; the newest one kept is named in the message.
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir()) if (run_dir / "checkpoints").exists() else []
    assert saved == checkpoints
    assert (saved[-1] if saved else "no checkpoint was saved") in errors[0]


def test_the_readme_token_budget_1e8_is_read_as_a_number(work, tmp_path, capfd):
    code, out, err = run(train_argv(work, tmp_path, "train.max_tokens=1e8", "train.max_steps=null", "--dry-run"), capfd)
    assert code == 0, err
    assert "max_tokens: 100000000" in out and "100,000,000" in out
    code, _, err = run(train_argv(work, tmp_path, "train.max_tokens=2.5e6", "train.max_steps=null", "--dry-run"), capfd)
    assert code == 0, err
    code, _, err = run(train_argv(work, tmp_path, "train.max_steps=1.5", "--dry-run"), capfd)
    assert_one_error_line(code, err, "train.max_steps", "fractional")


# (case, argv with {root} and {out} filled in, words the error must contain)
COMMANDS = [
    ("eval of a model that lacks a weight", ["eval", "{root}/lacking", "--data", "{root}/train.txt"],
     ["lacks weights its config needs", "model.final_norm"]),
    ("eval on the meta device", ["eval", "{root}/mesh", "--data", "{root}/train.txt", "--device", "meta"],
     ["device 'meta' holds no numbers"]),
    ("inspect on the meta device", ["inspect", "{root}/mesh", "--device", "meta", "--output", "{out}"],
     ["device 'meta' holds no numbers"]),
    ("diagnose on a GPU this machine lacks", ["diagnose", "{root}/mesh", "--data", "{root}/train.txt", "--device", "cuda:99",
                                              "--output", "{out}"], ["device 'cuda:99' requested but"]),
    ("eval of a truncated shard", ["eval", "{root}/truncated", "--data", "{root}/train.txt"], ["truncated", "model.safetensors"]),
    ("diagnose of a truncated shard", ["diagnose", "{root}/truncated", "--data", "{root}/train.txt", "--output", "{out}"],
     ["truncated", "model.safetensors"]),
    ("inspect of a truncated shard", ["inspect", "{root}/truncated", "--output", "{out}"], ["truncated", "model.safetensors"]),
    ("diagnose --output a file", ["diagnose", "{root}/mesh", "--data", "{root}/train.txt", "--output", "{root}/a-file"],
     ["--output", "is a file"]),
    ("inspect --output a file", ["inspect", "{root}/mesh", "--output", "{root}/a-file"], ["--output", "is a file"]),
    ("init --output a file", ["init", "custom", "--layers", "4", "--hidden", "32", "--heads", "4", "-o", "{root}/a-file"],
     ["--output", "is a file"]),
    ("init --layers 0", ["init", "custom", "--layers", "0", "--hidden", "32", "--heads", "4", "-o", "{out}"], ["num_layers"]),
    ("init with more layers than planned for", ["init", "custom", "--layers", "100000", "--hidden", "32", "--heads", "4",
                                                 "-o", "{out}"], ["num_layers", "less than or equal to 1024"]),
    ("init too large for memory", ["init", "custom", "--layers", "4", "--hidden", "400000", "--heads", "4", "-o", "{out}"],
     ["GiB in float32, more than the", "of memory available here"]),
    ("diagnose --threshold nan", ["diagnose", "{root}/mesh", "--data", "{root}/train.txt", "--threshold", "nan", "--output", "{out}"],
     ["--threshold", "nan"]),
    ("diagnose --threshold 1e10", ["diagnose", "{root}/mesh", "--data", "{root}/train.txt", "--threshold", "1e10", "--output", "{out}"],
     ["--threshold", "between"]),
]


@pytest.mark.parametrize(("argv", "needles"), [case[1:] for case in COMMANDS], ids=[case[0] for case in COMMANDS])
def test_bad_command_input_is_one_line(work, tmp_path, capfd, monkeypatch, argv, needles):
    monkeypatch.chdir(tmp_path)
    before = files_under(work["root"])
    code, _, err = run([arg.format(root=work["root"], out=tmp_path / "out") for arg in argv], capfd)
    assert_one_error_line(code, err, *needles)
    assert "pydantic.dev" not in err
    assert files_under(tmp_path) == set() and files_under(work["root"]) == before


def test_inspect_probes_no_further_than_the_models_context(work, tmp_path, capfd):
    out = tmp_path / "out"
    code, _, err = run(["inspect", str(work["model"]), "--data", str(work["text"]), "--seq-len", "1000",
                        "--samples", "2", "--output", str(out), "--json"], capfd)
    assert code == 0, err
    assert "--seq-len 1000 is above the model's context" in err
    routers = json.loads((out / "inspect.json").read_text())["routers"]
    assert routers["tokens"] == 2 * 64 and "2 x 64 tokens" in routers["source"]


@pytest.mark.parametrize("fault", [RuntimeError, ValueError, ZeroDivisionError])
@pytest.mark.parametrize("command", ["eval", "train"])
def test_a_fault_of_ours_while_loading_is_an_internal_error_not_the_users(work, tmp_path, capfd, monkeypatch, fault, command):
    """A bug in the model's memory module, met while loading a good checkpoint, is ours: `internal
    error` with exit 2, and --debug shows the frame that raised it (it said "cannot load the model")."""
    from mesh_convert.modeling.modeling_mesh import MeshMemory

    def broken(self, *args, **kwargs):
        raise fault("injected fault in MeshMemory")

    monkeypatch.setattr(MeshMemory, "__init__", broken)
    monkeypatch.chdir(tmp_path)
    path = write_recipe(tmp_path / "r.yaml", recipe(work["model"], work["text"], tmp_path / "run", train={"max_steps": 1}))
    argv = ["eval", str(work["model"]), "--data", str(work["text"])] if command == "eval" else ["train", str(path)]
    code, _, err = run(argv, capfd)
    assert code == 2 and "internal error:" in err and "injected fault" in err and "cannot load" not in err, err
    with pytest.raises(fault, match="injected fault"):
        main(["--debug", *argv])
    assert files_under(tmp_path) == {path}


def test_weights_that_do_not_fit_their_config_are_still_the_users(work, tmp_path, capfd):
    other = tiny_converted(tmp_path / "wide", char_tokenizer(tmp_path / "tok"), loops=3)
    mixed = tmp_path / "mixed"
    shutil.copytree(work["model"], mixed)
    shutil.copy(other / "model.safetensors", mixed / "model.safetensors")
    code, _, err = run(["eval", str(mixed), "--data", str(work["text"])], capfd)
    assert_one_error_line(code, err, "cannot load the model", "RuntimeError")


def test_a_refused_load_shows_only_its_line_not_transformers_report(work, tmp_path):
    """In a process of its own, as a user runs it: transformers printed its load report (a table of
    the missing weights) above the error line."""
    import subprocess
    import sys

    from helpers import SUBPROCESS_ENV

    result = subprocess.run([sys.executable, "-m", "mesh_convert", "eval", str(work["root"] / "lacking"), "--data",
                             str(work["text"])], capture_output=True, text=True, timeout=300,
                            env={**SUBPROCESS_ENV, "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: the model in") and "lacks weights its config needs" in result.stderr
