"""The model card (README.md) written next to every converted model and shown on the Hub.

Everything comes from `conversion.json` (the `info` dict). Converters of older versions, or
hand-edited files, may lack any field, so every reader here tolerates a missing or `None`
value and simply leaves the matching line or section out.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

PAPER_URL = "https://arxiv.org/abs/2510.07739"
BASE_TAGS = ["mesh", "recursive-transformer", "custom_code", "mesh-convert"]
# Routers and relaxation deltas are non-embedding parameters too: a full-rank relaxation stores as
# much as the original model, and the reduction must then say so.
REDUCTION_LABEL = "reduction of non-embedding parameters (routers and deltas included)"

# A Hub model id is `namespace/name`; local paths (absolute, relative, home) are not.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

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

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


# ----------------------------------------------------------------------------- reading info


def _section(info: dict, key: str) -> dict:
    """A nested dict of `info`, or {} when it is absent, None or not a dict."""
    value = info.get(key) if isinstance(info, dict) else None
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> int | float | None:
    """`value` if it is a real number (bools excluded), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def hub_model_id(name: Any) -> str | None:
    """`name` if it looks like a Hub model id (`namespace/name`), else None (e.g. a local path)."""
    if not isinstance(name, str) or name.startswith((".", "/", "~")) or "\\" in name:
        return None
    if not _HUB_ID.match(name) or ".." in name or "--" in name or len(name) > 96:
        return None
    return name


def _source_name(info: dict) -> str | None:
    model = _section(info, "source").get("model")
    return model if isinstance(model, str) and model else None


def _layout(info: dict) -> str | None:
    """The `P+CRK+Q` string, rebuilt from the counts when the converter did not store it."""
    layout = info.get("layout")
    if isinstance(layout, str) and layout:
        return layout
    parts = [_number(info.get(k)) for k in ("prelude", "core", "loops", "coda")]
    if any(p is None for p in parts):
        return None
    prelude, core, loops, coda = (int(p) for p in parts)
    return f"{prelude}+{core}R{loops}+{coda}"


def default_model_name(info: dict) -> str:
    """A readable name for the converted model, e.g. `pythia-160m-mesh-2+4R2+2`."""
    source = _source_name(info)
    base = source.rstrip("/").split("/")[-1] if source else "model"
    variant = info.get("variant") if isinstance(info.get("variant"), str) else "mesh"
    layout = _layout(info)
    return f"{base}-{variant}-{layout}" if layout else f"{base}-{variant}"


# ----------------------------------------------------------------------------- formatting


def _fmt_int(value: Any) -> str:
    number = _number(value)
    return f"{int(number):,}" if number is not None else "unknown"


def _fmt_value(value: Any) -> str:
    """Metric values: at most 4 decimals, no trailing zeros; non-numbers as given."""
    number = _number(value)
    if number is None:
        return str(value) if value is not None else "unknown"
    if isinstance(number, int):
        return f"{number:,}"
    return f"{number:.4f}".rstrip("0").rstrip(".")


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- metadata


def _eval_results(info: dict) -> list[EvalResult]:
    """Eval entries as `EvalResult`s for the card's model-index; malformed entries are skipped."""
    entries = info.get("eval_results")
    if not isinstance(entries, list):
        return []
    results = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        task, metric, value = entry.get("task"), entry.get("metric"), entry.get("value")
        if not isinstance(task, str) or not isinstance(metric, str) or _number(value) is None:
            continue
        dataset_id, dataset_name, dataset_config = _TASK_DATASETS.get(task.lower(), (task, task, None))
        results.append(
            EvalResult(
                task_type="text-generation",
                task_name="Text Generation",
                dataset_type=dataset_id,
                dataset_name=dataset_name,
                dataset_config=dataset_config,
                metric_type=metric,
                metric_name=f"{metric} ({task})",
                metric_value=value,
            )
        )
    return results


