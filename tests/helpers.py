"""Helpers shared by the tests (no tests here; fixtures are conftest's): a character tokenizer whose
ids fit the tiny models' 128-token vocabulary, learnable text, converted tiny checkpoints, a CLI
runner and the check of its one-line errors, snapshots of folders, a pickle payload, and folders
that name foreign remote code, with the check that a written model runs none of it."""

import ctypes
import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import make_tiny_llama, make_tiny_pythia
from mesh_convert.cli import main
from mesh_convert.convert.conversion import convert_model
from mesh_convert.artifacts.remote_code import AUTO_MAP, REMOTE_CODE_FILES

ROOT = Path(__file__).resolve().parents[1]
# Subprocesses get one thread each too (conftest sets it for this process).
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
WORDS = "the a king queen said to of and my lord good sir come go now here there love death night day".split()


# The character tokenizer's tokens, each with its place here as its id: 0 = <eos> (also BOS),
# 1 = newline, 2 = <unk>, 3.. = printable ASCII (98 ids in all, < 128).
CHARS = ["<eos>", "\n", "<unk>", *(chr(code) for code in range(32, 127))]
CHAR_IDS = {char: i for i, char in enumerate(CHARS)}


def char_tokenizer_fast() -> PreTrainedTokenizerFast:
    """One token per character, ids as CHARS places them."""
    tokenizer = Tokenizer(models.BPE(vocab=dict(CHAR_IDS), merges=[], unk_token="<unk>"))
    # Split into single characters before BPE, so long texts tokenize in linear time.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", bos_token="<eos>", unk_token="<unk>")


def char_tokenizer(path: Path) -> Path:
    """The character tokenizer saved in `path`."""
    char_tokenizer_fast().save_pretrained(path)
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


def assert_one_error_line(code: int, err: str, *needles: str) -> None:
    """Exit 1, no traceback, and one `error:` line saying each of `needles`."""
    assert code == 1, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def drop_file_permission_override():
    """In a child process (`preexec_fn`): lose root's right to read any file (CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH), so that mode 000 means unreadable even when the tests run as root."""
    libc = ctypes.CDLL(None, use_errno=True)
    PR_CAPBSET_DROP = 24
    for capability in (1, 2):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line]


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- folders and files


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` (hidden ones too), with a digest of each file's bytes or link's target."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = "-> " + os.readlink(path)
        elif path.is_file():
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[key] = "dir"
    return found


def file_digests(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below `folder` (what an upload of it holds)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def leftovers(folder: Path) -> list[str]:
    """The hidden entries of `folder`: what a run that stopped may have left (its work folder)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


class Payload:
    """Unpickling this runs a command that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ----------------------------------------------------------------------------- foreign code

FOREIGN_TOKENIZER = [None, "attacker/repo--evil.EvilTok"]  # code in another Hub repo
FOREIGN_CONFIG = {"AutoTokenizer": [None, "evil.EvilTok"],  # code planted next to the weights
                  "AutoModelForSequenceClassification": "attacker/repo--evil.Evil"}
FOREIGN_PIPELINES = {"text-generation": {"impl": "evil.EvilPipeline", "pt": ["AutoModelForCausalLM"]}}


def plant(folder: Path, marker: Path) -> Path:
    """Make `folder` (a model or tokenizer) name foreign code, and hold it: evil.py, which leaves
    `marker` behind when it runs."""
    tokenizer_config = folder / "tokenizer_config.json"
    tokenizer = json.loads(tokenizer_config.read_text())
    tokenizer_config.write_text(json.dumps({**tokenizer, "auto_map": {"AutoTokenizer": FOREIGN_TOKENIZER}}))
    if (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
        auto_map = {**config.get("auto_map", {}), **FOREIGN_CONFIG}
        (folder / "config.json").write_text(json.dumps({**config, "auto_map": auto_map,
                                                        "custom_pipelines": FOREIGN_PIPELINES}))
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                    "class EvilTok: pass\nclass Evil: pass\nclass EvilPipeline: pass\n")
    return folder


def foreign_references(folder: Path) -> list[str]:
    """Every code reference in `folder` that is not ours: .py files but our two, and any auto_map
    entry or custom_pipelines in its JSON files."""
    found = [p.name for p in folder.rglob("*.py") if p.name not in REMOTE_CODE_FILES]
    for path in folder.glob("*.json"):
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            continue
        ours = AUTO_MAP if path.name == "config.json" else {}
        found += [f"{path.name}: {key}" for key, value in data.get("auto_map", {}).items() if ours.get(key) != value]
        found += [f"{path.name}: custom_pipelines"] if "custom_pipelines" in data else []
    return found


LOAD_TRUSTING = textwrap.dedent(
    """
    import sys
    sys.modules["mesh_convert"] = None  # the folder's own remote code must be all that runs
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    for folder in sys.argv[1:]:  # a folder or a repo id
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        assert type(tokenizer).__module__.startswith("transformers."), type(tokenizer).__module__
        assert tokenizer("a b")["input_ids"]
        generate = pipeline("text-generation", model=folder, trust_remote_code=True)
        assert type(generate).__module__.startswith("transformers."), type(generate).__module__
        print("loaded", folder)
    """
)


def assert_loads_trusting_only_our_code(models: list, marker: Path, workdir: Path, endpoint: str | None = None) -> None:
    """Load each model (a folder, or a repo on the Hub at `endpoint`) as its card says, in a process
    that cannot import mesh_convert: it must load (a reference to another repo would need a download
    that the Hub, or offline mode, refuses) and leave no `marker` (evil.py would)."""
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "0" if endpoint else "1", "HF_ENDPOINT": endpoint or "http://127.0.0.1:9",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(workdir / "hf-home"),
           "HF_MODULES_CACHE": str(workdir / "modules"), "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", LOAD_TRUSTING, *map(str, models)], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("loaded") == len(models)
    assert not marker.exists(), "the planted code ran"
