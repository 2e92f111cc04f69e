"""The recipe schema: YAML + dotted overrides, unknown keys with suggestions, the LR schedule,
weight-decay groups, and that every shipped recipe validates."""

from pathlib import Path

import pytest
import torch
import yaml

from mesh_convert.errors import UserError
from mesh_convert.train.recipe import load_recipe, lr_schedule
from mesh_convert.train.optim import no_weight_decay, param_groups, select_trainable
from mesh_convert.train.recipe import OptimSection

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
MINIMAL = {
    "model": "some/dir",
    "data": {"train": ["a.txt"]},
    "train": {"max_steps": 10},
}


def write(tmp_path, data) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_minimal_recipe_has_paper_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert recipe.optim.betas == (0.9, 0.95)
    assert recipe.optim.weight_decay == 0.01
    assert (recipe.optim.warmup, recipe.optim.min_lr_ratio) == (0.01, 0.1)
    assert recipe.trainable == "all"


@pytest.mark.parametrize(
    "data, wanted",
    [
        ({**MINIMAL, "data": {"train": ["a.txt"], "blok_size": 8}}, "'data.blok_size' (did you mean 'data.block_size'?)"),
        ({**MINIMAL, "optimm": {}}, "'optimm' (did you mean 'optim'?)"),
        ({**MINIMAL, "lora": {"rank": 4}}, "'lora.rank'"),
    ],
)
def test_unknown_key_names_it_and_the_closest(tmp_path, data, wanted):
    with pytest.raises(UserError, match="unknown key") as error:
        load_recipe(write(tmp_path, data))
    assert wanted in str(error.value)
    assert "\n" not in str(error.value)


def test_dotted_overrides_are_typed_and_checked(tmp_path):
    path = write(tmp_path, MINIMAL)
    recipe = load_recipe(path, ["train.max_steps=3", "optim.lr=1e-4", "data.block_size=16", "method=lora"])
    assert recipe.train.max_steps == 3 and recipe.optim.lr == 1e-4 and recipe.data.block_size == 16
    assert recipe.trainable == "lora+routers"
    with pytest.raises(UserError, match=r"'trian' \(did you mean 'train'\?\)"):
        load_recipe(path, ["trian.max_steps=3"])
    with pytest.raises(UserError, match=r"'train.max_step' \(did you mean 'train.max_steps'\?\)"):
        load_recipe(path, ["train.max_step=3"])
    with pytest.raises(UserError, match="key.sub=value"):
        load_recipe(path, ["train.max_steps"])
    with pytest.raises(UserError, match="train.max_steps"):
        load_recipe(path, ["train.max_steps=many"])
    with pytest.raises(UserError, match=r"override seed: the value is not valid YAML \(could not determine a constructor"):
        load_recipe(path, ['seed=!!python/object/apply:os.system ["true"]'])
    with pytest.raises(UserError, match="override data.train: the value is not valid YAML"):
        load_recipe(path, ["data.train=[a.txt"])
    with pytest.raises(UserError, match="override seed: the value is nested too deeply"):
        load_recipe(path, ["seed=" + "[" * 100_000])


def test_what_yaml_and_overrides_naturally_write_is_read_as_meant(tmp_path):
    """YAML reads an unquoted `no` as false, and one file is naturally written without brackets."""
    path = tmp_path / "r.yaml"
    path.write_text("model: some/dir\ndata:\n  train: a.txt\n  eval_files: b.txt\n"
                    "train:\n  max_steps: 10\n  mixed_precision: no\n")
    recipe = load_recipe(path)
    assert recipe.train.mixed_precision == "no"
    assert (recipe.data.train, recipe.data.eval_files) == (["a.txt"], ["b.txt"])
    recipe = load_recipe(write(tmp_path, MINIMAL), ["train.mixed_precision=no", "data.train=c.txt"])
    assert (recipe.train.mixed_precision, recipe.data.train) == ("no", ["c.txt"])
    with pytest.raises(UserError, match="mixed_precision"):
        load_recipe(write(tmp_path, MINIMAL), ["train.mixed_precision=yes"])


