"""Resumable checkpoints with Accelerate's `save_state` (model, optimizer, RNG states and our
`TrainState`: step and tokens, which also fix the data position, since batch order is a pure
function of the step). The LR is a pure function of the step too (see `recipe.lr_schedule`).

A checkpoint is written to `step-N.tmp` and renamed to `step-N` once complete, so a run killed
mid-save never leaves a half-written checkpoint that `resume: auto` would pick up.
"""

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UserError

PREFIX = "step-"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens seen (all processes)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def resume_dir(root: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: `auto` = the newest (if any), `never` = none, or a path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = checkpoint_dirs(root)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"checkpoint.resume: {path} is not a directory")
    return path


def save_checkpoint(accelerator, root: Path, step: int, keep_last: int) -> Path:
    final = root / f"{PREFIX}{step:08d}"
    partial = root / f"{PREFIX}{step:08d}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in checkpoint_dirs(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


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
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= resumed_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
