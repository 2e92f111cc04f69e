"""A training run trusts nothing it did not write: a checkpoint's pickles are loaded as data only
(a planted payload never runs, and is refused), a damaged checkpoint is passed over for the
previous one, the run keeps clear of its inputs, and two runs never share an output_dir."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from helpers import (
    SUBPROCESS_ENV,
    Payload,
    char_tokenizer,
    invoke,
    metrics,
    recipe,
    tiny_converted,
    write_recipe,
    write_text,
)
from mesh_convert.errors import UserError
from mesh_convert.train.checkpoint import STATE_FILE, checkpoint_problem
from mesh_convert.train.loop import train
from mesh_convert.train.recipe import Recipe, recipe_yaml


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny converted model, its data, and a finished run with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("run-safety")
    tokenizer = char_tokenizer(root / "tokenizer")
    work = {"root": root, "model": tiny_converted(root / "mesh", tokenizer), "text": write_text(root / "train.txt", lines=100)}
    work["settings"] = dict(train={"max_steps": 6}, checkpoint={"every": 2, "keep_last": 2})
    train(Recipe.model_validate(recipe(work["model"], work["text"], root / "run", **work["settings"])))
    work["checkpoints"] = root / "run" / "checkpoints"
    return work


def run_copy(work, tmp_path: Path) -> Path:
    """A copy of the finished run, rewound to its step-4 checkpoint (metrics and export removed)."""
    run = tmp_path / "run"
    shutil.copytree(work["root"] / "run", run, symlinks=True)
    shutil.rmtree(run / "model")
    return run


def pickled_files(checkpoint: Path) -> list[Path]:
    return sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.suffix not in (".safetensors", ".json"))


def test_a_checkpoint_holds_our_state_as_json_and_pickles_only_what_accelerate_saves(work):
    newest = work["checkpoints"] / "step-00000004"
    assert json.loads((newest / STATE_FILE).read_text()) == {"step": 4, "tokens": 4 * 4 * 32}
    assert [p.name for p in pickled_files(newest)] == ["optimizer.bin", "random_states_0.pkl"]


@pytest.mark.parametrize("form", ["torch.save", "plain pickle"])
@pytest.mark.parametrize("planted", ["optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl", "pytorch_model.bin"])
def test_a_payload_planted_in_any_pickle_of_a_checkpoint_never_runs(work, tmp_path, capsys, planted, form):
    """Each pickle a checkpoint holds (and the registered-object file Accelerate would unpickle with
    code allowed, and a model's .bin), replaced by a payload in torch's zip format or as a plain
    pickle: resuming refuses in one line naming the file, does not pass over the tampered
    checkpoint for an older one in silence, and the payload never runs."""
    run = run_copy(work, tmp_path)
    marker = tmp_path / "ran"
    tampered = run / "checkpoints" / "step-00000004" / planted
    if form == "torch.save":
        torch.save(Payload(marker), tampered)
    else:  # not a zip archive: torch cannot memory-map it, which must not make it "damaged"
        tampered.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    for resume, output in (("auto", run), (str(tampered.parent), tmp_path / "elsewhere")):
        data = recipe(work["model"], work["text"], output, **work["settings"])
        data["checkpoint"]["resume"] = resume
        code, _, err = invoke(capsys, "train", write_recipe(tmp_path / "r.yaml", data))
        assert not marker.exists(), "the payload ran"
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        assert f"{tampered} holds pickled code (" in " ".join(err.split()) and "posix.system" in err, err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before and not (tmp_path / "elsewhere").exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in one process, as meant
def test_a_payload_in_a_distributed_checkpoint_is_refused_unread(tmp_path):
    """FSDP's sharded state (torch.distributed.checkpoint) is unpickled by torch with code allowed:
    its index and its non-tensor entries are checked as data first."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "ran"
    for case, entry in (("clean", {"step": 3}), ("payload", Payload(marker))):
        checkpoint = tmp_path / case
        checkpoint.mkdir()
        (checkpoint / STATE_FILE).write_text(json.dumps({"step": 2, "tokens": 8}))
        dcp.save({"weight": torch.ones(2), "extra": entry}, checkpoint_id=checkpoint / "pytorch_model_fsdp_0")
    assert checkpoint_problem(tmp_path / "clean") is None
    with pytest.raises(UserError, match="__0_0.distcp holds pickled code|holds pickled code .*posix.system"):
        checkpoint_problem(tmp_path / "payload")
    assert not marker.exists()
    metadata = tmp_path / "clean" / "pytorch_model_fsdp_0" / ".metadata"
    metadata.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UserError, match=r"\.metadata holds pickled code \(it references posix.system"):
        checkpoint_problem(tmp_path / "clean")
    assert not marker.exists()


