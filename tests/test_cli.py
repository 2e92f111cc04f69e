"""The command line as a user meets it: light to start (no torch, no transformers for help and
for a Pythia alias's dry run), choices checked by the parser, `python -m mesh_convert`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import char_tokenizer

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers")

# Runs the CLI's entry point in a fresh process, then prints which heavy libraries got imported.
PROBE = """
import sys
from mesh_convert.cli import main
code = main(sys.argv[1:])
print("HEAVY", sorted({m.split(".")[0] for m in sys.modules} & {%r, %r}), code, file=sys.stderr)
""" % HEAVY

COMMANDS = ["", "convert", "train", "finetune", "init", "merge", "eval", "push", "diagnose", "inspect"]


def run_probe(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
                          stdin=subprocess.DEVNULL)


def heavy_imports(result: subprocess.CompletedProcess) -> str:
    return next(line for line in result.stderr.splitlines() if line.startswith("HEAVY"))


@pytest.mark.parametrize("command", COMMANDS)
def test_help_imports_neither_torch_nor_transformers(command, tmp_path):
    result = run_probe([*command.split(), "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout
    assert heavy_imports(result) == "HEAVY [] 0"


@pytest.mark.parametrize("as_json", [False, True])
def test_dry_run_of_a_pythia_alias_imports_neither_torch_nor_transformers(as_json, tmp_path):
    result = run_probe(["pythia-410m", "--loops", "3", "--dry-run", *(["--json"] if as_json else [])], tmp_path)
    assert result.returncode == 0, result.stderr
    assert heavy_imports(result) == "HEAVY [] 0"
    if as_json:
        plan = json.loads(result.stdout)
        assert plan["layout"] == "3+6R3+3" and plan["params"]["original_nonembedding"] == 302_311_424
        assert plan["command"] == "mesh-convert pythia-410m --loops 3 --dry-run --json"
    else:
        assert "3+6R3+3" in result.stdout and "302,311,424" in result.stdout


def test_package_import_is_light_and_model_names_load_on_use(tmp_path):
    code = ("import sys, mesh_convert; light = 'torch' not in sys.modules; "
            "from mesh_convert import MeshConfig, MeshForCausalLM, convert_model; "
            "from transformers import AutoConfig; "
            "print(light, MeshForCausalLM.__name__, callable(convert_model), type(AutoConfig.for_model('mesh')).__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.stdout.split() == ["True", "MeshForCausalLM", "True", "MeshConfig"], result.stderr


@pytest.mark.parametrize(
    "args, choices",
    [
        (["pythia-160m", "--loops", "2", "--tie", "median"], "'upper', 'stepwise', 'lower', 'average'"),
        (["pythia-160m", "--loops", "2", "--variant", "loop"], "'mesh', 'base', 'residual', 'anchor', 'anchor_emb'"),
        (["pythia-160m", "--loops", "2", "--dtype", "float8"], "'auto', 'float32', 'float16', 'bfloat16'"),
        (["eval", "m", "--task", "translate"], "'auto', 'perplexity', 'lambada'"),
        (["eval", "m", "--dtype", "float8"], "'float32', 'bfloat16', 'float16'"),
    ],
)
def test_bad_choices_are_rejected_by_the_parser_with_the_valid_list(args, choices, tmp_path):
    result = subprocess.run([sys.executable, "-m", "mesh_convert", *args], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = " ".join(result.stderr.split())
    assert "Invalid value" in last and choices in last, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_launchers_entry_point_is_the_train_command(tmp_path):
    """`python -m mesh_convert.train` (what `accelerate launch -m` and torchrun run) takes the
    command's own options: --dry-run and --help, not only --overwrite."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    (tmp_path / "text.txt").write_text("some text to train on\n" * 50)
    char_tokenizer(tmp_path / "tok")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("init: {size: custom, num_layers: 4, hidden_size: 32, num_heads: 4, vocab_size: 128}\ntokenizer: tok\n"
                      "data: {train: [text.txt], block_size: 8}\ntrain: {max_steps: 3}\noptim: {lr: 1.0e-3}\noutput_dir: run\n")
    for args, wanted in (([str(recipe), "--dry-run"], "tokens_per_step"), (["--help"], "--dry-run")):
        result = subprocess.run([sys.executable, "-m", "mesh_convert.train", *args], capture_output=True, text=True,
                                timeout=300, cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        assert wanted in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "text.txt", "tok"]  # a dry run writes nothing


# ----------------------------------------------------------------------------- untrusted text

# A name that, printed as it is, clears the screen, retitles the terminal, turns text around and
# forges a line; and rich markup that would become a hyperlink.
HOSTILE_NAME = "m\x1b[2J\x1b]0;pwned\x07\u202e[link=evil.example]x\nerror: forged"


def test_control_characters_are_shown_escaped():
    from mesh_convert.errors import printable, shown

    assert printable("a\x1bb\n\t\x9b\u202ec\u2028") == "a\\x1bb\\n\\t\\x9b\\u202ec\\u2028"
    assert printable("Zürich 東京 ok [x] \\ 'q'") == "Zürich 東京 ok [x] \\ 'q'"
    assert shown("[bold]x\x1b") == "\\[bold]x\\x1b"


def test_untrusted_names_reach_the_terminal_escaped(tiny_pythia, tmp_path, capfd):
    """Paths in results, tables and errors: no control character reaches the terminal, and a
    name's markup is shown, not applied."""
    from helpers import invoke

    output = tmp_path / HOSTILE_NAME
    code, out, err = invoke(capfd, tiny_pythia, "--loops", "2", "-o", output)
    assert code == 0, err
    code, _, missing = invoke(capfd, tmp_path / HOSTILE_NAME / "nowhere", "--loops", "2")
    assert code == 1
    code, _, merged = invoke(capfd, "merge", output, "-o", tmp_path / "merged")
    assert code == 1
    for text in (out, err, missing, merged):
        assert not any(ord(c) < 32 and c != "\n" or 0x7f <= ord(c) < 0xa0 or c == "\u202e" for c in text), repr(text)
    assert "[link=evil.example]x" in out.replace("\n", "")  # shown, not a hyperlink
    assert "\\x1b[2J" in out and "\\nerror: forged" in out.replace("\n", "")
    for text in (missing, merged):
        assert len(text.strip().splitlines()) == 1 and "\\x1b[2J" in text and "\\nerror: forged" in text


def test_an_output_that_cannot_be_written_or_shown_is_one_line(tmp_path):
    """stdout on a full disk, a terminal that cannot show a name, a working folder deleted under
    the command: each was an internal error."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    plan = [sys.executable, "-m", "mesh_convert", "pythia-1.4b", "--loops", "3", "--dry-run"]
    with open("/dev/full", "w") as full:
        result = subprocess.run(plan, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300, env=env)
    assert result.returncode == 1 and result.stderr.strip() == "error: cannot write the output: No space left on device"

    named = tmp_path / "modèle"
    named.mkdir()
    result = subprocess.run([*plan[:3], str(named), "--loops", "2"], capture_output=True, text=True, timeout=300,
                            env={**env, "PYTHONIOENCODING": "ascii"})
    assert result.returncode == 1 and "mod\\xe8le has no config.json" in result.stderr, result.stderr

    gone = tmp_path / "gone"
    gone.mkdir()
    result = subprocess.run(["/bin/sh", "-c", f'cd "{gone}" && rmdir "{gone}" && exec "$0" "$@"', *plan],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 1 and "the working folder no longer exists" in result.stderr, result.stderr
