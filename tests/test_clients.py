"""What clients this project did not write see: plain transformers in a process where
mesh_convert cannot be imported and stdin is closed, a pushed repo read through the Hub
stand-in, and the command line's help as a newcomer reads it."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from conftest import make_tiny_llama, make_tiny_pythia
from hub_standin import HubStandin, User
from mesh_convert import cli

WRITE_TOKEN = "hf_standinWriteToken0123456789abcd"
WORDS = ["<unk>", "<|endoftext|>", "<s>", "hello", "world", "mesh", "loops"]


def word_tokenizer(adds_bos: bool) -> PreTrainedTokenizerFast:
    """A tiny word-level tokenizer; with `adds_bos` it puts <s> first, as Llama's do."""
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<|endoftext|>", bos_token="<s>" if adds_bos else None
    )


# The README's and the model card's call, in a process that cannot import mesh_convert.
LOAD_TOKENIZER = """
import sys
sys.modules["mesh_convert"] = None
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
print("IDS", tokenizer("hello mesh world")["input_ids"])
"""


def load_tokenizer_outside(source: str, env_extra: dict, workdir: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(workdir / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH="", **env_extra)
    return subprocess.run(
        [sys.executable, "-c", LOAD_TOKENIZER, source],
        cwd=workdir, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )


def assert_loads_quietly(done: subprocess.CompletedProcess, adds_bos: bool) -> None:
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Do you wish to run the custom code" not in done.stdout + done.stderr
    assert "model of type" not in done.stderr
    # From a Hub repo transformers names the remote code files it fetched: that notice is all.
    fetched_code_notice = r"\[transformers\] A new version of the following files was downloaded.*?pin a revision\."
    assert re.sub(fetched_code_notice, "", done.stderr, flags=re.S).strip() == "", done.stderr[-3000:]
    expected = [2, 3, 5, 4] if adds_bos else [3, 5, 4]
    assert f"IDS {expected}" in done.stdout


def converted_with_tokenizer(tmp_path: Path, family: str) -> Path:
    source = tmp_path / f"tiny-{family}"
    (make_tiny_pythia if family == "gpt_neox" else make_tiny_llama)(source)
    word_tokenizer(adds_bos=family == "llama").save_pretrained(source)
    output = tmp_path / f"{family}-mesh"
    assert cli.main(["convert", str(source), "--loops", "2", "-o", str(output)]) == 0
    return output


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_converted_tokenizer_loads_as_documented_without_prompt_or_warning(tmp_path, family):
    output = converted_with_tokenizer(tmp_path, family)
    card = (output / "README.md").read_text()
    call = re.search(r"tokenizer = AutoTokenizer\.from_pretrained\((.*)\)", card).group(1)
    assert call.endswith(", trust_remote_code=True"), call
    done = load_tokenizer_outside(str(output), {"HF_HUB_OFFLINE": "1"}, tmp_path)
    assert_loads_quietly(done, adds_bos=family == "llama")


def test_pushed_tokenizer_loads_as_documented_without_prompt_or_warning(tmp_path, monkeypatch):
    output = converted_with_tokenizer(tmp_path, "llama")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the stand-in speaks LFS, not Xet
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    with HubStandin(tmp_path / "standin", {WRITE_TOKEN: User("alice", write=True)}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
        assert cli.main(["push", str(output), "alice/tiny-llama-mesh"]) == 0
        card = hub.files("alice/tiny-llama-mesh")["README.md"].decode()
        assert re.search(r"tokenizer = AutoTokenizer\.from_pretrained\(.*, trust_remote_code=True\)", card)
        done = load_tokenizer_outside(
            "alice/tiny-llama-mesh", {"HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0"}, tmp_path
        )
    assert_loads_quietly(done, adds_bos=True)


# ------------------------------------------------------------------------------ help


def help_text(capsys, *command: str) -> str:
    capsys.readouterr()
    assert cli.main([*command, "--help"]) == 0
    return capsys.readouterr().out


COMMANDS = ["convert", "train", "finetune", "init", "merge", "eval", "push", "diagnose", "inspect"]


@pytest.mark.parametrize("command", [[], *[[name] for name in COMMANDS]], ids=["root", *COMMANDS])
def test_help_shows_flags_as_flags_and_arguments_in_capitals(capsys, monkeypatch, command):
    monkeypatch.setenv("COLUMNS", "200")
    text = help_text(capsys, *command)
    assert "<bool>" not in text
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert "{" not in usage and "}" not in usage, usage
    if command == ["convert"]:
        assert re.search(r"Usage: mesh-convert convert \[OPTIONS\] MODEL\s*$", usage), usage
        assert re.search(r"--dry-run\s+Print the plan only", text)


def test_help_and_package_name_the_llama_family(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    for command in ([], ["convert"]):
        text = " ".join(help_text(capsys, *command).split())
        assert "GPT-NeoX (Pythia) and Llama-family (Llama, Qwen2, SmolLM2)" in text or (
            "GPT-NeoX (Pythia) or Llama-family (Llama, Qwen2, SmolLM2)" in text
        ), text
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert "Llama-family (Llama, Qwen2, SmolLM2)" in re.search(r'^description = "(.*)"$', pyproject, re.M).group(1)


# ------------------------------------------------------------------- the demo's SmolLM2


def load_script(name: str):
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dequantised_smollm2_checkpoint_is_plain_float_for_lm_eval(tmp_path):
    """scripts/get_smollm2.py re-saves the model transformers de-quantised from the GGUF file. The
    same step on a tiny Llama whose config carries the GGUF loader's quantization_config: the
    folder must be a plain float checkpoint that lm-eval's HFLM loads by path."""
    from lm_eval.models.huggingface import HFLM
    from transformers import GgufConfig

    loaded = make_tiny_llama(tmp_path / "tiny-llama", num_layers=2)
    loaded.config.quantization_config = GgufConfig(gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    target = tmp_path / "float-checkpoint"
    load_script("get_smollm2").save_float_checkpoint(loaded, word_tokenizer(adds_bos=True), target)
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    wrapper = HFLM(pretrained=str(target), device="cpu", batch_size=1, dtype="float32")
    assert wrapper.model.lm_head.weight.dtype == torch.float32
    assert torch.equal(wrapper.model.model.embed_tokens.weight, loaded.model.embed_tokens.weight)


# ------------------------------------------------------------------------ the README

def test_eval_of_a_converted_model_neither_prompts_nor_spoils_its_json(tmp_path):
    """`mesh-convert eval` as a script runs it: its own process (the MeSH classes not yet loaded
    when the tokenizer is), stdin closed, stdout parsed as JSON."""
    output = converted_with_tokenizer(tmp_path, "gpt_neox")
    data = tmp_path / "text.txt"
    data.write_text("hello mesh world loops\n" * 200)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mesh_convert", "eval", str(output), "--data", str(data), "--json"],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "custom code" not in done.stdout + done.stderr and "model of type" not in done.stderr
    json.loads(done.stdout)


README = Path(__file__).resolve().parents[1] / "README.md"


def run_cli_process(*args: str) -> str:
    env = {**os.environ, "COLUMNS": "100", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from mesh_convert.cli import main; sys.exit(main())", *args],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_readme_dry_run_example_is_the_real_output():
    text = README.read_text()
    intro = "`mesh-convert pythia-1.4b --loops 3 --dry-run` prints"
    block = re.search(re.escape(intro) + r".*?```\n(.*?)```", text, re.S).group(1)
    real = run_cli_process("pythia-1.4b", "--loops", "3", "--dry-run")
    assert [line.rstrip() for line in block.splitlines()] == [line.rstrip() for line in real.splitlines()]


def test_readme_names_the_keys_the_dry_run_json_has(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = README.read_text()
    paragraph = re.search(r"and `--dry-run --json` one JSON object(.*?)\n\n", text, re.S).group(1)
    capsys.readouterr()
    assert cli.main(["pythia-1.4b", "--loops", "3", "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    keys = set(plan) | {f"params.{key}" for key in plan["params"]} | set(plan["params"])
    named = set(re.findall(r"`([a-z_.]+)`", paragraph)) - {"conversion.json"}
    assert named and named <= keys, named - keys
    assert set(plan) <= named, set(plan) - named
    assert "provenance" not in paragraph or "provenance" in plan


# ---------------------------------------------------------------------- inspect, diagnose


def save_run_model(directory: Path, model) -> Path:
    model.save_pretrained(directory)
    word_tokenizer(adds_bos=False).save_pretrained(directory)
    return directory


def test_inspect_names_its_default_folder_after_the_run(tmp_path, monkeypatch, tiny_mesh_model, capsys):
    """`train` writes every run's model to <run>/model: two runs must not inspect into one folder."""
    for run in ("run-a", "run-b"):
        save_run_model(tmp_path / run / "model", tiny_mesh_model)
    save_run_model(tmp_path / "run-a" / "checkpoints" / "step-4", tiny_mesh_model)
    monkeypatch.chdir(tmp_path)
    for model, folder in (("run-a/model", "inspect-run-a-model"), ("run-b/model", "inspect-run-b-model"),
                          ("run-a/checkpoints/step-4", "inspect-run-a-step-4")):
        assert cli.main(["inspect", model, "--samples", "1", "--seq-len", "4"]) == 0
        assert (tmp_path / folder / "inspect.json").is_file(), folder


def test_a_training_checkpoint_is_named_for_what_it_is(tmp_path, capsys):
    """`train`'s checkpoints hold the state it resumes from, not a model: the error names the
    model the run exports instead."""
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000004"
    checkpoint.mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"):
        (checkpoint / name).write_bytes(b"")
    for export in (None, "adapter", "model"):  # before the run ends; a LoRA run's; a full run's
        if export:
            (tmp_path / "run" / export).mkdir()
        for command in (["inspect", str(checkpoint)], ["eval", str(checkpoint), "--data", str(checkpoint / "x.txt")]):
            capsys.readouterr()
            assert cli.main(command) == 1
            err = capsys.readouterr().err.strip()
            assert err.count("\n") == 0 and "is a training checkpoint" in err, err
            assert (str(tmp_path / "run" / export) if export else "that the run exports when it ends") in err


def test_inspect_lists_the_provenance_once_with_whole_keys(tmp_path, monkeypatch, capsys):
    output = converted_with_tokenizer(tmp_path, "gpt_neox")
    monkeypatch.setenv("COLUMNS", "80")
    capsys.readouterr()
    assert cli.main(["inspect", str(output), "--output", str(tmp_path / "inspected"), "--samples", "1"]) == 0
    text = capsys.readouterr().out
    table = text[text.index("Provenance") : text.index("Parameters")]
    keys = [line.split("│")[1].strip() for line in table.splitlines() if line.count("│") == 3]
    keys = [key for key in keys if key]
    assert "source.model" in keys and "layer_map.core" in keys
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
    assert not any("…" in key for key in keys), keys


def test_transformers_loading_bars_stay_out_of_diagnose_and_inspect(tmp_path, tiny_mesh_model, capfd):
    from transformers.utils import logging as hf_logging

    model = save_run_model(tmp_path / "model", tiny_mesh_model)
    text = tmp_path / "text.txt"
    text.write_text("hello world mesh loops " * 40)
    hf_logging.enable_progress_bar()  # as in a fresh process
    for command in (
        ["inspect", str(model), "--output", str(tmp_path / "i"), "--samples", "1", "--seq-len", "4"],
        ["diagnose", str(model), "--data", str(text), "--samples", "2", "--seq-len", "8", "--output", str(tmp_path / "d")],
    ):
        capfd.readouterr()
        assert cli.main(command) == 0
        err = capfd.readouterr().err
        assert "Loading weights" not in err, command[0]
        assert hf_logging.is_progress_bar_enabled()  # and it is restored afterwards


def test_git_ignores_the_default_output_folders(tmp_path):
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["inspect-run-a-model/inspect.json", "diagnostics-pythia-160m/cka.png"]
    done = subprocess.run(["git", "-C", str(root), "check-ignore", "--no-index", *paths], capture_output=True, text=True)
    assert sorted(done.stdout.split()) == sorted(paths), done.stderr


def test_transformers_bars_stay_out_of_merge(tmp_path, capfd):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    base_dir = tmp_path / "base"
    make_tiny_pythia(base_dir, num_layers=2)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    get_peft_model(base, LoraConfig(r=2, target_modules=["query_key_value"])).save_pretrained(tmp_path / "adapter")
    hf_logging.enable_progress_bar()  # as in a fresh process
    capfd.readouterr()
    assert cli.main(["merge", str(tmp_path / "adapter"), "-o", str(tmp_path / "merged")]) == 0
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err, err
    assert (tmp_path / "merged" / "config.json").is_file()
