"""The model card (README.md) written next to every converted model and shown on the Hub.

It is rendered from `templates/model_card.md` (Jinja, through huggingface_hub's
`ModelCard.from_template`) with the facts of the model's conversion record (`conversion.json`);
a fact the record lacks leaves its line or section out.
"""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .. import io
from ..errors import printable
from ..layout import Layout
from .record import ConversionRecord, Params, converted_name

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
PAPER_URL = "https://arxiv.org/abs/2510.07739"
BASE_TAGS = ["mesh", "recursive-transformer", "custom_code", "mesh-convert"]
# Routers and relaxation deltas are non-embedding parameters too: a full-rank relaxation stores as
# much as the original model, and the reduction must then say so.
REDUCTION_LABEL = "reduction of non-embedding parameters (routers and deltas included)"

# Hub dataset ids and display names for the tasks that `mesh-convert eval` knows about, so that
# the card's model-index links to real datasets. Unknown tasks fall back to their own name.
_TASK_DATASETS: dict[str, tuple[str, str, str | None]] = {
    "wikitext": ("wikitext", "WikiText-2", "wikitext-2-raw-v1"),
    "wikitext2": ("wikitext", "WikiText-2", "wikitext-2-raw-v1"),
    "lambada_openai": ("EleutherAI/lambada_openai", "LAMBADA (OpenAI)", None),
    "piqa": ("ybisk/piqa", "PIQA", None),
    "hellaswag": ("Rowan/hellaswag", "HellaSwag", None),
    "winogrande": ("allenai/winogrande", "WinoGrande", None),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "ARC-Easy"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "ARC-Challenge"),
    "sciq": ("allenai/sciq", "SciQ", None),
}

# Characters that start markdown (emphasis, code, links, headings' closing, GFM tables and
# strikethrough) or HTML (tags, entities) inside a line of text; `_` only where it may (inside a
# word, as in `pythia-160m-mesh-2_4R2_2`, it cannot).
_MARKDOWN_SPECIAL = re.compile(r"([\\`*\[\]<>&|~#]|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z]))")


def _text(value: object) -> str:
    """Text from the record (a folder's name, a task's) as markdown shows it literally: on one
    line (control characters escaped), its markdown and HTML characters backslash-escaped."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", printable(value))


def _code(value: object) -> str:
    """Text from the record as an inline code span, which shows HTML and markdown literally: on one
    line, between more backticks than any run of them inside it."""
    text = printable(value)
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _code_block(value: object, language: str) -> str:
    """Text from the record as a fenced code block (one line), fenced by more backticks than any
    run of them inside it, so that nothing in it can close the block."""
    text = printable(value)
    fence = "`" * max(3, max(map(len, re.findall("`+", text)), default=0) + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def hub_model_id(name: str | None) -> str | None:
    """`name` if it is a Hub model id (`namespace/name`), else None (e.g. a local path)."""
    return name if name is not None and io.is_hub_id(name) else None


def default_model_name(record: ConversionRecord) -> str:
    """The name a conversion gives its folder, e.g. `pythia-160m-mesh-2_4R2_2`, from its record."""
    layout = record.layout_text()
    try:
        layout = Layout.parse(layout).name if layout else None
    except ValueError:  # a record edited by hand: its layout as written
        pass
    return converted_name(record.source_model or "model", record.variant or "mesh", layout, record.relax_rank)


def _count(value: int | None) -> str:
    return f"{value:,}" if value is not None else "unknown"


def _metric(value: float) -> str:
    """At most 4 decimals, no trailing zeros."""
    return f"{value:.4f}".rstrip("0").rstrip(".")


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def parameter_rows(params: Params | dict) -> list[list[str]]:
    """Rows of the parameter table. `converted_nonembedding` counts the stored layers only, so the
    converted model's non-embedding total adds the routers and relaxation deltas to it."""
    params = Params.model_validate(params)
    original, layers = params.original_nonembedding, params.converted_nonembedding
    rows = [["original model, non-embedding", _count(original)]] if original is not None or layers is None else []
    rows += [
        ["converted layers (stored once), non-embedding", _count(layers)],
        ["MeSH routers", _count(params.routers)],
        ["relaxation deltas", _count(params.relax)],
    ]
    if layers is not None:
        rows.append(["**converted model, non-embedding**", f"**{_count(params.unique_nonembedding())}**"])
        if original:
            rows.append([REDUCTION_LABEL, f"{100 * params.computed_reduction():.1f}%"])
    if params.embedding is not None:
        rows.append(["embedding + output head", _count(params.embedding)])
    if params.total is not None:
        rows.append(["converted model, total", _count(params.total)])
    return rows


