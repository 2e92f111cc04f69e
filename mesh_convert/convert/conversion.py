"""Converting a pretrained checkpoint into a MeSH recursive model (spec section 5).

The conversion streams: tensors are read lazily one layer group at a time (an embedding, a
prelude layer, the K stand-ins of one core position, ...), and each output tensor is written
into its place in its shard as soon as it exists (a copied one file to file, see `shards.py`),
so peak memory stays near one group. The result is built in a hidden directory beside the
target and renamed into place at the end.
"""

import json
import math
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from transformers import GenerationConfig

from ..artifacts.card import write_model_card
from ..artifacts.output import check_target, staged_directory
from ..artifacts.record import with_removed_code
from ..artifacts.remote_code import AUTO_MAP, REMOTE_CODE_FILES, strip_foreign_code
from ..errors import UserError
from ..io import torch_dtype
from ..modeling.configuration_mesh import MeshConfig
from ..modeling.modeling_mesh import MeshForCausalLM, relax_is_dense
from .families import MESH_EMBED, MESH_FINAL_NORM, MESH_HEAD, final_norm_names, layer_tensor_shapes
from .options import ConvertOptions
from .plan import ConversionPlan, make_plan, shared_sources
from .reader import CheckpointReader, one_thread
from .shards import ShardWriter, TensorSpan
from .source import fetch_checkpoint, load_generation_config, tokenizer_files


# ---------------------------------------------------------------------------------------------
# The tensors of the converted model, one layer group at a time.
# ---------------------------------------------------------------------------------------------


def _zero_start_deltas(name: str, shape: tuple[int, ...], config: MeshConfig) -> dict[str, torch.Tensor]:
    """`--relax-init zero`: per-loop deltas that start at zero, so the model starts as the plain tie.
    A low-rank pair starts as LoRA does, its output factor zero and its input factor random (both
    zero would never move): normal with the source's initializer_range, the modeling file's own
    init, seeded by the tensor's name so that a conversion is reproducible."""
    K, rank = config.num_loops, config.relax_rank
    if len(shape) == 1 or relax_is_dense(rank, shape[1], shape[0]):
        return {f"{name}_delta": torch.zeros(K, *shape)}
    out_features, in_features = shape
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    factors_in = torch.randn(K, rank, in_features, generator=generator) * config.initializer_range
    return {f"{name}_delta_in": factors_in, f"{name}_delta_out": torch.zeros(K, out_features, rank)}


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


def router_tensors(config: MeshConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
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
    shapes = layer_tensor_shapes(config)
    names = list(shapes)
    dtype = torch_dtype(plan.dtype_name)

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
    stand_ins = layout.loop_sources()
    def tied(i: int, name: str) -> torch.Tensor | TensorSpan:
        """A shared core tensor on its own: a copy of its one stand-in, or the stand-ins' mean."""
        sources = [family.layer(layer) + name for layer in shared[i]]
        if len(sources) == 1:
            return load(sources[0])
        return _average([reader.get(source) for source in sources], dtype)

    def tied_with_svd_deltas(i: int, name: str) -> dict[str, torch.Tensor]:
        """The shared tensor and each loop's (truncated) difference to its stand-in, from float32 originals."""
        sources = {*shared[i], *(s[i] for s in stand_ins)}
        originals = {layer: reader.get(family.layer(layer) + name).to(torch.float32) for layer in sources}
        shared_tensor = torch.stack([originals[layer] for layer in shared[i]]).mean(0)
        deltas = [originals[loop[i]] - shared_tensor for loop in stand_ins]
        tensors = {name: shared_tensor, **_delta_tensors(name, deltas, config.relax_rank)}
        return {f"model.core.{i}.{key}": value.to(dtype) for key, value in tensors.items()}

    for i in range(layout.core):
        group = {}
        for name in names:
            if config.relax_rank != 0 and plan.options.relax_init == "svd":
                group.update(tied_with_svd_deltas(i, name))
                continue
            key = f"model.core.{i}.{name}"
            group[key] = tied(i, name)
            if config.relax_rank != 0:  # --relax-init zero: the plain tie, plus deltas that start at zero
                group.update((k, v.to(dtype)) for k, v in _zero_start_deltas(key, shapes[name], config).items())
        yield f"core layer {i}", group

    first_coda = layout.unrolled_layers - layout.coda
    for j in range(layout.coda):
        yield f"coda layer {j}", copy_layer("coda", j, first_coda + j)
    yield "final norm", {MESH_FINAL_NORM + n: load(family.final_norm + n) for n in final_norm_names(config)}
    if config.variant == "mesh":
        yield "routers", router_tensors(config, dtype)
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

    `options` are those of `ConvertOptions` (prelude, coda, variant, tie, slots, router_gap, relax_rank,
    relax_init, dtype)."""
    with tempfile.TemporaryDirectory() as config_dir:
        model.config.save_pretrained(config_dir)
        plan = make_plan(ConvertOptions(model=config_dir, loops=loops, **options))
    plan.options = plan.options.model_copy(update={"model": type(model).__name__})
    reader = CheckpointReader(state_dict=model.state_dict())
    check_source_tensors(reader, plan)
    converted = MeshForCausalLM(plan.mesh_config)
    converted.load_state_dict(convert_state_dict(reader, plan), strict=not plan.mesh_config.tie_word_embeddings)
    converted.tie_weights()
    return converted.to(torch_dtype(plan.dtype_name)).eval()


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
    removed_code: list[str] = field(default_factory=list)  # the source's remote code, not carried over


def write_weights(staging: Path, reader: CheckpointReader, plan: ConversionPlan, progress) -> tuple[list[str], int]:
    """Stream the converted tensors into safetensors shards: each tensor goes to its place in its
    shard as soon as it exists, and a copied one goes from file to file without being read."""
    dtype = torch_dtype(plan.dtype_name)
    expected = expected_tensors(plan.mesh_config, dtype)
    split = split_torch_state_dict_into_shards(expected, max_shard_size=plan.options.max_shard_bytes)
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


def write_metadata(
    staging: Path, generation: GenerationConfig | None, plan: ConversionPlan, tokenizers: list[Path]
) -> list[str]:
    """Config with auto_map, generation config, remote code, tokenizer, conversion.json, model card;
    returns what of the source's own remote code was dropped (and recorded in conversion.json)."""
    config = plan.mesh_config
    config.dtype = torch_dtype(plan.dtype_name)
    config.auto_map = dict(AUTO_MAP)
    config.save_pretrained(staging)
    package_dir = Path(__file__).parents[1] / "modeling"
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(package_dir / name, staging / name)
    (generation or GenerationConfig.from_model_config(config)).save_pretrained(staging)
    for path in tokenizers:
        shutil.copyfile(path, staging / path.name)
    removed = strip_foreign_code(staging)
    record = with_removed_code(plan.record(), removed)
    record.write(staging)
    write_model_card(staging, record, repo_id=plan.options.push_to_hub)
    return removed


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
    generation = load_generation_config(source_dir)
    with staged_directory(target, plan.options.overwrite, sources) as staging:
        shards, total = write_weights(staging, reader, plan, progress)
        removed = write_metadata(staging, generation, plan, tokenizers)
    return ConversionResult(target, plan, shards, total, time.perf_counter() - started, reader.non_finite, removed)
