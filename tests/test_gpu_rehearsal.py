"""CPU rehearsal of what a GPU user runs: bf16 and compiled training, the tensorboard tracker,
`data.hub` through the datasets library, packed (padding-free) batches as flash attention sees
them, and `scripts/gpu_check --device cpu` end to end."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

from conftest import make_tiny_llama
from mesh_convert.convert.conversion import convert_model
from mesh_convert.train.recipe import Recipe
from mesh_convert.train.loop import train
from helpers import ROOT, SUBPROCESS_ENV, char_tokenizer, corpus, metrics, recipe, tiny_converted, write_text

# ---------------------------------------------------------------------------------------------
# Packed batches: documents concatenated in one row, positions restarting at each document.
# ---------------------------------------------------------------------------------------------


def varlen_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, position_ids=None, **kwargs):
    """Attention as flash attention's varlen path does it: no mask, documents found where the
    position ids restart."""
    assert attention_mask is None
    if position_ids is None:
        raise AssertionError("the model did not pass position_ids to the attention")
    document = (torch.diff(position_ids, prepend=position_ids[:, :1] - 1) != 1).cumsum(1)
    same = document[:, :, None] == document[:, None, :]
    causal = torch.ones(same.shape[-2:], dtype=torch.bool).tril()
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=(same & causal)[:, None], scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("test_varlen", varlen_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register("test_varlen", flash_attention_mask)


@pytest.fixture(scope="module", params=["gpt_neox", "llama"])
def mesh(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"packed-{request.param}")
    if request.param == "gpt_neox":
        tokenizer = char_tokenizer(root / "tokenizer")
        path = tiny_converted(root / "mesh", tokenizer, relax_rank=2)
    else:
        source = make_tiny_llama(root / "llama")
        path = root / "mesh"
        convert_model(source, loops=2, relax_rank=2, relax_init="svd", dtype="float32").save_pretrained(path)
    return path


def test_explicit_position_ids_equal_the_default(mesh):
    model = AutoModelForCausalLM.from_pretrained(mesh, dtype=torch.float32).eval()
    ids = torch.randint(0, 98, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        default = model(ids, use_cache=False).logits
        explicit = model(ids, position_ids=torch.arange(20).expand(2, 20), use_cache=False).logits
    assert torch.equal(default, explicit)


@pytest.mark.parametrize("attention", ["eager", "sdpa", "test_varlen"])
def test_a_packed_batch_gives_each_document_its_logits_alone(mesh, attention):
    model = AutoModelForCausalLM.from_pretrained(mesh, dtype=torch.float32, attn_implementation=attention).eval()
    generator = torch.Generator().manual_seed(1)
    documents = [torch.randint(0, 98, (1, n), generator=generator) for n in (9, 14, 6)]
    packed = torch.cat(documents, 1)
    positions = torch.cat([torch.arange(d.shape[1]) for d in documents])[None]
    with torch.no_grad():
        together = model(packed, position_ids=positions, use_cache=False).logits
        alone = torch.cat([model(d, use_cache=False).logits for d in documents], 1)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Training paths a GPU user takes, on a CPU.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("rehearsal")
    tokenizer = char_tokenizer(root / "tokenizer")
    return {"root": root, "text": write_text(root / "train.txt"), "model": tiny_converted(root / "mesh", tokenizer)}


def loads_whole(model_dir):
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    return model.eval()


def with_data(data: dict, **changes) -> dict:
    return {**data, "data": {**data["data"], **changes}}


def train_as_launched(data: dict, path) -> None:
    """`python -m mesh_convert.train RECIPE`, what launchers run (a fresh Accelerate state)."""
    path.write_text(json.dumps(data))
    result = subprocess.run([sys.executable, "-m", "mesh_convert.train", str(path)], capture_output=True, text=True,
                            env={**os.environ, **SUBPROCESS_ENV}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"-> {data['output_dir']}/model" in result.stderr  # the closing line, as `mesh-convert train` prints it


def test_bf16_mixed_precision_trains_with_float32_master_weights(work, tmp_path):
    fp32 = recipe(work["model"], work["text"], tmp_path / "fp32", train={"max_steps": 4})
    train(Recipe.model_validate(fp32))
    bf16 = recipe(work["model"], work["text"], tmp_path / "bf16", train={"max_steps": 4, "mixed_precision": "bf16"})
    train_as_launched(bf16, tmp_path / "bf16.yaml")
    exact, mixed = [r["loss"] for r in metrics(tmp_path / "fp32")], [r["loss"] for r in metrics(tmp_path / "bf16")]
    assert mixed != exact and mixed == pytest.approx(exact, rel=0.05)  # autocast ran, and stayed close
    model = loads_whole(tmp_path / "bf16" / "model")
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_compiled_training_saves_a_model_that_loads_whole_with_the_trained_weights(work, tmp_path):
    """`train.compile=true`, run as a launcher runs it; its output equals an eager run's."""
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile-{compiled}"
        data = with_data(recipe(work["model"], work["text"], out, train={"max_steps": 2, "compile": compiled}),
                         eval_blocks=0)  # no evaluation: one compiled graph less to build
        train_as_launched(data, tmp_path / f"compile-{compiled}.yaml")
        runs[compiled] = loads_whole(out / "model")
    ids = torch.randint(0, 98, (2, 24), generator=torch.Generator().manual_seed(0))
    original = loads_whole(work["model"])
    with torch.no_grad():
        eager, compiled, before = (m(ids, use_cache=False).logits for m in (runs[False], runs[True], original))
    torch.testing.assert_close(compiled, eager, atol=1e-3, rtol=1e-3)
    assert not torch.allclose(compiled, before, atol=1e-3)  # the trained weights, not the starting ones


