"""A randomly initialised MeSH model, following the paper's from-scratch recipe (spec section 4):
token embeddings multiplied by sqrt(D), and the output projections (attention `dense`, MLP
`dense_4h_to_h`) initialised with std / sqrt(2N), N = the unrolled layer count.

Never used on converted models: their weights are pretrained and must not be rescaled.
"""

import math
import os

import torch

from .. import __version__
from ..artifacts.record import ConversionRecord, Params
from ..convert.plan import mesh_parameter_counts
from ..errors import UserError
from ..layout import Layout, resolve_layout
from ..modeling.configuration_mesh import MeshConfig
from ..modeling.modeling_mesh import MeshForCausalLM
from ..options import check_router_gap
from .recipe import InitSpec

OUTPUT_PROJECTIONS = ("attention.dense", "mlp.dense_4h_to_h")


def scratch_config(spec: InitSpec) -> MeshConfig:
    """The MeshConfig of `spec`: a Pythia size's architecture (optionally resized), in its default
    (or the given) layout."""
    from ..convert.plan import mesh_config_from_source
    from ..convert.pythia import PYTHIA_SUITE, parse_alias, pythia_config

    check_router_gap(spec.router_gap, "float32")  # the dtype the model is made in
    if spec.size == "custom":
        missing = [k for k in ("num_layers", "hidden_size", "num_heads") if getattr(spec, k) is None]
        if missing:
            raise UserError(f"init size 'custom' needs {', '.join(missing)}")
        source = pythia_config("14m")
    else:
        try:
            alias = parse_alias(spec.size) or parse_alias(f"pythia-{spec.size}")
        except ValueError as error:
            raise UserError(str(error)) from None
        if alias is None or alias.size not in PYTHIA_SUITE:
            raise UserError(f"unknown init size {spec.size!r}: use pythia-<size> (e.g. pythia-160m) or custom")
        source = pythia_config(alias.size)
    overrides = {
        "num_hidden_layers": spec.num_layers,
        "hidden_size": spec.hidden_size,
        "num_attention_heads": spec.num_heads,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(source, key, value)
    if spec.hidden_size is not None or spec.intermediate_size is not None:
        source.intermediate_size = spec.intermediate_size or 4 * source.hidden_size
    if source.hidden_size % source.num_attention_heads:
        raise UserError(f"hidden_size {source.hidden_size} is not a multiple of num_heads {source.num_attention_heads}")
    try:
        layout = resolve_layout(source.num_hidden_layers, spec.loops, spec.prelude, spec.coda)
        config = mesh_config_from_source(source, layout, variant=spec.variant, router_gap=spec.router_gap,
                                         provenance={"init": "from scratch", "spec": spec.model_dump()})
    except ValueError as error:
        raise UserError(str(error)) from None
    config.dtype = "float32"
    config.embedding_multiplier = math.sqrt(config.hidden_size)  # applied in the forward pass
    return config


@torch.no_grad()
def init_scratch_model(config: MeshConfig, seed: int, router_init: str = "random") -> MeshForCausalLM:
    """Random weights as in the paper. Routers: `random` keeps the model's default random init
    (every read then starts as a near-uniform mix of all slots); `base` takes the conversion's
    function-preserving routers with `config.router_gap`, so MeSH starts as the base recurrence
    (plus the gap's leak) and learns away from it."""
    from ..convert.conversion import router_tensors

    check_fits_in_memory(config)
    torch.manual_seed(seed)
    model = MeshForCausalLM(config)
    std = config.initializer_range / math.sqrt(2 * config.num_hidden_layers)
    for name, module in model.named_modules():
        if name.endswith(OUTPUT_PROJECTIONS):
            module.weight.normal_(0.0, std)
    if router_init == "base" and model.model.memory is not None:
        model.load_state_dict(router_tensors(config, torch.float32), strict=False)
    return model


def check_fits_in_memory(config: MeshConfig) -> None:
    """Refuse, before allocating, a model whose float32 weights alone exceed the memory available
    now: building it would end in the system's out-of-memory kill or an error deep inside torch."""
    total = mesh_parameter_counts(config)["total"]
    needed, available = 4 * total, available_memory()
    if available is not None and needed > available:
        raise UserError(f"a model of {total:,} parameters needs {needed / 2**30:,.1f} GiB in float32, more than the "
                        f"{available / 2**30:,.1f} GiB of memory available here; choose smaller dimensions")


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable), else the physical
    memory where the system tells it, else None."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def scratch_record(config: MeshConfig, spec: InitSpec, seed: int, command: str | None = None) -> ConversionRecord:
    """The conversion record of a from-scratch model: its layout, its parameter counts (there is no
    original model to compare with), the spec, the seed and the `init` command that made it (none
    for a model that a training run made from its recipe's `init`)."""
    counts = mesh_parameter_counts(config)
    layout = Layout.of(config)
    return ConversionRecord(
        mesh_convert_version=__version__,
        **({"command": command} if command else {}),
        layout=layout.text,
        prelude=layout.prelude,
        core=layout.core,
        loops=layout.loops,
        coda=layout.coda,
        variant=config.variant,
        slots=config.num_slots if config.variant == "mesh" else None,
        relax_rank=config.relax_rank,
        dtype="float32",
        params=Params(converted_nonembedding=counts["nonembedding"], routers=counts["routers"], relax=counts["relax"],
                      embedding=counts["embedding"], total=counts["total"]),
        init=spec.model_dump(),
        seed=seed,
    )
