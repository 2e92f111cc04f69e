"""LoRA fine-tuning via peft, and merging an adapter into a standalone checkpoint.

PEFT targets `LoopLinear` (an `nn.Linear` subclass) by name; its LoRA wrapper passes extra
positional arguments to the base layer, so the loop index reaches the per-loop deltas. Routers
train as full copies through `modules_to_save`: peft refuses a ModuleList there, so each router
Linear is named individually (`write_routers.0`, ...).
"""

from pathlib import Path

from torch import nn

from ..convert.record import ConversionRecord, with_training
from ..errors import UserError
from ..io import check_weights_inside, load_model, transformers_bars_hidden
from .recipe import LoraSection

# Every attention and MLP projection of each decoder family (the routers train through
# modules_to_save instead, and the output head stays frozen).
DEFAULT_TARGETS = {
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


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
    peft_model = get_peft_model(model, config)
    # peft records the base as it was loaded, often relative to the training folder; the adapter
    # (`merge`, peft's AutoPeftModel) must find it from anywhere. A Hub id is kept as it is.
    base = model.name_or_path
    if base and Path(base).is_dir():
        peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path = str(Path(base).resolve())
    return peft_model


def copy_side_files(source: Path | None, target: Path, training: dict | None = None) -> None:
    """Carry the source model's conversion record (if any) over to `target`, with a `training` section."""
    record = ConversionRecord.read(source) if source is not None else None
    record = with_training(record, training)
    if record is not None:
        record.write(target)


def merge_adapter(
    adapter_dir: str | Path, output: str | Path, base: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Merge a LoRA adapter (+ its router copies) into its base model and save a standalone checkpoint."""
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoTokenizer

    import mesh_convert.modeling  # noqa: F401  (registers MeSH with the Auto classes)

    from ..convert.card import write_model_card
    from ..convert.output import check_target, staged_directory

    adapter_dir, output = Path(adapter_dir), Path(output)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir} is not a LoRA adapter directory (no adapter_config.json)")
    check_weights_inside(adapter_dir)
    config = PeftConfig.from_pretrained(str(adapter_dir))
    base_path = Path(base or config.base_model_name_or_path or "")
    if not (base_path / "config.json").is_file():
        raise UserError(f"base model {str(base_path)!r} of the adapter is not a checkpoint directory; pass --base")
    check_target(output, overwrite, (adapter_dir, base_path))  # before the slow load
    model = load_model(base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    with staged_directory(output, overwrite, (adapter_dir, base_path)) as staging:
        with transformers_bars_hidden():
            merged.save_pretrained(staging)
        for source in (adapter_dir, base_path):
            if (source / "tokenizer_config.json").is_file():
                AutoTokenizer.from_pretrained(str(source)).save_pretrained(staging)
                break
        adapter_record = ConversionRecord.read(adapter_dir)
        training = adapter_record.training if adapter_record is not None else None
        copy_side_files(base_path, staging, training.model_dump(exclude_unset=True) if training is not None else None)
        write_model_card(staging, ConversionRecord.read(staging))
    return output


__all__ = ["copy_side_files", "merge_adapter", "router_module_names", "wrap_lora"]
