"""LoRA via peft: the loop index reaches the relaxed layers, only adapter and router weights
change, merged == unmerged, the adapter loads with PeftModel, and `merge` writes a checkpoint."""

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mesh_convert.modeling.modeling_mesh import LoopLinear
from mesh_convert.train.recipe import LoraSection, Recipe
from mesh_convert.train.loop import train
from mesh_convert.train.lora import DEFAULT_TARGETS, merge_adapter, wrap_lora
from helpers import (
    ROOT,
    Payload,
    char_tokenizer,
    metrics,
    recipe,
    run_cli,
    state_of,
    tiny_converted,
    write_recipe,
    write_text,
)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """One LoRA (+ routers) run on a relaxed tiny model, shared by the checks below. Its recipe
    names the model and data relative to the training folder, as a user in that folder would."""
    root = tmp_path_factory.mktemp("lora")
    tokenizer = char_tokenizer(root / "tokenizer")
    model = tiny_converted(root / "mesh", tokenizer, relax_rank=4)
    write_text(root / "train.txt")
    data = recipe(Path("mesh"), Path("train.txt"), Path("run"), method="lora",
                  lora={"r": 4, "alpha": 8, "merge": True}, train={"max_steps": 6})
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        train(Recipe.model_validate(data))
    return {"model": model, "out": root / "run"}


