"""Healing: distillation from the original model, and annealed tying down to a target rank."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import assert_loads_as_remote_code
from mesh_convert.train.data import BatchPlan
from mesh_convert.train.sources import build_data
from mesh_convert.train.recipe import AnnealSection, DistillSection, Recipe
from mesh_convert.train.loop import train
from mesh_convert.train.anneal import Annealer, export_at_rank, relaxed_modules, scheduled_rank
from mesh_convert.train.distill import Distiller
from helpers import char_tokenizer, metrics, recipe, run_cli, tiny_converted, write_recipe, write_text


@pytest.fixture(scope="module", params=["gpt_neox", "llama"])
def work(request, tmp_path_factory):
    """Both decoder families: their relaxed norms differ (LayerNorm weight+bias vs RMSNorm weight)."""
    root = tmp_path_factory.mktemp(f"heal-{request.param}")
    tokenizer = char_tokenizer(root / "tokenizer")
    full = tiny_converted(root / "mesh-full", tokenizer, relax_rank="full", family=request.param)
    return {"root": root, "text": write_text(root / "train.txt"), "full": full,
            "teacher": root / "mesh-full-source", "plain": tiny_converted(root / "mesh", tokenizer, family=request.param)}


def test_distillation_term_is_zero_for_the_teacher_itself_and_has_no_teacher_grads(work):
    distiller = Distiller(DistillSection(teacher=str(work["teacher"]), weight=2.0, temperature=2.0),
                          torch.device("cpu"), torch.float32, vocab_size=128)
    ids = torch.randint(3, 100, (2, 12))
    teacher_logits = distiller.teacher(ids).logits
    assert distiller.loss(teacher_logits, ids).item() == pytest.approx(0.0, abs=1e-6)
    student = (teacher_logits + torch.randn_like(teacher_logits)).requires_grad_()
    loss = distiller.loss(student, ids)
    loss.backward()
    assert loss.item() > 0 and student.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in distiller.teacher.parameters())


def test_distillation_run_pulls_the_student_towards_the_teacher(work, tmp_path):
    """A full-rank relaxed conversion equals its teacher; routers/deltas-only training with a
    large distillation weight keeps it close, while training the LM loss alone drifts further."""
    ids = torch.randint(3, 100, (2, 24))
    teacher = AutoModelForCausalLM.from_pretrained(work["teacher"]).eval()
    with torch.no_grad():
        target = torch.log_softmax(teacher(ids).logits, -1)

    def drift(out):
        student = AutoModelForCausalLM.from_pretrained(out / "model").eval()
        with torch.no_grad():
            log_p = torch.log_softmax(student(ids).logits, -1)
        return torch.nn.functional.kl_div(log_p, target, log_target=True, reduction="batchmean").item()

    common = dict(trainable="all", train={"max_steps": 6}, optim={"lr": 1e-2})
    train(Recipe.model_validate(recipe(work["full"], work["text"], tmp_path / "lm", **common)))
    train(Recipe.model_validate(recipe(work["full"], work["text"], tmp_path / "kd", **common,
                                       distill={"teacher": str(work["teacher"]), "weight": 20.0})))
    assert drift(tmp_path / "kd") < drift(tmp_path / "lm")


def test_rank_schedule_ends_at_the_target():
    ranks = [scheduled_rank(32, 0, p / 10) for p in range(11)]
    assert ranks[0] == 32 and ranks[-1] == 0 and all(a >= b for a, b in zip(ranks, ranks[1:]))
    assert scheduled_rank(32, 4, 1.0) == 4


@pytest.mark.parametrize("target", [0, 3])
def test_annealed_tying_exports_at_the_target_rank_with_the_same_function(work, tmp_path, target):
    """The held-out loss of the exported model equals the one the run measured on its trained model."""
    out = tmp_path / "run"
    data = recipe(work["full"], work["text"], out, train={"max_steps": 6},
                  anneal={"target_rank": target, "steps": 4, "every": 2, "penalty": 1e-3})
    data["data"]["eval_files"] = [str(write_text(tmp_path / "eval.txt", seed=1, lines=40))]
    parsed = Recipe.model_validate(data)
    train(parsed)
    exported = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    plan = BatchPlan(parsed.train.global_batch_size, parsed.train.micro_batch_size, 6)
    blocks = build_data(parsed.data, AutoTokenizer.from_pretrained(out / "model"), parsed.seed, plan).eval
    ids = blocks.stack(range(len(blocks)))
    with torch.no_grad():
        logits = exported(ids).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
    assert loss == pytest.approx(metrics(out)[-1]["eval_loss"], abs=1e-5)
    assert exported.config.relax_rank == target
    names = [n for n, _ in exported.named_parameters()]
    if target == 0:
        assert not any("_delta" in n for n in names)
    else:
        shapes = {n: p.shape for n, p in exported.named_parameters() if n.endswith("weight_delta_in")}
        assert shapes and all(s[1] == target for s in shapes.values())
    record = json.loads((out / "model" / "conversion.json").read_text())
    assert record["training"]["steps"] == 6 and record["relax_rank"] == target  # not the source's "full"
    assert len(metrics(out)) == 6


def test_an_annealing_run_resumed_between_its_events_ends_as_the_uninterrupted_one(work, tmp_path):
    """A checkpoint at step 3 falls between the annealing events at 2 and 4: resumed there, the
    bias and norm deltas keep the scale set at step 2, and the run ends as it would have."""
    settings = dict(train={"max_steps": 8}, checkpoint={"every": 3, "keep_last": 1},
                    anneal={"target_rank": 0, "steps": 6, "every": 2})
    train(Recipe.model_validate(recipe(work["full"], work["text"], tmp_path / "reference", **settings)))

    def interrupt_after_step_4(step, record):
        if step == 4:
            raise KeyboardInterrupt

    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        train(Recipe.model_validate(recipe(work["full"], work["text"], out, **settings)), on_step=interrupt_after_step_4)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000003"]
    train(Recipe.model_validate(recipe(work["full"], work["text"], out, **settings)))
    for a, b in zip(metrics(out), metrics(tmp_path / "reference"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=0), a["step"]
    final = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "reference" / "model").state_dict()
    assert all(torch.allclose(final[k], expected[k], atol=1e-6, rtol=0) for k in expected)


@pytest.mark.parametrize("target", [0, 3])
def test_an_annealed_export_counts_the_parameters_it_ends_with(work, tmp_path, target):
    """conversion.json (and so the card) counts the deltas the export keeps, in its total and
    its reduction too, not the full-rank ones the run started from."""
    converted = tmp_path / "converted"
    assert run_cli([str(work["teacher"]), "--loops", "2", "--relax-rank", "full", "-o", str(converted)]) == 0
    AutoTokenizer.from_pretrained(work["full"]).save_pretrained(converted)
    out = tmp_path / "run"
    train(Recipe.model_validate(recipe(converted, work["text"], out, train={"max_steps": 4},
                                       anneal={"target_rank": target, "steps": 4, "every": 2})))
    exported = AutoModelForCausalLM.from_pretrained(out / "model")
    params = json.loads((out / "model" / "conversion.json").read_text())["params"]
    assert params["total"] == exported.num_parameters()
    assert params["relax"] == sum(p.numel() for n, p in exported.named_parameters() if "_delta" in n)
    unique = params["converted_nonembedding"] + params["routers"] + params["relax"]
    assert params["reduction"] == pytest.approx(1 - unique / params["original_nonembedding"])
    assert f"{100 * params['reduction']:.1f}%" in (out / "model" / "README.md").read_text()


def test_a_run_shorter_than_its_annealing_is_refused(work, tmp_path, monkeypatch, capsys):
    """Stopped mid-schedule, the deltas still have more than the target rank: the export would
    silently differ from the trained model."""
    data = recipe(work["full"], work["text"], tmp_path / "run", train={"max_steps": 3},
                  anneal={"target_rank": 0, "steps": 4, "every": 2})
    for dry_run in ([], ["--dry-run"]):  # a dry run checks it too
        capsys.readouterr()
        assert run_cli(["train", str(write_recipe(tmp_path / "r.yaml", data)), *dry_run]) == 1
        error = capsys.readouterr().err.splitlines()[-1]
        assert error.startswith("error: anneal.steps=4") and "3 steps" in error
    assert not (tmp_path / "run").exists()


def test_a_dry_run_refuses_annealing_a_model_without_deltas(work, tmp_path, capsys):
    data = recipe(work["plain"], work["text"], tmp_path / "run", anneal={"target_rank": 0, "steps": 4, "every": 2})
    assert run_cli(["train", str(write_recipe(tmp_path / "r.yaml", data)), "--dry-run"]) == 1
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: anneal needs a model converted with relaxation")


@pytest.mark.parametrize("target", [0, 2])
def test_export_preserves_the_annealed_function(work, target):
    """After the last truncation the deltas have the target rank, so exporting changes nothing;
    the recentring step moves the loop-mean of the deltas (norms included) into the shared weights exactly."""
    model = AutoModelForCausalLM.from_pretrained(work["full"]).eval()
    ids = torch.randint(3, 100, (2, 10))
    with torch.no_grad():
        original = model(ids).logits
    annealer = Annealer(model, AnnealSection(target_rank=target, steps=2, every=1), total_steps=2)
    for module in relaxed_modules(model):
        annealer._recentre(module)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, original, atol=1e-5)
    annealer.after_step(1)
    annealer.after_step(2)
    with torch.no_grad():
        annealed = model(ids).logits
        exported = export_at_rank(model, target)(ids).logits
    assert torch.allclose(exported, annealed, atol=1e-4)
    assert not torch.allclose(annealed, original, atol=1e-3)  # truncation did change the model


@pytest.mark.parametrize("target", [0, 2])
def test_exported_annealed_model_loads_with_the_trained_logits(work, tmp_path, target):
    """Anneal while really training (optimizer steps, penalty), then write the export as training
    does: plain transformers, in a fresh process without mesh_convert, gives the trained logits."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(work["full"])
    annealer = Annealer(model, AnnealSection(target_rank=target, steps=4, every=2, penalty=1e-3), total_steps=6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(6):
        ids = torch.randint(3, 100, (2, 16))
        loss = model(input_ids=ids, labels=ids).loss
        if (penalty := annealer.penalty(step)) is not None:
            loss = loss + penalty
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        annealer.after_step(step + 1)
    model.eval()
    x = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        trained = model(x).logits
    export_at_rank(model, target).save_pretrained(tmp_path / "exported")
    assert_loads_as_remote_code(tmp_path / "exported", x, trained, tmp_path)
