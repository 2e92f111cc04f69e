"""The conversion plan: which layout, which original layers feed which unique layer, and how
many parameters the result has. Pure bookkeeping, no weights and no torch (spec sections 1 and 5),
so that `--dry-run` plans stay light."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, get_args

from .. import __version__
from ..errors import UserError
from ..artifacts.record import ConversionRecord, Params, converted_name
from ..layout import Layout, resolve_layout
from .families import SourceFamily, source_family
from ..options import DEFAULT_ROUTER_GAP, DTYPE_MAX, check_router_gap
from .options import MAX_SLOTS, ConvertOptions, Tie, default_slots
from .pythia import parse_alias, pythia_config_fields
from .source import SourceRef, fetch_config, load_source_config, resolve_source

if TYPE_CHECKING:
    from ..modeling.configuration_mesh import MeshConfig

TIES = get_args(Tie)


def shared_sources(layout: Layout, tie: str) -> list[list[int]]:
    """For each core position, the original layers its shared weights are made from."""
    by_loop = layout.loop_sources()  # by_loop[t][i]: the layer that loop t of position i stands in for
    if tie == "average":
        return [list(stand_ins) for stand_ins in zip(*by_loop)]
    if tie == "lower":
        return [[layer] for layer in by_loop[0]]
    if tie == "upper":
        return [[layer] for layer in by_loop[-1]]
    if tie == "stepwise":
        # round(linspace(0, C*K - 1, C)) over the middle block's layers: evenly spaced (Python rounds
        # half to even, as numpy)
        middle = [layer for loop in by_loop for layer in loop]
        if layout.core == 1:
            return [middle[:1]]
        step = (len(middle) - 1) / (layout.core - 1)
        return [[middle[round(i * step)]] for i in range(layout.core)]
    raise ValueError(f"unknown tie strategy {tie!r}; choose one of {', '.join(TIES)}")


def layer_map(layout: Layout, tie: str) -> dict[str, list[list[int]]]:
    """Which original layers fed each unique layer (recorded in the config and conversion.json)."""
    n = layout.unrolled_layers
    return {
        "prelude": [[j] for j in range(layout.prelude)],
        "core": shared_sources(layout, tie),
        "coda": [[n - layout.coda + j] for j in range(layout.coda)],
    }


def mesh_config_fields(
    source_config,
    layout: Layout,
    variant: str = "mesh",
    slots: int | None = None,
    router_gap: float = DEFAULT_ROUTER_GAP,
    relax_rank: int | str = 0,
    provenance: dict | None = None,
) -> dict:
    """The `MeshConfig` fields of a conversion of `source_config` (any object with the source
    config's attributes) into `layout`."""
    family = source_family(getattr(source_config, "model_type", None))
    if layout.unrolled_layers != source_config.num_hidden_layers:
        raise ValueError(
            f"layout {layout.text} unrolls to {layout.unrolled_layers} layers, "
            f"but the model has {source_config.num_hidden_layers}"
        )
    return dict(
        base_model_type=family.base_model_type,
        num_prelude_layers=layout.prelude,
        num_core_layers=layout.core,
        num_loops=layout.loops,
        num_coda_layers=layout.coda,
        num_hidden_layers=layout.unrolled_layers,
        variant=variant,
        num_slots=slots,
        router_gap=router_gap,
        relax_rank=relax_rank,
        provenance=provenance,
        architectures=["MeshForCausalLM"],
        **family.mesh_fields(source_config),
    )


def mesh_config_from_source(source_config, layout: Layout, *args, **kwargs) -> MeshConfig:
    """The `MeshConfig` of a conversion (arguments as `mesh_config_fields`)."""
    from ..modeling.configuration_mesh import MeshConfig

    return MeshConfig(**mesh_config_fields(source_config, layout, *args, **kwargs))


# Parameter counts, computed from the config's numbers as the model classes lay them out (the
# layer classes mirror the source families', so the same sums count the original model);
# tests check them against the models built on the meta device.


def _relax_is_dense(rank: int | str, in_features: int, out_features: int) -> bool:
    return rank == "full" or rank >= min(in_features, out_features)


def _linears(fields: Mapping) -> list[tuple[int, int, bool]]:
    """(in, out, bias) of every linear map in one decoder layer."""
    D, F = fields["hidden_size"], fields["intermediate_size"]
    attention_bias = fields.get("attention_bias", True)
    if fields["base_model_type"] == "gpt_neox":
        return [(D, 3 * D, attention_bias), (D, D, attention_bias), (D, F, True), (F, D, True)]
    H = fields["num_attention_heads"]
    KV = fields.get("num_key_value_heads") or H
    head_dim = fields.get("head_dim") or D // H
    out_bias = fields.get("attention_output_bias")
    out_bias = attention_bias if out_bias is None else out_bias
    mlp_bias = fields.get("mlp_bias", False)
    return [
        (D, H * head_dim, attention_bias), (D, KV * head_dim, attention_bias), (D, KV * head_dim, attention_bias),
        (H * head_dim, D, out_bias), (D, F, mlp_bias), (D, F, mlp_bias), (F, D, mlp_bias),
    ]


def _norm_vectors(fields: Mapping) -> int:
    """Vectors per norm: LayerNorm has a weight and a bias, RMSNorm a weight."""
    return 2 if fields["base_model_type"] == "gpt_neox" else 1


def _layer_parameters(fields: Mapping) -> int:
    linears = sum(i * o + (o if bias else 0) for i, o, bias in _linears(fields))
    return linears + 2 * _norm_vectors(fields) * fields["hidden_size"]


def _relax_parameters(fields: Mapping) -> int:
    """Per-loop deltas of one core layer (see `modeling_mesh.LoopLinear` and the loop norms)."""
    rank, K = fields.get("relax_rank", 0), fields["num_loops"]
    if rank == 0:
        return 0
    total = 2 * _norm_vectors(fields) * K * fields["hidden_size"]
    for i, o, bias in _linears(fields):
        total += K * (i * o if _relax_is_dense(rank, i, o) else rank * (i + o))
        total += K * o if bias else 0
    return total


def _embedding_parameters(fields: Mapping) -> int:
    embedding = fields["vocab_size"] * fields["hidden_size"]
    return embedding if fields.get("tie_word_embeddings", False) else 2 * embedding


def mesh_parameter_counts(config: MeshConfig | Mapping) -> dict[str, int]:
    """Parameters of a MeSH model (a `MeshConfig` or the dict of its fields): `nonembedding` is the
    unique layers plus the final norm, without routers or relax deltas (tied embeddings count once)."""
    fields = config if isinstance(config, Mapping) else config.to_dict()
    D, K = fields["hidden_size"], fields["num_loops"]
    unique = fields["num_prelude_layers"] + fields["num_core_layers"] + fields["num_coda_layers"]
    nonembedding = unique * _layer_parameters(fields) + _norm_vectors(fields) * D
    slots = fields.get("num_slots") or default_slots(K)
    routers = 2 * (K + 1) * (D * slots + slots) if fields.get("variant", "mesh") == "mesh" else 0
    relax = fields["num_core_layers"] * _relax_parameters(fields)
    embedding = _embedding_parameters(fields)
    return {"nonembedding": nonembedding, "routers": routers, "relax": relax, "embedding": embedding,
            "total": nonembedding + routers + relax + embedding}


def count_parameters(source_config, mesh_config: MeshConfig | Mapping) -> dict[str, float]:
    """Parameter counts of the original and the converted model (see `mesh_parameter_counts`)."""
    fields = mesh_config if isinstance(mesh_config, Mapping) else mesh_config.to_dict()
    original = source_config.num_hidden_layers * _layer_parameters(fields) + _norm_vectors(fields) * fields["hidden_size"]
    counts = {"original_nonembedding": original}
    converted = mesh_parameter_counts(fields)
    counts["converted_nonembedding"] = converted.pop("nonembedding")
    counts.update(converted)
    counts["reduction"] = Params.model_validate(counts).computed_reduction()
    return counts


@dataclass
class ConversionPlan:
    options: ConvertOptions
    source: SourceRef
    source_config: Any  # the source's config, or the built-in facts of a Pythia alias (see `make_plan`)
    layout: Layout
    mesh_fields: dict  # the converted model's MeshConfig fields
    params: dict
    command: str = ""

    @cached_property
    def mesh_config(self) -> MeshConfig:
        from ..modeling.configuration_mesh import MeshConfig

        return MeshConfig(**self.mesh_fields)

    @property
    def family(self) -> SourceFamily:
        return source_family(self.source_config.model_type)

    @property
    def output_dir(self) -> Path:
        if self.options.output is not None:
            return self.options.output
        # The folder's own name, also for `.` or `..`; a Hub id's last part.
        # Named as the record names the source: a local folder by its name (also for `.`), a Hub
        # id or a snapshot in the Hugging Face cache by the model's name, not its revision's hash.
        return Path(converted_name(self.source.recorded()[0], self.options.variant, self.layout.name,
                                   self.options.relax_rank))

    def record(self) -> ConversionRecord:
        """The conversion record (conversion.json) of this plan."""
        return ConversionRecord.model_validate(self.to_dict())

    def to_dict(self) -> dict:
        """The full plan and provenance, as written to conversion.json and printed by --dry-run --json."""
        config = SimpleNamespace(**self.mesh_fields)
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
            "relax_init": config.provenance["relax_init"],
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


def output_dtype_name(options: ConvertOptions, source_config) -> str:
    if options.dtype != "auto":
        return options.dtype
    dtype = getattr(source_config, "dtype", None) or "float32"
    name = str(dtype).removeprefix("torch.")
    return name if name in DTYPE_MAX else "float32"


def check_router_options(options: ConvertOptions, slots: int, dtype_name: str) -> None:
    """The router gap fits the output dtype, and the memory is not absurdly large."""
    check_router_gap(options.router_gap, dtype_name)
    if options.variant == "mesh" and slots > MAX_SLOTS:
        raise UserError(
            f"--slots {slots} is more than {MAX_SLOTS}: every slot adds a hidden state per token to the memory "
            f"buffer and an output to each router; the paper uses K+3 (here {default_slots(options.loops)})"
        )


def make_plan(options: ConvertOptions, command: str = "", builtin_facts: bool = False) -> ConversionPlan:
    """Resolve the source, its architecture and the layout, without reading any weights.

    With `builtin_facts` (for --dry-run), `pythia-<size>` aliases use the suite's built-in
    architecture and need no network; otherwise the checkpoint's own config.json decides."""
    ref = resolve_source(options.model, options.revision)
    alias = parse_alias(options.model) if ref.local_dir is None else None
    if alias and builtin_facts:
        source_config = SimpleNamespace(**pythia_config_fields(alias.size))
    else:
        source_config = load_source_config(fetch_config(ref))
    family = source_family(source_config.model_type)
    try:
        layout = resolve_layout(source_config.num_hidden_layers, options.loops, options.prelude, options.coda)
    except ValueError as error:
        raise UserError(str(error)) from None
    slots = options.slots if options.slots is not None else default_slots(layout.loops)
    if options.variant == "mesh" and slots < layout.loops + 2:
        raise UserError(
            f"--slots {slots} is too few for {layout.loops} loops: the function-preserving router init needs "
            f"K+2 = {layout.loops + 2} slots (one per step plus the embedding); the paper's default is K+3"
        )
    check_router_options(options, slots, output_dtype_name(options, source_config))
    recorded_model, recorded_revision = ref.recorded()
    provenance = {
        "source": {
            "model": recorded_model,
            "revision": recorded_revision,
            "model_type": family.model_type,
            "license": "apache-2.0" if alias else None,
            "num_layers": source_config.num_hidden_layers,
            "hidden_size": source_config.hidden_size,
            "num_attention_heads": source_config.num_attention_heads,
        },
        "tie": options.tie,
        "layer_map": layer_map(layout, options.tie),
        "loop_sources": layout.loop_sources(),
        "relax_rank": options.relax_rank,
        "relax_init": options.relax_init if options.relax_rank != 0 else None,
    }
    mesh_fields = mesh_config_fields(
        source_config, layout, options.variant, slots, options.router_gap, options.relax_rank, provenance
    )
    params = count_parameters(source_config, mesh_fields)
    return ConversionPlan(options, ref, source_config, layout, mesh_fields, params, command)
