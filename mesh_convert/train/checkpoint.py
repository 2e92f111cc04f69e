"""Resumable checkpoints: Accelerate's `save_state` (model, optimizer, RNG states) and our
`TrainState` (step and tokens, which also fix the data position, since batch order is a pure
function of the step) as JSON. The LR is a pure function of the step too (see `recipe.lr_schedule`).

A checkpoint is written to `step-N.tmp` and renamed to `step-N` once complete, so a run killed
mid-save never leaves a half-written checkpoint that `resume: auto` would pick up.

A checkpoint is read as data, never as code. It may come from elsewhere (`checkpoint.resume=PATH`,
or a file planted in a shared run folder), and some of its readers unpickle with code allowed:
Accelerate reads registered objects (`custom_checkpoint_N.pkl`) so, torch's distributed checkpoint
its `.metadata` and non-tensor entries, DeepSpeed its state files. So before anything loads it, every
pickled file in it is loaded once as data only (torch's weights-only unpickler, or a restricted
one for plain pickles): a file that would run code, or that is damaged, is refused, and `resume:
auto` falls back to the newest checkpoint that loads.
"""

import io
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UserError, first_line, unpickling_refusal

PREFIX = "step-"
STATE_FILE = "train_state.json"
# Where earlier versions kept the state: Accelerate's registered-object
# file, which Accelerate unpickles with code allowed. Read here as data; never handed to Accelerate.
LEGACY_STATE_FILE = "custom_checkpoint_0.pkl"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens seen (all processes)

    def write(self, directory: Path) -> None:
        (directory / STATE_FILE).write_text(json.dumps(asdict(self)) + "\n")

    @classmethod
    def read(cls, directory: Path) -> "TrainState":
        """The state saved in a checkpoint; a ValueError or OSError says why it cannot be read."""
        if (directory / STATE_FILE).is_file():
            state = json.loads((directory / STATE_FILE).read_text())
        elif (directory / LEGACY_STATE_FILE).is_file():
            state = _load_data_only(directory / LEGACY_STATE_FILE)
        else:
            raise ValueError(f"it has no {STATE_FILE}")
        if not isinstance(state, dict) or not all(isinstance(state.get(k), int) and state[k] >= 0 for k in ("step", "tokens")):
            raise ValueError(f"its {STATE_FILE} does not hold a step and a token count")
        return cls(state["step"], state["tokens"])


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def save_checkpoint(accelerator, root: Path, step: int, tokens: int, keep_last: int) -> Path:
    final = root / f"{PREFIX}{step:08d}"
    partial = root / f"{PREFIX}{step:08d}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial))
    except BaseException:  # a stop or a full disk mid-save: no half-written checkpoint stays behind
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        TrainState(step, tokens).write(partial)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in checkpoint_dirs(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ----------------------------------------------------------------------------- choosing one


@dataclass
class Resume:
    path: Path
    state: TrainState
    skipped: list[str]  # newer checkpoints passed over, each with why

    @property
    def from_earlier_version(self) -> bool:
        """Written before the state was JSON, when the data had another (randperm) order."""
        return not (self.path / STATE_FILE).is_file()


def choose_checkpoint(root: Path, resume: str) -> Resume | None:
    """The checkpoint to resume from, checked to load as data: `auto` = the newest that does (the
    newer, damaged ones are listed in `skipped`), `never` = none, or a path (refused if damaged);
    one that would run code is refused, whichever it is."""
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume).expanduser()
        if not path.is_dir():
            raise UserError(f"checkpoint.resume: {path} is not a directory")
        problem = checkpoint_problem(path)
        if problem is not None:
            usable = [p for p in reversed(checkpoint_dirs(path.parent)) if p != path and checkpoint_problem(p) is None]
            other = f"; the newest usable one beside it is {usable[0]}" if usable else ""
            raise UserError(f"cannot resume from {path}: {problem}{other}")
        return Resume(path, TrainState.read(path), [])
    skipped = []
    for path in reversed(checkpoint_dirs(root)):
        problem = checkpoint_problem(path)
        if problem is None:
            return Resume(path, TrainState.read(path), skipped)
        skipped.append(f"{path.name} ({problem})")
    if skipped:
        raise UserError(f"no checkpoint in {root} can be resumed from: {'; '.join(skipped)}; remove them, or start "
                        "anew with checkpoint.resume=never")
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from, or None: a state that does not read,
    weights that do not open, or a pickled file that is damaged. A pickled file that would run code
    is a UserError at once: a tampered checkpoint is not passed over in silence for an older one."""
    from safetensors import SafetensorError, safe_open

    try:
        TrainState.read(path)
    except (OSError, ValueError, pickle.UnpicklingError) as error:
        return first_line(error)
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        name = file.relative_to(path).as_posix()
        try:
            if file.suffix == ".safetensors":
                with safe_open(file, framework="pt"):
                    pass
            elif _is_pickled(file):  # every process's RNG state too: all processes must choose alike
                _load_data_only(file)
            elif file.name == ".metadata":  # torch.distributed.checkpoint's index, and its non-tensor entries
                _check_distributed_checkpoint(file)
        except pickle.UnpicklingError as error:
            if _names_code(error):
                raise UserError(f"{file} holds pickled code ({unpickling_refusal(error)}): the checkpoint was tampered "
                                "with or is not one of mesh-convert's; no checkpoint is resumed from while it is there "
                                "(remove it to resume from an earlier one)") from None
            return f"{name} does not load as data ({unpickling_refusal(error)})"
        except (SafetensorError, OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            return f"{name} does not load as data ({unpickling_refusal(error)})"
    return None


def _names_code(error: pickle.UnpicklingError) -> bool:
    """Whether an unpickling refusal is of something that is not data (a callable, an object of a
    class not allowed): a file that would run code, not a damaged one."""
    text = str(error)
    return text.startswith("Weights only load failed") and "GLOBAL" in text or "which is not data" in text


# ----------------------------------------------------------------------------- loading as data


def _is_pickled(file: Path) -> bool:
    """torch.save's zip archives and plain pickles (which start with the PROTO opcode); not
    safetensors, JSON or a distributed checkpoint's files (its `.metadata` is checked with its data)."""
    if file.suffix in (".safetensors", ".json", ".distcp") or file.name == ".metadata":
        return False
    with file.open("rb") as handle:
        head = handle.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" or file.suffix in (".pkl", ".bin", ".pt")


