"""What trains, and how: parameter roles, the trainable selection, AdamW groups and the LR schedule.

Roles come from parameter names (see modeling_mesh): routers live under `memory.*_routers`,
the shared core's layers under `core.`, relaxation deltas end in `_delta`, `_delta_in` or
`_delta_out`, LoRA weights contain `lora_`.
Names may carry PEFT's or DDP's prefixes, so every test here is a substring test.
"""

import torch
from torch import nn

from ..errors import UserError
from .recipe import OptimSection

DELTA_SUFFIXES = ("_delta", "_delta_in", "_delta_out")


def is_router(name: str) -> bool:
    return "memory.write_routers." in name or "memory.read_routers." in name


def is_delta(name: str) -> bool:
    return name.endswith(DELTA_SUFFIXES)


def is_core(name: str) -> bool:
    return ".core." in name or name.startswith("core.")


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norms (and their per-loop deltas) are not decayed: 1-D tensors, or norm/bias deltas."""
    module, _, stem = name.rpartition(".")
    if stem in ("bias", "bias_delta"):
        return True
    if "norm" in module.rsplit(".", 1)[-1]:  # a LayerNorm's weight and its weight_delta
        return True
    return param.ndim < 2


def select_trainable(model: nn.Module, trainable: str) -> None:
    """Set requires_grad for the recipe's choice (`lora*` choices were already set by PEFT)."""
    names = [name for name, _ in model.named_parameters()]
    if trainable in ("routers", "routers+deltas") and not any(is_router(n) for n in names):
        raise UserError(f"trainable: {trainable} needs MeSH routers, and this model has none (variant is not mesh)")
    if trainable == "routers+deltas" and not any(is_delta(n) for n in names):
        raise UserError("trainable: routers+deltas needs relax deltas; the model was converted with relax_rank 0")
    if trainable.startswith("lora"):
        return
    for name, param in model.named_parameters():
        if trainable == "all":
            param.requires_grad_(True)
        elif trainable == "routers":
            param.requires_grad_(is_router(name))
        elif trainable == "core+routers":  # the looped part: the tie's error lives there
            param.requires_grad_(is_core(name) or is_router(name))
        else:
            param.requires_grad_(is_router(name) or is_delta(name))


def param_groups(model: nn.Module, optim: OptimSection) -> list[dict]:
    """AdamW groups by (role LR multiplier, decayed or not); each group remembers its peak LR."""
    groups: dict[tuple[str, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        role = "router" if is_router(name) else "delta" if is_delta(name) else "main"
        mult = {"router": optim.router_lr_mult, "delta": optim.delta_lr_mult, "main": 1.0}[role]
        decay = not no_weight_decay(name, param)
        group = groups.setdefault(
            (role, decay),
            {"params": [], "names": [], "weight_decay": optim.weight_decay if decay else 0.0, "lr_mult": mult},
        )
        group["params"].append(param)
        group["names"].append(name)
    if not groups:
        raise UserError("nothing to train: the recipe's `trainable` selects no parameters")
    return list(groups.values())


def make_optimizer(groups: list[dict], optim: OptimSection, peak_lr: float) -> torch.optim.AdamW:
    torch_groups = [
        {"params": g["params"], "weight_decay": g["weight_decay"], "lr": peak_lr * g["lr_mult"], "peak_lr": peak_lr * g["lr_mult"]}
        for g in groups
    ]
    return torch.optim.AdamW(torch_groups, lr=peak_lr, betas=tuple(optim.betas), eps=optim.eps)


def set_lr(optimizer, multiplier: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * multiplier


def count_trainable(model: nn.Module) -> dict[str, int]:
    counts = {"trainable": 0, "frozen": 0, "routers": 0, "deltas": 0, "lora": 0}
    seen = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        if not param.requires_grad:
            counts["frozen"] += param.numel()
            continue
        counts["trainable"] += param.numel()
        if is_router(name):
            counts["routers"] += param.numel()
        elif is_delta(name):
            counts["deltas"] += param.numel()
        elif "lora_" in name:
            counts["lora"] += param.numel()
    return counts