def test_a_truncated_random_state_is_passed_over_with_a_warning(work, tmp_path, capsys):
    """Accelerate resumes without a random state it cannot read and says nothing: the checkpoint
    is damaged, so the previous one is used, and the user is told."""
    run = run_copy(work, tmp_path)
    state = run / "checkpoints" / "step-00000004" / "random_states_0.pkl"
    state.write_bytes(state.read_bytes()[:100])
    code, _, err = invoke(capsys, "train", write_recipe(tmp_path / "r.yaml", recipe(work["model"], work["text"], run, **work["settings"])))
    assert code == 0, err
    assert "warning:" in err and "random_states_0.pkl does not load as data" in err and "step-00000002" in err, err


def test_when_no_checkpoint_loads_the_run_says_so_and_changes_nothing(work, tmp_path, capsys):
    run = run_copy(work, tmp_path)
    for checkpoint in (run / "checkpoints").iterdir():
        (checkpoint / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    code, _, err = invoke(capsys, "train", write_recipe(tmp_path / "r.yaml", recipe(work["model"], work["text"], run, **work["settings"])))
    assert code == 1 and "no checkpoint in" in err and "model.safetensors does not load as data" in err, err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_a_checkpoint_of_an_earlier_version_resumes_without_unpickling_code(work, tmp_path, capsys):
    """Earlier versions kept the step in Accelerate's registered-object pickle: it is read as data,
    and hidden from Accelerate, which would unpickle it with code allowed."""
    run = run_copy(work, tmp_path)
    for checkpoint in (run / "checkpoints").iterdir():
        state = json.loads((checkpoint / STATE_FILE).read_text())
        (checkpoint / STATE_FILE).unlink()
        torch.save(state, checkpoint / "custom_checkpoint_0.pkl")
    code, _, err = invoke(capsys, "train", write_recipe(tmp_path / "r.yaml", recipe(work["model"], work["text"], run, **work["settings"])))
    assert code == 0, err
    assert "was written by an earlier mesh-convert, which ordered the data otherwise" in " ".join(err.split()), err
    reference = metrics(work["root"] / "run")
    assert [r["loss"] for r in metrics(run)] == pytest.approx([r["loss"] for r in reference], rel=1e-6)


@pytest.mark.parametrize(
    "layout, wanted",
    [
        ({"model": "run/model"}, "the input model {run}/model is where the run writes its model"),
        ({"recipe": "run/recipe.yaml"}, "the input recipe {run}/recipe.yaml is where the run writes its recipe.yaml"),
        ({"data": "run/checkpoints/train.txt"}, "the input data.train {run}/checkpoints/train.txt is where the run writes"),
        ({"output": "mesh/run"}, "output_dir {tmp}/mesh/run is inside the input model {tmp}/mesh"),
        ({"output": "mesh"}, "output_dir {tmp}/mesh is the input model {tmp}/mesh"),
    ],
)
def test_an_output_that_meets_an_input_is_refused_even_with_overwrite(work, tmp_path, capsys, layout, wanted):
    """`output_dir: .` beside the user's ./model and ./recipe.yaml drew "use --overwrite", which then
    replaced them: where the run would write over an input, no flag makes it safe."""
    model = tmp_path / "mesh"
    shutil.copytree(work["model"], model)
    run = tmp_path / layout.get("output", "run")
    if "model" in layout:
        shutil.copytree(work["model"], tmp_path / layout["model"])
        model = tmp_path / layout["model"]
    text = work["text"]
    if "data" in layout:
        (tmp_path / layout["data"]).parent.mkdir(parents=True)
        text = shutil.copy(work["text"], tmp_path / layout["data"])
    path = tmp_path / layout.get("recipe", "r.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_recipe(path, recipe(model, text, run, train={"max_steps": 1}))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    for flags in ([], ["--overwrite"]):
        code, _, err = invoke(capsys, "train", path, *flags)
        assert code == 1 and wanted.format(run=run, tmp=tmp_path) in " ".join(err.split()), err
        assert "--overwrite" not in err
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_the_runs_own_recipe_given_again_resumes_the_run(work, tmp_path, capsys):
    run = run_copy(work, tmp_path)
    own = Recipe.model_validate(recipe(work["model"], work["text"], run, **work["settings"]))
    (run / "recipe.yaml").write_text(recipe_yaml(own))  # as the run wrote it, naming this copy
    code, _, err = invoke(capsys, "train", run / "recipe.yaml")
    assert code == 0, err
    code, _, err = invoke(capsys, "train", run / "recipe.yaml", "train.max_steps=8")
    assert code == 1 and "is where the run writes its recipe.yaml" in err, err


def test_resuming_a_foreign_checkpoint_into_an_earlier_run_needs_overwrite(work, tmp_path, capsys):
    """checkpoint.resume=PATH skipped the occupied-output check, and its export replaced the
    earlier run's model without --overwrite."""
    run = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", recipe(work["model"], work["text"], run, train={"max_steps": 2}))
    assert invoke(capsys, "train", path)[0] == 0
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    foreign = f"checkpoint.resume={work['checkpoints'] / 'step-00000004'}"
    code, _, err = invoke(capsys, "train", path, foreign, "train.max_steps=6")
    assert code == 1 and "already holds a run, which resuming from" in err and "--overwrite" in err, err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    code, _, err = invoke(capsys, "train", path, foreign, "train.max_steps=6", "--overwrite")
    assert code == 0 and [r["step"] for r in metrics(run)] == [5, 6], err


def test_a_second_run_into_the_same_output_dir_is_refused_while_the_first_runs(work, tmp_path, capsys):
    run = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", recipe(work["model"], work["text"], run, train={"max_steps": 3}))
    first = textwrap.dedent("""
        import sys, time
        from mesh_convert.train.recipe import load_recipe
        from mesh_convert.train.loop import train

        def hold(step, record):  # wait at step 2 until told to go on
            while step == 2 and not open(sys.argv[2]).read():
                time.sleep(0.1)

        train(load_recipe(sys.argv[1]), on_step=hold)
    """)
    go = tmp_path / "go"
    go.write_text("")
    process = subprocess.Popen([sys.executable, "-c", first, str(path), str(go)], env={**os.environ, **SUBPROCESS_ENV},
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not ((run / "metrics.jsonl").is_file() and metrics(run)[-1:] and metrics(run)[-1]["step"] == 2):
            assert process.poll() is None and time.time() < deadline, process.stderr.read()[-2000:]
            time.sleep(0.1)
        for flags in ([], ["--overwrite"]):
            code, _, err = invoke(capsys, "train", path, *flags)
            assert code == 1 and "is in use by another training run" in err, err
    finally:
        go.write_text("go")
        assert process.wait(timeout=240) == 0, process.stderr.read()[-2000:]
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "model", "recipe.yaml"]


def test_a_read_only_output_location_is_one_line(work, tmp_path, capsys):
    """A folder the user cannot write to (for root, who can write anywhere else: sysfs)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):
        locked = Path("/sys")
        if not locked.is_dir():
            pytest.skip("running as root, and there is no sysfs to be refused by")
    path = write_recipe(tmp_path / "r.yaml", recipe(work["model"], work["text"], locked / "run", train={"max_steps": 1}))
    code, _, err = invoke(capsys, "train", path)
    assert code == 1 and f"cannot create output_dir {locked / 'run'}" in err, err
    assert len(err.strip().splitlines()) == 1


def test_a_failed_run_into_a_new_folder_leaves_nothing(work, tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", recipe(work["model"], work["text"], tmp_path / "run", train={"max_steps": 1}))
    code, _, err = invoke(capsys, "train", path, "data.block_size=100000")
    assert code == 1 and not (tmp_path / "run").exists(), err


def test_a_stop_while_a_checkpoint_is_saved_leaves_no_half_of_it(work, tmp_path, monkeypatch):
    from accelerate import Accelerator

    def stopped(self, folder, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        Path(folder, "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Accelerator, "save_state", stopped)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(Recipe.model_validate(recipe(work["model"], work["text"], out, **work["settings"])))
    assert list((out / "checkpoints").iterdir()) == []
