"""What a saved model is: layout, variant, provenance, parameter counts, and what its MeSH
routers do on sample text (mean write/read weight per step and slot)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..artifacts.output import report_mark
from ..artifacts.record import ConversionRecord
from ..io import has_tokenizer
from ..loading import load_model, load_tokenizer
from .diagnose import is_mesh, json_safe, model_layout, token_windows, tokenize_file
from .plots import figure_size, figure_text, labelled, pyplot_agg, save_figure
from ..errors import UserError

# Used when no --data is given: varied everyday text, enough to see how routers spread tokens.
SAMPLE_SENTENCES = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "In 1969, two astronauts walked on the surface of the Moon for the first time.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "She opened the letter, read the first line twice, and then sat down without a word.",
    "The committee will meet on Tuesday to review the budget and vote on the proposal.",
    "Water boils at 100 degrees Celsius at sea level, but at lower temperatures on mountains.",
    "Once upon a time, in a kingdom by the sea, there lived a princess who loved maps.",
)
RANDOM_SAMPLES, RANDOM_LENGTH = 4, 64

# ---------------------------------------------------------------------------------------------
# Parameters, by name.
# ---------------------------------------------------------------------------------------------

PARAMETER_GROUPS = (
    "embedding (input)",
    "output head",
    "prelude layers",
    "core layers (unique)",
    "coda layers",
    "layers",
    "final norm",
    "routers",
    "relax deltas",
)


def parameter_group(name: str) -> str:
    """The group of a parameter, from its name (order matters: deltas live inside core layers)."""
    if name.startswith("model.memory.") or ".memory." in name:
        return "routers"
    if "_delta" in name:
        return "relax deltas"
    if name.startswith(("lm_head", "embed_out")):
        return "output head"
    if "embed" in name:
        return "embedding (input)"
    for stage, group in (
        (".prelude.", "prelude layers"),
        (".core.", "core layers (unique)"),
        (".coda.", "coda layers"),
    ):
        if stage in name:
            return group
    if ".layers." in name or ".h." in name:
        return "layers"
    return "final norm"


def parameter_counts(model) -> dict[str, int]:
    """Parameters per group, the non-embedding count the paper reports, and the total.

    `named_parameters` lists a tied output head once (as the input embedding), so nothing is
    counted twice.
    """
    counts = dict.fromkeys(PARAMETER_GROUPS, 0)
    for name, parameter in model.named_parameters():
        counts[parameter_group(name)] += parameter.numel()
    counts = {group: count for group, count in counts.items() if count or group in ("routers", "relax deltas")}
    layer_groups = ("prelude layers", "core layers (unique)", "coda layers", "layers", "final norm")
    counts["non-embedding (layers + final norm)"] = sum(counts.get(group, 0) for group in layer_groups)
    counts["total"] = sum(counts.get(group, 0) for group in PARAMETER_GROUPS)
    return counts


# ---------------------------------------------------------------------------------------------
# Provenance.
# ---------------------------------------------------------------------------------------------


def read_provenance(model_dir: Path, config) -> dict:
    """`config.provenance` and the directory's `conversion.json`, each when present."""
    provenance: dict = {}
    if getattr(config, "provenance", None):
        provenance["config"] = config.provenance
    try:
        record = ConversionRecord.read(model_dir)
    except UserError as error:  # shown, not fatal: the model itself loaded
        provenance["conversion.json"] = f"unreadable: {error}"
    else:
        if record is not None:
            provenance["conversion.json"] = record.model_dump(mode="json", exclude_unset=True)
    return provenance


