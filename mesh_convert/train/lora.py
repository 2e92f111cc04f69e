"""LoRA fine-tuning via peft, and merging an adapter into a standalone checkpoint.

PEFT targets `LoopLinear` (an `nn.Linear` subclass) by name; its LoRA wrapper passes extra
positional arguments to the base layer, so the loop index reaches the per-loop deltas. Routers
train as full copies through `modules_to_save`: peft refuses a ModuleList there, so each router
Linear is named individually (`write_routers.0`, ...).
"""

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from ..artifacts.record import ConversionRecord, with_removed_code, with_training
from ..artifacts.remote_code import strip_foreign_code
from ..errors import UserError, first_line, is_our_fault, unpickling_refusal
from ..io import check_weights_inside, open_safetensors, read_json_object
from ..loading import load_model, transformers_bars_hidden
from .recipe import LoraSection

# Every attention and MLP projection of each decoder family (the routers train through
# modules_to_save instead, and the output head stays frozen).
DEFAULT_TARGETS = {
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@contextmanager
def peft_deprecation_hidden() -> Iterator[None]:
    """Inside the block, hide the FutureWarning that transformers (5.23 on) gives when peft reads
    `model.is_gradient_checkpointing` while it wraps a model: it is for peft to act on, not the user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def linear_layer_names(model: nn.Module) -> set[str]:
    """The names a LoRA target can give a Linear layer by (peft matches a name's dotted suffix):
    the last part, or with its list's name for a member of a ModuleList (`write_routers.0`)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            parts = name.split(".")
            names.add(".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1])
    return names


def router_module_names(model: nn.Module) -> list[str]:
    names = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in ("write_routers", "read_routers") and isinstance(module, nn.Linear):
            names.append(f"{parts[-2]}.{parts[-1]}")
    return names


def wrap_lora(model: nn.Module, section: LoraSection, train_routers: bool):
    from peft import LoraConfig, get_peft_model

    available = linear_layer_names(model)
    targets = section.target_modules or DEFAULT_TARGETS[getattr(model.config, "base_model_type", "gpt_neox")]
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise UserError(f"lora.target_modules {unknown} match no Linear layer; the model has {sorted(available)}")
    routers = router_module_names(model) if train_routers else []
    if train_routers and not routers:
        raise UserError("trainable: lora+routers needs MeSH routers, and this model has none (use trainable: lora)")
    config = LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=list(targets),
        modules_to_save=routers or None,
        task_type="CAUSAL_LM",
    )
    with peft_deprecation_hidden():
        peft_model = get_peft_model(model, config)
    # peft records the base as it was loaded, often relative to the training folder; the adapter
    # (`merge`, peft's AutoPeftModel) must find it from anywhere. A Hub id is kept as it is.
    base = model.name_or_path
    if base and Path(base).is_dir():
        peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path = str(Path(base).resolve())
    return peft_model


def copy_side_files(source: Path | None, target: Path, training: dict | None = None,
                    record: ConversionRecord | None = None) -> list[str]:
    """Carry the conversion record over to `target` (`record`, else the source model's, if any),
    with a `training` section, once everything else is written there: the remote code not ours
    that those files name (a tokenizer's or config's `auto_map`, see `remote_code.py`) is dropped,
    recorded and returned."""
    removed = strip_foreign_code(target)
    if record is None and source is not None:
        record = ConversionRecord.read(source)
    record = with_removed_code(with_training(record, training), removed)
    if record is not None:
        record.write(target)
    return removed


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def read_adapter(adapter_dir: Path):
    """The LoRA config of the adapter in `adapter_dir`, after its files are checked as data: the
    config holds a valid LoRA config, and the weights open (a pickled `.bin` only as weights, and
    a folder without weights is refused here, where peft would look for them on the Hub)."""
    from peft import LoraConfig

    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(f"{adapter_dir} is not a LoRA adapter directory (no adapter_config.json)")
    check_weights_inside(adapter_dir)
    fields = read_json_object(config_file)
    if fields.get("peft_type") != "LORA":
        raise UserError(f"{config_file}: peft_type is {fields.get('peft_type')!r}; merge takes LoRA adapters")
    try:
        config = LoraConfig.from_peft_type(**fields)
    except (TypeError, ValueError, KeyError) as error:  # peft checks some fields as it builds the config
        if is_our_fault(error):
            raise
        raise UserError(f"{config_file} is not a valid LoRA config: {first_line(error)}") from None
    if not isinstance(config.base_model_name_or_path, (str, type(None))):
        raise UserError(f"{config_file}: base_model_name_or_path is not a path")
    weights = next((adapter_dir / name for name in ADAPTER_WEIGHTS if (adapter_dir / name).is_file()), None)
    if weights is None:
        raise UserError(f"{adapter_dir} holds no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    if weights.suffix == ".safetensors":
        with open_safetensors(weights):
            pass
    else:
        import pickle

        import torch

        try:
            torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
            raise UserError(f"{weights} does not load as weights only: {unpickling_refusal(error)}") from None
    return config


PATTERNS_SECONDS = 10.0  # for all patterns on all module names: real ones take milliseconds
# How peft matches names, run in a process of its own that can be stopped: Python's `re` holds the
# interpreter while it backtracks, so nothing in this process could interrupt it.
_MATCH_ALL = "import json, re, sys\nforms, names = json.load(sys.stdin)\nfor pattern, whole in forms:\n" \
             "    compiled = re.compile(pattern)\n    for name in names:\n" \
             "        (compiled.fullmatch if whole else compiled.match)(name)\n"


def check_patterns(config, names: list[str], where: Path) -> None:
    """peft matches the model's module names against regular expressions taken from the adapter's
    config (a string target_modules or exclude_modules, modules_to_save, layers_pattern, the keys of
    rank_pattern and alpha_pattern), in the forms given here: a received adapter's pattern could
    backtrack for hours. Each must compile, and all must match every name within a time limit."""
    import json
    import subprocess
    import sys

    def listed(value) -> list:
        return [value] if isinstance(value, str) else list(value or ())

    forms = [(field, getattr(config, field), True) for field in ("target_modules", "exclude_modules")
             if isinstance(getattr(config, field, None), str)]
    forms += [("modules_to_save", rf"(^|.*\.){m}($|\..*)", False) for m in listed(config.modules_to_save)]
    forms += [("layers_pattern", rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", False) for p in listed(config.layers_pattern)]
    forms += [(field, rf"(.*\.)?({key})$", False) for field in ("rank_pattern", "alpha_pattern")
              for key in (getattr(config, field, None) or {})]
    for field, pattern, _ in forms:
        try:
            re.compile(str(pattern))
        except re.error as error:
            raise UserError(f"{where}: {field} holds an invalid regular expression ({error})") from None
    if not forms:
        return
    try:
        subprocess.run([sys.executable, "-c", _MATCH_ALL], input=json.dumps([[(str(p), w) for _, p, w in forms], names]),
                       text=True, capture_output=True, timeout=PATTERNS_SECONDS, check=True)
    except subprocess.TimeoutExpired:
        fields = ", ".join(sorted({field for field, _, _ in forms}))
        raise UserError(f"{where}: a regular expression in {fields} takes more than {PATTERNS_SECONDS:g} s to match "
                        "the model's module names (one that backtracks without end); refused") from None
    except OSError as error:  # no process could be started (a process limit, an interpreter we may not run)
        raise UserError(f"cannot check the regular expressions of {where} in a process of their own: "
                        f"{error.strerror or error}") from None


def _mismatch(error: RuntimeError) -> str:
    """The first of torch's "size mismatch for NAME: ..." lines (its first line only says where)."""
    return next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), first_line(error))


def retitle_adapter_card(directory: Path, title: str, base: str | None) -> None:
    """peft's card for an adapter (README.md), titled `title` and naming its base model only by a
    Hub id: peft writes the path the base was loaded from as `base_model` (and into a
    `base_model:adapter:` tag), for a local model the user's directory, under the title "Model
    Card for Model ID"."""
    from huggingface_hub import ModelCard

    from ..artifacts.card import hub_model_id

    path = directory / "README.md"
    card = ModelCard.load(path)
    hub_id = hub_model_id(base)
    card.data.base_model = hub_id
    tags = [tag for tag in card.data.tags or [] if not tag.startswith("base_model:")]
    card.data.tags = tags + ([f"base_model:adapter:{hub_id}"] if hub_id else [])
    card.text = re.sub(r"^# .*$", lambda _: f"# {title}", card.text, count=1, flags=re.M)
    card.save(path)


def merge_adapter(
    adapter_dir: str | Path, output: str | Path, base: str | Path | None = None, overwrite: bool = False,
    name: str | None = None,
) -> tuple[Path, list[str]]:
    """Merge a LoRA adapter (+ its router copies) into its base model and save a standalone
    checkpoint, its card titled `name` (default: the output folder's name); returns it with the
    remote code not ours that was left out of it (`copy_side_files`)."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    import mesh_convert.modeling  # noqa: F401  (registers MeSH with the Auto classes)

    from ..artifacts.card import write_model_card
    from ..artifacts.output import check_target, staged_directory

    adapter_dir, output = Path(adapter_dir), Path(output)
    config = read_adapter(adapter_dir)
    base_path = Path(base or config.base_model_name_or_path or "")
    if not (base_path / "config.json").is_file():
        raise UserError(f"base model {str(base_path)!r} of the adapter is not a checkpoint directory; pass --base")
    check_target(output, overwrite, (adapter_dir, base_path))  # before the slow load
    model = load_model(base_path, dtype=torch.float32)
    check_patterns(config, [name for name, _ in model.named_modules()], adapter_dir / "adapter_config.json")
    try:
        with peft_deprecation_hidden():
            merged = PeftModel.from_pretrained(model, str(adapter_dir), config=config).merge_and_unload()
    except (RuntimeError, TypeError, ValueError, KeyError) as error:  # peft failing on the adapter's values or shapes
        if is_our_fault(error):
            raise
        raise UserError(f"the adapter in {adapter_dir} cannot be applied to the base model {base_path}: "
                        f"{_mismatch(error)}") from None
    with staged_directory(output, overwrite, (adapter_dir, base_path)) as staging:
        with transformers_bars_hidden():
            merged.save_pretrained(staging)
        for source in (adapter_dir, base_path):
            if (source / "tokenizer_config.json").is_file():
                AutoTokenizer.from_pretrained(str(source)).save_pretrained(staging)
                break
        adapter_record = ConversionRecord.read(adapter_dir)
        training = adapter_record.training if adapter_record is not None else None
        removed = copy_side_files(base_path, staging, training.model_dump(exclude_unset=True) if training is not None else None)
        write_model_card(staging, ConversionRecord.read(staging), name=name or output.resolve().name)
    return output, removed


__all__ = ["copy_side_files", "merge_adapter", "retitle_adapter_card", "router_module_names", "wrap_lora"]