def build_card_data(info: dict, model_name: str) -> ModelCardData:
    """The YAML metadata block: what the Hub uses for search, the widget and the model tree."""
    source = _section(info, "source")
    license_ = source.get("license") if isinstance(source.get("license"), str) else None
    tags = list(BASE_TAGS)
    if isinstance(source.get("model_type"), str):
        tags.append(source["model_type"])
    results = _eval_results(info)
    return ModelCardData(
        base_model=hub_model_id(_source_name(info)),
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license_,
        tags=tags,
        model_name=model_name if results else None,
        eval_results=results or None,
    )


# ----------------------------------------------------------------------------- body sections


def _origin(info: dict) -> str:
    """Where the weights came from, linked when the source is a Hub model."""
    source = _source_name(info)
    if hub_model_id(source):
        return f"converted from [`{source}`](https://huggingface.co/{source}) by mesh-convert"
    return f"converted from `{source}` by mesh-convert" if source else "built with mesh-convert"


def _intro(info: dict, model_name: str) -> str:
    layout = _layout(info)
    shape = f" (layout `{layout}`)" if layout else ""
    return (
        f"# {model_name}\n\n"
        f"A recursive transformer{shape}, {_origin(info)}.\n\n"
        "**MeSH** ([Memory-as-State-Highways, arXiv 2510.07739](" + PAPER_URL + ")) runs one shared block of "
        "layers several times, so that compute depth no longer requires as many parameters. Instead of "
        "handing a single hidden state from one loop to the next, it keeps a small buffer of memory slots "
        "and lets per-step routers choose what each loop writes and reads, which gives every loop its own "
        "role."
        + _variant_note(info)
    )


def _variant_note(info: dict) -> str:
    """Baseline recurrences share the layout but not the routers; say so rather than imply MeSH."""
    variant = info.get("variant")
    if not isinstance(variant, str) or variant == "mesh":
        return ""
    return (
        f" This model uses the paper's `{variant}` baseline recurrence between loops instead of the MeSH "
        "buffer and routers."
    )


def _layout_section(info: dict) -> str | None:
    layout = _layout(info)
    numbers = {k: _number(info.get(k)) for k in ("prelude", "core", "loops", "coda")}
    if layout is None and all(v is None for v in numbers.values()):
        return None
    lines = ["## Layout", ""]
    if layout:
        lines.append(f"`{layout}` means:")
        lines.append("")
    if numbers["prelude"] is not None:
        lines.append(f"- **prelude**: {_plural(int(numbers['prelude']), 'unshared layer')}, run once;")
    if numbers["core"] is not None:
        loops = f", looped {int(numbers['loops'])} times" if numbers["loops"] is not None else ""
        lines.append(f"- **core**: {_plural(int(numbers['core']), 'shared layer')}{loops};")
    if numbers["coda"] is not None:
        lines.append(f"- **coda**: {_plural(int(numbers['coda']), 'unshared layer')}, run once at the end.")
    if all(v is not None for v in numbers.values()):
        unrolled = int(numbers["prelude"] + numbers["core"] * numbers["loops"] + numbers["coda"])
        original = _number(_section(info, "source").get("num_layers"))
        same = " (as many as the original model)" if original == unrolled else ""
        lines += ["", f"Each token passes through {unrolled} layers{same}, but only "
                  f"{int(numbers['prelude'] + numbers['core'] + numbers['coda'])} of them are stored."]
    extras = _layout_extras(info)
    if extras:
        lines += ["", *extras]
    return "\n".join(lines)


def _layout_extras(info: dict) -> list[str]:
    extras = []
    if isinstance(info.get("variant"), str):
        extras.append(f"- recurrence between loops: `{info['variant']}`")
    if _number(info.get("slots")) is not None:
        extras.append(f"- memory slots: {int(info['slots'])}")
    if isinstance(info.get("dtype"), str):
        extras.append(f"- weights stored as `{info['dtype']}`")
    return extras