def test_tensorboard_tracker_writes_the_logged_metrics(work, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    train(Recipe.model_validate(recipe(work["model"], work["text"], out, trackers=["tensorboard"],
                                       train={"max_steps": 3})))
    event_files = list(out.rglob("events.out.tfevents.*"))
    assert event_files
    events = EventAccumulator(str(event_files[0].parent))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("loss")]
    assert losses == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in metrics(out)]


@pytest.fixture(scope="module")
def dataset_folder(work):
    """A dataset folder as `datasets` reads it (a Hub dataset repository, downloaded)."""
    folder = work["root"] / "local-dataset"
    (folder / "data").mkdir(parents=True)
    lines = [json.dumps({"text": text, "meta": i}) for i, text in enumerate(corpus(3, 300))]
    (folder / "data" / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_hub_dataset_through_datasets_equals_the_same_file_given_directly(work, dataset_folder, tmp_path):
    hub = with_data(recipe(work["model"], work["text"], tmp_path / "hub", train={"max_steps": 3, "eval_every": 3}),
                    train=[], hub={"path": str(dataset_folder)})
    train(Recipe.model_validate(hub))
    local = with_data(recipe(work["model"], work["text"], tmp_path / "file", train={"max_steps": 3, "eval_every": 3}),
                      train=[str(dataset_folder / "data" / "train.jsonl")])
    train(Recipe.model_validate(local))
    def losses(out):
        return [(r["loss"], r.get("eval_loss")) for r in metrics(out)]

    assert losses(tmp_path / "hub") == losses(tmp_path / "file")  # the same documents, in the same order


@pytest.mark.filterwarnings("error:'set_vital' is deprecated")  # torchdata's warning, which users cannot act on
def test_streamed_hub_dataset_trains_and_holds_out_its_first_blocks(work, dataset_folder, tmp_path):
    out = tmp_path / "streamed"
    data = with_data(recipe(work["model"], work["text"], out, train={"max_steps": 3, "eval_every": 3}),
                     train=[], hub={"path": str(dataset_folder), "streaming": True})
    summary = train(Recipe.model_validate(data))
    log = metrics(out)
    assert [r["step"] for r in log] == [1, 2, 3] and "eval_loss" in log[-1]
    assert summary["tokens"] == 3 * 4 * 32
    loads_whole(out / "model")


# ---------------------------------------------------------------------------------------------
# scripts/gpu_check, rehearsed: the script a GPU machine will run once, known to work before.
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gpu_check_rehearsal_on_cpu_writes_every_stage(tmp_path):
    """The whole script on CPU with tiny shapes, less the compiled speed stage (its compilation
    alone takes minutes on two cores; `bash scripts/gpu_check --device cpu` runs it too)."""
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check"), "--device", "cpu", "--no-compile"],
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, **SUBPROCESS_ENV, "OUT": str(tmp_path), "PYTHON": sys.executable})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = report["stages"]
    assert list(stages) == ["environment", "gpu_tests", "convert", "train_fsdp2", "train_ddp", "train_speed",
                            "generate", "train_speed_compiled", "train_deepspeed"]
    # 9 on one device; the two-GPU device-map checks (3) skip there
    assert stages["gpu_tests"]["counts"]["passed"] == 9 and not stages["gpu_tests"]["counts"]["failure"]
    assert set(stages["convert"]["models"]) == {"tiny-a", "tiny-b"}
    for launch in ("train_fsdp2", "train_ddp"):
        assert stages[launch]["status"] == "ok" and stages[launch]["resume_matches"], stages[launch]
        assert stages[launch]["processes"] == 1
    assert set(stages["train_speed"]["models"]) == {"mesh", "base", "original"}
    assert all(m["tokens_per_s"] > 0 for m in stages["train_speed"]["models"].values())
    assert stages["generate"]["mesh_vs_original"] > 0
    assert stages["train_speed_compiled"]["status"] == "skipped"
    assert stages["train_deepspeed"]["status"] == "unavailable" and stages["train_deepspeed"]["reason"]
    assert (tmp_path / "gpu_check.log").stat().st_size > 0
