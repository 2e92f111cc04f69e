"""Converting a pretrained checkpoint into a MeSH recursive model (spec section 5).

The conversion streams: tensors are read lazily one layer group at a time (an embedding, a
prelude layer, the K stand-ins of one core position, ...), and each output tensor is written
into its place in its shard as soon as it exists (a copied one file to file, see `shards.py`),
so peak memory stays near one group. The result is built in a hidden directory beside the
target and renamed into place at the end.
"""

import ctypes
import errno
import glob
import json
import math
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from pydantic import BaseModel, ConfigDict, Field, field_validator
from transformers import GenerationConfig, PreTrainedConfig

from . import __version__
from .checkpoint import (
    CheckpointReader,
    SourceRef,
    fetch_checkpoint,
    fetch_config,
    load_source_config,
    one_thread,
    resolve_source,
    tokenizer_files,
)
from .configuration_mesh import MeshConfig
from .errors import Interrupted, UserError
from .families import (
    MESH_EMBED,
    MESH_FINAL_NORM,
    MESH_HEAD,
    SourceFamily,
    final_norm_names,
    layer_tensor_shapes,
    source_family,
)
from .modeling_mesh import MeshForCausalLM, relax_is_dense
from .plan import (
    DEFAULT_ROUTER_GAP,
    Layout,
    count_parameters,
    layer_map,
    loop_sources,
    mesh_config_from_source,
    resolve_layout,
    shared_sources,
)
from .pythia import parse_alias, pythia_config
from .shards import ShardWriter, TensorSpan

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REMOTE_CODE_FILES = ("configuration_mesh.py", "modeling_mesh.py")
AUTO_MAP = {
    "AutoConfig": "configuration_mesh.MeshConfig",
    "AutoModel": "modeling_mesh.MeshModel",
    "AutoModelForCausalLM": "modeling_mesh.MeshForCausalLM",
}
# Each slot is one more hidden state per token in the memory buffer, and one more output of every
# router; the paper uses K+3 and found K+1 .. K+4 alike. Far beyond that is a typo, not a design.
MAX_SLOTS = 1024


class ConvertOptions(BaseModel):
    """Everything a conversion depends on; the CLI (and recipes) build this, and it validates."""

    model_config = ConfigDict(extra="forbid")

    model: str
    loops: int = Field(ge=1)
    prelude: int | None = Field(default=None, ge=0)
    coda: int | None = Field(default=None, ge=0)
    variant: Literal["mesh", "base", "residual", "anchor", "anchor_emb"] = "mesh"
    tie: Literal["average", "stepwise", "lower", "upper"] = "upper"
    slots: int | None = Field(default=None, ge=2)
    router_gap: float = Field(default=DEFAULT_ROUTER_GAP, gt=0, allow_inf_nan=False)
    relax_rank: int | Literal["full"] = 0
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    revision: str | None = None
    output: Path | None = None
    overwrite: bool = False
    max_shard_size: str = "5GB"
    push_to_hub: str | None = None  # the card's usage snippet then names this repo

    @field_validator("relax_rank", mode="before")
    @classmethod
    def _parse_rank(cls, value):
        if isinstance(value, str) and value.strip().lower() == "full":
            return "full"
        try:
            rank = int(value)
        except (TypeError, ValueError):
            raise ValueError("must be a non-negative integer or 'full'") from None
        if rank < 0:
            raise ValueError("must be a non-negative integer or 'full'")
        return rank

    @field_validator("max_shard_size")
    @classmethod
    def _parse_size(cls, value: str):
        from huggingface_hub.serialization._base import parse_size_to_int

        try:
            if parse_size_to_int(value) <= 0:
                raise ValueError
        except ValueError:
            raise ValueError("must be a size like 500MB or 5GB") from None
        return value


