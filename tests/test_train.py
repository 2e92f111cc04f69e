"""Continue pretraining from recipes on tiny converted models: the loss falls, outputs load,
partial training touches only what it should, data handling, bad input and the CLI."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from mesh_convert.train.data import BatchPlan, PackedBlocks, ShuffledOrder, read_documents, shuffled, tokenize_stream
from mesh_convert.errors import UserError
from mesh_convert.train.recipe import Recipe
from mesh_convert.train.loop import describe, flushes_denormals, train
from helpers import (
    SUBPROCESS_ENV,
    char_tokenizer,
    corpus,
    invoke,
    metrics,
    recipe,
    run_cli,
    state_of,
    tiny_converted,
    write_recipe,
    write_text,
)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tokenizer, a text file and two converted tiny models (plain and with rank-4 relaxation)."""
    root = tmp_path_factory.mktemp("train")
    tokenizer = char_tokenizer(root / "tokenizer")
    return {
        "root": root,
        "tokenizer": tokenizer,
        "text": write_text(root / "train.txt"),
        "model": tiny_converted(root / "mesh", tokenizer),
        "relaxed": tiny_converted(root / "mesh-relaxed", tokenizer, relax_rank=4),
    }


def test_continue_pretraining_lowers_the_loss_and_saves_a_converted_checkpoint(work, tmp_path):
    out = tmp_path / "run"
    data = recipe(work["model"], work["text"], out, train={"max_steps": 30, "eval_every": 15})
    summary = train(Recipe.model_validate(data))
    log = metrics(out)
    assert [r["step"] for r in log] == list(range(1, 31))
    assert sum(r["loss"] for r in log[-5:]) / 5 < log[0]["loss"] - 0.5
    evals = [r for r in log if "eval_ppl" in r]
    assert [r["step"] for r in evals] == [15, 30] and evals[1]["eval_ppl"] < evals[0]["eval_ppl"]
    assert summary["tokens"] == 30 * 4 * 32

    model_dir = out / "model"
    info = json.loads((model_dir / "conversion.json").read_text())
    assert info["source"] == {"name": "tiny-pythia"}  # the converter's record is kept
    assert info["training"]["steps"] == 30 and info["training"]["method"] == "full"
    assert info["training"]["tokens"] == 30 * 128 and info["training"]["final_loss"] == log[-1]["loss"]
    assert info["training"]["recipe"]["optim"]["lr"] == 3e-3
    # Published with the model: the recipe's absolute paths by their last part only.
    recorded = info["training"]["recipe"]
    assert recorded["model"] == Path(work["model"]).name and recorded["output_dir"] == out.name
    published = (model_dir / "conversion.json").read_text()
    assert str(tmp_path) not in published and str(work["root"]) not in published
    card = ModelCard.load(model_dir / "README.md")  # the trained model has its own card, as every output
    assert "- method: full" in card.text and "- steps: 30" in card.text
    assert card.text.lstrip().startswith("# run\n")  # titled with the run's name, not its folder's (`model`)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.use_cache  # generation still uses the cache
    generated = model.generate(torch.tensor([[60, 61]]), max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 7)


@pytest.mark.parametrize("trainable", ["routers", "routers+deltas", "core+routers"])
def test_partial_training_changes_only_the_selected_parameters(work, tmp_path, trainable):
    before = state_of(AutoModelForCausalLM.from_pretrained(work["relaxed"]))
    out = tmp_path / "run"
    train(Recipe.model_validate(recipe(work["relaxed"], work["text"], out, trainable=trainable,
                                       train={"max_steps": 3})))
    after = state_of(AutoModelForCausalLM.from_pretrained(out / "model"))
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    extra = {"routers": "(none)", "routers+deltas": "_delta", "core+routers": ".core."}[trainable]
    selected = {n for n in before if ".memory." in n or extra in n}
    assert changed and changed <= selected
    assert any(".memory." in n for n in changed)
    if trainable != "routers":
        assert any(extra in n for n in changed)


def test_training_flushes_denormals_and_restores_the_setting(work, tmp_path):
    """Sharp routers give denormal softmax outputs, on which x86 CPUs compute hundreds of times slower."""
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    torch.set_flush_denormal(False)
    seen = []
    train(Recipe.model_validate(recipe(work["model"], work["text"], tmp_path / "run", train={"max_steps": 2})),
          on_step=lambda step, record: seen.append(flushes_denormals()))
    assert seen == [True, True]
    assert not flushes_denormals()