def test_inconsistent_recipes_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="exactly one of train.max_steps and train.max_tokens"):
        load_recipe(write(tmp_path, {**MINIMAL, "train": {}}))
    with pytest.raises(UserError, match="exactly one of `model`"):
        load_recipe(write(tmp_path, {k: v for k, v in MINIMAL.items() if k != "model"}))
    with pytest.raises(UserError, match="needs method: lora"):
        load_recipe(write(tmp_path, {**MINIMAL, "trainable": "lora"}))
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="data.shuffle_buffer is gone: streamed data is read in its stored order"):
        load_recipe(write(tmp_path, {**MINIMAL, "data": {"hub": {"path": "a/b", "streaming": True}, "shuffle_buffer": 9}}))
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


def test_a_recipe_that_is_no_file_or_too_deep_is_one_line_and_never_hangs(tmp_path):
    """A pipe given as the recipe was read forever; YAML nested thousands deep was an internal error."""
    import os

    os.mkfifo(tmp_path / "pipe.yaml")
    with pytest.raises(UserError, match="is not a file"):
        load_recipe(tmp_path / "pipe.yaml")
    with pytest.raises(UserError, match=r"is not a file \(a directory\)"):
        load_recipe(tmp_path)
    (tmp_path / "deep.yaml").write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(UserError, match="nested too deeply"):
        load_recipe(tmp_path / "deep.yaml")
    (tmp_path / "big.yaml").write_text("# " + "x" * (2 << 20) + "\n")
    with pytest.raises(UserError, match="larger than 1 MiB"):
        load_recipe(tmp_path / "big.yaml")
    (tmp_path / "latin1.yaml").write_bytes(b"model: caf\xe9\n")
    with pytest.raises(UserError, match="not UTF-8"):
        load_recipe(tmp_path / "latin1.yaml")


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    total = 1000
    values = [lr_schedule(step, total, 0.01, 0.1) for step in range(total)]
    assert values[0] == pytest.approx(0.1)  # 10 warm-up steps
    assert values[9] == pytest.approx(1.0)
    assert max(values) == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


@pytest.mark.parametrize(("total", "warm"), [(200, 10), (50, 5), (20, 2), (5, 1), (3000, 30)])
def test_short_runs_get_a_warm_up_floor(total, warm):
    """1% of the steps, but at least min(10, total // 10) of them (and one)."""
    values = [lr_schedule(step, total, 0.01, 0.1) for step in range(total)]
    assert values[warm - 1] == pytest.approx(1.0)
    assert values[: warm - 1] == pytest.approx([(step + 1) / warm for step in range(warm - 1)])
    assert lr_schedule(0, total, 0.0, 0.1) == pytest.approx(1.0)  # no warm-up asked for: none


def test_no_weight_decay_on_biases_norms_and_their_deltas(tiny_mesh_model):
    assert no_weight_decay("model.core.0.attention.dense.bias", torch.nn.Parameter(torch.zeros(3)))
    assert no_weight_decay("model.core.0.attention.dense.bias_delta", torch.nn.Parameter(torch.zeros(2, 3)))
    assert no_weight_decay("model.core.0.input_layernorm.weight_delta", torch.nn.Parameter(torch.zeros(2, 3)))
    assert no_weight_decay("model.memory.read_routers.1.bias", torch.nn.Parameter(torch.zeros(5)))
    assert not no_weight_decay("model.memory.read_routers.1.weight", torch.nn.Parameter(torch.zeros(5, 3)))
    assert not no_weight_decay("model.core.0.attention.dense.weight_delta", torch.nn.Parameter(torch.zeros(2, 3, 3)))
    groups = param_groups(tiny_mesh_model, OptimSection(router_lr_mult=10.0))
    for group in groups:
        for name in group["names"]:
            decayed = group["weight_decay"] > 0
            assert decayed == (name.endswith("weight") and "norm" not in name), name
            assert group["lr_mult"] == (10.0 if "routers" in name else 1.0)


def test_routers_only_freezes_everything_else(tiny_mesh_model):
    select_trainable(tiny_mesh_model, "routers")
    trainable = [n for n, p in tiny_mesh_model.named_parameters() if p.requires_grad]
    assert trainable and all(".memory." in n for n in trainable)
    with pytest.raises(UserError, match="relax_rank 0"):
        select_trainable(tiny_mesh_model, "routers+deltas")


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    if recipe.init is None and recipe.method == "full" and "cpu" not in path.name:
        # Continue-pretraining recipes follow the paper: bf16, context 2048, AdamW (0.9, 0.95), wd 0.01.
        assert recipe.train.mixed_precision == "bf16"
        assert recipe.data.block_size == 2048
        assert recipe.optim.betas == (0.9, 0.95) and recipe.optim.weight_decay == 0.01
