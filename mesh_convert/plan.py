"""The conversion plan: which layout, which original layers feed which unique layer, and how
many parameters the result has. Pure bookkeeping, no weights (spec sections 1 and 5)."""

import math
import re
from dataclasses import dataclass

import torch
from transformers import PreTrainedConfig

from .configuration_mesh import MeshConfig
from .families import final_norm_names, layer_tensor_shapes, source_family
from .modeling_mesh import MeshForCausalLM

TIES = ("average", "stepwise", "lower", "upper")
# Logit gap of the function-preserving router init (spec section 5): off-target mass is
# (B-1)*e^-gap. See BENCHMARKS.md / scripts/bench_router_gap.py for how it was chosen.
DEFAULT_ROUTER_GAP = 8.0


_LAYOUT_TEXT = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*[Rr]\s*(\d+)\s*\+\s*(\d+)\s*$")


@dataclass(frozen=True)
class Layout:
    """P prelude layers, C core layers looped K times, Q coda layers: `P+CRK+Q`."""

    prelude: int
    core: int
    loops: int
    coda: int

    @classmethod
    def parse(cls, text: str) -> "Layout":
        """`"4+8R2+4"` -> Layout(4, 8, 2, 4); ValueError for anything else."""
        match = _LAYOUT_TEXT.match(text)
        if match is None:
            raise ValueError(f"layout {text!r} is not of the form P+CRK+Q (e.g. 4+8R2+4)")
        layout = cls(*(int(group) for group in match.groups()))
        if layout.core < 1 or layout.loops < 1:
            raise ValueError(f"layout {text!r} needs at least one core layer and one loop")
        return layout

    @property
    def text(self) -> str:
        return f"{self.prelude}+{self.core}R{self.loops}+{self.coda}"

    @property
    def unrolled_layers(self) -> int:
        return self.prelude + self.core * self.loops + self.coda

    def boundary_index(self, t: int) -> int:
        """Index of h^(t) in a model's `hidden_states` (entry 0 is the embeddings)."""
        return self.prelude + t * self.core

    @property
    def state_names(self) -> list[str]:
        return ["h_emb", *(f"h^({t})" for t in range(self.loops + 1)), "h_out"]

    @property
    def block_names(self) -> list[str]:
        return ["prelude", *(f"loop {t + 1}" for t in range(self.loops)), "coda"]

    def __str__(self) -> str:
        return self.text


