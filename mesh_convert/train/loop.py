"""Continue pretraining (full, partial or LoRA) of a MeSH model from a recipe, on Accelerate: the
same recipe runs on a CPU, one GPU or many (DDP, FSDP2, DeepSpeed from `accelerate launch`).

The global batch (`train.global_batch_size` sequences) is fixed by the recipe; gradient
accumulation is derived from it, the micro-batch size and the number of processes, so the
optimisation is the same whatever hardware runs it.
"""

import math
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError, first_line, is_our_fault, shown
from ..io import check_model_dir, check_output_directory
from ..loading import load_model, load_tokenizer, model_file_errors, transformers_bars_hidden
from ..artifacts.remote_code import warn_removed
from .recipe import Recipe, lr_schedule, recipe_yaml
from .checkpoint import MetricsLog, Resume, TrainState, accelerate_view, checkpoint_dirs, choose_checkpoint, save_checkpoint
from .run_folder import check_inputs_apart, check_not_occupied, exclusive_run
from .optim import count_trainable, make_optimizer, param_groups, select_trainable, set_lr

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class RunPlan:
    processes: int
    micro_batch_size: int
    grad_accum: int
    global_batch_size: int
    block_size: int
    steps: int
    peak_lr: float | None = None  # None until the model is known: its provenance gives the default

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.block_size

    @property
    def total_tokens(self) -> int:
        return self.steps * self.tokens_per_step


def plan_run(recipe: Recipe, processes: int, peak_lr: float | None = None) -> RunPlan:
    """How the global batch splits over `processes` and micro-batches, and how many steps the run takes."""
    train = recipe.train
    per_step = train.micro_batch_size * processes
    if train.global_batch_size % per_step:
        raise UserError(
            f"train.global_batch_size={train.global_batch_size} is not a multiple of micro_batch_size "
            f"({train.micro_batch_size}) x processes ({processes})"
        )
    tokens_per_step = train.global_batch_size * recipe.data.block_size
    steps = train.max_steps or math.ceil(train.max_tokens / tokens_per_step)
    return RunPlan(processes, train.micro_batch_size, train.global_batch_size // per_step, train.global_batch_size,
                recipe.data.block_size, steps, peak_lr)


def default_peak_lr(recipe: Recipe, config) -> float:
    """The recipe's LR, else the Pythia pretraining LR of the model's size (from its provenance)."""
    if recipe.optim.lr is not None:
        return recipe.optim.lr
    from ..convert.pythia import PYTHIA_LR

    if recipe.init is not None:
        hint = recipe.init.size
    else:  # the converted model's source, as its config records it
        source = (getattr(config, "provenance", None) or {}).get("source") or {}
        hint = source.get("model", "") if isinstance(source, dict) else str(source)
    match = re.search(r"pythia-([0-9.]+[mb])", hint, re.IGNORECASE)
    if match and match[1].lower() in PYTHIA_LR:
        return PYTHIA_LR[match[1].lower()]
    raise UserError("set optim.lr: the model's provenance names no Pythia size to take the LR from")


# ---------------------------------------------------------------------------------------------
# The model and what trains.
# ---------------------------------------------------------------------------------------------


def load_base_model(recipe: Recipe, meta: bool = False):
    """The model to train, in float32 master weights (mixed precision autocasts on top)."""
    from .scratch import init_scratch_model, scratch_config

    if recipe.init is not None:
        config = scratch_config(recipe.init)
        if meta:
            from ..modeling.modeling_mesh import MeshForCausalLM

            with torch.device("meta"):
                return MeshForCausalLM(config)
        return init_scratch_model(config, recipe.seed, recipe.init.router_init)
    if meta:
        from transformers import AutoModelForCausalLM

        config = model_config(recipe)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    return load_model(recipe.model, dtype=torch.float32)


def model_config(recipe: Recipe):
    """The config of the model to train, without its weights."""
    if recipe.init is not None:
        from .scratch import scratch_config

        return scratch_config(recipe.init)
    from transformers import AutoConfig

    import mesh_convert.modeling  # noqa: F401  (registers MeSH with the Auto classes)

    check_model_dir(recipe.model)
    try:
        return AutoConfig.from_pretrained(recipe.model)
    except model_file_errors() as error:
        if is_our_fault(error):
            raise
        raise UserError(f"cannot read the model config in {recipe.model}: {first_line(error)}") from None