def _eval_results(record: ConversionRecord) -> list[EvalResult]:
    """The evaluations as `EvalResult`s for the card's model-index."""
    results = []
    for entry in record.eval_results or []:
        dataset_id, dataset_name, dataset_config = _TASK_DATASETS.get(entry.task.lower(), (entry.task, entry.task, None))
        results.append(
            EvalResult(
                task_type="text-generation",
                task_name="Text Generation",
                dataset_type=dataset_id,
                dataset_name=dataset_name,
                dataset_config=dataset_config,
                metric_type=entry.metric,
                metric_name=f"{entry.metric} ({entry.task})",
                metric_value=entry.value,
            )
        )
    return results


def build_card_data(record: ConversionRecord, model_name: str) -> ModelCardData:
    """The YAML metadata block: what the Hub uses for search, the widget and the model tree."""
    tags = list(BASE_TAGS)
    if record.source and record.source.model_type:
        tags.append(record.source.model_type)
    results = _eval_results(record)
    return ModelCardData(
        base_model=hub_model_id(record.source_model),
        library_name="transformers",
        pipeline_tag="text-generation",
        license=record.source.license if record.source else None,
        tags=tags,
        model_name=model_name if results else None,
        eval_results=results or None,
    )


def _layout_lines(r: ConversionRecord) -> list[str]:
    lines = []
    if r.prelude is not None:
        lines.append(f"- **prelude**: {_plural(r.prelude, 'unshared layer')}, run once;")
    if r.core is not None:
        loops = f", looped {r.loops} times" if r.loops is not None else ""
        lines.append(f"- **core**: {_plural(r.core, 'shared layer')}{loops};")
    if r.coda is not None:
        lines.append(f"- **coda**: {_plural(r.coda, 'unshared layer')}, run once at the end.")
    return lines


def _layer_rows(r: ConversionRecord) -> list[tuple[str, int, str]]:
    rows = []
    for block, groups in (r.layer_map or {}).items():
        label = f"core (×{r.loops})" if block == "core" and r.loops is not None else block
        rows += [(_text(label), position, ", ".join(map(str, sources))) for position, sources in enumerate(groups)]
    return rows


