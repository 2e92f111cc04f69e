"""lm-eval harness tasks on an already loaded model, when lm-eval is installed (`--tasks`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import UserError
from .models import default_context


LM_EVAL_MISSING = "--tasks needs lm-eval, which is not installed: pip install 'mesh-convert[eval]'"


def require_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(LM_EVAL_MISSING) from None
    return lm_eval, HFLM, TaskManager


def lm_eval_task_manager(tasks: Sequence[str], include_path: str | os.PathLike | None = None):
    """An lm-eval TaskManager that knows every name in `tasks`, or a UserError naming those it
    does not. lm-eval's own index (~15k tasks, ~10 s to build) is skipped when the local
    task folder already defines everything asked for."""
    _, _, TaskManager = require_lm_eval()
    if include_path is None:
        manager = TaskManager()
    else:
        path = Path(include_path).expanduser()
        if not path.is_dir():
            raise UserError(f"--include-path is not a directory: {path}")
        manager = TaskManager(include_path=str(path), include_defaults=False)
        if not all(task in manager.all_tasks for task in tasks):
            manager = TaskManager(include_path=str(path))
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s): {', '.join(unknown)} (local task YAMLs: --include-path DIR)")
    return manager


def lm_eval_tasks(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    include_path: str | os.PathLike | None = None,
    task_manager=None,
    limit: int | None = None,
    batch_size: int = 1,
    max_length: int | None = None,
) -> dict[str, dict[str, float]]:
    """Run lm-eval harness tasks on an already loaded model; {task: {metric: value}}.

    Metric names lose lm-eval's ",none" filter suffix (other filters keep theirs). Tasks
    defined in local YAML files (e.g. over a local jsonl) work offline via `include_path`;
    pass a `task_manager` from `lm_eval_task_manager` to reuse one across models."""
    lm_eval, HFLM, _ = require_lm_eval()
    manager = task_manager or lm_eval_task_manager(tasks, include_path)
    wrapper = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        max_length=max_length or default_context(model),
    )
    output = lm_eval.simple_evaluate(model=wrapper, tasks=list(tasks), task_manager=manager, limit=limit)
    return {task: _metrics(values) for task, values in output["results"].items()}


def _metrics(values: dict) -> dict[str, float]:
    metrics = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # "alias" and "N/A" stderr placeholders
        name, _, filter_name = key.partition(",")
        metrics[name if filter_name in ("", "none") else key] = float(value)
    return metrics
