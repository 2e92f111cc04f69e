"""`conversion.json`: the record of where a model came from and what was done to it.

One schema, written by `convert`, `train`/`finetune` (a `training` section), `init` and `merge`,
and read by the model card, `push`, `inspect` and training. Every field is optional, because
records of older versions lack some, and unknown fields are kept, so that a record passes through
`train` and `merge` unchanged. Records written before this schema existed still read: `init` then
wrote its counts under `parameters`.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from ..errors import UserError
from ..io import cache_snapshot, parse_json
from ..layout import Layout

FILENAME = "conversion.json"


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow")


class Source(_Section):
    model: str | None = None  # Hub id or local directory, as converted
    revision: str | None = None
    model_type: str | None = None
    license: str | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None


class Params(_Section):
    """Parameter counts (`convert.plan.count_parameters`); `converted_nonembedding` counts the
    stored layers only, routers and relaxation deltas are counted apart."""

    original_nonembedding: int | None = None
    converted_nonembedding: int | None = None
    routers: int = 0
    relax: int = 0
    embedding: int | None = None
    total: int | None = None
    reduction: float | None = None

    def unique_nonembedding(self) -> int | None:
        """The converted model's non-embedding parameters: its stored layers, routers and deltas."""
        if self.converted_nonembedding is None:
            return None
        return self.converted_nonembedding + self.routers + self.relax

    def computed_reduction(self) -> float | None:
        """1 - converted / original non-embedding parameters, routers and deltas included (a
        full-rank relaxation stores more than the original: the reduction is then negative)."""
        if not self.original_nonembedding or self.converted_nonembedding is None:
            return None
        return 1 - self.unique_nonembedding() / self.original_nonembedding

    def with_relax(self, relax: int) -> Params:
        """These counts with deltas of `relax` parameters instead (after annealing them)."""
        changed = self.model_copy(update={"relax": relax})
        update = {}
        if self.total is not None:
            update["total"] = self.total - self.relax + relax
        if self.reduction is not None:
            update["reduction"] = changed.computed_reduction()
        return changed.model_copy(update=update)


class Training(_Section):
    recipe: Any = None  # the recipe as trained (a dict), or its name
    method: str | None = None
    trainable: str | None = None
    tokens: int | None = None
    steps: int | None = None
    final_loss: float | None = None
    processes: int | None = None
    distributed: str | None = None
    init: dict | None = None  # the from-scratch spec, for models `init` made


class EvalEntry(_Section):
    task: str
    metric: str
    value: float