@dataclass
class ConversionPlan:
    options: ConvertOptions
    source: SourceRef
    source_config: PreTrainedConfig
    layout: Layout
    mesh_config: MeshConfig
    params: dict
    command: str = ""

    @property
    def family(self) -> SourceFamily:
        return source_family(self.source_config.model_type)

    @property
    def output_dir(self) -> Path:
        if self.options.output is not None:
            return self.options.output
        # The folder's own name, also for `.` or `..`; a Hub id's last part.
        local = self.source.local_dir
        base = local.name if local is not None else self.source.name.rstrip("/").rsplit("/", 1)[-1]
        return Path(f"{base}-mesh-{self.layout.text}")

    def to_dict(self) -> dict:
        """The full plan and provenance, as written to conversion.json and printed by --dry-run --json."""
        config = self.mesh_config
        return {
            "mesh_convert_version": __version__,
            "command": self.command,
            "source": config.provenance["source"],
            "layout": self.layout.text,
            "prelude": self.layout.prelude,
            "core": self.layout.core,
            "loops": self.layout.loops,
            "coda": self.layout.coda,
            "variant": config.variant,
            "tie": self.options.tie,
            "slots": config.num_slots if config.variant == "mesh" else None,
            "router_gap": config.router_gap if config.variant == "mesh" else None,
            "relax_rank": config.relax_rank,
            "dtype": self.dtype_name,
            "layer_map": config.provenance["layer_map"],
            "loop_sources": config.provenance["loop_sources"],
            "params": self.params,
            "output": str(self.output_dir),
            "training": None,
            "eval_results": None,
        }

    @property
    def dtype_name(self) -> str:
        return output_dtype_name(self.options, self.source_config)


def output_dtype_name(options: ConvertOptions, source_config: PreTrainedConfig) -> str:
    if options.dtype != "auto":
        return options.dtype
    dtype = getattr(source_config, "dtype", None) or torch.float32
    name = str(dtype).removeprefix("torch.")
    return name if name in DTYPES else "float32"


def check_router_options(options: ConvertOptions, slots: int, dtype_name: str) -> None:
    """The router init stores the gap as a bias in the output dtype: it must be a number that dtype holds."""
    largest = torch.finfo(DTYPES[dtype_name]).max
    if options.router_gap > largest:
        raise UserError(
            f"--router-gap {options.router_gap:g} does not fit {dtype_name}, the dtype the router biases are "
            f"stored in: use a gap in (0, {largest:g}] (the default is {DEFAULT_ROUTER_GAP:g})"
        )
    if options.variant == "mesh" and slots > MAX_SLOTS:
        raise UserError(
            f"--slots {slots} is more than {MAX_SLOTS}: every slot adds a hidden state per token to the memory "
            f"buffer and an output to each router; the paper uses K+3 (here {options.loops + 3})"
        )


def make_plan(options: ConvertOptions, command: str = "", builtin_facts: bool = False) -> ConversionPlan:
    """Resolve the source, its architecture and the layout, without reading any weights.

    With `builtin_facts` (for --dry-run), `pythia-<size>` aliases use the suite's built-in
    architecture and need no network; otherwise the checkpoint's own config.json decides."""
    ref = resolve_source(options.model, options.revision)
    alias = parse_alias(options.model) if ref.local_dir is None else None
    if alias and builtin_facts:
        source_config = pythia_config(alias.size)
    else:
        source_config = load_source_config(fetch_config(ref))
    family = source_family(source_config.model_type)
    try:
        layout = resolve_layout(source_config.num_hidden_layers, options.loops, options.prelude, options.coda)
    except ValueError as error:
        raise UserError(str(error)) from None
    slots = options.slots if options.slots is not None else layout.loops + 3
    if options.variant == "mesh" and slots < layout.loops + 2:
        raise UserError(
            f"--slots {slots} is too few for {layout.loops} loops: the function-preserving router init needs "
            f"K+2 = {layout.loops + 2} slots (one per step plus the embedding); the paper's default is K+3"
        )
    check_router_options(options, slots, output_dtype_name(options, source_config))
    provenance = {
        "source": {
            "model": ref.repo_id or str(ref.local_dir),
            "revision": ref.revision,
            "model_type": family.model_type,
            "license": "apache-2.0" if alias else None,
            "num_layers": source_config.num_hidden_layers,
            "hidden_size": source_config.hidden_size,
            "num_attention_heads": source_config.num_attention_heads,
        },
        "tie": options.tie,
        "layer_map": layer_map(layout, options.tie),
        "loop_sources": loop_sources(layout),
        "router_gap": options.router_gap,
        "relax_rank": options.relax_rank,
    }
    mesh_config = mesh_config_from_source(
        source_config, layout, options.variant, slots, options.router_gap, options.relax_rank, provenance
    )
    params = count_parameters(source_config, mesh_config)
    return ConversionPlan(options, ref, source_config, layout, mesh_config, params, command)


# ---------------------------------------------------------------------------------------------
# The tensors of the converted model, one layer group at a time.
# ---------------------------------------------------------------------------------------------


