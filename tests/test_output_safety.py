"""Output safety (issue 14): nothing of the user's is replaced without --overwrite, never the input;
Ctrl-C, SIGTERM, SIGHUP or SIGKILL at any stage of publishing an output leave one of the two whole
states (the previous one or the new one), the report says which, and what a killed run leaves
behind is reclaimed by the next. Every command that writes a model directory is covered: convert,
init, merge (through the training export) and train."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub.utils import validate_repo_id
from transformers import AutoModelForCausalLM

from conftest import assert_loads_as_remote_code, make_tiny_pythia
from mesh_convert.convert import conversion as convert_module
from mesh_convert.artifacts import output as output_module
from mesh_convert.cli import main
from helpers import (
    SUBPROCESS_ENV,
    char_tokenizer,
    invoke,
    leftovers,
    metrics,
    recipe,
    snapshot,
    tiny_converted,
    write_text,
)

INIT = ["init", "custom", "--layers", "4", "--hidden", "32", "--heads", "4", "--vocab", "128", "--context", "64"]





@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("source") / "tiny-pythia"
    make_tiny_pythia(path, num_layers=4)
    return path


@pytest.fixture(scope="module")
def converted_names(source, tmp_path_factory) -> list[str]:
    """The files of one complete conversion, to tell a whole output from a partial one."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main([str(source), "-k", "2", "-o", str(out)]) == 0
    return sorted(p.name for p in out.iterdir())


def previous_result(out: Path) -> dict[str, str]:
    out.mkdir()
    (out / "previous.txt").write_text("the user's earlier result")
    return snapshot(out)


# ---------------------------------------------------------------------------------------------
# Refusals: the command ends with one `error:` line, exit 1, and the folder is as it was.
# ---------------------------------------------------------------------------------------------


def _setup_workdir(tmp: Path, monkeypatch) -> None:
    (tmp / "work").mkdir()
    (tmp / "work" / "notes.txt").write_text("the user's own files")
    monkeypatch.chdir(tmp / "work")


def _setup_full_folder(tmp: Path, monkeypatch) -> None:
    (tmp / "full").mkdir()
    (tmp / "full" / "keep.txt").write_text("mine")


