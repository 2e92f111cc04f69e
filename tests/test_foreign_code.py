"""No remote code but our own two model files in anything we write (issue 21, item 2).

A source whose tokenizer_config.json and config.json name code of their own (`auto_map`,
`custom_pipelines`) and that holds a `.py` of its own goes through convert, `init --tokenizer`, a
training run's export (full and LoRA), and `merge`: each output names no code but ours, says what
it dropped, and loads with `trust_remote_code=True` (as its card says) in a process without
mesh_convert, offline, without fetching or running anything else. `push` is in test_hub.py.
"""

import json

import pytest

from conftest import make_tiny_pythia
from helpers import (assert_loads_trusting_only_our_code, char_tokenizer, foreign_references, invoke, plant, recipe,
                     tiny_converted, write_recipe, write_text)
from mesh_convert.artifacts.remote_code import AUTO_MAP, strip_foreign_code, without_foreign_code


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict:
    """A tokenizer and a converted tiny model that both name foreign code and hold evil.py, and data."""
    root = tmp_path_factory.mktemp("hostile")
    marker = root / "PLANTED-CODE-RAN"
    tokenizer = plant(char_tokenizer(root / "tokenizer"), marker)
    clean = char_tokenizer(root / "clean-tokenizer")
    model = plant(tiny_converted(root / "model", clean), marker)
    return {"root": root, "marker": marker, "tokenizer": tokenizer, "model": model,
            "text": write_text(root / "train.txt", lines=80)}


def test_what_a_file_may_name(tmp_path):
    ours = {"auto_map": AUTO_MAP, "model_type": "mesh"}
    assert without_foreign_code("config.json", json.dumps(ours).encode())[1] == []
    mixed = {**ours, "auto_map": {**AUTO_MAP, "AutoTokenizer": [None, "x--y.Z"]}, "custom_pipelines": {}}
    cleaned, dropped = without_foreign_code("config.json", json.dumps(mixed).encode())
    assert json.loads(cleaned) == ours and len(dropped) == 2 and "x--y.Z" in dropped[0]
    # Our own classes count only in config.json, and only under their own keys.
    assert json.loads(without_foreign_code("tokenizer_config.json", json.dumps(ours).encode())[0]) == {"model_type": "mesh"}
    swapped = {"auto_map": {"AutoModel": "modeling_mesh.MeshForCausalLM"}}
    assert json.loads(without_foreign_code("config.json", json.dumps(swapped).encode())[0]) == {}
    # The old list form of a tokenizer's auto_map, an unreadable file that names code, a .py.
    assert without_foreign_code("tokenizer_config.json", b'{"auto_map": ["a--b.C", null]}')[0] == b"{}\n"
    assert without_foreign_code("tokenizer_config.json", b'{"auto_map": {"AutoTokenizer": [nu')[0] is None
    assert without_foreign_code("tokenizer_config.json", b'{"not json')[0] == b'{"not json'
    assert without_foreign_code("evil.py", b"")[0] is None
    assert without_foreign_code("modeling_mesh.py", b"x")[0] == b"x"

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.py").write_text("")
    (tmp_path / "modeling_mesh.py").write_text("ours")
    (tmp_path / "processor_config.json").write_text(json.dumps({"auto_map": {"AutoProcessor": "p.P"}}))
    assert sorted(strip_foreign_code(tmp_path)) == ["processor_config.json auto_map AutoProcessor: \"p.P\"", "sub/deep.py"]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["modeling_mesh.py", "processor_config.json"]


def test_convert_init_train_and_merge_write_no_code_but_ours(hostile, tmp_path, capfd):
    root, marker = hostile["root"], hostile["marker"]
    source = tmp_path / "source"
    make_tiny_pythia(source)
    plant(char_tokenizer(source), marker)

    outputs = {}
    code, out, err = invoke(capfd, source, "--loops", "2", "-o", tmp_path / "converted", "--json")
    assert code == 0, err
    assert "attacker/repo--evil.EvilTok" in err and "removed remote code" in err
    assert any("EvilTok" in item for item in json.loads(out)["removed_remote_code"])
    outputs["convert"] = tmp_path / "converted"

    code, _, err = invoke(capfd, "init", "custom", "--layers", "4", "--hidden", "32", "--heads", "4", "--vocab", "128",
                          "--context", "64", "--tokenizer", hostile["tokenizer"], "-o", tmp_path / "init")
    assert code == 0, err
    assert "attacker/repo--evil.EvilTok" in err and "removed remote code" in err
    outputs["init"] = tmp_path / "init"

    data = recipe(hostile["model"], hostile["text"], tmp_path / "run", train={"max_steps": 2})
    code, _, err = invoke(capfd, "train", write_recipe(tmp_path / "full.yaml", data))
    assert code == 0, err
    assert "removed remote code" in err and "attacker/repo--evil.EvilTok" in err
    outputs["train"] = tmp_path / "run" / "model"

    data = recipe(hostile["model"], hostile["text"], tmp_path / "lora", method="lora", train={"max_steps": 2},
                  lora={"r": 2, "alpha": 4, "merge": False})
    code, _, err = invoke(capfd, "finetune", write_recipe(tmp_path / "lora.yaml", data))
    assert code == 0, err
    assert foreign_references(tmp_path / "lora" / "adapter") == []
    code, _, err = invoke(capfd, "merge", tmp_path / "lora" / "adapter", "-o", tmp_path / "merged")
    assert code == 0, err
    assert "removed remote code" in err  # the base model's config named foreign code
    outputs["merge"] = tmp_path / "merged"

    for name, folder in outputs.items():
        assert foreign_references(folder) == [], name
        recorded = json.loads((folder / "conversion.json").read_text())["removed_remote_code"]
        assert recorded and all("evil" in item for item in recorded), name
    assert_loads_trusting_only_our_code(list(outputs.values()), marker, root)