def _context(r: ConversionRecord, model_name: str, model_ref: str, tokenizer_ref: str) -> dict:
    """The template's variables, from the record."""
    from ..modeling.configuration_mesh import REQUIRES_TRANSFORMERS  # transformers: only when a card is made

    source = r.source_model
    if hub_model_id(source):  # a Hub id holds no markdown: letters, digits and - _ . only
        origin = f"converted from [`{source}`](https://huggingface.co/{source}) by mesh-convert"
    else:
        # A local source is named by its folder alone: the card is published, the user's paths are not.
        source = source.rstrip("/").rsplit("/", 1)[-1] if source else None
        origin = f"converted from {_code(source)} by mesh-convert" if source else "built with mesh-convert"
    layout = r.counted_layout()
    relax = f"{r.relax_rank} (none)" if r.relax_rank == 0 else r.relax_rank
    if r.relax_init is not None:  # recorded only where there are deltas
        relax = f"{relax} ({r.relax_init} start)"
    conversion = [("source model", source), ("source revision", r.source.revision if r.source else None),
                  ("tie strategy", r.tie), ("router bias gap", r.router_gap), ("relaxation rank", relax),
                  ("mesh-convert version", r.mesh_convert_version)]
    training = []
    if r.training is not None:
        t = r.training
        # Training records the whole resolved recipe (a dict); only a recipe's name reads well here.
        training = [("recipe", _text(t.recipe) if isinstance(t.recipe, str) else None),
                    ("method", _text(t.method) if t.method is not None else None),
                    ("trainable", _text(t.trainable) if t.trainable is not None else None),
                    ("tokens", _count(t.tokens) if t.tokens is not None else None),
                    ("steps", _count(t.steps) if t.steps is not None else None),
                    ("final loss", _metric(t.final_loss) if t.final_loss is not None else None)]
    params = r.params
    show_params = params is not None and (params.original_nonembedding, params.converted_nonembedding) != (None, None)
    return {
        "r": r,
        "model_name": _text(model_name),
        "paper_url": PAPER_URL,
        "layout": _code(r.layout_text()) if r.layout_text() else None,
        "variant": _code(r.variant) if r.variant else None,
        "tie": _code(r.tie) if r.tie else None,
        "command_block": _code_block(r.command, "bash") if r.command else None,
        "origin": origin,
        "layout_lines": _layout_lines(r),
        "unrolled": layout.unrolled_layers if layout else None,
        "stored": layout.stored_layers if layout else None,
        "layout_extras": [line for line, value in (
            (f"- recurrence between loops: {_code(r.variant)}", r.variant),
            (f"- memory slots: {r.slots}", r.slots),
            (f"- weights stored as {_code(r.dtype)}", r.dtype)) if value is not None],
        "parameter_rows": parameter_rows(params) if show_params else [],
        "layer_rows": _layer_rows(r),
        "conversion_facts": [(name, _code(value)) for name, value in conversion if value is not None],
        "training_facts": [(name, value) for name, value in training if value is not None],
        "eval_rows": [(_text(e.task), _text(e.metric), _metric(e.value)) for e in r.eval_results or []],
        "model_ref": model_ref,
        # transformers 5 reads the model's config.json before choosing a tokenizer class, and this
        # config is remote code: without trust_remote_code AutoTokenizer asks on stdin (the
        # template adds it when the tokenizer comes from the converted model).
        "tokenizer_ref": tokenizer_ref,
        "requires_transformers": REQUIRES_TRANSFORMERS,  # what the remote code needs (it checks it itself)
    }


def build_model_card(
    record: ConversionRecord | dict | None,
    *,
    repo_id: str | None = None,
    has_tokenizer: bool = True,
    name: str | None = None,
) -> ModelCard:
    """The model card of a converted model, from its conversion record.

    `repo_id` (where the model is or will be published) names the card and goes into the usage
    snippet; without it the snippet points at a local directory, and `name` (the model's own name:
    a run's, the folder the user chose) or else the name a conversion gives its folder titles the
    card. `has_tokenizer=False` makes the snippet load the tokenizer from the source model instead.
    """
    if not isinstance(record, ConversionRecord):
        record = ConversionRecord.model_validate(record or {})
    record = record.published()
    model_name = repo_id.split("/")[-1] if repo_id else name or default_model_name(record)
    model_ref = repo_id or "path/to/converted-model"
    source_id = hub_model_id(record.source_model)
    tokenizer_ref = model_ref if has_tokenizer or not source_id else source_id
    context = _context(record, model_name, model_ref, tokenizer_ref)
    return ModelCard.from_template(build_card_data(record, model_name), template_path=str(TEMPLATE), **context)


def write_model_card(
    output_dir: Path, record: ConversionRecord | dict | None, *, repo_id: str | None = None, name: str | None = None
) -> None:
    """Write README.md into a converted model's directory (`repo_id`, `name`: see `build_model_card`)."""
    output_dir = Path(output_dir)
    card = build_model_card(record, repo_id=repo_id, has_tokenizer=io.has_tokenizer(output_dir), name=name)
    (output_dir / "README.md").write_text(str(card), encoding="utf-8")