def apply_trainable(model, recipe: Recipe):
    """Freeze / wrap the model for the recipe's `trainable` choice; returns the model to train."""
    if recipe.method == "lora":
        from .lora import wrap_lora

        model.requires_grad_(False)
        return wrap_lora(model, recipe.lora, train_routers=recipe.trainable == "lora+routers")
    select_trainable(model, recipe.trainable)
    return model


def check_output_and_trackers(recipe: Recipe) -> None:
    """What the run writes to and logs with, checked before any work."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    check_output_directory(recipe.output_dir, "output_dir")
    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    for tracker in recipe.trackers:
        if not available[tracker]():
            raise UserError(f"trackers: {tracker} is not installed: pip install 'mesh-convert[{tracker}]' "
                            "or remove it from trackers")


def check_data_files(recipe: Recipe) -> None:
    from .sources import check_sources

    check_sources(recipe.data)


# ---------------------------------------------------------------------------------------------
# Dry run.
# ---------------------------------------------------------------------------------------------


def describe(recipe: Recipe, processes: int = 1) -> dict:
    """The plan of a recipe without training or loading weights (the model is built on meta)."""
    check_output_and_trackers(recipe)
    check_data_files(recipe)
    model = load_base_model(recipe, meta=True)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and recipe.data.block_size > context:
        raise UserError(f"data.block_size={recipe.data.block_size} is above the model's context of {context} tokens")
    model = apply_trainable(model, recipe)
    plan = plan_run(recipe, processes, default_peak_lr(recipe, model.config))
    if recipe.anneal.target_rank is not None:
        from .anneal import Annealer

        Annealer(model, recipe.anneal, plan.steps)  # its checks: a relaxed model, a rank it has, steps enough
    counts = count_trainable(model)
    return {
        "processes": plan.processes,
        "micro_batch_size": plan.micro_batch_size,
        "grad_accum": plan.grad_accum,
        "global_batch_size": plan.global_batch_size,
        "tokens_per_step": plan.tokens_per_step,
        "steps": plan.steps,
        "total_tokens": plan.total_tokens,
        "peak_lr": plan.peak_lr,
        "trainable": recipe.trainable,
        "parameters": counts,
    }


# ---------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------


def validation_loss(model, accelerator, blocks, micro_batch_size: int, max_batches: int | None) -> dict:
    """Mean token loss and perplexity over held-out blocks, split across processes. Every process
    runs the same number of forward passes (padding with weight 0), which sharded models need."""
    from .data import model_inputs

    world, rank = accelerator.num_processes, accelerator.process_index
    indices = list(range(len(blocks)))
    if max_batches is not None:
        indices = indices[: max_batches * micro_batch_size * world]
    per_process = math.ceil(len(indices) / world)
    mine = indices[rank::world]
    weights = [1.0] * len(mine) + [0.0] * (per_process - len(mine))
    mine = mine + [indices[0]] * (per_process - len(mine))
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, per_process, micro_batch_size):
            ids = blocks.stack(mine[start : start + micro_batch_size]).to(accelerator.device)
            targets = ids[:, 1:]  # the next token of each position (see `model_inputs`)
            inputs = model_inputs(ids, blocks.block_size)["input_ids"]
            logits = model(input_ids=inputs, use_cache=False).logits[:, : targets.shape[1]].float()
            losses = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
            ).view(ids.shape[0], -1)
            weight = torch.tensor(weights[start : start + micro_batch_size], device=losses.device)
            total[0] += (losses.sum(1).double() * weight).sum()
            total[1] += losses.shape[1] * weight.sum().double()
    model.train(was_training)
    total = accelerator.reduce(total, "sum")
    loss = (total[0] / total[1]).item()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def flushes_denormals() -> bool:
    """Whether CPU arithmetic flushes float32 denormals to zero (torch has no getter)."""
    return torch.tensor([1e-39]).mul(1.0).item() == 0.0


@contextmanager
def denormals_flushed() -> Iterator[None]:
    """CPU arithmetic flushes denormals to zero for the duration, then returns to what it was.

    Routers that learn sharp weights give softmax outputs below float32's normal range (gaps above
    ~87 nats), and x86 CPUs compute with such denormals far slower (a matmul on them: 300x here;
    a K=3 healing run with router lr x10 slowed 3-8x from step 15). Flushing changes only values
    under 1.2e-38; GPUs are unaffected either way."""
    before = flushes_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


def train(
    recipe: Recipe,
    console=None,
    overwrite: bool = False,
    on_step: Callable[[int, dict], None] | None = None,
    recipe_file: Path | None = None,
) -> dict:
    """Run the recipe; returns a summary (steps, tokens, final loss, output paths). An output_dir
    that already holds something is continued from its newest checkpoint (`checkpoint.resume`),
    or, with `overwrite`, replaced; otherwise it is refused. `on_step(step, record)` runs after
    each optimizer step, once its metrics are logged and its checkpoint saved. `recipe_file`: the
    file the recipe was read from, which the run must not write over."""
    from accelerate import PartialState

    check_output_and_trackers(recipe)
    check_inputs_apart(recipe, recipe_file, recipe_yaml(recipe))
    world = PartialState(cpu=_cpu_requested()).num_processes
    _check_all_processes_started(world)
    plan = plan_run(recipe, world)  # an impossible batch split fails here, before anything loads
    with denormals_flushed(), exclusive_run(Path(recipe.output_dir)):
        return _train(recipe, plan, console, overwrite, on_step)


# What a resumed run must share with the run that wrote its checkpoints: the model and what of it
# trains, and the data order, a pure function of the seed, the data and the global batch. `lora`
# and `anneal` count only where they are in use.
FIXED_WHEN_RESUMING = ("model", "init", "tokenizer", "seed", "method", "trainable", "lora", "data",
                       "train.global_batch_size", "anneal")


def _changed_since_the_run_began(output: Path, recipe: Recipe) -> list[str]:
    """The settings of FIXED_WHEN_RESUMING in which `recipe` differs from the run's recipe.yaml
    (paths compared as the files they name, so `x`, `./x` and `/abs/x` are one)."""
    import yaml

    try:
        began = Recipe.model_validate(yaml.safe_load((output / "recipe.yaml").read_text()))
    except (OSError, ValueError, yaml.YAMLError):  # none, or from a version with another schema: nothing to compare
        return []

    def settings(run: Recipe) -> dict:
        tree = run.model_dump(mode="json")
        if run.method != "lora":
            tree.pop("lora")
        if run.anneal.target_rank is None:
            tree.pop("anneal")
        return _as_files(tree)

    def setting(tree: dict, dotted: str):
        for part in dotted.split("."):
            tree = tree.get(part) if isinstance(tree, dict) else None
        return tree

    before, now = settings(began), settings(recipe)
    return [key for key in FIXED_WHEN_RESUMING if setting(before, key) != setting(now, key)]


def _as_files(value):
    """`value` (a recipe tree) with every text that names an existing path resolved to it."""
    if isinstance(value, dict):
        return {key: _as_files(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_as_files(item) for item in value]
    if isinstance(value, str) and value and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


def _resume_point(recipe: Recipe, output: Path, overwrite: bool, console) -> tuple[Resume | None, bool]:
    """The checkpoint this run starts from, once the output_dir is known to allow it, and whether
    it is one of the run's own (the run then continues its metrics; otherwise they start anew)."""
    checkpoints = output / "checkpoints"
    resume = choose_checkpoint(checkpoints, recipe.checkpoint.resume)
    own = resume is not None and resume.path.resolve().parent == checkpoints.resolve()
    check_not_occupied(output, recipe.checkpoint.resume, own, overwrite)
    if own and (changed := _changed_since_the_run_began(output, recipe)):
        raise UserError(f"cannot resume from {resume.path}: {', '.join(changed)} differ from the run's "
                        f"{output / 'recipe.yaml'}; restore them, or start anew in another output_dir (or here, "
                        "with checkpoint.resume=never and --overwrite)")
    warnings = []
    if resume is not None and resume.skipped:
        warnings.append(f"{'; '.join(resume.skipped)}: resuming from {resume.path}")
    if resume is not None and resume.from_earlier_version:
        warnings.append(f"{resume.path} was written by an earlier mesh-convert, which ordered the data otherwise: "
                        "the run goes on over the same data in this version's order")
    for warning in warnings if console is not None else ():
        console.print(f"[bold yellow]warning:[/] {shown(warning)}", highlight=False, soft_wrap=True)
    return resume, own