def parameter_rows(params: dict) -> list[list[str]]:
    """Rows of the parameter table. `converted_nonembedding` counts the stored layers only, so the
    converted model's non-embedding total adds the routers and relaxation deltas to it."""
    original = _number(params.get("original_nonembedding"))
    layers = _number(params.get("converted_nonembedding"))
    routers = _number(params.get("routers")) or 0
    relax = _number(params.get("relax")) or 0
    rows = [
        ["original model, non-embedding", _fmt_int(original)],
        ["converted layers (stored once), non-embedding", _fmt_int(layers)],
        ["MeSH routers", _fmt_int(routers)],
        ["relaxation deltas", _fmt_int(relax)],
    ]
    if layers is not None:
        converted = layers + routers + relax
        rows.append(["**converted model, non-embedding**", f"**{_fmt_int(converted)}**"])
        if original:
            rows.append([REDUCTION_LABEL, f"{100 * (1 - converted / original):.1f}%"])
    if _number(params.get("embedding")) is not None:
        rows.append(["embedding + output head", _fmt_int(params["embedding"])])
    if _number(params.get("total")) is not None:
        rows.append(["converted model, total", _fmt_int(params["total"])])
    return rows


def _params_section(info: dict) -> str | None:
    params = _section(info, "params")
    if not any(_number(params.get(k)) is not None for k in ("original_nonembedding", "converted_nonembedding")):
        return None
    return "## Parameters\n\n" + _table(["", "parameters"], parameter_rows(params))


def _layer_rows(layer_map: dict, loops: Any) -> list[list[str]]:
    rows = []
    for block in ("prelude", "core", "coda"):
        groups = layer_map.get(block)
        if not isinstance(groups, list):
            continue
        label = f"core (×{int(loops)})" if block == "core" and _number(loops) is not None else block
        for position, sources in enumerate(groups):
            sources = sources if isinstance(sources, list) else [sources]
            rows.append([label, str(position), ", ".join(str(s) for s in sources)])
    return rows


def _layer_map_section(info: dict) -> str | None:
    rows = _layer_rows(_section(info, "layer_map"), info.get("loops"))
    if not rows:
        return None
    tie = info.get("tie")
    note = (
        f" A shared core layer was made from its source layers with the `{tie}` tie strategy."
        if isinstance(tie, str)
        else ""
    )
    return (
        "## Layer map\n\nWhich layers of the original model each layer here comes from."
        + note
        + "\n\n"
        + _table(["block", "position", "original layers"], rows)
    )


def _conversion_section(info: dict) -> str | None:
    source = _section(info, "source")
    relax = info.get("relax_rank")
    facts = [
        ("source model", _source_name(info)),
        ("source revision", source.get("revision")),
        ("tie strategy", info.get("tie")),
        ("router bias gap", info.get("router_gap")),
        ("relaxation rank", f"{relax} (none)" if relax == 0 else relax),
        ("mesh-convert version", info.get("mesh_convert_version")),
    ]
    lines = [f"- {name}: `{value}`" for name, value in facts if value is not None]
    if isinstance(info.get("command"), str):
        lines = ["```bash", info["command"], "```", "", *lines]
    if not lines:
        return None
    if info.get("variant") in (None, "mesh") and info.get("router_gap") is not None:
        # Only MeSH has routers; the sentence explains what the gap above means.
        lines += [
            "",
            "At conversion the routers were set to read back exactly the slot that the current step "
            "wrote, so the converted model started out computing what running the shared layers in "
            "order computes; the bias gap sets how strictly.",
        ]
    return "## How it was converted\n\n" + "\n".join(lines)


def _training_section(info: dict) -> str | None:
    training = _section(info, "training")
    if not training:
        return None
    recipe = training.get("recipe")
    facts = [
        # Training records the whole resolved recipe (a dict); only a recipe's name reads well here.
        ("recipe", recipe if isinstance(recipe, str) else None),
        ("method", training.get("method")),
        ("trainable", training.get("trainable")),
        ("tokens", _fmt_int(training["tokens"]) if _number(training.get("tokens")) is not None else None),
        ("steps", _fmt_int(training["steps"]) if _number(training.get("steps")) is not None else None),
        ("final loss", _fmt_value(training["final_loss"]) if _number(training.get("final_loss")) is not None else None),
    ]
    lines = [f"- {name}: {value}" for name, value in facts if value is not None]
    if not lines:
        return None
    return "## Training\n\nAfter conversion the model was trained further:\n\n" + "\n".join(lines)