def test_lora_wrapper_passes_the_loop_index_to_relaxed_layers(tiny_mesh_model):
    """peft's LoRA Linear must forward `loop` to LoopLinear: output = base(x, loop) + lora(x)."""
    from mesh_convert import MeshConfig, MeshForCausalLM

    torch.manual_seed(0)
    config = tiny_mesh_model.config.to_dict()
    config.update(relax_rank=4)
    model = MeshForCausalLM(MeshConfig(**{k: v for k, v in config.items() if k in MeshConfig.__annotations__}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "_delta" in name:
                param.normal_(0, 0.1)
    peft_model = wrap_lora(model, LoraSection(r=2), train_routers=True)
    layer = peft_model.base_model.model.model.core[0].attention.query_key_value
    assert isinstance(layer.base_layer, LoopLinear)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
    x = torch.randn(2, 5, model.config.hidden_size)
    lora = layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
    for loop in range(2):
        assert torch.allclose(layer(x, loop), layer.base_layer(x, loop) + lora, atol=1e-6)
    assert not torch.allclose(layer(x, 0), layer(x, 1))


def test_only_adapter_and_router_weights_are_trained(lora_run):
    adapter = lora_run["out"] / "adapter"
    saved = load_file(adapter / "adapter_model.safetensors")
    assert saved and all("lora_" in k or "_routers." in k for k in saved)
    assert any("_routers." in k for k in saved) and any("lora_B" in k for k in saved)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # it trained
    info = json.loads((adapter / "conversion.json").read_text())
    assert info["training"]["method"] == "lora" and info["training"]["steps"] == 6
    assert len(metrics(lora_run["out"])) == 6

    base = state_of(AutoModelForCausalLM.from_pretrained(lora_run["model"]))
    merged = state_of(AutoModelForCausalLM.from_pretrained(lora_run["out"] / "merged"))
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    targets = ("query_key_value.weight", "attention.dense.weight", "dense_h_to_4h.weight", "dense_4h_to_h.weight")
    assert changed and all(k.endswith(targets) or "_routers." in k for k in changed)
    assert not any("_delta" in k or "norm" in k or "embed" in k for k in changed)


def test_merged_and_unmerged_give_the_same_logits(lora_run, monkeypatch, tmp_path):
    ids = torch.tensor([[5, 9, 14, 3, 60, 61, 62, 7]])
    base = AutoModelForCausalLM.from_pretrained(lora_run["model"]).eval()
    base_logits = base(ids).logits
    peft_model = PeftModel.from_pretrained(base, lora_run["out"] / "adapter").eval()
    unmerged = peft_model(ids).logits
    assert not torch.allclose(unmerged, base_logits, atol=1e-4)  # the adapter does something
    merged = AutoModelForCausalLM.from_pretrained(lora_run["out"] / "merged").eval()
    assert torch.allclose(merged(ids).logits, unmerged, atol=1e-5)

    target = tmp_path / "merged-cli"
    assert run_cli(["merge", str(lora_run["out"] / "adapter"), "-o", str(target)]) == 0
    again = AutoModelForCausalLM.from_pretrained(target).eval()
    assert torch.allclose(again(ids).logits, unmerged, atol=1e-5)
    assert (target / "tokenizer.json").is_file()
    assert json.loads((target / "conversion.json").read_text())["training"]["method"] == "lora"


def test_merge_and_peft_find_the_base_model_from_any_folder(lora_run, monkeypatch, tmp_path):
    """The adapter records where its base model is in a form that resolves from anywhere; the
    merged model comes with a model card like every other model this tool writes."""
    adapter = lora_run["out"] / "adapter"
    recorded = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(recorded).is_absolute() and Path(recorded) == lora_run["model"].resolve()

    monkeypatch.chdir(tmp_path)
    ids = torch.tensor([[5, 9, 14, 3, 60, 61, 62, 7]])
    unmerged = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()(ids).logits
    assert run_cli(["merge", str(adapter), "-o", "merged-here"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged-here").eval()
    assert torch.allclose(merged(ids).logits, unmerged, atol=1e-5)

    card = ModelCard.load(tmp_path / "merged-here" / "README.md")
    assert card.data.library_name == "transformers" and "mesh" in card.data.tags
    assert card.text.lstrip().startswith("# merged-here\n")  # its own name, not its base model's
    assert "## Training" in card.text and "- method: lora" in card.text
    assert "{" not in card.text.split("## Training")[1].split("##")[0]  # the recipe is not dumped as a dict
    assert (lora_run["out"] / "merged" / "README.md").is_file()  # `lora.merge: true` writes one too


def test_the_run_titles_its_exports_and_the_adapter_card_names_no_local_base(lora_run):
    """peft's adapter card named the base by its local path (`base_model: mesh`, a
    `base_model:adapter:mesh` tag) under "Model Card for Model ID"; the merged model had its base's title."""
    adapter = ModelCard.load(lora_run["out"] / "adapter" / "README.md")
    assert adapter.data.library_name == "peft" and adapter.data.base_model is None
    assert not [tag for tag in adapter.data.tags if tag.startswith("base_model:")]
    assert adapter.text.lstrip().startswith("# run (LoRA adapter)\n")
    merged = ModelCard.load(lora_run["out"] / "merged" / "README.md")
    assert merged.text.lstrip().startswith("# run\n")


def test_peft_reading_a_deprecated_transformers_property_shows_no_warning(lora_run, tiny_mesh_model, tmp_path):
    """peft reads `is_gradient_checkpointing` when it wraps a model, which transformers deprecated:
    `finetune` and `merge` printed that FutureWarning, which the user can do nothing about."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrap_lora(tiny_mesh_model, LoraSection(r=2), train_routers=True)
        merge_adapter(lora_run["out"] / "adapter", tmp_path / "merged")
    assert [str(w.message) for w in caught if "is_gradient_checkpointing" in str(w.message)] == []


def test_merge_of_a_non_adapter_is_a_clear_error(tmp_path, monkeypatch, capsys):
    assert run_cli(["merge", str(tmp_path), "-o", str(tmp_path / "out")]) == 1
    assert "is not a LoRA adapter directory" in capsys.readouterr().err


def _pickled(adapter: Path, marker: Path) -> None:
    (adapter / "adapter_model.safetensors").unlink()
    torch.save({"weight": Payload(marker)}, adapter / "adapter_model.bin")


def _config(**changes):
    def change(adapter: Path, marker: Path) -> None:
        path = adapter / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return change


def _shapes(adapter: Path, marker: Path) -> None:
    from safetensors.torch import save_file

    weights = load_file(adapter / "adapter_model.safetensors")
    save_file({name: torch.zeros(3, 3) for name in weights}, adapter / "adapter_model.safetensors")


BAD_ADAPTERS = [
    ("pickled", _pickled, "adapter_model.bin does not load as weights only: Trying to load unsupported GLOBAL posix.system"),
    ("no weights", lambda adapter, marker: (adapter / "adapter_model.safetensors").unlink(), "holds no adapter weights"),
    ("truncated", lambda adapter, marker: (adapter / "adapter_model.safetensors").write_bytes(b"\x10" * 9),
     "corrupt or truncated safetensors file"),
    ("not json", lambda adapter, marker: (adapter / "adapter_config.json").write_text("{bad"), "is not valid JSON"),
    ("a list", lambda adapter, marker: (adapter / "adapter_config.json").write_text("[1]"), "does not hold a JSON object"),
    ("nested", lambda adapter, marker: (adapter / "adapter_config.json").write_text("[" * 100000 + "]" * 100000),
     "nested more than 64 levels deep"),
    ("another method", _config(peft_type="PREFIX_TUNING"), "peft_type is 'PREFIX_TUNING'; merge takes LoRA adapters"),
    ("rank of text", _config(r="abc"), "cannot be applied to the base model"),
    ("targets a number", _config(target_modules=5), "cannot be applied to the base model"),
    ("base of a number", _config(base_model_name_or_path=5), "base_model_name_or_path is not a path"),
    ("other shapes", _shapes, "size mismatch for"),
    ("saves an invalid pattern", _config(modules_to_save=["(unclosed"]), "modules_to_save holds an invalid regular expression"),
]


@pytest.mark.parametrize("case, damage, wanted", BAD_ADAPTERS, ids=[case[0] for case in BAD_ADAPTERS])
def test_merge_of_a_bad_adapter_is_one_line_and_runs_nothing(lora_run, tmp_path, capsys, case, damage, wanted):
    """A pickled, truncated or mistyped adapter was an internal error (or a wait for the Hub)."""
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(lora_run["out"] / "adapter", adapter)
    marker = tmp_path / "ran"
    damage(adapter, marker)
    capsys.readouterr()
    assert run_cli(["merge", str(adapter), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert wanted in " ".join(err.split()) and len(err.strip().splitlines()) == 1, err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_merge_of_an_adapter_whose_pattern_backtracks_without_end_is_refused(lora_run, tmp_path, capsys, monkeypatch):
    """peft matches module names against a string target_modules with Python's re, which held merge
    for hours on a pattern such as ([a-z_.0-9]+)+! (the time limit is shortened here)."""
    import shutil

    from mesh_convert.train import lora

    monkeypatch.setattr(lora, "PATTERNS_SECONDS", 1.0)
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_run["out"] / "adapter", adapter)
    _config(target_modules=r"([a-z_.0-9]+)+!")(adapter, tmp_path / "ran")
    capsys.readouterr()
    assert run_cli(["merge", str(adapter), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "target_modules takes more than 1 s to match the model's module names" in " ".join(err.split()), err
    assert not (tmp_path / "out").exists()


def test_finetune_dry_run_counts_adapter_and_router_parameters(lora_run, tmp_path, monkeypatch, capsys):
    from helpers import write_text as text

    data = recipe(lora_run["model"], text(tmp_path / "t.txt"), tmp_path / "run")
    path = write_recipe(tmp_path / "r.yaml", data)
    assert run_cli(["finetune", str(path), "lora.r=2", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "method: lora" in printed and "lora+routers" in printed
    routers = 2 * 3 * (32 * 5 + 5)
    lora = sum(2 * (i + o) for i, o in [(32, 96), (32, 32), (32, 128), (128, 32)]) * 5  # r=2, 1+3R2+1: 5 unique layers
    assert f"{routers:,} / " in printed
    assert f"/ {lora:,}" in printed


LORA_RECIPES = [p for p in sorted((ROOT / "recipes").glob("*.yaml")) if yaml.safe_load(p.read_text()).get("method") == "lora"]


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
@pytest.mark.parametrize("path", LORA_RECIPES, ids=lambda p: p.name)
def test_lora_recipes_fit_every_family(path, family, tmp_path, monkeypatch):
    """A shipped LoRA recipe, its lora section untouched, fine-tunes a conversion of either family:
    LoRA lands on every attention and MLP projection of that family."""
    model = tiny_converted(tmp_path / "mesh", char_tokenizer(tmp_path / "tokenizer"), family=family)
    overrides = [f"model={model}", f"data.train=[{write_text(tmp_path / 'train.txt')}]", f"output_dir={tmp_path / 'run'}",
                 "data.block_size=32", "data.eval_blocks=2", "train.max_steps=2", "train.global_batch_size=2",
                 "train.micro_batch_size=2", "train.eval_every=0", "checkpoint.every=0",
                 "train.mixed_precision='no'"]  # one process cannot switch Accelerate's precision
    assert run_cli(["finetune", str(path), *overrides]) == 0
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert {k.split(".")[-3] for k in saved if ".lora_A." in k} == set(DEFAULT_TARGETS[family])


def test_unknown_lora_target_lists_the_models_linear_layers_by_name(lora_run, tmp_path, monkeypatch, capsys):
    data = recipe(lora_run["model"], write_text(tmp_path / "t.txt"), tmp_path / "run", method="lora")
    path = write_recipe(tmp_path / "r.yaml", data)
    assert run_cli(["finetune", str(path), "lora.target_modules=[q_proj]", "--dry-run"]) == 1
    error = capsys.readouterr().err
    assert "['q_proj'] match no Linear layer" in error
    for name in ("'query_key_value'", "'dense'", "'dense_4h_to_h'", "'write_routers.0'", "'read_routers.2'"):
        assert name in error
    assert "'0'" not in error