class ConversionRecord(_Section):
    mesh_convert_version: str | None = None
    command: str | None = None
    source: Source | None = None
    layout: str | None = None
    prelude: int | None = None
    core: int | None = None
    loops: int | None = None
    coda: int | None = None
    variant: str | None = None
    tie: str | None = None
    slots: int | None = None
    router_gap: float | None = None
    relax_rank: int | str | None = None
    relax_init: str | None = None  # how the deltas started: svd or zero
    dtype: str | None = None
    layer_map: dict[str, list[list[int]]] | None = None
    loop_sources: list[list[int]] | None = None
    params: Params | None = None
    output: str | None = None
    init: dict | None = None  # `init`: the from-scratch spec
    seed: int | None = None  # `init`: the seed of the random weights
    training: Training | None = None
    eval_results: list[EvalEntry] | None = None
    # What the source's files named as remote code and we did not carry over (`remote_code.py`).
    removed_remote_code: list[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _older_init_records(cls, data):
        """`init` once wrote `mesh_parameter_counts` under `parameters`."""
        if isinstance(data, dict) and "parameters" in data and "params" not in data:
            data = dict(data)
            counts = dict(data.pop("parameters") or {})
            if "nonembedding" in counts:
                counts["converted_nonembedding"] = counts.pop("nonembedding")
            data["params"] = counts
        return data

    @property
    def source_model(self) -> str | None:
        return self.source.model if self.source else None

    def counted_layout(self) -> Layout | None:
        """The layout of the recorded counts, None where one of them is missing."""
        parts = (self.prelude, self.core, self.loops, self.coda)
        return None if None in parts else Layout(*parts)

    def layout_text(self) -> str | None:
        """`P+CRK+Q`, rebuilt from the counts when the record does not store it."""
        if self.layout:
            return self.layout
        counted = self.counted_layout()
        return counted.text if counted else None

    def relaxed_to(self, rank: int, relax_parameters: int) -> ConversionRecord:
        """The record of this model annealed to relaxation `rank`, whose deltas now hold
        `relax_parameters`; without deltas, how they started no longer applies."""
        update = {"relax_rank": rank, "relax_init": self.relax_init if rank else None}
        if self.params is not None:
            update["params"] = self.params.with_relax(relax_parameters)
        return self.model_copy(update=update)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_unset=True) + "\n"

    def published(self) -> ConversionRecord:
        """The record as it is written: it goes to the Hub with the model, so the absolute paths in
        it (a local source, the output, the command line, a trained model's recipe) keep only their
        last part; the user's directory layout stays theirs."""

        def cut(section: BaseModel | None, field: str, how=_without_local_paths):
            # Unset fields stay unwritten, null ones null (shlex.split(None) would read stdin).
            if section is None or field not in section.model_fields_set or getattr(section, field) is None:
                return section
            return section.model_copy(update={field: how(getattr(section, field))})

        record = cut(cut(self, "output"), "command", _command_without_local_paths)
        sections = {"source": _published_source(self.source), "training": cut(self.training, "recipe")}
        return record.model_copy(update={name: value for name, value in sections.items() if name in self.model_fields_set})

    def local_texts(self) -> dict[str, str]:
        """Each text of this record that publishing cuts, with what it is published as (for
        files written from the record before it was cut on writing, e.g. an older model card)."""
        found = {}

        def walk(held, published):
            if isinstance(held, dict) and isinstance(published, dict):
                for key in held.keys() & published.keys():
                    walk(held[key], published[key])
            elif isinstance(held, list) and isinstance(published, list):
                for pair in zip(held, published):
                    walk(*pair)
            elif isinstance(held, str) and isinstance(published, str) and held != published:
                found[held] = published

        walk(self.model_dump(), self.published().model_dump())
        return found

    def write(self, directory: Path) -> Path:
        path = Path(directory) / FILENAME
        path.write_text(self.published().to_json())
        return path

    @classmethod
    def read(cls, directory: Path) -> ConversionRecord | None:
        """The record in `directory`, None when there is none; a UserError when it is unreadable."""
        path = Path(directory) / FILENAME
        if not path.is_file():
            return None
        try:
            return cls.model_validate(parse_json(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as error:
            detail = _first_problem(error) if isinstance(error, ValidationError) else str(error).splitlines()[0]
            raise UserError(f"cannot read {path}: {detail}") from None


def _published_source(source: Source | None) -> Source | None:
    """The source without its local path: a snapshot in the Hugging Face cache is published as
    its repo id and revision (as conversions record it now), any other folder by its name."""
    if source is None or "model" not in source.model_fields_set or not isinstance(source.model, str):
        return source
    snapshot = cache_snapshot(Path(source.model)) if PurePosixPath(source.model).is_absolute() else None
    if snapshot is not None:
        return source.model_copy(update={"model": snapshot[0], "revision": source.revision or snapshot[1]})
    return source.model_copy(update={"model": _without_local_paths(source.model)})


def published_config(config: dict) -> dict:
    """config.json as it is published: its provenance with the absolute paths cut like the
    record's (conversions before mesh-convert cut them on writing stored a local source's path),
    and transformers' `_name_or_path` (where a model was loaded from, which a config saved by
    another tool may hold) cut too."""
    if isinstance(config.get("_name_or_path"), str):
        config = {**config, "_name_or_path": _without_local_paths(config["_name_or_path"])}
    provenance = config.get("provenance")
    if not isinstance(provenance, dict):
        return config
    source = provenance.get("source")
    if isinstance(source, dict) and isinstance(source.get("model"), str):
        published = _published_source(Source.model_validate(source))
        provenance = {**provenance, "source": {**source, "model": published.model, "revision": published.revision}}
    return {**config, "provenance": _without_local_paths(provenance)}


def published_adapter_config(config: dict) -> dict:
    """A LoRA adapter's adapter_config.json as it is published: peft names the base model by the
    path it was trained from (`train` makes it absolute), cut like the record's paths."""
    if not isinstance(config.get("base_model_name_or_path"), str):
        return config
    return {**config, "base_model_name_or_path": _without_local_paths(config["base_model_name_or_path"])}


def _first_problem(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "the record"
    return f"{where}: {first['msg']}"


def _without_local_paths(value: Any) -> Any:
    """`value` (text, or lists and dicts of it) with every path on the user's machine cut to its
    last part: absolute ones (POSIX or Windows), from home (`~/...`), and relative ones that climb
    (`../../clients/acme/model`) or go down more than one folder. `NAME` and `DIR/NAME` stay: they
    tell nothing of the user's directories, and the latter is also how a Hub id is written."""
    if isinstance(value, dict):
        return {key: _without_local_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_local_paths(item) for item in value]
    if isinstance(value, str) and "://" not in value:  # a URL is no path
        for flavour in (PurePosixPath, PureWindowsPath):
            if flavour(value).is_absolute():
                return flavour(value).name
        parts = re.split(r"[\\/]", value)
        if value.startswith("~") or len(parts) > 2 or any(part in (".", "..") for part in parts):
            return next((part for part in reversed(parts) if part not in ("", ".")), value)
    return value


def _command_without_local_paths(command: str) -> str:
    """A command line with the absolute paths in it cut: `/a/b`, `--flag=/a/b` and `-o/a/b`."""

    def cut(arg: str) -> str:
        if arg.startswith("--") and "=" in arg:
            flag, value = arg.split("=", 1)
            return f"{flag}={_without_local_paths(value)}"
        if arg.startswith("-") and not arg.startswith("--") and len(arg) > 2:
            return arg[:2] + _without_local_paths(arg[2:])
        return _without_local_paths(arg)

    try:
        return shlex.join(map(cut, shlex.split(command)))
    except ValueError:  # not a shell line (written by hand): as it is
        return command


def converted_name(source: str, variant: str, layout_name: str | None, relax_rank: int | str | None) -> str:
    """A converted model's default name, for its folder and its model card: the source's last
    part, the variant (so that conversions of one source into two variants do not meet), the
    layout as `P_CRK_Q`, and the relaxation rank where there are deltas (they change the
    parameter count). E.g. `pythia-160m-mesh-2_4R2_2`, `pythia-160m-mesh-2_4R2_2-relax64`."""
    base = source.rstrip("/").rsplit("/", 1)[-1] or "model"
    relax = f"relax{relax_rank}" if relax_rank not in (0, None) else None
    return "-".join(part for part in (base, variant, layout_name, relax) if part)


def with_training(record: ConversionRecord | None, training: dict | None) -> ConversionRecord | None:
    """`record` (of the source model) with the `training` section of a run that continued it."""
    if training is None:
        return record
    base = record or ConversionRecord()
    return base.model_copy(update={"training": Training.model_validate(training)})


def with_removed_code(record: ConversionRecord | None, removed: list[str]) -> ConversionRecord | None:
    """`record` that also names the remote code `removed` from the folder it describes (after what
    earlier steps, e.g. the conversion before a training run, removed)."""
    if not removed:
        return record
    base = record or ConversionRecord()
    earlier = base.removed_remote_code or []
    return base.model_copy(update={"removed_remote_code": earlier + [item for item in removed if item not in earlier]})


__all__ = ["FILENAME", "ConversionRecord", "EvalEntry", "Params", "Source", "Training", "converted_name",
           "published_adapter_config", "published_config", "with_removed_code", "with_training"]
