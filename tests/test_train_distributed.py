"""Two CPU processes (gloo) reproduce the single-process losses for the same global batch:
DDP through the real `train()` launched as a user would on CPUs (`accelerate launch --multi_gpu
--num_processes 2`), and FSDP2 (`fully_shard` with the shared core
layer as the wrap unit, as in recipes/accelerate/fsdp2.yaml) on the same model, data and batch
split. Accelerate 1.15 does not enable its FSDP plugin on CPU processes (MULTI_CPU), so the FSDP2
check applies `fully_shard` itself; on GPUs the accelerate config does the same wrapping. Also:
the launches that would silently train alone are refused, and a recipe error prints once."""

import json
import os
import signal
import subprocess
import sys

import pytest

from mesh_convert.train.recipe import Recipe
from mesh_convert.train.loop import train
from helpers import SUBPROCESS_ENV, char_tokenizer, metrics, recipe, tiny_converted, write_recipe, write_text

pytestmark = pytest.mark.slow

FSDP2_SCRIPT = r'''
import json, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, AutoTokenizer
import mesh_convert.modeling  # registers MeSH with the Auto classes
from mesh_convert.train.data import BatchPlan, model_inputs
from mesh_convert.train.sources import build_data
from mesh_convert.modeling.modeling_mesh import GPTNeoXLoopLayer
from mesh_convert.train.recipe import load_recipe, lr_schedule
from mesh_convert.train.loop import default_peak_lr, plan_run
from mesh_convert.train.optim import make_optimizer, param_groups, set_lr

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
recipe = load_recipe(sys.argv[1])
torch.manual_seed(recipe.seed)
model = AutoModelForCausalLM.from_pretrained(recipe.model, dtype=torch.float32)
for module in model.modules():
    if isinstance(module, GPTNeoXLoopLayer):
        fully_shard(module)
fully_shard(model)
tokenizer = AutoTokenizer.from_pretrained(recipe.model)
plan = plan_run(recipe, world, default_peak_lr(recipe, model.config))
rows = BatchPlan(plan.global_batch_size, plan.micro_batch_size, plan.steps, rank, world)
data = build_data(recipe.data, tokenizer, recipe.seed, rows, model.config)
optimizer = make_optimizer(param_groups(model, recipe.optim), recipe.optim, plan.peak_lr)
losses = []
for step in range(plan.steps):
    set_lr(optimizer, lr_schedule(step, plan.steps, recipe.optim.warmup, recipe.optim.min_lr_ratio))
    total = torch.zeros(())
    for micro in range(plan.grad_accum):
        loss = model(**model_inputs(data.train.rows(step, micro), plan.block_size), use_cache=False).loss
        (loss / plan.grad_accum).backward()
        total += loss.detach() / plan.grad_accum
    torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.optim.grad_clip)
    optimizer.step()
    optimizer.zero_grad()
    dist.all_reduce(total)
    losses.append(total.item() / world)
if rank == 0:
    json.dump(losses, open(sys.argv[2], "w"))
dist.destroy_process_group()
'''


# What an outside training script does: plain transformers (the model's remote code, no
# mesh_convert import), reentrant checkpointing (older tutorials and trainers ask for it), DDP.
REENTRANT_DDP_SCRIPT = r'''
import json, sys, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM

sys.modules["mesh_convert"] = None
dist.init_process_group("gloo")
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).train()
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=json.loads(sys.argv[2]))
ddp = DistributedDataParallel(model)
x = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(dist.get_rank()))
for _ in range(2):
    ddp(input_ids=x, labels=x, use_cache=False).loss.backward()
print("trained", flush=True)
dist.destroy_process_group()
'''


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    tokenizer = char_tokenizer(root / "tokenizer")
    model = tiny_converted(root / "mesh", tokenizer)
    data = recipe(model, write_text(root / "train.txt"), root / "single", train={"max_steps": 4, "eval_every": 2})
    train(Recipe.model_validate(data))  # one process: micro-batch 2, 2 accumulation steps
    return {"root": root, "recipe": data, "losses": [r["loss"] for r in metrics(root / "single")]}


def launch(command: list[str], cwd, expect_rc: int = 0) -> str:
    """Run a launcher; on a hang, the whole process group is killed (no stray workers)."""
    env = {**os.environ, **SUBPROCESS_ENV}
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"launched run timed out:\n{output[-3000:]}")
    assert process.returncode == expect_rc, output[-3000:]
    return output


def torchrun(args: list[str], cwd, expect_rc: int = 0) -> str:
    """Two local processes."""
    return launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args], cwd,
                  expect_rc)


def accelerate_launch(flags: list[str], recipe_path, cwd, expect_rc: int = 0) -> str:
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]  # `accelerate launch`
    return launch([*accelerate, *flags, "-m", "mesh_convert.train", str(recipe_path)], cwd, expect_rc)