def test_dry_run_prints_the_plan(work, tmp_path, monkeypatch, capsys):
    path = write_recipe(tmp_path / "r.yaml", recipe(work["model"], work["text"], tmp_path / "run"))
    assert run_cli(["train", str(path), "train.max_steps=5", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "max_steps: 5" in printed
    for needle in ("tokens_per_step", "128", "total_tokens", "640", "trainable parameters", "grad_accum"):
        assert needle in printed
    assert not (tmp_path / "run").exists()
    plan = describe(Recipe.model_validate(recipe(work["model"], work["text"], tmp_path / "x", trainable="routers")))
    assert plan["parameters"]["trainable"] == plan["parameters"]["routers"] > 0


def test_blocks_are_packed_with_eos_and_shuffled_from_the_seed(work):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work["tokenizer"])
    ids = [i for doc in tokenize_stream(["ab", "c"], tokenizer) for i in doc]
    assert ids == [*tokenizer("ab")["input_ids"], 0, *tokenizer("c")["input_ids"], 0]
    blocks = PackedBlocks(torch.arange(100).numpy(), 10)
    plan = BatchPlan(global_batch=4, micro_batch=4, steps=5)
    first, again, other = (ShuffledOrder(blocks, seed, plan) for seed in (1, 1, 2))
    batches = [first.rows(s, 0) for s in range(5)]  # 20 blocks: two epochs
    assert all(torch.equal(b, again.rows(s, 0)) for s, b in enumerate(batches))
    assert not all(torch.equal(b, other.rows(s, 0)) for s, b in enumerate(batches))
    epochs = torch.cat(batches)[:, 0].view(2, 10).sort().values
    assert torch.equal(epochs, torch.arange(0, 100, 10).expand(2, 10))  # each epoch is a permutation
    assert not torch.equal(torch.cat(batches)[:10, 0], torch.cat(batches)[10:, 0])  # in another order
    head, tail = blocks.split_tail(3)
    assert len(head) == 7 and len(tail) == 3 and tail.block(0)[0] == 70


@pytest.mark.parametrize("count", [1, 2, 7, 1000, 65_537, 10**9 + 7])
def test_the_shuffle_is_a_permutation_of_any_size_computed_per_position(count):
    places = np.arange(min(count, 70_000))
    sent = shuffled(places, count, seed=3, epoch=0)
    assert sent.min() >= 0 and sent.max() < count and len(np.unique(sent)) == len(places)
    if count <= 70_000:
        assert np.array_equal(np.sort(sent), places)
        if count > 2:
            assert not np.array_equal(sent, places)
    assert np.array_equal(shuffled(places[-5:], count, 3, 0), sent[-5:])  # one position alone: the same place


def test_jsonl_and_parquet_text_fields(work, tmp_path):
    docs = corpus(1, 5)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    assert list(read_documents(jsonl, "body")) == docs
    with pytest.raises(UserError, match=r"line 1 has no 'text' field \(it has: body, id\)"):
        list(read_documents(jsonl, "text"))
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": docs}), parquet)
    assert list(read_documents(parquet, "content")) == docs
    with pytest.raises(UserError, match="no 'text' column"):
        list(read_documents(parquet, "text"))


@pytest.mark.parametrize(
    "case, wanted",
    [
        ("missing data", "data file .*nope.txt does not exist"),
        ("typo", r"unknown key 'train.max_stpes' \(did you mean 'train.max_steps'\?\)"),
        ("no text column", "has no 'text' field"),
        ("block too long", "block_size=4096 is above the model's context of 64"),
        ("broken checkpoint", "corrupt or truncated safetensors file .*broken"),
        ("missing model", "model directory .* does not exist"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(work, tmp_path, monkeypatch, capsys, case, wanted):
    out = tmp_path / "run"
    data = recipe(work["model"], work["text"], out)
    args = []
    if case == "missing data":
        data["data"]["train"] = [str(tmp_path / "nope.txt")]
    elif case == "typo":
        args = ["train.max_stpes=3"]
    elif case == "no text column":
        (tmp_path / "d.jsonl").write_text(json.dumps({"content": "hello"}) + "\n")
        data["data"]["train"] = [str(tmp_path / "d.jsonl")]
    elif case == "block too long":
        data["data"]["block_size"] = 4096
    elif case == "broken checkpoint":
        broken = tmp_path / "broken"
        broken.mkdir()
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            (broken / name).write_bytes((work["model"] / name).read_bytes())
        (broken / "model.safetensors").write_bytes(b"not a safetensors file")
        data["model"] = str(broken)
    elif case == "missing model":
        data["model"] = str(tmp_path / "nowhere")
    path = write_recipe(tmp_path / "r.yaml", data)
    code = run_cli(["train", str(path), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    # Only the last line is ours (a weight-loading progress bar may come before it).
    assert err and err[-1].startswith("error:") and sum(line.startswith("error") for line in err) == 1, err
    assert re.search(wanted, err[-1]), err
    assert not (out / "model").exists()
    assert (work["model"] / "model.safetensors").is_file()  # nothing lost


def test_the_cli_prints_its_own_progress_and_summary_only(work, tmp_path, capsys):
    """No tqdm bar of transformers' (loading, writing shards) between our progress bar and our summary."""
    path = write_recipe(tmp_path / "r.yaml", recipe(work["model"], work["text"], tmp_path / "run", train={"max_steps": 2}))
    code, out, err = invoke(capsys, "train", path)
    assert code == 0, err
    assert "it/s]" not in out + err and "trained 2 steps" in out + err, out + err


def test_sigkill_and_resume_reproduces_the_uninterrupted_losses(work, tmp_path):
    """A real SIGKILL of a training subprocess after its step-2 checkpoint (it is stalled at step 3,
    past the checkpoint); `resume: auto` then finishes the run with the uninterrupted losses."""
    settings = dict(train={"max_steps": 6}, checkpoint={"every": 2, "keep_last": 2})
    reference = tmp_path / "reference"
    train(Recipe.model_validate(recipe(work["model"], work["text"], reference, **settings)))

    out = tmp_path / "killed"
    path = write_recipe(tmp_path / "r.yaml", recipe(work["model"], work["text"], out, **settings))
    env = {**os.environ, **SUBPROCESS_ENV}
    code = textwrap.dedent("""
        import sys, time
        from mesh_convert.train.recipe import load_recipe
        from mesh_convert.train.loop import train

        def stall_after_step_3(step, record):  # wait there to be killed, past the step-2 checkpoint
            while step == 3:
                time.sleep(1)

        train(load_recipe(sys.argv[1]), on_step=stall_after_step_3)
    """)
    process = subprocess.Popen([sys.executable, "-c", code, str(path)], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline:
        log = metrics(out) if (out / "metrics.jsonl").is_file() else []
        if any(r["step"] == 3 for r in log) or process.poll() is not None:
            break
        time.sleep(0.2)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
    assert not (out / "model").exists()

    train(Recipe.model_validate(recipe(work["model"], work["text"], out, **settings)))
    resumed, uninterrupted = metrics(out), metrics(reference)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(resumed, uninterrupted):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=0), a["step"]
    final = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    expected = AutoModelForCausalLM.from_pretrained(reference / "model").state_dict()
    assert all(torch.allclose(final[k], expected[k], atol=1e-6) for k in expected)


@pytest.mark.parametrize(
    "present, resume, wanted",
    [
        ("notes.txt", "auto", "is not empty"),  # the user's own file: not a run
        ("metrics.jsonl", "auto", "already holds a run and there is no checkpoint to resume from"),
        ("checkpoints/step-00000002/model.safetensors", "never", "already holds a run, and checkpoint.resume is never"),
    ],
)
def test_an_occupied_output_dir_is_refused_for_what_it_holds(work, tmp_path, present, resume, wanted):
    out = tmp_path / "run"
    (out / present).parent.mkdir(parents=True, exist_ok=True)
    (out / present).write_text("mine\n")
    data = recipe(work["model"], work["text"], out, train={"max_steps": 1}, checkpoint={"every": 0, "resume": resume})
    with pytest.raises(UserError) as refused:
        train(Recipe.model_validate(data))
    assert wanted in str(refused.value) and "--overwrite" in str(refused.value)
    assert [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()] == [present]


def test_resuming_with_another_model_data_or_batch_is_refused(work, tmp_path):
    """The checkpoint's state and data position belong to the run's settings: resuming under others
    would mix two runs into one."""
    out = tmp_path / "run"
    settings = dict(train={"max_steps": 4}, checkpoint={"every": 2})
    train(Recipe.model_validate(recipe(work["model"], work["text"], out, **settings)))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    for model, section, changes, wanted in (
        (work["model"], "data", {"block_size": 16}, "data"),
        (work["model"], "train", {"global_batch_size": 8}, "train.global_batch_size"),
        (work["relaxed"], "train", {}, "model"),
    ):
        data = recipe(model, work["text"], out, **settings)
        data[section] = {**data[section], **changes}
        with pytest.raises(UserError, match=f"cannot resume from .*step-00000002: {wanted} differ") as refused:
            train(Recipe.model_validate(data))
        assert "checkpoint.resume=never and --overwrite" in str(refused.value)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    # The same files named otherwise, and sections not in use, are the same run: it resumes.
    data = recipe(f"{work['model']}/", work["text"], out, **settings, lora={"r": 4})
    data["data"]["train"] = [os.path.relpath(work["text"])]
    assert train(Recipe.model_validate(data))["steps"] == 4
