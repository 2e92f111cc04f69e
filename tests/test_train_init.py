"""`mesh-convert init` (the paper's from-scratch recipe) and the CPU smoke recipe on real text."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from mesh_convert.convert.plan import mesh_parameter_counts
from mesh_convert.errors import UserError
from mesh_convert.train.recipe import InitSpec
from mesh_convert.train.scratch import init_scratch_model, scratch_config
from helpers import ROOT, char_tokenizer, metrics, recipe, run_cli, write_recipe, write_text


@pytest.mark.parametrize(
    "size, loops, layout, nonembedding, routers",
    [
        ("pythia-160m", 2, "2+4R2+2", 56_704_512, 23_070),
        ("pythia-410m", 2, "4+8R2+4", 201_541_632, 30_750),
        ("pythia-410m", 3, "3+6R3+3", 151_156_736, 49_200),
        ("pythia-1.4b", 2, "4+8R2+4", 805_736_448, 61_470),
    ],
)
def test_paper_parameter_counts_on_meta(size, loops, layout, nonembedding, routers):
    config = scratch_config(InitSpec(size=size, loops=loops))
    counts = mesh_parameter_counts(config)
    assert config.layout == layout
    assert (counts["nonembedding"], counts["routers"]) == (nonembedding, routers)


def test_paper_init_scales():
    spec = InitSpec(size="custom", num_layers=6, hidden_size=256, num_heads=4, vocab_size=512, loops=2)
    config = scratch_config(spec)
    model = init_scratch_model(config, seed=0)
    D, N = config.hidden_size, config.num_hidden_layers
    dense = torch.cat([m.weight.flatten() for n, m in model.named_modules() if n.endswith("attention.dense")])
    down = torch.cat([m.weight.flatten() for n, m in model.named_modules() if n.endswith("dense_4h_to_h")])
    qkv = torch.cat([m.weight.flatten() for n, m in model.named_modules() if n.endswith("query_key_value")])
    expected = config.initializer_range / math.sqrt(2 * N)
    assert dense.std().item() == pytest.approx(expected, rel=0.05)
    assert down.std().item() == pytest.approx(expected, rel=0.05)
    assert qkv.std().item() == pytest.approx(config.initializer_range, rel=0.05)
    ids = torch.randint(0, 512, (1, 8))
    h_emb = model(ids, output_hidden_states=True).hidden_states[0]
    table = model.get_input_embeddings()(ids)
    # sqrt(D) in the forward pass, as in the paper; the table itself keeps the usual init.
    assert config.embedding_multiplier == pytest.approx(math.sqrt(D))
    assert torch.allclose(h_emb, table * math.sqrt(D), atol=1e-5)
    assert model.get_input_embeddings().weight.std().item() == pytest.approx(config.initializer_range, rel=0.05)


def test_init_command_writes_a_loadable_model(tmp_path, monkeypatch):
    out = tmp_path / "scratch"
    args = ["init", "custom", "--loops", "2", "--layers", "4", "--hidden", "32", "--heads", "4", "--vocab", "128",
            "--context", "64", "-o", str(out)]
    assert run_cli(args) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.layout == "1+1R2+1" and model.config.vocab_size == 128
    record = json.loads((out / "conversion.json").read_text())
    assert record["params"]["routers"] == 2 * 3 * (32 * 5 + 5)
    # The card shows the from-scratch model's parameter table (there is no original to compare with).
    card = (out / "README.md").read_text()
    nonembedding = record["params"]["converted_nonembedding"]
    assert "## Parameters" in card and f"| converted layers (stored once), non-embedding | {nonembedding:,} |" in card
    assert "original model" not in card and "`1+1R2+1`" in card
    assert card.startswith("---") and "\n# scratch\n" in card  # the name the user gave it
    assert model.generate(torch.tensor([[1, 2]]), max_new_tokens=3, min_new_tokens=3, do_sample=False).shape == (1, 5)


def test_a_run_from_a_recipes_init_records_the_model_it_made(tmp_path):
    """The exported model's conversion.json has what `init` records (layout, counts, spec, seed),
    and its training; the card is titled with the run's name."""
    from mesh_convert.train.loop import train
    from mesh_convert.train.recipe import load_recipe

    tokenizer = char_tokenizer(tmp_path / "tokenizer")
    text = write_text(tmp_path / "train.txt", lines=60)
    out = tmp_path / "scratch-run"
    init = {"size": "custom", "num_layers": 4, "hidden_size": 32, "num_heads": 4, "loops": 2, "vocab_size": 128,
            "max_position_embeddings": 64}
    data = recipe(None, text, out, init=init, tokenizer=str(tokenizer), train={"max_steps": 1})
    del data["model"]
    train(load_recipe(write_recipe(tmp_path / "scratch.yaml", data), []))
    record = json.loads((out / "model" / "conversion.json").read_text())
    assert record["layout"] == "1+1R2+1" and (record["prelude"], record["core"], record["loops"]) == (1, 1, 2)
    assert record["params"]["routers"] == 2 * 3 * (32 * 5 + 5) and record["seed"] == 7
    assert record["init"]["num_layers"] == 4 and record["training"]["steps"] == 1
    assert "source" not in record and "command" not in record  # from scratch, made by no conversion
    assert "\n# scratch-run\n" in (out / "model" / "README.md").read_text()