def _delta_tensors(name: str, deltas: list[torch.Tensor], rank) -> dict[str, torch.Tensor]:
    """Per-loop deltas of one shared tensor: exact for vectors (biases, norms) and dense matrices,
    truncated SVD for low-rank ones (split as sqrt(S) on both factors, so both train alike)."""
    if deltas[0].ndim == 1:
        return {f"{name}_delta": torch.stack(deltas)}
    out_features, in_features = deltas[0].shape
    if relax_is_dense(rank, in_features, out_features):
        return {f"{name}_delta": torch.stack(deltas)}
    factors_in, factors_out = [], []
    for delta in deltas:
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        root = S[:rank].sqrt()
        factors_out.append(U[:, :rank] * root)
        factors_in.append(root[:, None] * Vh[:rank])
    return {f"{name}_delta_in": torch.stack(factors_in), f"{name}_delta_out": torch.stack(factors_out)}


def _average(tensors: list[torch.Tensor], dtype: torch.dtype, chunk: int = 1 << 17) -> torch.Tensor:
    """Mean of same-shaped tensors, accumulated in float32 one cache-sized chunk at a time and
    written straight into `dtype` (same bits as stacking float32 copies, and many times faster).
    A 512 KiB float32 chunk stays in L2 while being large enough that the Python loop costs
    little: 1.7x faster than 128 KiB chunks on a pythia-1b layer."""
    out = torch.empty(tensors[0].shape, dtype=dtype)
    flat_out, flats = out.view(-1), [t.reshape(-1) for t in tensors]
    # One thread: a single busy core made SmolLM2's conversion 7x slower (bench_convert.py).
    with one_thread():
        for start in range(0, flat_out.numel(), chunk):
            acc = flats[0][start : start + chunk].to(torch.float32, copy=True)
            for flat in flats[1:]:
                acc += flat[start : start + chunk]
            flat_out[start : start + chunk] = acc.div_(len(tensors))
    return out