def test_ddp_two_cpu_processes_match_one(single, tmp_path):
    """The launch a user types on a CPU machine (README): Accelerate's multi-process launcher."""
    out = tmp_path / "ddp"
    path = write_recipe(tmp_path / "r.yaml", {**single["recipe"], "output_dir": str(out)})
    # 2 processes x micro-batch 2, no accumulation
    accelerate_launch(["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                       "--dynamo_backend", "no", "--main_process_port", "0"], path, tmp_path)
    info = json.loads((out / "model" / "conversion.json").read_text())["training"]
    assert info["processes"] == 2 and info["distributed"] == "MULTI_CPU"
    losses = [r["loss"] for r in metrics(out)]
    assert losses == pytest.approx(single["losses"], rel=1e-4)
    evals = [r["eval_loss"] for r in metrics(out) if "eval_loss" in r]
    assert evals == pytest.approx([r["eval_loss"] for r in metrics(single["root"] / "single") if "eval_loss" in r], rel=1e-4)


def test_fsdp2_two_cpu_processes_match_one(single, tmp_path):
    script = tmp_path / "fsdp2.py"
    script.write_text(FSDP2_SCRIPT)
    path = write_recipe(tmp_path / "r.yaml", single["recipe"])
    torchrun([str(script), str(path), str(tmp_path / "losses.json")], tmp_path)
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert losses == pytest.approx(single["losses"], rel=1e-4)


def test_accelerate_cpu_launch_of_several_processes_that_starts_one_is_refused(single, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process: the run says so instead of
    training alone."""
    out = tmp_path / "one"
    path = write_recipe(tmp_path / "r.yaml", {**single["recipe"], "output_dir": str(out)})
    output = accelerate_launch(["-q", "--cpu", "--num_processes", "2"], path, tmp_path, expect_rc=1)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--multi_gpu --num_processes N" in errors[0], output[-3000:]
    assert not out.exists()


def test_torchrun_recipe_error_is_one_line_and_tagged_on_the_other_ranks(single, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", {**single["recipe"], "output_dir": str(tmp_path / "out")})
    output = torchrun(["-m", "mesh_convert.train", str(path), "train.global_batch_size=6"], tmp_path, expect_rc=1)
    error = "error: train.global_batch_size=6 is not a multiple of micro_batch_size (2) x processes (2)"
    assert [line for line in output.splitlines() if line.startswith("error:")] == [error], output[-3000:]
    assert f"[rank 1] {error}" in output.splitlines(), output[-3000:]


# Asked for explicitly, or left to torch's default (reentrant in some releases).
@pytest.mark.parametrize("kwargs", [{"use_reentrant": True}, {"preserve_rng_state": True}])
def test_ddp_with_reentrant_checkpointing_trains_the_looped_core(single, tmp_path, kwargs):
    """Each core layer runs K times; reentrant checkpointing would give DDP their gradients K times
    ("Expected to mark a variable ready only once"): the model checkpoints non-reentrantly instead."""
    script = tmp_path / "reentrant.py"
    script.write_text(REENTRANT_DDP_SCRIPT)
    output = torchrun([str(script), str(single["root"] / "mesh"), json.dumps(kwargs)], tmp_path)
    assert output.count("trained") == 2, output[-3000:]
    assert ("use_reentrant=False" in output) == ("use_reentrant" in kwargs), output[-3000:]


def test_streamed_hub_data_resumes_from_its_saved_position_on_two_processes(single, tmp_path):
    """Each process streams its own shards of a local dataset folder, tokenized in a loader
    worker; a run resumed from its step-2 checkpoint (the loaders' saved positions, not a replay)
    trains on what the uninterrupted run trained on."""
    import shutil

    from helpers import corpus

    folder = tmp_path / "dataset"
    folder.mkdir()
    for shard in range(4):
        (folder / f"part-{shard}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus(shard, 120)))
    whole = tmp_path / "whole"
    data = {**single["recipe"], "output_dir": str(whole)}
    data["data"] = {**data["data"], "train": [], "hub": {"path": str(folder), "streaming": True}, "loader_workers": 1}
    data["train"] = {**data["train"], "max_steps": 6, "eval_every": 0}
    data["checkpoint"] = {"every": 2, "keep_last": 3}
    path = write_recipe(tmp_path / "r.yaml", data)
    flags = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
             "--dynamo_backend", "no", "--main_process_port", "0"]
    accelerate_launch(flags, path, tmp_path)
    assert sorted(p.name for p in (whole / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert {p.name for p in (whole / "checkpoints" / "step-00000002").glob("data-state-*")} == {
        "data-state-0.pt", "data-state-1.pt"}

    resumed = tmp_path / "resumed"  # as if killed after its step-2 checkpoint
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "model")
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    path = write_recipe(tmp_path / "r2.yaml", {**data, "output_dir": str(resumed)})
    accelerate_launch(flags, path, tmp_path)
    losses = [r["loss"] for r in metrics(resumed)]
    assert len(losses) == 6 and losses == pytest.approx([r["loss"] for r in metrics(whole)], rel=1e-5)