def _load_data_only(file: Path | io.BytesIO):
    """Load a pickled file as data: torch's zip format with torch's weights-only unpickler (and the
    numpy types of RNG states, as Accelerate allows), anything else pickled is refused. Memory-
    mapped, so that checking an optimizer's state costs little more than reading its index."""
    import torch
    from accelerate.utils.other import load

    # torch memory-maps only its zip format; any other file is read whole, so that a plain pickle
    # meets the weights-only unpickler (which names any code in it) instead of mmap's refusal
    mmap = {"mmap": True} if isinstance(file, Path) and zipfile.is_zipfile(file) else {}
    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            return load(file, map_location="cpu", **mmap)
    except RuntimeError as error:  # torch wraps a non-zip file, a truncated archive, ... so
        raise ValueError(first_line(error)) from None


def _deepspeed_globals() -> list:
    """DeepSpeed's ZeRO state files hold two of its classes beside tensors (plain data: a loss
    scale and a stage number); allowed where DeepSpeed is installed, the only place they load."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
    except ImportError:
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum]


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a distributed checkpoint's `.metadata`, which holds dataclasses of
    `torch.distributed.checkpoint` and torch's sizes, dtypes and layouts: those and nothing else."""

    ALLOWED = {
        ("torch.distributed.checkpoint.metadata", name)
        for name in ("Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
                     "ChunkStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")
    } | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
         ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
         ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        import torch

        if (module, name) in self.ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it references {module}.{name}, which is not data")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it references outside storage")


def _check_distributed_checkpoint(metadata_file: Path) -> None:
    """A torch.distributed.checkpoint folder (FSDP's sharded state): its index loads as data, and so
    does each non-tensor entry, which torch would unpickle with code allowed."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    with metadata_file.open("rb") as handle:
        metadata = _MetadataUnpickler(handle).load()
    for index, where in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        if where.transform_descriptors:
            raise ValueError(f"entry {index.fqn} is stored transformed ({', '.join(where.transform_descriptors)}), "
                             "which cannot be checked")
        with (metadata_file.parent / where.relative_path).open("rb") as handle:
            handle.seek(where.offset)
            _load_data_only(io.BytesIO(handle.read(where.length)))


@contextmanager
def accelerate_view(path: Path) -> Iterator[Path]:
    """`path` as Accelerate's `load_state` may read it: without registered-object files
    (`custom_checkpoint_N.pkl`), which it would unpickle with code allowed (our state is read from
    JSON, or from the legacy file as data). A folder of links where there are such files."""
    hidden = [p for p in path.iterdir() if p.name.startswith("custom_checkpoint_") and p.suffix == ".pkl"]
    if not hidden:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="mesh-convert-resume-") as view:
        for entry in path.iterdir():
            if entry not in hidden:
                os.symlink(entry.resolve(), Path(view) / entry.name)
        yield Path(view)


class MetricsLog:
    """`metrics.jsonl`, one JSON object per logged step; on resume, entries after the resumed step
    (written by the killed run after its last checkpoint) are dropped so the log has no duplicates."""

    def __init__(self, path: Path, enabled: bool, resumed_step: int | None):
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resumed_step is None:
            path.write_text("")
        elif path.is_file():
            kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= resumed_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")


def _logged_step(line: str) -> float:
    """A metrics line's step; a line that is not a record (cut by a kill mid-write) counts as after any step."""
    try:
        record = json.loads(line)
    except ValueError:
        return float("inf")
    return record.get("step", 0) if isinstance(record, dict) and isinstance(record.get("step", 0), int) else float("inf")
