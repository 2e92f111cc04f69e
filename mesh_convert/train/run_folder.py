"""A run's output_dir: what a run writes there, which inputs it must keep away from, and one run
in it at a time.

A run writes only the names in RUN_FILES inside output_dir, replacing what is there (an export
is swapped whole). So an output_dir that is, or sits inside, one of the run's inputs, and an input
that sits where the run writes, are refused outright: `--overwrite` cannot make either safe.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from ..errors import UserError
from ..io import RUN_EXPORTS
from .recipe import Recipe

# What a run writes into its output_dir, and the lock it holds there while it runs.
RUN_FILES = ("metrics.jsonl", "recipe.yaml", "checkpoints", *RUN_EXPORTS)
LOCK_FILE = ".mesh-convert-run.lock"


def _inputs(recipe: Recipe, recipe_file: Path | None) -> list[tuple[str, str]]:
    """(what, path) for everything the run reads from disk."""
    named = [("model", recipe.model), ("tokenizer", recipe.tokenizer), ("distill.teacher", recipe.distill.teacher),
             ("recipe", recipe_file)]
    if recipe.checkpoint.resume not in ("auto", "never"):
        named.append(("checkpoint.resume", recipe.checkpoint.resume))
    named += [("data.train", path) for path in recipe.data.train]
    named += [("data.eval_files", path) for path in recipe.data.eval_files]
    return [(what, str(path)) for what, path in named if path is not None]


def check_inputs_apart(recipe: Recipe, recipe_file: Path | None, written_recipe: str) -> None:
    """Refuse an output_dir that is or sits inside an input, and an input where the run writes.
    Two places where a run meets its own files are allowed: a checkpoint of this run to resume
    from, and the run's own recipe.yaml given again as the recipe (where the run would write
    `written_recipe`, the same text, over it)."""
    output = Path(os.path.realpath(recipe.output_dir))
    for what, shown in _inputs(recipe, recipe_file):
        path = Path(shown).expanduser()
        if not path.exists():
            continue  # a Hub id, or a file whose absence its own check reports
        path = Path(os.path.realpath(path))
        if output == path or path in output.parents:
            where = "is" if output == path else "is inside"
            raise UserError(f"output_dir {recipe.output_dir} {where} the input {what} {shown}: the run would write "
                            "into it; choose another output_dir")
        for name in RUN_FILES:
            spot = output / name
            if path != spot and spot not in path.parents:
                continue
            if what == "checkpoint.resume" and name == "checkpoints":
                continue
            if what == "recipe" and name == "recipe.yaml" and _same_text(path, written_recipe):
                continue
            raise UserError(f"the input {what} {shown} is where the run writes its {name} in output_dir "
                            f"{recipe.output_dir}; move it, or choose another output_dir")


def _same_text(path: Path, text: str) -> bool:
    try:
        return path.read_text(encoding="utf-8") == text
    except (OSError, UnicodeDecodeError):
        return False


def check_not_occupied(output: Path, resume_setting: str, continues_this_run: bool, overwrite: bool) -> None:
    """A run starts in an empty output_dir, or continues the run there from its own checkpoint;
    anything else is replaced only with --overwrite."""
    if continues_this_run or overwrite or not output.is_dir():
        return
    if all(entry.name == LOCK_FILE for entry in output.iterdir()):
        return
    if not any((output / name).exists() for name in RUN_FILES):
        what = "is not empty"
    elif resume_setting == "never":
        what = "already holds a run, and checkpoint.resume is never"
    elif resume_setting == "auto":
        what = "already holds a run and there is no checkpoint to resume from"
    else:
        what = f"already holds a run, which resuming from {resume_setting} (not one of its checkpoints) would replace"
    raise UserError(f"output_dir {output} {what} (use --overwrite to replace it, or another output_dir)")


@contextmanager
def exclusive_run(output: Path) -> Iterator[None]:
    """Hold output_dir for this run: another run into it, started meanwhile, is refused in one
    line instead of mixing its checkpoints and metrics with this one's. The main process holds an
    advisory lock on a file in the folder (released by the system however the process ends,
    removed by the run when it ends) and tells the other processes of a launch whether it got it.
    A folder this created is removed again if the run leaves nothing else in it."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    created, handle, refusal = False, None, None
    if state.is_main_process:
        try:
            output.mkdir(parents=True)
            created = True
        except FileExistsError:
            pass
        except OSError as error:
            refusal = f"cannot create output_dir {output}: {error.strerror or error}"
        if refusal is None:
            try:
                handle = _locked(output / LOCK_FILE)
            except BlockingIOError:
                refusal = (f"output_dir {output} is in use by another training run; wait for it to end, or choose "
                           "another output_dir")
            except OSError as error:
                refusal = f"cannot write to output_dir {output}: {error.strerror or error}"
    if state.num_processes > 1:
        refusal = broadcast_object_list([refusal])[0]
    try:
        if refusal is not None:
            raise UserError(refusal)
        yield
    finally:
        if handle is not None:
            (output / LOCK_FILE).unlink(missing_ok=True)  # first: while held, no other run can have it
            handle.close()
        if created:
            with suppress(OSError):
                output.rmdir()  # only where the run left it empty


def _locked(path: Path):
    """`path` opened and locked exclusively, or BlockingIOError where another run holds it (or
    has just removed it: a lock on a file no longer at `path` would guard nothing). Where the
    system has no flock (Windows), the file is opened without a lock."""
    handle = path.open("a")  # append: opening never truncates what a running holder wrote
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not path.exists() or os.stat(path).st_ino != os.fstat(handle.fileno()).st_ino:
            raise BlockingIOError
    except BaseException:
        handle.close()
        raise
    return handle