@dataclass
class _Run:
    """What a training run holds from its set-up (`_set_up`) to its export."""

    recipe: Recipe
    plan: RunPlan  # with the peak LR
    accelerator: Any
    model: Any  # as Accelerate prepared it
    optimizer: Any
    tokenizer: Any
    data: Any  # TrainData: the training rows of this process, the held-out blocks
    state: TrainState
    metrics: MetricsLog
    checkpoints: Path
    resumed: bool  # from a checkpoint: the export may replace an earlier one
    parameters: dict  # trainable and frozen counts
    annealer: Any = None
    distiller: Any = None


def _train(recipe: Recipe, plan: RunPlan, console, overwrite: bool, on_step: Callable[[int, dict], None] | None) -> dict:
    """Set up, step to the end (logging, evaluating and checkpointing on the way), export."""
    run = _set_up(recipe, plan, console, overwrite)
    state, plan = run.state, run.plan
    progress = _Progress(console if run.accelerator.is_main_process else None, plan.steps, state.step)
    run.model.train()
    last_loss = float("nan")
    throughput = _Throughput()
    while state.step < plan.steps:
        step_loss, grad_norm = _optimizer_step(run)
        last_loss = run.accelerator.reduce(step_loss, "mean").item()
        if not math.isfinite(last_loss):
            progress.close()
            raise _diverged(f"the loss is {last_loss} at step {state.step}", run.checkpoints)
        throughput.add(plan.tokens_per_step)
        record = _log_step(run, last_loss, grad_norm, throughput)
        progress.update(state.step, record)
        if _checkpoint_due(run):
            if not _weights_finite(run.model, run.accelerator):  # keep the checkpoints on disk usable
                progress.close()
                raise _diverged(f"the weights hold NaN or inf after step {state.step}", run.checkpoints)
            save_checkpoint(run.accelerator, run.checkpoints, state.step, state.tokens, recipe.checkpoint.keep_last)
        if on_step is not None:
            on_step(state.step, record)
    progress.close()

    with transformers_bars_hidden():  # transformers' "Writing model shards" bar would follow ours
        summary = _export(recipe, run.accelerator, run.model, run.tokenizer, state, last_loss,
                          replace=overwrite or run.resumed)
    summary.update(steps=state.step, tokens=state.tokens, final_loss=last_loss, parameters=run.parameters)
    if recipe.trackers:
        run.accelerator.end_training()
    return summary