def flatten(record, prefix: str = "") -> list[tuple[str, str]]:
    """Nested dicts as dotted keys with short printable values, for a two-column table."""
    if not isinstance(record, dict):
        text = record if isinstance(record, str) else json.dumps(record)
        return [(prefix, text if len(text) <= 120 else text[:117] + "...")]
    rows = []
    for key, value in record.items():
        rows.extend(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return rows


def provenance_rows(provenance: dict) -> list[tuple[str, str]]:
    """One row per dotted key over `config.provenance` and `conversion.json`, which repeat
    most of each other; a key whose two values differ gets a row per source."""
    rows: dict[str, str] = {}
    for origin, record in provenance.items():
        for key, value in flatten(record) if isinstance(record, dict) else [(origin, str(record))]:
            if rows.get(key, value) != value:
                key = f"{key} ({origin})"
            rows.setdefault(key, value)
    return list(rows.items())


# ---------------------------------------------------------------------------------------------
# Routers on sample text.
# ---------------------------------------------------------------------------------------------


@dataclass
class RouterStats:
    """Mean routing weight over all sample tokens, rows = steps, columns = slots."""

    steps: list[str]
    write: torch.Tensor  # steps x slots
    read: torch.Tensor  # steps x slots
    tokens: int
    source: str

    def to_dict(self) -> dict:
        return {
            "steps": self.steps,
            "slots": self.write.shape[1],
            "tokens": self.tokens,
            "source": self.source,
            "mean_write": self.write.tolist(),
            "mean_read": self.read.tolist(),
        }


def step_names(loops: int) -> list[str]:
    return ["transitional", *(f"loop {t + 1}" for t in range(loops))]


def router_statistics(model, sequences: Sequence[torch.Tensor], source: str = "") -> RouterStats:
    """Mean write/read weights of every router pair over the tokens of `sequences` (1-D each).

    Each write router is called once per forward on its step's router input (h_pre for the
    transitional step, h^(t) for loop t), so a pre-hook on it captures exactly that input, and
    `memory.route` turns it into the weights the model used.
    """
    memory = model.model.memory
    steps = len(memory.write_routers)
    inputs: dict[int, torch.Tensor] = {}
    hooks = [
        router.register_forward_pre_hook(lambda _m, args, step=step: inputs.__setitem__(step, args[0]))
        for step, router in enumerate(memory.write_routers)
    ]
    write_sum = torch.zeros(steps, memory.num_slots, dtype=torch.float64)
    read_sum = torch.zeros_like(write_sum)
    tokens = 0
    try:
        with torch.no_grad():
            for ids in sequences:
                inputs.clear()
                model(ids.view(1, -1).to(model.device), use_cache=False)
                for step in range(steps):
                    write, read = memory.route(step, inputs[step])
                    write_sum[step] += write.reshape(-1, memory.num_slots).double().sum(0).cpu()
                    read_sum[step] += read.reshape(-1, memory.num_slots).double().sum(0).cpu()
                tokens += ids.numel()
    finally:
        for hook in hooks:
            hook.remove()
    return RouterStats(step_names(steps - 1), write_sum / tokens, read_sum / tokens, tokens, source)


def sample_sequences(
    model_dir: Path, model, data: Path | None, samples: int, seq_len: int, tokenizer: str | None = None
) -> tuple[list[torch.Tensor], str]:
    """Token sequences for the router probe, and a line saying where they came from.

    With --data: up to `samples` windows of `seq_len` tokens (fewer if the file is short, the
    whole file if it is shorter than one window). Without: the built-in sentences, or random
    token ids when there is no tokenizer (the routers still show their preferences).
    """
    vocab_size = model.config.vocab_size
    tokenizer_name = tokenizer or str(model_dir)
    if data is None and tokenizer is None and not has_tokenizer(tokenizer_name):
        generator = torch.Generator().manual_seed(0)
        length = min(RANDOM_LENGTH, seq_len)
        sequences = list(torch.randint(0, vocab_size, (RANDOM_SAMPLES, length), generator=generator))
        return (
            sequences,
            f"{RANDOM_SAMPLES} x {length} random token ids (no tokenizer in {model_dir}; pass --tokenizer for real text)",
        )
    tokenizer = load_tokenizer(tokenizer_name)
    if data is None:
        sequences = [
            torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:seq_len], dtype=torch.long)
            for text in SAMPLE_SENTENCES[:samples]
        ]
        source = f"{len(sequences)} built-in sample sentences"
    else:
        tokens = tokenize_file(data, tokenizer, samples * seq_len)
        if not tokens:
            raise UserError(f"{data} holds no text")
        available = max(1, min(samples, len(tokens) // seq_len))
        length = min(seq_len, len(tokens))
        sequences = list(token_windows(tokens, available, length, str(data)))
        source = f"{available} x {length} tokens of {data}"
    if any(int(ids.max()) >= vocab_size for ids in sequences if ids.numel()):
        raise UserError(f"the tokenizer {tokenizer_name} produces ids outside the model's vocabulary of {vocab_size}")
    return [ids for ids in sequences if ids.numel()], source


def plot_router_heatmap(stats: RouterStats, title: str = ""):
    """Two panels (write, read): rows = steps, columns = slots, colour = mean weight."""
    plt = pyplot_agg()
    steps, slots = stats.write.shape
    size, roomy = figure_size(max(7.0, 1.3 * slots + 3.5), max(3.0, 0.55 * steps + 2.0))
    fig, axes = plt.subplots(1, 2, figsize=size, layout="constrained", sharey=True)
    image = None
    for ax, (label, weights) in zip(axes, (("write", stats.write), ("read", stats.read))):
        image = ax.imshow(weights.numpy(), vmin=0.0, vmax=1.0, cmap="magma", aspect="auto")
        for i in range(steps) if roomy else ():
            for j in range(slots):
                value = weights[i, j].item()
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="black" if value > 0.5 else "white",
                )
        columns = labelled(slots)
        ax.set_xticks(columns, [f"slot {j}" for j in columns], rotation=45, ha="right")
        ax.set_title(f"mean {label} weight")
    rows = labelled(steps)
    axes[0].set_yticks(rows, [stats.steps[i] for i in rows])
    fig.colorbar(image, ax=list(axes), fraction=0.04, pad=0.02)
    source = figure_text(stats.source)
    fig.suptitle(f"{title}\n{source}" if title else source, fontsize=9)
    return fig


# ---------------------------------------------------------------------------------------------
# The whole report.
# ---------------------------------------------------------------------------------------------


@dataclass
class InspectReport:
    model_dir: str
    model_type: str
    layout: str
    variant: str
    num_slots: int | None
    relax_rank: int | str | None
    provenance: dict
    parameters: dict[str, int]
    routers: RouterStats | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return json_safe(
            {
                **report_mark(),
                "model_dir": self.model_dir,
                "model_type": self.model_type,
                "layout": self.layout,
                "variant": self.variant,
                "num_slots": self.num_slots,
                "relax_rank": self.relax_rank,
                "provenance": self.provenance,
                "parameters": self.parameters,
                "routers": self.routers.to_dict() if self.routers else None,
                "notes": self.notes,
            }
        )


def inspect_model(
    model_dir: Path,
    data: Path | None = None,
    samples: int = 8,
    seq_len: int = 128,
    device: str | torch.device = "cpu",
    tokenizer: str | None = None,
) -> InspectReport:
    """Everything `mesh-convert inspect` shows, for a MeSH or a plain checkpoint directory."""
    if not model_dir.is_dir():
        raise UserError(f"model directory {model_dir} does not exist")
    if samples < 1 or seq_len < 2:
        raise UserError("need at least 1 sample of at least 2 tokens")
    model = load_model(model_dir, device=device)
    config = model.config
    mesh = is_mesh(model)
    report = InspectReport(
        model_dir=str(model_dir),
        model_type=config.model_type,
        layout=str(model_layout(model)) if mesh else f"plain, {config.num_hidden_layers} layers",
        variant=config.variant if mesh else "plain",
        num_slots=config.num_slots if mesh and config.variant == "mesh" else None,
        relax_rank=config.relax_rank if mesh else None,
        provenance=read_provenance(model_dir, config),
        parameters=parameter_counts(model),
    )
    if mesh and config.variant == "mesh":
        context = config.max_position_embeddings
        if seq_len > context:
            report.notes.append(f"--seq-len {seq_len} is above the model's context: probed at most {context} tokens per sequence")
            seq_len = context
        sequences, source = sample_sequences(model_dir, model, data, samples, seq_len, tokenizer)
        report.routers = router_statistics(model, sequences, source)
    else:
        report.notes.append(f"no routers: the {report.variant} variant has no MeSH memory")
    return report


INSPECT_FILES = {"json": "inspect.json", "routers": "routers.png"}


def write_inspect_outputs(report: InspectReport, output_dir: Path) -> dict[str, Path]:
    """inspect.json, and routers.png for MeSH models."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / INSPECT_FILES["json"]}
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if report.routers is not None:
        title = f"{figure_text(Path(report.model_dir).name)}: {report.layout}, B = {report.num_slots}"
        paths["routers"] = save_figure(
            plot_router_heatmap(report.routers, title), output_dir / INSPECT_FILES["routers"]
        )
    return paths


__all__ = [
    "InspectReport",
    "RouterStats",
    "inspect_model",
    "parameter_counts",
    "parameter_group",
    "plot_router_heatmap",
    "read_provenance",
    "router_statistics",
    "write_inspect_outputs",
]
