"""Annealed tying: shrink the per-loop relaxation deltas of a model converted with relaxation
(ideally full rank) to a target rank (0 = fully tied) over a number of training steps, letting
the shared weights and routers absorb what the deltas held; then export at the target rank.

Schedule, every `anneal.every` steps up to `anneal.steps`, with progress p in (0, 1]:
  1. recentre (exact, function-preserving): the mean delta over loops moves into the shared
     weight, so only what really differs between loops stays in the deltas;
  2. truncate each loop's weight delta to rank r(p), geometric in (1 + rank) from full to target;
  3. for target 0, scale the O(D) bias and norm deltas down linearly to zero at p = 1.
Between these events, an optional L2 penalty on the deltas pulls them towards zero as well.
"""

import copy
import math

import torch
from torch import nn

from ..errors import UserError
from ..modeling.modeling_mesh import LoopLayerNorm, LoopLinear, LoopRMSNorm, MeshForCausalLM, relax_is_dense
from .recipe import AnnealSection
from .optim import is_delta

# The per-loop norms of every decoder family: their weight delta is O(D), like a bias delta.
LOOP_NORMS = (LoopLayerNorm, LoopRMSNorm)


def relaxed_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (LoopLinear, *LOOP_NORMS)) and m.relaxed]


def weight_delta(module: LoopLinear) -> torch.Tensor:
    """The [K, out, in] weight deltas of all loops."""
    if hasattr(module, "weight_delta"):
        return module.weight_delta.detach()
    return module.weight_delta_out.detach() @ module.weight_delta_in.detach()


def full_rank(module: LoopLinear) -> int:
    return min(module.in_features, module.out_features)


def current_rank(module: LoopLinear) -> int:
    return full_rank(module) if hasattr(module, "weight_delta") else module.weight_delta_in.shape[1]