def test_init_rejects_an_unknown_size(tmp_path, monkeypatch, capsys):
    assert run_cli(["init", "pythia-7m", "-o", str(tmp_path / "x")]) == 1
    assert "unknown Pythia size" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_init_takes_its_arguments_and_options_from_the_init_spec():
    """`init` and a recipe's `init` are one declaration: every field of InitSpec is a parameter of the command."""
    from typer.main import get_command

    from mesh_convert.cli import app

    parameters = {param.name for param in get_command(app).commands["init"].params}
    assert set(InitSpec.model_fields) <= parameters


def test_the_router_gap_has_one_bound_the_dtype_that_stores_it():
    """As for `convert`: any positive gap that the model's dtype (float32 here) holds, whatever its size."""
    assert scratch_config(InitSpec(size="14m", router_gap=100.0)).router_gap == 100.0
    with pytest.raises(UserError, match="--router-gap 1e\\+39 does not fit float32"):
        scratch_config(InitSpec(size="14m", router_gap=1e39))


@pytest.mark.parametrize("key", ["loops=0", "prelude=-1", "coda=-1"])
def test_a_recipes_init_layout_has_the_options_bounds(tmp_path, key):
    """The recipe's `init` shares the layout options' declaration, and with it their bounds."""
    from mesh_convert.train.recipe import load_recipe

    with pytest.raises(UserError, match=f"init.{key.split('=')[0]}: Input should be greater than or equal to"):
        load_recipe(None, [f"init.{key}", f"tokenizer={tmp_path}", f"data.train=[{tmp_path / 'x.txt'}]",
                           "train.max_steps=1"])


def test_cpu_smoke_recipe_lowers_the_loss_on_real_text(shared_dir, tmp_path, monkeypatch):
    """recipes/cpu-smoke.yaml (shortened to 12 steps here) on Tiny Shakespeare; the result loads and generates."""
    monkeypatch.chdir(ROOT)  # the recipe's paths are relative to the repository root
    out = tmp_path / "smoke"
    args = ["train", "recipes/cpu-smoke.yaml", f"output_dir={out}", "train.max_steps=12", "train.eval_every=6"]
    assert run_cli(args) == 0
    log = metrics(out)
    assert log[0]["loss"] > 10 and log[-1]["loss"] < log[0]["loss"] - 1.5
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    ids = tokenizer("ROMEO:", return_tensors="pt").input_ids
    text = tokenizer.decode(model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0], skip_special_tokens=True)
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")


def _logits_with_variant(model_dir, variant: str, ids: torch.Tensor) -> torch.Tensor:
    """The logits of the checkpoint's weights run as `variant` (routers dropped for non-mesh)."""
    from mesh_convert.modeling import MeshForCausalLM

    source = AutoModelForCausalLM.from_pretrained(model_dir)
    config = source.config
    config.variant = variant
    model = MeshForCausalLM(config)
    model.load_state_dict({k: v for k, v in source.state_dict().items() if "memory." not in k or variant == "mesh"})
    return model.eval()(ids).logits


@pytest.mark.parametrize("router_args, close_to_base", [(["--router-init", "base"], True), ([], False)])
def test_init_router_init_base_starts_as_the_base_recurrence(tmp_path, monkeypatch, router_args, close_to_base):
    """`init --router-init base` gives the conversion's function-preserving routers: a fresh MeSH
    model computes what the same weights compute as the base recurrence, up to the gap's leak
    ((B-1)*e^-8 of each read); the random routers read a near-uniform mix of all slots instead."""
    out = tmp_path / "scratch"
    args = ["init", "custom", "--loops", "2", "--layers", "4", "--hidden", "32", "--heads", "4", "--vocab", "128",
            "--context", "64", *router_args, "-o", str(out)]
    assert run_cli(args) == 0
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mesh, base = _logits_with_variant(out, "mesh", ids), _logits_with_variant(out, "base", ids)
    gap = (mesh - base).abs().max().item()
    assert (gap < 0.01) == close_to_base, gap


def test_train_recipe_router_init_base(tmp_path):
    """The recipe's `init.router_init=base` reaches the model that `train` builds."""
    from mesh_convert.train.recipe import load_recipe
    from mesh_convert.train.loop import load_base_model

    recipe = load_recipe(None, ["init.size=custom", "init.num_layers=4", "init.hidden_size=32", "init.num_heads=4",
                                "init.vocab_size=128", "init.router_init=base", "init.router_gap=5", f"tokenizer={tmp_path}",
                                f"data.train=[{tmp_path / 'x.txt'}]", "train.max_steps=1"])
    model = load_base_model(recipe)
    router = model.model.memory.read_routers[1]
    assert model.config.router_gap == 5 and not router.weight.any()
    assert router.bias.tolist() == [0.0, 0.0, 5.0, 0.0, 0.0]


def test_scratch_recipe_gives_the_routers_ten_times_the_rate():
    """BENCHMARKS.md "From scratch": at x1, MeSH from scratch trailed base at lr 1e-3; at x10 it did not."""
    from mesh_convert.train.recipe import load_recipe
    from mesh_convert.train.loop import load_base_model
    from mesh_convert.train.optim import make_optimizer, param_groups

    recipe = load_recipe(ROOT / "recipes" / "pythia-160m-scratch.yaml")
    model = load_base_model(recipe, meta=True)
    groups = param_groups(model, recipe.optim)
    optimizer = make_optimizer(groups, recipe.optim, recipe.optim.lr)
    rates = {("router" if "_routers." in name else "other"): torch_group["lr"]
             for group, torch_group in zip(groups, optimizer.param_groups) for name in group["names"]}
    assert rates == {"router": pytest.approx(10 * recipe.optim.lr), "other": pytest.approx(recipe.optim.lr)}