def _setup_adapter(tmp: Path, monkeypatch) -> None:
    """An adapter's config naming its base, and weights (none): all that merge reads before it checks the output."""
    from safetensors.torch import save_file

    (tmp / "adapter").mkdir()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(tmp / "tiny-pythia"),
              "r": 4, "target_modules": ["query_key_value"]}
    (tmp / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    save_file({}, tmp / "adapter" / "adapter_model.safetensors")
    _setup_full_folder(tmp, monkeypatch)


def _setup_adapter_linking_out(tmp: Path, monkeypatch) -> None:
    """An adapter whose weight file is a link to a file outside it (planted in a received folder)."""
    _setup_adapter(tmp, monkeypatch)
    (tmp / "elsewhere.safetensors").write_bytes((tmp / "tiny-pythia" / "model.safetensors").read_bytes())
    (tmp / "adapter" / "adapter_model.safetensors").unlink()
    (tmp / "adapter" / "adapter_model.safetensors").symlink_to(tmp / "elsewhere.safetensors")


REFUSALS = [
    ("output is the source", ["{src}", "-k", "2", "-o", "{src}", "--overwrite"], None, "input"),
    ("output holds the source", ["{src}", "-k", "2", "-o", "{tmp}", "--overwrite"], None, "input"),
    ("output inside the source, overwriting", ["{src}", "-k", "2", "-o", "{src}/sub", "--overwrite"], None, "input"),
    ("output . is the working directory", ["{src}", "-k", "2", "-o", ".", "--overwrite"], _setup_workdir, "current directory"),
    ("init into a non-empty folder", [*INIT, "-o", "{tmp}/full"], _setup_full_folder, "--overwrite"),
    ("init whose tokenizer fails", [*INIT, "-o", "{tmp}/new", "--tokenizer", "{tmp}"], None, "tokenizer"),
    ("init over its own tokenizer", [*INIT, "-o", "{src}", "--tokenizer", "{src}", "--overwrite"], None, "input"),
    ("merge into a non-empty folder", ["merge", "{tmp}/adapter", "-o", "{tmp}/full"], _setup_adapter, "--overwrite"),
    ("merge over its adapter", ["merge", "{tmp}/adapter", "-o", "{tmp}/adapter", "--overwrite"], _setup_adapter, "input"),
    ("merge over its base", ["merge", "{tmp}/adapter", "-o", "{src}", "--overwrite"], _setup_adapter, "input"),
    ("merge an adapter linking out", ["merge", "{tmp}/adapter", "-o", "{tmp}/new"], _setup_adapter_linking_out,
     "adapter_model.safetensors is a link to"),
    ("convert into a name too long", ["{src}", "-k", "2", "-o", "{tmp}/" + "x" * 256], None, "256 bytes long"),
]


@pytest.mark.parametrize("case, args, setup, match", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refused_outputs_leave_everything_as_it_was(source, tmp_path, capsys, monkeypatch, case, args, setup, match):
    src = tmp_path / "tiny-pythia"
    shutil.copytree(source, src)
    if setup is not None:
        setup(tmp_path, monkeypatch)
    before = snapshot(tmp_path)
    code, _, err = invoke(capsys, *[a.format(src=src, tmp=tmp_path) for a in args])
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], err
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# Races, names, modes and links.
# ---------------------------------------------------------------------------------------------


def test_a_file_that_appears_in_the_target_meanwhile_is_kept(source, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    finish = convert_module.write_metadata

    def someone_writes_into_the_target(*args, **kwargs):
        finish(*args, **kwargs)
        out.mkdir()
        (out / "theirs.txt").write_text("written by another program meanwhile")

    monkeypatch.setattr(convert_module, "write_metadata", someone_writes_into_the_target)
    code, _, err = invoke(capsys, source, "-k", "2", "-o", out)
    assert code == 1 and "--overwrite" in err, err
    assert [p.name for p in out.iterdir()] == ["theirs.txt"] and not leftovers(tmp_path)


def test_of_two_conversions_to_one_output_the_second_is_refused(source, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    finish = convert_module.write_metadata

    def the_other_conversion_finishes_first(*args, **kwargs):
        finish(*args, **kwargs)
        monkeypatch.setattr(convert_module, "write_metadata", finish)
        assert main([str(source), "-k", "2", "--variant", "base", "-o", str(out)]) == 0

    monkeypatch.setattr(convert_module, "write_metadata", the_other_conversion_finishes_first)
    code, _, err = invoke(capsys, source, "-k", "2", "-o", out)
    assert code == 1 and "--overwrite" in err, err
    assert json.loads((out / "conversion.json").read_text())["variant"] == "base" and not leftovers(tmp_path)


def test_the_default_output_of_dot_is_named_after_the_folder(source, tmp_path, capsys, monkeypatch):
    src = tmp_path / "tiny-pythia"
    shutil.copytree(source, src)
    monkeypatch.chdir(src)
    code, _, err = invoke(capsys, ".", "-k", "2")
    assert code == 0, err
    made = [p.name for p in src.iterdir() if p.is_dir()]
    assert made == ["tiny-pythia-mesh-1_1R2_1"]
    # The default name can name a Hub repository too, and loading it as remote code is quiet.
    validate_repo_id(made[0])
    model = AutoModelForCausalLM.from_pretrained(src / made[0], dtype=torch.float32)
    x = torch.randint(0, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        expected = model(x).logits
    assert_loads_as_remote_code(src / made[0], x, expected, tmp_path)


def test_default_outputs_of_two_variants_do_not_meet_and_their_cards_share_their_names(source, tmp_path, capsys, monkeypatch):
    """Nor do those of two relaxation ranks, which differ in parameters."""
    monkeypatch.chdir(tmp_path)
    for flags in (["--variant", "mesh"], ["--variant", "base"], ["--relax-rank", "2"]):
        code, _, err = invoke(capsys, source, "-k", "2", *flags)
        assert code == 0, err
    made = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert made == ["tiny-pythia-base-1_1R2_1", "tiny-pythia-mesh-1_1R2_1", "tiny-pythia-mesh-1_1R2_1-relax2"]
    for name in made:
        assert f"\n# {name}\n" in (tmp_path / name / "README.md").read_text()


def test_output_directories_follow_the_umask(source, tmp_path, capsys):
    previous = os.umask(0o022)
    try:
        code, _, err = invoke(capsys, source, "-k", "2", "-o", tmp_path / "out")
        init_code, _, init_err = invoke(capsys, *INIT, "-o", tmp_path / "init")
    finally:
        os.umask(previous)
    assert code == 0 and init_code == 0, err + init_err
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "init").stat().st_mode & 0o777 == 0o755


def test_overwriting_through_a_symlink_replaces_what_it_points_to(source, tmp_path, capsys, converted_names):
    real = tmp_path / "real"
    previous_result(real)
    link = tmp_path / "out"
    link.symlink_to(real, target_is_directory=True)
    code, _, err = invoke(capsys, source, "-k", "2", "-o", link, "--overwrite")
    assert code == 0, err
    assert link.is_symlink() and sorted(p.name for p in real.iterdir()) == converted_names
    assert not leftovers(tmp_path)


def test_a_private_folder_stays_private_while_and_after_it_is_overwritten(source, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    previous_result(out)
    out.chmod(0o700)
    finish, modes = convert_module.write_metadata, []

    def look_at_the_folder_being_written(staging, *args, **kwargs):
        modes.append(staging.stat().st_mode & 0o777)
        finish(staging, *args, **kwargs)

    monkeypatch.setattr(convert_module, "write_metadata", look_at_the_folder_being_written)
    previous = os.umask(0o022)
    try:
        code, _, err = invoke(capsys, source, "-k", "2", "-o", out, "--overwrite")
    finally:
        os.umask(previous)
    assert code == 0, err
    assert modes == [0o700] and out.stat().st_mode & 0o777 == 0o700
    assert (out / "config.json").is_file() and not leftovers(tmp_path)


def test_a_read_only_empty_target_gets_the_result_and_keeps_its_mode(source, tmp_path, capsys, monkeypatch,
                                                                     converted_names):
    """Moving a folder to another parent needs its owner's write bit (its ".." entry is rewritten):
    a result given a 0555 target's mode first could not be published by anyone but root, and
    stayed behind in its work folder."""
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    publish, modes = output_module._publish, []

    def look_at_the_result_being_published(work, *args):
        modes.append((work / output_module.NEW).stat().st_mode & 0o777)
        publish(work, *args)

    monkeypatch.setattr(output_module, "_publish", look_at_the_result_being_published)
    code, _, err = invoke(capsys, source, "-k", "2", "-o", out)
    assert code == 0, err
    assert modes == [0o755] and out.stat().st_mode & 0o777 == 0o555
    assert sorted(p.name for p in out.iterdir()) == converted_names and not leftovers(tmp_path)
    out.chmod(0o755)


def test_an_output_name_at_the_length_limit_converts(source, tmp_path, capsys, converted_names):
    """The work folder beside it has a longer name than the target: it is cut short to fit."""
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    name = "é" * ((limit - 1) // 2) + "x" * (2 - limit % 2)  # two-byte characters up to the limit, cut at one
    assert len(os.fsencode(name)) == limit
    code, _, err = invoke(capsys, source, "-k", "2", "-o", tmp_path / name)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == converted_names and not leftovers(tmp_path)
    code, _, err = invoke(capsys, source, "-k", "2", "-o", tmp_path / name, "--overwrite")
    assert code == 0 and not leftovers(tmp_path), err


def _marked_work_folder(target: Path, **marker_changes) -> Path:
    """A work folder as a run makes it, with its marker changed as given, and half a result."""
    work, _ = output_module._make_work_folder(target)
    marker = json.loads((work / output_module.MARKER).read_text()) | marker_changes
    (work / output_module.MARKER).write_text(json.dumps(marker))
    (work / output_module.NEW / "model.safetensors").write_text("half a result")
    return work


def test_folders_that_look_like_leftovers_are_left_alone(source, tmp_path, capsys, converted_names):
    """Only a work folder this tool provably made is ever removed: the user's folders named like
    the leftovers of older versions, and work folders whose marker is missing, forged or not for
    this target, stay as they are, with --overwrite or without; none is renamed onto the target."""
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    marker = {"tool": "mesh-convert", "target": "out", "host": socket.gethostname(), "pid": dead.pid, "started": 1.0}

    def plant(token: str, marker: dict | None = None, name: str | None = None) -> Path:
        folder = tmp_path / (name or f".out.partial-{token}")
        folder.mkdir()
        (folder / "mine.txt").write_text("the user's own")
        if marker is not None:
            (folder / output_module.MARKER).write_text(json.dumps(marker))
        return folder

    plant("", name=".out.old-999999")  # named like an older version's set-aside previous result
    plant("", name=".out.partial-999999-0badc0de")  # ... and like its staging folder
    plant("1" * 16, marker | {"token": "1" * 16, "tool": "another-tool"})
    plant("2" * 16, marker | {"token": "2" * 16, "target": "another-target"})
    plant("3" * 16, marker | {"token": "4" * 16})  # the token of another folder
    (tmp_path / "elsewhere.json").write_text(json.dumps(marker | {"token": "5" * 16}))
    (plant("5" * 16) / output_module.MARKER).symlink_to(tmp_path / "elsewhere.json")  # a marker that is a link
    genuine = plant("6" * 16, marker | {"token": "6" * 16})  # what a killed run leaves: it goes
    before = {p.name: snapshot(p) for p in tmp_path.iterdir() if p.name.startswith(".") and p != genuine}
    for overwrite in ([], ["--overwrite"]):
        code, _, err = invoke(capsys, source, "-k", "2", "-o", out, *overwrite)
        assert code == 0, err
        assert sorted(p.name for p in out.iterdir()) == converted_names
        assert {p.name: snapshot(p) for p in tmp_path.iterdir() if p.name.startswith(".")} == before


def test_only_a_dead_runs_marked_work_folder_is_reclaimed(tmp_path):
    """A work folder goes when its marker names this tool, this target, the folder's own token,
    this machine and a process that is gone (a pid now used by another process counts as gone)."""
    target = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    alive = _marked_work_folder(target)  # this very process
    started = json.loads((alive / output_module.MARKER).read_text())["started"]
    reused = _marked_work_folder(target, started=started - 1000.0)  # this pid, another process before it
    gone = _marked_work_folder(target, pid=dead.pid)
    elsewhere = _marked_work_folder(target, pid=dead.pid, host="another-machine")  # cannot be checked from here
    output_module.reclaim_leftovers(target)
    assert alive.is_dir() and elsewhere.is_dir() and not reused.exists() and not gone.exists()


def test_a_previous_version_set_aside_by_a_killed_run_is_kept_and_shown(source, tmp_path, capsys, converted_names):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    work = _marked_work_folder(out, pid=dead.pid)
    (work / output_module.PREVIOUS).mkdir()
    (work / output_module.PREVIOUS / "previous.txt").write_text("the user's earlier result")
    before = snapshot(work / output_module.PREVIOUS)
    code, _, err = invoke(capsys, source, "-k", "2", "-o", out)
    assert code == 0 and sorted(p.name for p in out.iterdir()) == converted_names, err
    assert f"note: the previous version of {out} is in {work / output_module.PREVIOUS}" in err
    assert snapshot(work / output_module.PREVIOUS) == before and leftovers(tmp_path) == [work.name]


def test_init_replaces_only_with_overwrite(tmp_path, capsys):
    out = tmp_path / "model"
    before = previous_result(out)
    code, _, err = invoke(capsys, *INIT, "-o", out)
    assert code == 1 and "--overwrite" in err and snapshot(out) == before
    code, _, err = invoke(capsys, *INIT, "-o", out, "--overwrite")
    assert code == 0, err
    assert (out / "conversion.json").is_file() and not (out / "previous.txt").exists() and not leftovers(tmp_path)


def test_a_failed_portable_swap_puts_the_previous_result_back(source, tmp_path, capsys, monkeypatch):
    """Where there is no atomic exchange the swap is two renames; if the second fails (a full
    or failing disk), the first is undone rather than leaving no target at all."""
    out = tmp_path / "out"
    before = previous_result(out)
    monkeypatch.setattr(output_module, "_exchange", lambda first, second: False, raising=False)
    rename = os.rename

    def the_disk_fails_on_the_second_rename(source, destination, *args, **kwargs):
        if Path(destination) == out and Path(source).name == output_module.NEW:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return rename(source, destination, *args, **kwargs)

    monkeypatch.setattr(os, "rename", the_disk_fails_on_the_second_rename)
    code, _, err = invoke(capsys, source, "-k", "2", "-o", out, "--overwrite")
    assert code == 1 and "error:" in err, err
    assert snapshot(out) == before and not leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------
# Signals at each stage of publishing, in a real subprocess that signals itself at that stage.
# ---------------------------------------------------------------------------------------------

SIGNAL_AT_STAGE = """
import os, shutil, signal, sys
from pathlib import Path
from mesh_convert.cli import main
from mesh_convert.convert import conversion as convert
from mesh_convert.artifacts import output

stage, name, *args = sys.argv[1:]
number = getattr(signal, name)
if name != "SIGKILL":  # a suite run under nohup passes SIGHUP on ignored, and ignored stays ignored
    signal.signal(number, signal.SIG_DFL)
target = Path(args[args.index("-o") + 1]).resolve()
if stage == "write":  # the new result is complete in its staging place, not yet published
    finish = convert.write_metadata
    def write_metadata(*a, **k):
        finish(*a, **k)
        os.kill(os.getpid(), number)
    convert.write_metadata = write_metadata
elif stage == "cleanup":  # removing what sits beside the target (the previous result, once replaced)
    remove = shutil.rmtree
    def rmtree(path, *a, **k):
        if target.parent in Path(path).resolve().parents:
            os.kill(os.getpid(), number)
        return remove(path, *a, **k)
    shutil.rmtree = rmtree
else:  # "between-renames": a system without an atomic exchange swaps by two renames
    output._exchange = lambda first, second: False
    rename = os.rename
    def os_rename(source, destination, *a, **k):
        rename(source, destination, *a, **k)
        if Path(source).resolve() == target:
            os.kill(os.getpid(), number)
    os.rename = os_rename
sys.exit(main(args))
"""

# (stage, signal, what a reader of the target sees right after: the previous or the new result)
SIGNALS = [
    ("write", "SIGTERM", "previous"),
    ("write", "SIGHUP", "previous"),
    ("write", "SIGKILL", "previous"),
    ("cleanup", "SIGINT", "new"),
    ("cleanup", "SIGTERM", "new"),
    ("cleanup", "SIGHUP", "new"),
    ("cleanup", "SIGKILL", "new"),
    ("between-renames", "SIGTERM", "new"),
    ("between-renames", "SIGKILL", None),  # no target: the previous result is in the work folder
]


@pytest.mark.parametrize("stage, name, seen", SIGNALS, ids=[f"{n}-during-{s}" for s, n, _ in SIGNALS])
def test_a_signal_at_any_stage_leaves_one_whole_state(source, tmp_path, capsys, converted_names, stage, name, seen):
    out = tmp_path / "out"
    before = previous_result(out)
    args = [str(source), "-k", "2", "-o", str(out), "--overwrite"]
    result = subprocess.run(
        [sys.executable, "-c", SIGNAL_AT_STAGE, stage, name, *args],
        env={**os.environ, **SUBPROCESS_ENV}, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )
    if seen == "new":
        assert sorted(p.name for p in out.iterdir()) == converted_names, result.stderr
    elif seen == "previous":
        assert snapshot(out) == before, result.stderr
    if name != "SIGKILL":
        assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: interrupted") and (("written in full" in last) == (seen == "new")), last
    else:
        assert result.returncode == -signal.SIGKILL
        assert leftovers(tmp_path), "a killed run leaves its hidden work folder"
        code, _, err = invoke(capsys, *args)
        assert code == 0 and sorted(p.name for p in out.iterdir()) == converted_names, err
        if seen is None:  # the previous result stays where it was set aside, never put back, and the user is told
            (work,) = leftovers(tmp_path)
            kept = tmp_path / work / output_module.PREVIOUS
            assert f"note: the previous version of {out} is in {kept}" in err and snapshot(kept) == before, err
            shutil.rmtree(tmp_path / work)
    assert not leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------
# Training: an earlier run is not replaced unless resuming or told to; the export is staged.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    tokenizer = char_tokenizer(root / "tokenizer")
    return {"model": tiny_converted(root / "mesh", tokenizer), "text": write_text(root / "train.txt", lines=100)}


def _recipe_file(training, tmp_path: Path, **sections) -> Path:
    path = tmp_path / "recipe.yaml"
    data = recipe(training["model"], training["text"], tmp_path / "run", train={"max_steps": 2}, **sections)
    path.write_text(yaml.safe_dump(data))
    return path


def test_training_into_an_earlier_run_needs_overwrite(training, tmp_path, capsys):
    path = _recipe_file(training, tmp_path)
    run = tmp_path / "run"
    code, _, err = invoke(capsys, "train", path)
    assert code == 0, err
    before = snapshot(run)
    code, _, err = invoke(capsys, "train", path)
    assert code == 1 and "--overwrite" in err, err
    assert snapshot(run) == before, "the earlier run's metrics and model are untouched"
    code, _, err = invoke(capsys, "train", path, "--overwrite")
    assert code == 0, err
    assert [r["step"] for r in metrics(run)] == [1, 2] and (run / "model" / "conversion.json").is_file()
    assert not leftovers(run)


def test_a_kill_during_the_training_export_leaves_no_partial_model(training, tmp_path, capsys):
    path = _recipe_file(training, tmp_path)
    run = tmp_path / "run"
    killed_in_export = (
        "import os, signal, sys; from mesh_convert.train import lora as train_lora; from mesh_convert.cli import main\n"
        "def copy_side_files(*args, **kwargs): os.kill(os.getpid(), signal.SIGKILL)\n"
        "train_lora.copy_side_files = copy_side_files\n"
        "sys.exit(main(['train', sys.argv[1]]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", killed_in_export, str(path)],
        env={**os.environ, **SUBPROCESS_ENV}, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert not (run / "model").exists(), "no model rather than half of one"
    code, _, err = invoke(capsys, "train", path, "--overwrite")
    assert code == 0, err
    assert (run / "model" / "conversion.json").is_file() and not leftovers(run)