def _router_tensors(config: MeshConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Function-preserving routers (spec section 5): zero weights, and a bias that puts almost all
    mass on the step's own slot (transitional step -> slot 1, loop t -> slot t+2), for writing and
    reading alike, so each step reads back exactly what it wrote."""
    tensors = {}
    for step in range(config.num_router_pairs):
        bias = torch.zeros(config.num_slots)
        bias[step + 1] = config.router_gap
        for kind in ("write_routers", "read_routers"):
            tensors[f"model.memory.{kind}.{step}.weight"] = torch.zeros(config.num_slots, config.hidden_size, dtype=dtype)
            tensors[f"model.memory.{kind}.{step}.bias"] = bias.to(dtype).clone()
    return tensors


def iter_tensor_groups(
    reader: CheckpointReader, plan: ConversionPlan, spans: bool = False
) -> Iterator[tuple[str, dict[str, torch.Tensor | TensorSpan]]]:
    """Yield (label, {output name: tensor in the output dtype}) in the order of the model's state dict.

    Copied tensors pass through in their stored dtype (cast only if the output differs); with
    `spans`, one already in the output dtype comes as the `TensorSpan` of its bytes in the source
    file instead of being read. Averages and deltas are computed in float32 and cast as soon as
    they exist, so a group never holds more than one float32 layer at a time."""
    family, layout, config = plan.family, plan.layout, plan.mesh_config
    names = list(layer_tensor_shapes(config))
    dtype = DTYPES[plan.dtype_name]

    def load(name: str) -> torch.Tensor | TensorSpan:
        span = reader.span(name) if spans else None
        if span is not None and span.dtype == dtype:
            return span
        return reader.get(name).to(dtype)

    def copy_layer(stage: str, position: int, source_layer: int):
        prefix = family.layer(source_layer)
        return {f"model.{stage}.{position}.{name}": load(prefix + name) for name in names}

    yield "embedding", {MESH_EMBED: load(family.embed)}
    for j in range(layout.prelude):
        yield f"prelude layer {j}", copy_layer("prelude", j, j)

    shared = shared_sources(layout, plan.options.tie)
    stand_ins = loop_sources(layout)
    for i in range(layout.core):
        group = {}
        for name in names:
            if config.relax_rank == 0:  # no deltas: the float32 originals are not needed
                sources = [family.layer(layer) + name for layer in shared[i]]
                group[f"model.core.{i}.{name}"] = (
                    load(sources[0])  # tied to one stand-in: a copy
                    if len(sources) == 1
                    else _average([reader.get(source) for source in sources], dtype)
                )
                continue
            sources = {*shared[i], *(s[i] for s in stand_ins)}
            originals = {layer: reader.get(family.layer(layer) + name).to(torch.float32) for layer in sources}
            shared_tensor = torch.stack([originals[layer] for layer in shared[i]]).mean(0)
            group[f"model.core.{i}.{name}"] = shared_tensor.to(dtype)
            deltas = [originals[loop[i]] - shared_tensor for loop in stand_ins]
            group.update(
                (f"model.core.{i}.{key}", value.to(dtype))
                for key, value in _delta_tensors(name, deltas, config.relax_rank).items()
            )
        yield f"core layer {i}", group

    first_coda = layout.unrolled_layers - layout.coda
    for j in range(layout.coda):
        yield f"coda layer {j}", copy_layer("coda", j, first_coda + j)
    yield "final norm", {MESH_FINAL_NORM + n: load(family.final_norm + n) for n in final_norm_names(config)}
    if config.variant == "mesh":
        yield "routers", _router_tensors(config, dtype)
    if not config.tie_word_embeddings:
        head = next(name for name in family.heads if name in reader)
        yield "output head", {MESH_HEAD: load(head)}


def expected_tensors(config: MeshConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The converted model's state dict on the meta device: names, shapes, order."""
    with torch.device("meta"):
        model = MeshForCausalLM(config).to(dtype)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop(MESH_HEAD)
    return state


def check_source_tensors(reader: CheckpointReader, plan: ConversionPlan) -> None:
    """Every tensor the conversion needs exists, is floating point and has the shape its config
    implies, and no layer lies beyond the config's count; checked before any output."""
    family, config = plan.family, plan.mesh_config
    layer_shapes = layer_tensor_shapes(config)
    embedding = (config.vocab_size, config.hidden_size)
    wanted = {family.embed: embedding}
    wanted.update({family.final_norm + name: (config.hidden_size,) for name in final_norm_names(config)})
    for layer in range(plan.layout.unrolled_layers):
        wanted.update({family.layer(layer) + name: shape for name, shape in layer_shapes.items()})
    if not config.tie_word_embeddings:
        head = next((name for name in family.heads if name in reader), family.heads[0])
        wanted[head] = embedding
    for name, shape in wanted.items():
        if name not in reader:
            raise UserError(f"the checkpoint lacks tensor {name} (truncated, or not a {family.model_type} model?)")
        reader.dtype(name)  # refuses integer and complex tensors
        if reader.shape(name) != shape:
            raise UserError(
                f"tensor {name} has shape {list(reader.shape(name))}, but config.json implies {list(shape)}"
            )
    beyond = family.layer(plan.layout.unrolled_layers)
    extra = next((name for name in reader.names() if name.startswith(beyond)), None)
    if extra is not None:
        raise UserError(
            f"the checkpoint has tensors of layer {plan.layout.unrolled_layers} ({extra}), but config.json says "
            f"num_hidden_layers is {plan.layout.unrolled_layers}: converting would drop layers"
        )


def convert_state_dict(reader: CheckpointReader, plan: ConversionPlan) -> dict[str, torch.Tensor]:
    """All converted tensors at once, in memory (for small models and the Python API)."""
    state = {}
    for _, group in iter_tensor_groups(reader, plan):
        state.update(group)
    return state


def convert_model(model, loops: int, **options) -> MeshForCausalLM:
    """Convert an in-memory source model (e.g. a `GPTNeoXForCausalLM`) into a `MeshForCausalLM`.

    `options` are those of `ConvertOptions` (prelude, coda, variant, tie, slots, router_gap, relax_rank, dtype)."""
    with tempfile.TemporaryDirectory() as config_dir:
        model.config.save_pretrained(config_dir)
        plan = make_plan(ConvertOptions(model=config_dir, loops=loops, **options))
    plan.options = plan.options.model_copy(update={"model": type(model).__name__})
    reader = CheckpointReader(state_dict=model.state_dict())
    check_source_tensors(reader, plan)
    converted = MeshForCausalLM(plan.mesh_config)
    converted.load_state_dict(convert_state_dict(reader, plan), strict=not plan.mesh_config.tie_word_embeddings)
    converted.tie_weights()
    return converted.to(DTYPES[plan.dtype_name]).eval()


# ---------------------------------------------------------------------------------------------
# Writing the output directory.
# ---------------------------------------------------------------------------------------------


@dataclass
class ConversionResult:
    output_dir: Path
    plan: ConversionPlan
    shards: list[str] = field(default_factory=list)
    bytes_written: int = 0
    seconds: float = 0.0
    non_finite: list[str] = field(default_factory=list)  # source tensors read with NaN or inf in them


def resolve_target(target: Path) -> Path:
    """The directory a write to `target` lands in: `.` becomes the working directory's real path,
    and a symlinked target the directory it points to (the link itself stays)."""
    return Path(os.path.realpath(target))


def check_target(target: Path, overwrite: bool, sources: tuple[Path, ...] = ()) -> None:
    """Refuse, before any work, an output that would replace something not ours to replace."""
    shown, target = target, resolve_target(target)
    if target.exists() and not target.is_dir():
        raise UserError(f"output {shown} exists and is not a directory")
    cwd = Path.cwd().resolve()
    if cwd == target or target in cwd.parents:
        raise UserError(f"output {shown} is (or holds) the current directory; choose another --output")
    for source in sources:
        source = Path(os.path.realpath(source))
        # Inside the source only matters with --overwrite: a new folder beside its files harms nothing.
        if source == target or target in source.parents or (overwrite and source in target.parents):
            raise UserError(f"output {shown} would replace (part of) the input {source}; choose another --output")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise UserError(f"output directory {shown} exists and is not empty (use --overwrite to replace it)")


STAGING, SET_ASIDE = "partial", "old"
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextmanager
def _stop_signals(handler) -> Iterator[None]:
    """Route the stop signals (Ctrl-C, SIGTERM, SIGHUP) to `handler` meanwhile; one the user set
    to be ignored (`nohup`) stays ignored. Python lets only the main thread set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    try:
        for number in STOP_SIGNALS:
            current = signal.getsignal(number)
            if current is not signal.SIG_IGN and current is not None:  # None: set outside Python
                previous[number] = current
                signal.signal(number, handler)
        yield
    finally:
        for number, current in previous.items():
            signal.signal(number, current)


def _raise_interrupt(number, frame):
    raise KeyboardInterrupt


def _owner_alive(pid_text: str) -> bool:
    if not pid_text.isdigit():
        return False  # a leftover of a version that did not record its process
    if os.name == "nt":
        return True  # there, os.kill(pid, 0) would terminate the process rather than probe it
    try:
        os.kill(int(pid_text), 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True  # alive, under another user
    return True


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def reclaim_leftovers(target: Path) -> None:
    """Remove what killed runs (SIGKILL, power loss) left beside `target`: staging directories,
    and set-aside previous versions; a set-aside one whose target is gone (killed between the two
    renames of the portable swap) is put back, so the previous state returns whole."""
    prefix = f".{target.name}."
    for path in target.parent.glob(glob.escape(prefix) + "*-*"):
        kind, _, owner = path.name[len(prefix) :].partition("-")
        if kind not in (STAGING, SET_ASIDE) or _owner_alive(owner.split("-")[0]):
            continue
        if kind == SET_ASIDE and not os.path.lexists(target):
            path.rename(target)
        else:
            _remove(path)


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # old kernel or a filesystem without exchange
    raise OSError(code, os.strerror(code), str(second))


def _publish(staging: Path, target: Path, overwrite: bool, tag: str) -> None:
    """Make `staging` the target. Without overwrite, rename(2) itself refuses a target that
    became non-empty meanwhile; with it, the swap is one atomic exchange where the system has one."""
    if not overwrite or not os.path.lexists(target):
        try:
            staging.rename(target)
        except OSError as error:
            if error.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise UserError(
                    f"{target} was filled by something else while this ran; left it as it is "
                    "(use --overwrite to replace it)"
                ) from None
            raise
        return
    if _exchange(staging, target):
        _remove(staging)  # now the previous version
        return
    set_aside = target.with_name(f".{target.name}.{SET_ASIDE}-{tag}")
    target.rename(set_aside)
    try:
        staging.rename(target)
    except OSError:
        set_aside.rename(target)
        raise
    _remove(set_aside)


@contextmanager
def staged_directory(target: Path, overwrite: bool = False, sources: tuple[Path, ...] = ()) -> Iterator[Path]:
    """A hidden directory beside `target` that becomes the target on success and vanishes on any
    failure, Ctrl-C, SIGTERM or SIGHUP. Without `overwrite` a non-empty target is never replaced,
    even one filled while this runs; with it the old and the new swap whole. Either way a reader
    of `target` sees one of the two complete states, and a run killed outright leaves only hidden
    leftovers, which the next run to that target reclaims."""
    shown, target = target, resolve_target(target)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    staging = target.with_name(f".{target.name}.{STAGING}-{tag}")
    try:
        reclaim_leftovers(target)  # first: a previous version put back is then checked like any other
        check_target(shown, overwrite, sources)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()  # mode from the umask, like any other directory the user creates
    except OSError as error:
        raise UserError(f"cannot write to {target.parent}: {error.strerror or error}") from None
    stops = []
    try:
        with _stop_signals(_raise_interrupt):
            yield staging
        # From here the result is complete: a stop signal waits until the swap is whole, then
        # is reported as what it is, an interruption after the new version was published.
        with _stop_signals(lambda number, frame: stops.append(number)):
            _publish(staging, target, overwrite, tag)
    except OSError as error:
        _remove(staging)
        raise UserError(f"writing {target} failed: {error.strerror or error}") from None
    except BaseException:
        _remove(staging)
        raise
    if stops:
        raise Interrupted(f"interrupted after {target} was written in full")


def write_weights(staging: Path, reader: CheckpointReader, plan: ConversionPlan, progress) -> tuple[list[str], int]:
    """Stream the converted tensors into safetensors shards: each tensor goes to its place in its
    shard as soon as it exists, and a copied one goes from file to file without being read."""
    dtype = DTYPES[plan.dtype_name]
    expected = expected_tensors(plan.mesh_config, dtype)
    split = split_torch_state_dict_into_shards(expected, max_shard_size=plan.options.max_shard_size)
    total = sum(t.numel() * t.element_size() for t in expected.values())
    task = progress.add_task("converting", total=total)
    layout = {
        filename: {name: tuple(expected[name].shape) for name in names}
        for filename, names in split.filename_to_tensors.items()
    }
    with ShardWriter(staging, layout, dtype, metadata={"format": "pt"}) as shards:
        for label, group in iter_tensor_groups(reader, plan, spans=True):
            progress.update(task, description=label)
            for name, tensor in group.items():
                if name not in expected or tuple(tensor.shape) != tuple(expected[name].shape):
                    raise RuntimeError(f"converter produced {name} {tuple(tensor.shape)}, which the model does not expect")
                shards.write(name, tensor)
                progress.advance(task, math.prod(tensor.shape) * dtype.itemsize)
    if split.is_sharded:
        index = {"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return list(split.filename_to_tensors), total


def write_metadata(staging: Path, source_dir: Path, plan: ConversionPlan, tokenizers: list[Path]) -> None:
    """Config with auto_map, generation config, remote code, tokenizer, conversion.json, model card."""
    config = plan.mesh_config
    config.dtype = DTYPES[plan.dtype_name]
    config.auto_map = dict(AUTO_MAP)
    config.save_pretrained(staging)
    package_dir = Path(__file__).parent
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(package_dir / name, staging / name)
    if (source_dir / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(source_dir)
    else:
        generation = GenerationConfig.from_model_config(config)
    generation.save_pretrained(staging)
    for path in tokenizers:
        shutil.copyfile(path, staging / path.name)
    info = plan.to_dict()
    (staging / "conversion.json").write_text(json.dumps(info, indent=2) + "\n")
    from .card import write_model_card

    write_model_card(staging, info, repo_id=plan.options.push_to_hub)


def convert(plan: ConversionPlan, progress) -> ConversionResult:
    """Run a planned conversion; `progress` is a rich Progress (or anything with its task methods)."""
    started = time.perf_counter()
    target = plan.output_dir
    sources = (plan.source.local_dir,) if plan.source.local_dir is not None else ()
    check_target(target, plan.options.overwrite, sources)
    source_dir = fetch_checkpoint(plan.source)
    reader = CheckpointReader(source_dir)
    check_source_tensors(reader, plan)
    tokenizers = tokenizer_files(source_dir, local=plan.source.local_dir is not None)
    with staged_directory(target, plan.options.overwrite, sources) as staging:
        shards, total = write_weights(staging, reader, plan, progress)
        write_metadata(staging, source_dir, plan, tokenizers)
    return ConversionResult(target, plan, shards, total, time.perf_counter() - started, reader.non_finite)