def _set_up(recipe: Recipe, plan: RunPlan, console, overwrite: bool) -> _Run:
    """The accelerator, where the run starts, its data, its model and optimizer (restored from the
    checkpoint it resumes), its recipe.yaml, metrics log and trackers."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from .data import BatchPlan
    from .sources import build_data

    output = Path(recipe.output_dir)
    # Accelerate owns accumulation (needed for DeepSpeed, whose engine steps inside backward).
    accelerator = Accelerator(
        cpu=_cpu_requested(),
        mixed_precision=recipe.train.mixed_precision,
        gradient_accumulation_steps=plan.grad_accum,
        log_with=list(recipe.trackers) or None,
        project_dir=str(output),
    )
    main = accelerator.is_main_process
    resume, continues = _resume_point(recipe, output, overwrite, console if main else None)
    set_seed(recipe.seed)

    # Cheap checks first (files, config, tokenizer, data), so bad input fails before a long load.
    check_data_files(recipe)
    config = model_config(recipe)
    tokenizer = load_tokenizer(recipe.tokenizer_path, remedy="set `tokenizer` to a tokenizer directory")
    rows = BatchPlan(plan.global_batch_size, plan.micro_batch_size, plan.steps, accelerator.process_index,
                     accelerator.num_processes)
    data = build_data(recipe.data, tokenizer, recipe.seed, rows, config, console if main else None)
    if hasattr(data.train, "save"):  # a streamed position, one per process, kept in each checkpoint
        accelerator.register_save_state_pre_hook(lambda models, weights, folder: data.train.save(folder))
        accelerator.register_load_state_pre_hook(lambda models, folder: data.train.load(folder))
    model, optimizer, plan, parameters, annealer = _model_and_optimizer(recipe, plan, accelerator)

    distiller = None
    if recipe.distill.teacher:
        from .distill import Distiller

        vocab = accelerator.unwrap_model(model).get_output_embeddings().weight.shape[0]
        distiller = Distiller(recipe.distill, accelerator.device, DTYPES[recipe.train.mixed_precision], vocab)

    state = _restore(resume, accelerator, annealer) if resume is not None else TrainState()
    if main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "recipe.yaml").write_text(recipe_yaml(recipe))
    metrics = MetricsLog(output / "metrics.jsonl", main, state.step if continues else None)
    if recipe.trackers:
        accelerator.init_trackers("mesh-convert", config=_flat(recipe.model_dump(mode="json")))
    return _Run(recipe, plan, accelerator, model, optimizer, tokenizer, data, state, metrics, output / "checkpoints",
                resume is not None, parameters, annealer, distiller)


def _restore(resume: Resume, accelerator, annealer) -> TrainState:
    """The model's, optimizer's (and data position's) state as the checkpoint holds them; the step it was at."""
    try:
        with accelerate_view(resume.path) as view:
            accelerator.load_state(str(view))
    except (OSError, ValueError, KeyError, RuntimeError) as error:  # states of another model or optimizer
        raise UserError(f"cannot resume from {resume.path}: it does not fit this run's model and optimizer "
                        f"({type(error).__name__}: {first_line(error)})") from None
    if annealer is not None:
        annealer.restore(resume.state.step)
    return resume.state


def _model_and_optimizer(recipe: Recipe, plan: RunPlan, accelerator):
    """The model to train (what of it trains set), its optimizer at the run's peak LR (the plan,
    now with it), both prepared by Accelerate, its trainable and frozen parameter counts, and the
    annealer of its deltas (or None)."""
    from accelerate.utils import DistributedType

    model = load_base_model(recipe)
    if recipe.train.gradient_checkpointing:
        # transformers 5.23 renamed it activation checkpointing (the old name warns that it goes in v6);
        # 5.20-5.22, which this package supports, know only the old name, which warns nothing there.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_trainable(model, recipe)
    plan = replace(plan, peak_lr=default_peak_lr(recipe, model.config))
    parameters = count_trainable(model)

    annealer = None
    if recipe.anneal.target_rank is not None:
        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise UserError("anneal needs whole (unsharded) parameters: run it on one process or with DDP")
        from .anneal import Annealer

        annealer = Annealer(model, recipe.anneal, plan.steps)
    groups = param_groups(model, recipe.optim)
    optimizer = make_optimizer(groups, recipe.optim, plan.peak_lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    if recipe.train.compile:
        # In place: the module keeps its class and parameter names, so checkpoints and the saved
        # model have no `_orig_mod.` prefix (torch.compile(model) would wrap it).
        model.compile()
    return model, optimizer, plan, parameters, annealer


def _optimizer_step(run: _Run) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step over the plan's micro-batches: this process's mean loss of the step, and
    the gradient norm where gradients are clipped."""
    from .data import model_inputs

    recipe, plan, state, accelerator, model = run.recipe, run.plan, run.state, run.accelerator, run.model
    step = state.step
    set_lr(run.optimizer, lr_schedule(step, plan.steps, recipe.optim.warmup, recipe.optim.min_lr_ratio))
    step_loss = torch.zeros((), device=accelerator.device)
    grad_norm = None
    for micro in range(plan.grad_accum):
        inputs = model_inputs(run.data.train.rows(step, micro).to(accelerator.device), plan.block_size)
        with accelerator.accumulate(model):  # no gradient sync until the last micro-batch
            out = model(**inputs, use_cache=False)
            loss = out.loss
            step_loss += loss.detach() / plan.grad_accum
            if run.distiller is not None:
                loss = loss + run.distiller.loss(out.logits, inputs["input_ids"])
            if run.annealer is not None and (penalty := run.annealer.penalty(step)) is not None:
                loss = loss + penalty
            del out
            accelerator.backward(loss)  # divided by the accumulation steps there
            if accelerator.sync_gradients and recipe.optim.grad_clip is not None:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), recipe.optim.grad_clip)
            run.optimizer.step()  # a no-op until the accumulation is complete
            run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.tokens += plan.tokens_per_step
    if run.annealer is not None:
        run.annealer.after_step(state.step)
    return step_loss, grad_norm


class _Throughput:
    """Training tokens per second since the last logged step."""

    def __init__(self):
        self.start, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float | None:
        """The rate, and a new window from now."""
        elapsed = time.perf_counter() - self.start
        rate = self.tokens / elapsed if elapsed > 0 else None
        self.start, self.tokens = time.perf_counter(), 0
        return rate


def _log_step(run: _Run, loss: float, grad_norm, throughput: _Throughput) -> dict:
    """The step's record: loss, LR, tokens, the gradient norm where clipped, the throughput where
    the step is logged and the held-out loss where it is evaluated (every `train.log_every` and
    `train.eval_every` steps, and the last); written to metrics.jsonl and the trackers when due."""
    recipe, state, plan = run.recipe, run.state, run.plan
    last = state.step == plan.steps
    logged = state.step % recipe.train.log_every == 0 or last
    record = {"step": state.step, "loss": loss, "lr": run.optimizer.param_groups[0]["lr"], "tokens": state.tokens}
    if grad_norm is not None:
        record["grad_norm"] = float(grad_norm)
    if logged:
        record["tokens_per_s"] = throughput.rate()
    every = recipe.train.eval_every
    if run.data.eval is not None and ((every and state.step % every == 0) or last):
        record.update(validation_loss(run.model, run.accelerator, run.data.eval, plan.micro_batch_size,
                                      recipe.train.eval_batches))
    if logged or "eval_loss" in record:
        run.metrics.write(record)
        if recipe.trackers:
            run.accelerator.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=state.step)
    return record


def _checkpoint_due(run: _Run) -> bool:
    """Every `checkpoint.every` steps, but not at the end: the export follows."""
    every = run.recipe.checkpoint.every
    return bool(every) and run.state.step % every == 0 and run.state.step < run.plan.steps


def _weights_finite(model, accelerator) -> bool:
    bad = any(not torch.isfinite(p).all() for p in model.parameters())
    return accelerator.reduce(torch.tensor(float(bad), device=accelerator.device), "sum").item() == 0


def _diverged(what: str, checkpoints: Path) -> UserError:
    """Training that has run into NaN or inf stops: nothing is exported from broken weights."""
    saved = checkpoint_dirs(checkpoints)
    kept = f"the last checkpoint, {saved[-1]}, is kept" if saved else "no checkpoint was saved"
    return UserError(f"training diverged: {what}; stopped without exporting a model ({kept}); "
                     "lower optim.lr")


def _cpu_requested() -> bool:
    """CPU training: asked for by `accelerate launch --cpu` (ACCELERATE_USE_CPU), or several
    processes without GPUs (e.g. `torchrun --nproc_per_node 2` on a CPU machine: gloo DDP)."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def _check_all_processes_started(world: int) -> None:
    """Refuse a run that a launcher asked to be several processes but that is one: Accelerate's
    single-process launcher (`accelerate launch --cpu --num_processes N`, or `--num_processes N`
    on a machine without GPUs) exports MASTER_ADDR for the N processes, then starts only one."""
    single_process_launcher = "ACCELERATE_USE_CPU" in os.environ  # set by that launcher alone
    if world == 1 and single_process_launcher and "MASTER_ADDR" in os.environ:
        raise UserError(
            "accelerate launch was asked for several processes but started one (its --cpu launcher runs a single "
            "process); on CPUs launch with `accelerate launch --multi_gpu --num_processes N` or `torchrun --nproc_per_node N`"
        )


def _flat(tree: dict, prefix: str = "") -> dict:
    """Nested recipe -> flat scalars for trackers (tensorboard accepts only scalars and strings)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, name + "."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _export(recipe: Recipe, accelerator, model, tokenizer, state: TrainState, final_loss: float, replace: bool) -> dict:
    """Write the trained model (or adapter), the tokenizer and conversion.json with a training
    section, each staged and published whole; `replace` allows replacing an earlier export."""
    from ..artifacts.card import write_model_card
    from ..artifacts.output import staged_directory
    from ..artifacts.record import ConversionRecord
    from .lora import copy_side_files, retitle_adapter_card
    from .scratch import scratch_record

    output = Path(recipe.output_dir)
    run = output.resolve().name  # titles the exports' cards
    training = {
        "recipe": recipe.model_dump(mode="json"),
        "method": recipe.method,
        "trainable": recipe.trainable,
        "tokens": state.tokens,
        "steps": state.step,
        "final_loss": final_loss,
        "processes": accelerator.num_processes,
        "distributed": str(accelerator.distributed_type).rsplit(".", 1)[-1],
    }
    source = Path(recipe.model) if recipe.model else None
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)  # gathers sharded (FSDP / ZeRO) weights
    paths = {}
    if accelerator.is_main_process:
        if recipe.method == "lora":
            adapter = output / "adapter"
            with staged_directory(adapter, replace) as staging:
                unwrapped.save_pretrained(staging, state_dict=state_dict)
                tokenizer.save_pretrained(staging)
                removed = copy_side_files(source, staging, training)
                retitle_adapter_card(staging, f"{run} (LoRA adapter)", recipe.model)
            paths["adapter"] = str(adapter)
            if recipe.lora.merge:
                from .lora import merge_adapter

                merged, removed_on_merge = merge_adapter(adapter, output / "merged", base=source, overwrite=replace, name=run)
                paths["merged"] = str(merged)
                removed += [item for item in removed_on_merge if item not in removed]
        else:
            target = output / "model"
            if recipe.init is not None:
                training["init"] = recipe.init.model_dump()
            with staged_directory(target, replace) as staging:
                if recipe.anneal.target_rank is not None:
                    from .anneal import export_at_rank

                    unwrapped.load_state_dict(state_dict)
                    annealed = export_at_rank(unwrapped, recipe.anneal.target_rank)
                    annealed.save_pretrained(staging)
                else:
                    unwrapped.save_pretrained(staging, state_dict=state_dict)
                tokenizer.save_pretrained(staging)
                # From scratch, the record `init` writes, continued; else the converted model's.
                made = scratch_record(unwrapped.config, recipe.init, recipe.seed) if recipe.init is not None else None
                removed = copy_side_files(source, staging, training, record=made)
                record = ConversionRecord.read(staging)
                if record is not None and recipe.anneal.target_rank is not None:
                    from ..convert.plan import mesh_parameter_counts

                    relax = mesh_parameter_counts(annealed.config)["relax"]
                    record = record.relaxed_to(recipe.anneal.target_rank, relax)
                    record.write(staging)
                write_model_card(staging, record, name=run)  # like every other output
            paths["model"] = str(target)
        if removed:
            paths["removed_remote_code"] = removed
    accelerator.wait_for_everyone()
    return paths


class _Progress:
    """A rich progress bar (main process only): loss, LR, tokens/s, ETA."""

    def __init__(self, console, total: int, start: int):
        self.bar = None
        if console is None:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = self.bar.add_task("train", total=total, completed=start, info="")
        self.bar.start()

    def update(self, step: int, record: dict) -> None:
        if self.bar is None:
            return
        info = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}"
        if record.get("tokens_per_s"):
            info += f"  {record['tokens_per_s']:,.0f} tok/s"
        if "eval_loss" in record:
            info += f"  eval ppl {record['eval_ppl']:.2f}"
        self.bar.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def report(summary: dict, console) -> None:
    """The run's closing line (printed by the process that exported, i.e. rank 0 under a launcher)."""
    where = summary.get("model") or summary.get("adapter")
    if where:
        console.print(f"trained {summary['steps']} steps, {summary['tokens']:,} tokens, final loss "
                      f"{summary['final_loss']:.4f} -> {shown(where)}", highlight=False, soft_wrap=True)
    warn_removed(console, summary.get("removed_remote_code", []))


__all__ = ["RunPlan", "describe", "plan_run", "report", "train", "validation_loss"]