def _eval_section(info: dict) -> str:
    entries = info.get("eval_results")
    rows = [
        [str(e.get("task", "?")), str(e.get("metric", "?")), _fmt_value(e.get("value"))]
        for e in (entries if isinstance(entries, list) else [])
        if isinstance(e, dict) and e.get("value") is not None
    ]
    if not rows:
        return "## Evaluation\n\nNot evaluated yet (see `mesh-convert eval`)."
    return "## Evaluation\n\n" + _table(["task", "metric", "value"], rows)


def _usage_section(model_ref: str, tokenizer_ref: str) -> str:
    # transformers 5 reads the model's config.json before choosing a tokenizer class, and this
    # config is remote code: without the flag AutoTokenizer asks on stdin (a batch job stalls).
    tokenizer_flag = ", trust_remote_code=True" if tokenizer_ref == model_ref else ""
    return "\n".join(
        [
            "## Usage",
            "",
            "The modeling code ships with the weights, so loading needs `trust_remote_code=True` "
            "(read `modeling_mesh.py` first if you do not trust the source).",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{model_ref}", trust_remote_code=True)',
            f'tokenizer = AutoTokenizer.from_pretrained("{tokenizer_ref}"{tokenizer_flag})',
            "",
            'inputs = tokenizer("The capital of France is", return_tensors="pt")',
            "output = model.generate(**inputs, max_new_tokens=20, do_sample=False)",
            "print(tokenizer.decode(output[0], skip_special_tokens=True))",
            "```",
        ]
    )


def _citation_section() -> str:
    return "\n".join(
        [
            "## Citation",
            "",
            "```bibtex",
            "@article{yu2025mesh,",
            "  title   = {MeSH: Memory-as-State-Highways for Recursive Transformers},",
            "  author  = {Yu, Chengting and others},",
            "  journal = {arXiv preprint arXiv:2510.07739},",
            "  year    = {2025}",
            "}",
            "```",
        ]
    )


# ----------------------------------------------------------------------------- public API


def build_model_card(
    info: dict,
    *,
    repo_id: str | None = None,
    has_tokenizer: bool = True,
) -> ModelCard:
    """The model card of a converted model, from the content of its `conversion.json`.

    `repo_id` (where the model is or will be published) names the card and goes into the usage
    snippet; without it the snippet points at a local directory. `has_tokenizer=False` makes the
    snippet load the tokenizer from the source model instead.
    """
    info = info if isinstance(info, dict) else {}
    model_name = repo_id.split("/")[-1] if repo_id else default_model_name(info)
    model_ref = repo_id or "path/to/converted-model"
    source_id = hub_model_id(_source_name(info))
    tokenizer_ref = model_ref if has_tokenizer or not source_id else source_id

    sections = [
        _intro(info, model_name),
        _layout_section(info),
        _params_section(info),
        _layer_map_section(info),
        _conversion_section(info),
        _training_section(info),
        _eval_section(info),
        _usage_section(model_ref, tokenizer_ref),
        _citation_section(),
    ]
    body = "\n\n".join(s for s in sections if s)
    data = build_card_data(info, model_name)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def write_model_card(output_dir: Path, info: dict, *, repo_id: str | None = None) -> None:
    """Write README.md into a converted model's directory."""
    output_dir = Path(output_dir)
    has_tokenizer = any((output_dir / name).is_file() for name in _TOKENIZER_FILES)
    card = build_model_card(info, repo_id=repo_id, has_tokenizer=has_tokenizer)
    (output_dir / "README.md").write_text(str(card), encoding="utf-8")