def truncate(delta: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-`rank` approximation of each loop's matrix (truncated SVD, in float32)."""
    if rank <= 0:
        return torch.zeros_like(delta)
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    return ((u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]).to(delta.dtype)


def factorize(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [K,o,r], in [K,r,i]) with out @ in the rank-`rank` truncation; singular values split evenly."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    root = s[..., :rank].sqrt()
    return (u[..., :rank] * root[..., None, :]).to(delta.dtype), (root[..., :, None] * vh[..., :rank, :]).to(delta.dtype)


def scheduled_rank(full: int, target: int, progress: float) -> int:
    value = math.exp((1 - progress) * math.log1p(full) + progress * math.log1p(target)) - 1
    return max(target, min(full, round(value)))


class Annealer:
    def __init__(self, model: nn.Module, section: AnnealSection, total_steps: int):
        self.section = section
        self.target = section.target_rank
        if total_steps < section.steps:
            # Stopped mid-schedule, the deltas still hold more than the target rank keeps.
            raise UserError(f"anneal.steps={section.steps} is more than the run's {total_steps} steps, so the export "
                            f"at rank {self.target} would differ from the trained model: lower anneal.steps or train longer")
        self.modules = relaxed_modules(model)
        if not self.modules:
            raise UserError("anneal needs a model converted with relaxation (relax_rank > 0 or full)")
        ranks = {current_rank(m) for m in self.modules if isinstance(m, LoopLinear)}
        if ranks and max(ranks) < self.target:
            raise UserError(f"anneal.target_rank={self.target} is above the model's relax rank {max(ranks)}")
        self.bias_scale = 1.0  # how much of the O(D) deltas is still left (target 0 only)

    def restore(self, step: int) -> None:
        """The schedule's state after `step` optimizer steps, for a resumed run: the O(D) deltas'
        scale is the one set at the last annealing event, which a checkpoint need not fall on."""
        if self.target != 0:
            return
        last_event = step if step >= self.section.steps else step - step % self.section.every
        self.bias_scale = 1.0 - min(1.0, last_event / self.section.steps)  # as `after_step` sets it

    def active(self, step: int) -> bool:
        return step < self.section.steps

    def penalty(self, step: int) -> torch.Tensor | None:
        """L2 penalty on all deltas while annealing (a term of the loss)."""
        if not self.section.penalty or not self.active(step):
            return None
        total = sum(
            (p.float() ** 2).sum() for m in self.modules for n, p in m.named_parameters(recurse=False) if is_delta(n)
        )
        return self.section.penalty * total

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Called after optimizer step `step` (1-based count of steps done). Once annealing is
        over, every step projects the deltas back to the target rank (zero for rank 0), so the
        trained model is exactly what `export_at_rank` writes."""
        if step < self.section.steps and step % self.section.every:
            return
        progress = min(1.0, step / self.section.steps)
        if step > self.section.steps and self.target == 0:
            for module in self.modules:
                for name, param in module.named_parameters(recurse=False):
                    if is_delta(name):
                        param.zero_()
            return
        for module in self.modules:
            if step <= self.section.steps:
                self._recentre(module)
            if isinstance(module, LoopLinear):
                rank = scheduled_rank(full_rank(module), self.target, progress)
                if rank < current_rank(module):
                    self._set_weight_delta(module, truncate(weight_delta(module), rank))
        if self.target == 0:
            new_scale = 1.0 - progress
            factor = new_scale / self.bias_scale if self.bias_scale > 0 else 0.0
            for module in self.modules:
                for name in ("bias_delta",) + (("weight_delta",) if isinstance(module, LOOP_NORMS) else ()):
                    if hasattr(module, name):
                        getattr(module, name).mul_(factor)
            self.bias_scale = new_scale

    @staticmethod
    @torch.no_grad()
    def _recentre(module: nn.Module) -> None:
        """Move the loop-mean of every delta into the shared parameter: the function is unchanged."""
        if isinstance(module, LOOP_NORMS) or hasattr(module, "weight_delta"):
            mean = module.weight_delta.mean(0)
            module.weight.add_(mean)
            module.weight_delta.sub_(mean)
        if getattr(module, "bias_delta", None) is not None:
            mean = module.bias_delta.mean(0)
            module.bias.add_(mean)
            module.bias_delta.sub_(mean)

    @staticmethod
    def _set_weight_delta(module: LoopLinear, delta: torch.Tensor) -> None:
        if hasattr(module, "weight_delta"):
            module.weight_delta.copy_(delta)
        else:  # keep the stored rank; the truncated delta has at most that rank
            out, inp = factorize(delta, module.weight_delta_in.shape[1])
            module.weight_delta_out.copy_(out)
            module.weight_delta_in.copy_(inp)


@torch.no_grad()
def export_at_rank(model: MeshForCausalLM, rank: int) -> MeshForCausalLM:
    """A new model with `config.relax_rank = rank`; its deltas are the truncations of `model`'s
    (for rank 0 the delta parameters are gone, and the O(D) deltas must already be zero)."""
    config = copy.deepcopy(model.config)
    config.relax_rank = rank
    state = {k: v for k, v in model.state_dict().items() if not is_delta(k)}
    names = {id(m): n for n, m in model.named_modules()}
    for module in relaxed_modules(model):
        prefix = names[id(module)] + "."
        if rank == 0:
            continue
        for name in ("bias_delta",) + (("weight_delta",) if isinstance(module, LOOP_NORMS) else ()):
            if hasattr(module, name):
                state[prefix + name] = getattr(module, name).detach().clone()
        if isinstance(module, LoopLinear):
            delta = weight_delta(module)
            if relax_is_dense(rank, module.in_features, module.out_features):
                state[prefix + "weight_delta"] = delta.clone()
            else:
                state[prefix + "weight_delta_out"], state[prefix + "weight_delta_in"] = factorize(delta, rank)
    exported = type(model)(config).to(next(model.parameters()).dtype)
    exported.load_state_dict(state, strict=True)
    return exported.eval()