def _layouts(num_layers: int, loops: int, min_outer: int = 1) -> list[Layout]:
    """Every compute-matched layout P + C*K + Q = num_layers with C >= 1 and P, Q >= min_outer."""
    layouts = []
    for core in range(1, num_layers // loops + 1):
        rest = num_layers - core * loops
        for prelude in range(min_outer, rest - min_outer + 1):
            layouts.append(Layout(prelude, core, loops, rest - prelude))
    return layouts


def default_layout(num_layers: int, loops: int) -> Layout:
    """The paper's rule: prelude = coda ~ C/2, i.e. C ~ N/(K+1), with the outer layers split evenly.

    Reproduces 2+4R2+2 (12 layers), 4+8R2+4 and 3+6R3+3 (24), 3+5R2+3 (16). Among the layouts
    closest to C = N/(K+1), an even split of the outer layers wins; an odd extra layer goes to the coda.
    """
    if loops < 1:
        raise ValueError("--loops must be at least 1")
    # Per core size, the one split of the rest with coda - prelude in {0, 1}, both at least 1.
    balanced = [
        Layout(rest // 2, core, loops, rest - rest // 2)
        for core in range(1, num_layers // loops + 1)
        if (rest := num_layers - core * loops) >= 2
    ]
    if not balanced:
        raise ValueError(
            f"{num_layers} layers are too few for {loops} loops with at least one prelude and one coda layer"
        )
    target = num_layers / (loops + 1)
    return min(balanced, key=lambda l: (abs(l.core - target), l.coda != l.prelude, -l.core))


def resolve_layout(num_layers: int, loops: int, prelude: int | None = None, coda: int | None = None) -> Layout:
    """The default layout, or the one the user's --prelude/--coda pin down, or a ValueError that names
    layouts that would work."""
    if prelude is None and coda is None:
        return default_layout(num_layers, loops)
    if loops < 1:
        raise ValueError("--loops must be at least 1")
    for name, value in (("--prelude", prelude), ("--coda", coda)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0")
    options = [
        layout
        for layout in _layouts(num_layers, loops, min_outer=0)
        if (prelude is None or layout.prelude == prelude) and (coda is None or layout.coda == coda)
    ]
    if options:
        # With one of the two given, the other follows as close to it as the layer count allows.
        given = prelude if prelude is not None else coda
        return min(options, key=lambda l: (abs(l.prelude - l.coda), -l.core, abs(l.prelude - given)))
    asked = " ".join(f"{flag} {value}" for flag, value in (("--prelude", prelude), ("--coda", coda)) if value is not None)
    rest = num_layers - (prelude or 0) - (coda or 0)
    message = f"{asked} does not fit {num_layers} layers with {loops} loops"
    if coda is not None and prelude is not None:
        message += f" ({rest} layers are left for the core, not a positive multiple of {loops})"
    valid = _layouts(num_layers, loops)
    if not valid:
        raise ValueError(f"{message}; no layout of {num_layers} layers fits {loops} loops")
    near = sorted(valid, key=lambda l: abs(l.prelude - (prelude or l.prelude)) + abs(l.coda - (coda or l.coda)))[:4]
    raise ValueError(f"{message}; these would: " + "; ".join(f"--prelude {l.prelude} --coda {l.coda} ({l.text})" for l in near))


def loop_sources(layout: Layout) -> list[list[int]]:
    """sources[t][i]: the original layer that loop t of core position i stands in for (P + t*C + i)."""
    P, C = layout.prelude, layout.core
    return [[P + t * C + i for i in range(C)] for t in range(layout.loops)]


def shared_sources(layout: Layout, tie: str) -> list[list[int]]:
    """For each core position, the original layers its shared weights are made from."""
    P, C, K = layout.prelude, layout.core, layout.loops
    stand_ins = [[P + t * C + i for t in range(K)] for i in range(C)]
    if tie == "average":
        return stand_ins
    if tie == "lower":
        return [[P + i] for i in range(C)]
    if tie == "upper":
        return [[P + (K - 1) * C + i] for i in range(C)]
    if tie == "stepwise":
        # round(linspace(P, P + C*K - 1, C)): evenly spaced over the middle block (Python rounds half to even, as numpy)
        if C == 1:
            return [[P]]
        step = (C * K - 1) / (C - 1)
        return [[P + round(i * step)] for i in range(C)]
    raise ValueError(f"unknown tie strategy {tie!r}; choose one of {', '.join(TIES)}")


def layer_map(layout: Layout, tie: str) -> dict[str, list[list[int]]]:
    """Which original layers fed each unique layer (recorded in the config and conversion.json)."""
    n = layout.unrolled_layers
    return {
        "prelude": [[j] for j in range(layout.prelude)],
        "core": shared_sources(layout, tie),
        "coda": [[n - layout.coda + j] for j in range(layout.coda)],
    }


def mesh_config_from_source(
    source_config: PreTrainedConfig,
    layout: Layout,
    variant: str = "mesh",
    slots: int | None = None,
    router_gap: float | None = None,
    relax_rank: int | str = 0,
    provenance: dict | None = None,
) -> MeshConfig:
    family = source_family(getattr(source_config, "model_type", None))
    if layout.unrolled_layers != source_config.num_hidden_layers:
        raise ValueError(
            f"layout {layout.text} unrolls to {layout.unrolled_layers} layers, "
            f"but the model has {source_config.num_hidden_layers}"
        )
    return MeshConfig(
        base_model_type=family.base_model_type,
        num_prelude_layers=layout.prelude,
        num_core_layers=layout.core,
        num_loops=layout.loops,
        num_coda_layers=layout.coda,
        num_hidden_layers=layout.unrolled_layers,
        variant=variant,
        num_slots=slots,
        router_gap=DEFAULT_ROUTER_GAP if router_gap is None else router_gap,
        relax_rank=relax_rank,
        provenance=provenance,
        architectures=["MeshForCausalLM"],
        **family.mesh_fields(source_config),
    )


def _embedding_parameters(model) -> int:
    tensors = {id(p): p for m in (model.get_input_embeddings(), model.get_output_embeddings()) for p in m.parameters()}
    return sum(p.numel() for p in tensors.values())


def _layer_parameters(mesh_config: MeshConfig) -> int:
    """Parameters of one unshared layer (the same in the source family's own layer class)."""
    return sum(math.prod(shape) for shape in layer_tensor_shapes(mesh_config).values())


def mesh_parameter_counts(mesh_config: MeshConfig) -> dict[str, int]:
    """Parameters of a MeSH model: `nonembedding` is the unique layers plus the final norm, without
    routers or relax deltas (tied embeddings count once).

    Counted on the meta device on a model with one core layer and no prelude or coda, then scaled
    to the real layer counts, so that planning costs the same at any depth."""
    config = mesh_config.to_dict()
    config.update(num_prelude_layers=0, num_core_layers=1, num_coda_layers=0, num_hidden_layers=mesh_config.num_loops)
    with torch.device("meta"):
        model = MeshForCausalLM(MeshConfig.from_dict(config))
    routers = sum(p.numel() for name, p in model.named_parameters() if name.startswith("model.memory."))
    relax = sum(p.numel() for name, p in model.named_parameters() if "_delta" in name)
    embedding = _embedding_parameters(model)
    total = sum(p.numel() for p in model.parameters())
    more_layers = mesh_config.num_prelude_layers + mesh_config.num_core_layers - 1 + mesh_config.num_coda_layers
    total += more_layers * _layer_parameters(mesh_config) + (mesh_config.num_core_layers - 1) * relax
    relax *= mesh_config.num_core_layers
    return {"nonembedding": total - embedding - routers - relax, "routers": routers, "relax": relax,
            "embedding": embedding, "total": total}


def count_parameters(source_config: PreTrainedConfig, mesh_config: MeshConfig) -> dict[str, float]:
    """Parameter counts of the original and the converted model (see `mesh_parameter_counts`).
    The original's layers are the converter's unshared layers, so its count needs no model."""
    norm = len(final_norm_names(mesh_config)) * mesh_config.hidden_size
    counts = {"original_nonembedding": source_config.num_hidden_layers * _layer_parameters(mesh_config) + norm}
    converted = mesh_parameter_counts(mesh_config)
    counts["converted_nonembedding"] = converted.pop("nonembedding")
    counts.update(converted)
    counts["reduction"] = 1 - counts["converted_nonembedding"] / counts["original_nonembedding"]
    return counts


def off_target_mass(slots: int, gap: float) -> float:
    """Softmax mass that the function-preserving router init leaves off its target slot."""
    return (slots - 1) * math.exp(-gap) / (1 + (slots - 1) * math.exp(-gap))
