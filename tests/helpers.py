"""Helpers shared by the tests (no tests here): a character tokenizer whose ids fit the tiny
models' 128-token vocabulary, learnable text, converted tiny checkpoints and a CLI runner."""

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from conftest import make_tiny_llama, make_tiny_pythia
from mesh_convert.cli import main
from mesh_convert.convert.conversion import convert_model

ROOT = Path(__file__).resolve().parents[1]
# Subprocesses get one thread each too (conftest sets it for this process).
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
WORDS = "the a king queen said to of and my lord good sir come go now here there love death night day".split()


def char_tokenizer(path: Path) -> Path:
    """Ids: 0 = <eos>, 1 = newline, 2 = <unk>, 3.. = printable ASCII (98 ids in all, < 128)."""
    vocab = {"<eos>": 0, "\n": 1, "<unk>": 2}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", bos_token="<eos>")
    fast.save_pretrained(path)
    return path


def corpus(seed: int = 0, lines: int = 400) -> list[str]:
    """Short documents of a tiny-vocabulary, very learnable language."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) + "." for _ in range(lines)]


def write_text(path: Path, seed: int = 0, lines: int = 400) -> Path:
    path.write_text("\n".join(corpus(seed, lines)) + "\n")
    return path


def tiny_converted(path: Path, tokenizer_dir: Path, relax_rank=0, seed: int = 0, loops: int = 2,
                   family: str = "gpt_neox") -> Path:
    """A tiny Pythia (or, with family="llama", a tiny Llama) converted in memory and saved like the
    converter's output (with conversion.json)."""
    name, make_source = ("tiny-llama", make_tiny_llama) if family == "llama" else ("tiny-pythia", make_tiny_pythia)
    source = make_source(path.parent / f"{path.name}-source", seed=seed)
    # The SVD start, so that relaxed models run through non-zero deltas (a rank N starts at zero by default).
    svd = {"relax_init": "svd"} if relax_rank else {}
    model = convert_model(source, loops=loops, relax_rank=relax_rank, dtype="float32", **svd)
    model.save_pretrained(path)
    PreTrainedTokenizerFast.from_pretrained(tokenizer_dir).save_pretrained(path)
    (path / "conversion.json").write_text(json.dumps({"source": {"name": name}}) + "\n")
    return path


def recipe(model: Path, data: Path, output: Path, **sections) -> dict:
    """A small recipe for the tiny models (fp32, 32-token blocks, no eval unless asked)."""
    base = {
        "model": str(model),
        "output_dir": str(output),
        "seed": 7,
        "data": {"train": [str(data)], "block_size": 32, "eval_blocks": 4},
        "optim": {"lr": 3e-3},
        "train": {"global_batch_size": 4, "micro_batch_size": 2, "max_steps": 8, "eval_every": 0},
        "checkpoint": {"every": 0},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


def write_recipe(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(args: list[str]) -> int:
    """The CLI through its public entry point, `mesh_convert.cli.main` (as the console script runs it)."""
    return main(args)


def invoke(capture, *args) -> tuple[int, str, str]:
    """`mesh-convert ARGS` in-process through `mesh_convert.cli.main`, its error handling included;
    the exit code and what the command alone printed (`capture`: pytest's capsys or capfd)."""
    capture.readouterr()  # drop what fixtures printed
    code = main([str(arg) for arg in args])
    out, err = capture.readouterr()
    return code, out, err


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line]


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
