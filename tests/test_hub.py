"""Publishing to the Hub, against the loopback stand-in in `hub_standin.py`.

No test reaches the real Hub: HF_ENDPOINT points at the stand-in, huggingface_hub's telemetry
and agent-registry requests are disabled, and the login cache is hidden.
"""

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError
from transformers import AutoModelForCausalLM

from helpers import file_digests, invoke
from mesh_convert.errors import UserError, http_error_message, hub_error, scrub
from mesh_convert import io
from mesh_convert.hub.push import push_folder, push_to_hub

try:  # the HTTP client module huggingface_hub uses (httpx2 from huggingface_hub 2.x)
    import httpx2 as httpx
except ImportError:
    import httpx

from hub_standin import HubStandin, User

WRITE_TOKEN = "hf_standinWriteToken0123456789abcd"
READ_TOKEN = "hf_standinReadOnlyToken0123456789ab"
WRONG_TOKEN = "hf_notAValidToken0123456789abcdefgh"
TOKENS = {WRITE_TOKEN: User("alice", write=True), READ_TOKEN: User("alice", write=False)}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running stand-in, with HF_ENDPOINT pointing at it and no token anywhere yet."""
    # huggingface_hub reads these at import time; patch the values it consults per call.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the stand-in speaks LFS, not Xet
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))  # no login cache
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    with HubStandin(tmp_path / "standin", TOKENS) as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.endpoint)
        yield standin
    assert standin.unhandled == [], "requests the stand-in could not answer"


def conversion_info() -> dict:
    """A conversion.json for the `tiny_mesh_model` fixture (1+3R2+1 over 8 layers)."""
    return {
        "mesh_convert_version": "0.1.0",
        "command": "mesh-convert tiny --loops 2",
        "source": {"model": "EleutherAI/pythia-14m", "revision": "main", "model_type": "gpt_neox",
                   "license": "apache-2.0", "num_layers": 8, "hidden_size": 32, "num_attention_heads": 4},
        "layout": "1+3R2+1", "prelude": 1, "core": 3, "loops": 2, "coda": 1,
        "variant": "mesh", "tie": "average", "slots": 5, "router_gap": 8.0, "relax_rank": 0, "dtype": "float32",
        "layer_map": {"prelude": [[0]], "core": [[1, 4], [2, 5], [3, 6]], "coda": [[7]]},
        "params": {"original_nonembedding": 100000, "converted_nonembedding": 62500, "routers": 1000,
                   "relax": 0, "embedding": 8192, "total": 71692},
        "training": None,
        "eval_results": None,
    }


@pytest.fixture
def model_dir(tmp_path, tiny_mesh_model) -> Path:
    """A converted-model directory without README.md (so a push must generate the card)."""
    path = tmp_path / "converted"
    tiny_mesh_model.save_pretrained(path)
    (path / "conversion.json").write_text(json.dumps(conversion_info(), indent=2))
    return path


def closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------- running the CLI


def assert_one_clear_line(code: int, err: str, *needles: str) -> None:
    assert code != 0
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    for token in (WRITE_TOKEN, READ_TOKEN, WRONG_TOKEN):
        assert token not in err


# ----------------------------------------------------------------------------- round trip

LOAD_AND_COMPARE = r"""
import sys
sys.modules["mesh_convert"] = None  # the published remote code must be enough on its own
import torch
from transformers import AutoModelForCausalLM

repo_id, expected_path = sys.argv[1], sys.argv[2]
expected = torch.load(expected_path)
model = AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
with torch.no_grad():
    logits = model(expected["input_ids"]).logits
torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-6)
print("logits match")
"""


def test_round_trip_through_the_cli(hub, model_dir, tiny_mesh_model, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    code, out, err = invoke(capfd, "push", str(model_dir), "alice/tiny-mesh", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result == {"url": f"{hub.endpoint}/alice/tiny-mesh", "repo_id": "alice/tiny-mesh", "revision": "main",
                      "left_out": [], "removed_remote_code": []}
    assert WRITE_TOKEN not in out + err

    # Everything in the folder was uploaded, weights through LFS, plus the generated card,
    # which the successful push also left in the folder.
    remote = hub.files("alice/tiny-mesh")
    local = file_digests(model_dir)
    assert "README.md" in local
    assert set(local) | {".gitattributes"} == set(remote)
    for name, digest in local.items():
        assert hashlib.sha256(remote[name]).hexdigest() == digest, name
    assert "model.safetensors" in hub.lfs_paths("alice/tiny-mesh")

    # The Hub sees the card's metadata.
    card = HfApi(endpoint=hub.endpoint).model_info("alice/tiny-mesh").card_data
    assert card.base_model == "EleutherAI/pythia-14m"
    assert card.library_name == "transformers"
    assert card.pipeline_tag == "text-generation"
    assert card.license == "apache-2.0"
    assert {"mesh", "recursive-transformer", "custom_code"} <= set(card.tags)

    # Download it anonymously in a fresh process that cannot import mesh_convert.
    input_ids = torch.tensor([[1, 5, 9, 27, 3, 64, 100, 7]])
    with torch.no_grad():
        logits = tiny_mesh_model(input_ids).logits
    expected = tmp_path / "expected.pt"
    torch.save({"input_ids": input_ids, "logits": logits}, expected)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "download-home"), HF_HUB_OFFLINE="0",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH="")
    done = subprocess.run(
        [sys.executable, "-c", LOAD_AND_COMPARE, "alice/tiny-mesh", str(expected)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "logits match" in done.stdout


# ----------------------------------------------------------------------------- the API


def test_push_to_a_new_branch_of_a_private_repo(hub, model_dir, tmp_path):
    # HF_ENDPOINT is read when pushing, not when huggingface_hub was imported.
    assert constants.ENDPOINT != hub.endpoint
    (model_dir / "README.md").write_text("---\nlicense: mit\n---\n# my own card\n")
    before = file_digests(model_dir)

    result = push_folder(model_dir, "tiny-mesh", private=True, revision="dev",
                         commit_message="first", token=WRITE_TOKEN)

    assert result.url == f"{hub.endpoint}/alice/tiny-mesh/tree/dev"
    assert (result.repo_id, result.revision) == ("alice/tiny-mesh", "dev")
    assert hub.repos["alice/tiny-mesh"].private
    assert "model.safetensors" in hub.files("alice/tiny-mesh", "dev")
    assert "model.safetensors" not in hub.files("alice/tiny-mesh", "main")
    # An existing card is uploaded as it is, never regenerated.
    assert hub.files("alice/tiny-mesh", "dev")["README.md"] == (model_dir / "README.md").read_bytes()
    assert file_digests(model_dir) == before
    # Private: invisible without the owner's token.
    with pytest.raises(HfHubHTTPError):
        HfApi(endpoint=hub.endpoint, token=False).model_info("alice/tiny-mesh")


def test_pushing_again_reuses_the_repo(hub, model_dir):
    first = push_to_hub(model_dir, "alice/tiny-mesh", token=WRITE_TOKEN)
    commits = len(hub.repos["alice/tiny-mesh"].commits)
    (model_dir / "notes.txt").write_text("second upload\n")
    second = push_to_hub(model_dir, "alice/tiny-mesh", token=WRITE_TOKEN, include=["notes.txt"])
    assert first == second
    assert len(hub.repos["alice/tiny-mesh"].commits) == commits + 1
    assert hub.files("alice/tiny-mesh")["notes.txt"] == b"second upload\n"


def test_an_old_checkpoint_is_published_without_its_local_paths(hub, model_dir):
    """Converters before paths were cut on writing stored them in conversion.json and config.json;
    the push publishes both cut, uploads every other file of the model as it is, and leaves the
    folder alone."""
    home = "/home/alice/work"
    cached = f"{home}/hf/models--EleutherAI--pythia-14m/snapshots/0123abcd"  # a source in the HF cache
    record = {**conversion_info(), "command": f"mesh-convert {cached} --loops 2 -o {home}/out",
              "output": f"{home}/out"}
    record["source"] = {**record["source"], "model": cached, "revision": None}
    (model_dir / "conversion.json").write_text(json.dumps(record, indent=2))
    config = json.loads((model_dir / "config.json").read_text())
    config["provenance"] = {"source": {"model": f"{home}/pythia-14m", "revision": None}, "tie": "average"}
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    (model_dir / "README.md").write_text(f"# my own card\n\nConverted from `{cached}` into `{home}/out`.\n")
    (model_dir / ".git").mkdir()
    (model_dir / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (model_dir / "extra").mkdir()
    (model_dir / "extra" / "notes.txt").write_text("kept\n")
    before = file_digests(model_dir)

    push_to_hub(model_dir, "alice/tiny-mesh", token=WRITE_TOKEN)

    remote = hub.files("alice/tiny-mesh")
    assert file_digests(model_dir) == before
    assert set(before) - {".git/HEAD", "extra/notes.txt"} | {".gitattributes"} == set(remote)
    assert not any(home.encode() in content for content in remote.values())
    published = json.loads(remote["conversion.json"])
    assert published["source"] == {**record["source"], "model": "EleutherAI/pythia-14m", "revision": "0123abcd"}
    assert (published["output"], published["command"]) == ("out", "mesh-convert 0123abcd --loops 2 -o out")
    assert json.loads(remote["config.json"])["provenance"]["source"]["model"] == "pythia-14m"
    assert remote["README.md"] == b"# my own card\n\nConverted from `EleutherAI/pythia-14m` into `out`.\n"
    for name in set(before) - {"conversion.json", "config.json", "README.md", ".git/HEAD", "extra/notes.txt"}:
        assert hashlib.sha256(remote[name]).hexdigest() == before[name], name
    assert len(hub.repos["alice/tiny-mesh"].commits) == 2  # the repo's first commit, then one upload


def test_a_push_that_cannot_stage_its_upload_fails_before_any_request(hub, model_dir, monkeypatch, capfd):
    from mesh_convert.hub import push

    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    (model_dir / "conversion.json").write_text(json.dumps({**conversion_info(), "output": "/home/alice/out"}))
    before = file_digests(model_dir)

    def no_space(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(push, "link", no_space)
    code, _, err = invoke(capfd, "push", str(model_dir), "alice/tiny-mesh")
    assert_one_clear_line(code, err, "cannot prepare the upload", "No space left on device")
    assert hub.log == [] and "alice/tiny-mesh" not in hub.repos
    assert file_digests(model_dir) == before


def test_a_current_checkpoint_is_uploaded_as_it_is(hub, model_dir):
    (model_dir / "README.md").write_text("# my own card\n")
    before = file_digests(model_dir)
    push_to_hub(model_dir, "alice/tiny-mesh", token=WRITE_TOKEN)
    remote = hub.files("alice/tiny-mesh")
    assert {name: hashlib.sha256(remote[name]).hexdigest() for name in before} == before


# ----------------------------------------------------------------------------- what is published


def test_only_what_a_model_repo_needs_is_published(hub, model_dir, monkeypatch, capfd):
    """A model folder also holds what was never meant for the Hub: push publishes the model, says in
    one line what it left out, and publishes more only where --include names it."""
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    (model_dir / "README.md").write_text("# my own card\n")
    (model_dir / "chat_template.jinja").write_text("{{ messages }}")
    (model_dir / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/home/alice/runs/base"}))
    model = file_digests(model_dir)
    (model_dir / ".env").write_text("OPENAI_API_KEY=sk-not-for-the-hub\n")
    (model_dir / "notes.md").write_text("for the client only\n")
    (model_dir / ".ipynb_checkpoints").mkdir()
    (model_dir / ".ipynb_checkpoints" / "explore-checkpoint.ipynb").write_text("{}")
    (model_dir / "eval").mkdir()
    (model_dir / "eval" / "results.json").write_text("{}")
    before = file_digests(model_dir)

    code, out, err = invoke(capfd, "push", model_dir, "alice/tiny-mesh", "--json")
    assert code == 0, err
    remote = hub.files("alice/tiny-mesh")
    assert set(remote) == set(model) | {".gitattributes"}
    assert json.loads(out)["left_out"] == [".env", ".ipynb_checkpoints/", "eval/", "notes.md"]
    notes = [line for line in err.splitlines() if "--include" in line]
    assert len(notes) == 1 and all(name in notes[0] for name in (".env", ".ipynb_checkpoints/", "eval/", "notes.md"))
    # An adapter names its base by the path it was trained from: published as the folder's name.
    assert json.loads(remote["adapter_config.json"]) == {"base_model_name_or_path": "base"}
    assert file_digests(model_dir) == before

    code, out, err = invoke(capfd, "push", model_dir, "alice/tiny-mesh", "--include", "eval/", "--include", "notes.md",
                            "--json")
    assert code == 0, err
    remote = hub.files("alice/tiny-mesh")
    assert {"eval/results.json", "notes.md"} <= set(remote) and ".env" not in remote
    assert json.loads(out)["left_out"] == [".env", ".ipynb_checkpoints/"]


def test_relative_paths_are_published_as_folder_names(hub, model_dir):
    """A conversion run from elsewhere records where it read and wrote: the push publishes the
    folders' names, not the way there."""
    record = {**conversion_info(), "output": "../../clients/acme/model",
              "command": "mesh-convert ../../clients/acme/pythia --loops 2 -o ../../clients/acme/model"}
    record["source"] = {**record["source"], "model": "../../clients/acme/pythia"}
    (model_dir / "conversion.json").write_text(json.dumps(record))
    (model_dir / "README.md").write_text("Converted from `../../clients/acme/pythia` into `../../clients/acme/model`.\n")

    push_to_hub(model_dir, "alice/tiny-mesh", token=WRITE_TOKEN)

    remote = hub.files("alice/tiny-mesh")
    assert not any(b"clients" in content or b"acme" in content for content in remote.values())
    published = json.loads(remote["conversion.json"])
    assert (published["output"], published["source"]["model"]) == ("model", "pythia")
    assert published["command"] == "mesh-convert pythia --loops 2 -o model"
    assert remote["README.md"] == b"Converted from `pythia` into `model`.\n"


def test_push_publishes_no_code_but_ours(hub, model_dir, tmp_path, monkeypatch, capfd):
    """A folder whose tokenizer and config name foreign code, and that holds code of its own, is
    published naming none of it, even when asked to include every file, and the published model
    loads with trust_remote_code running nothing but our two files."""
    from helpers import assert_loads_trusting_only_our_code, char_tokenizer, foreign_references, plant

    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    marker = tmp_path / "PLANTED-CODE-RAN"
    plant(char_tokenizer(model_dir), marker)
    (model_dir / "custom_generate").mkdir()
    (model_dir / "custom_generate" / "generate.py").write_text("raise SystemExit('ran')\n")
    (model_dir / "README.md").write_text("# my own card\n")
    before = file_digests(model_dir)

    code, out, err = invoke(capfd, "push", model_dir, "alice/tiny-mesh", "--include", "*", "--json")
    assert code == 0, err
    removed = json.loads(out)["removed_remote_code"]
    assert "evil.py" in removed and "custom_generate/generate.py" in removed
    assert any("attacker/repo--evil.EvilTok" in item for item in removed)
    assert "removed remote code" in err
    assert file_digests(model_dir) == before  # published cleaned, the folder as it was
    download = tmp_path / "download"
    download.mkdir()
    for name, content in hub.files("alice/tiny-mesh").items():
        (download / name).parent.mkdir(parents=True, exist_ok=True)
        (download / name).write_bytes(content)
    assert foreign_references(download) == []
    assert_loads_trusting_only_our_code(["alice/tiny-mesh"], marker, tmp_path, endpoint=hub.endpoint)


# ----------------------------------------------------------------------------- failures


def test_missing_token(hub, model_dir, capfd):
    before = file_digests(model_dir)
    code, _, err = invoke(capfd, "push", str(model_dir), "alice/tiny-mesh")
    assert_one_clear_line(code, err, "hf auth login", "HF_TOKEN")
    assert hub.log == []  # refused before any request
    assert file_digests(model_dir) == before


def test_an_unreadable_config_is_refused_before_any_request(hub, model_dir, monkeypatch, capfd):
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    (model_dir / "config.json").write_text("{ not json")
    before = file_digests(model_dir)
    code, _, err = invoke(capfd, "push", str(model_dir), "alice/tiny-mesh")
    assert_one_clear_line(code, err, "cannot read", "config.json")
    assert hub.log == []
    assert file_digests(model_dir) == before


def _link_weights_out(folder: Path) -> None:
    outside = folder.parent / "elsewhere.safetensors"
    (folder / "model.safetensors").rename(outside)
    (folder / "model.safetensors").symlink_to(outside)


def _link_card_out(folder: Path) -> None:
    (folder.parent / "private-notes.md").write_text("my private notes\n")
    (folder / "README.md").symlink_to(folder.parent / "private-notes.md")


@pytest.mark.parametrize(
    "damage, needles",
    [
        (_link_weights_out, ["model.safetensors is a link to", "outside the checkpoint"]),
        (_link_card_out, ["README.md is a link to", "outside the checkpoint"]),
        (lambda folder: (folder / "model.safetensors").write_bytes(b""), ["corrupt or truncated safetensors file"]),
        (lambda folder: (folder / "generation_config.json").write_text(json.dumps({"note": WRITE_TOKEN})),
         ["generation_config.json holds your Hugging Face token"]),
    ],
    ids=["weights link out", "card links out", "empty weights", "token in a config"],
)
def test_what_must_not_be_published_is_refused_before_any_request(hub, model_dir, monkeypatch, capfd, damage, needles):
    """A link out of the folder would publish what it points to, broken weights a broken model,
    and a token that a tool wrote into a file the user's credentials."""
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    damage(model_dir)
    code, _, err = invoke(capfd, "push", str(model_dir), "alice/tiny-mesh")
    assert_one_clear_line(code, err, *needles)
    assert hub.log == []


def test_wrong_token_is_refused_without_echoing_it(hub, model_dir, monkeypatch, capfd):
    monkeypatch.setenv("HF_TOKEN", WRONG_TOKEN)
    before = file_digests(model_dir)
    code, out, err = invoke(capfd, "push", str(model_dir), "alice/tiny-mesh")
    assert_one_clear_line(code, err, "401")
    assert WRONG_TOKEN not in out
    # The stand-in did echo the token back in its error body; the CLI must not pass it on.
    assert any(status == 401 for _, _, status in hub.log)
    assert file_digests(model_dir) == before
    assert "alice/tiny-mesh" not in hub.repos


def test_read_only_token_is_refused_and_the_folder_is_left_as_it_was(hub, model_dir, monkeypatch, capfd):
    HfApi(endpoint=hub.endpoint, token=WRITE_TOKEN).create_repo("alice/tiny-mesh")
    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    before = file_digests(model_dir)
    code, _, err = invoke(capfd, "push", str(model_dir), "alice/tiny-mesh")
    assert_one_clear_line(code, err, "403", "alice/tiny-mesh")
    # The card generated for this push was removed again when the upload was refused.
    assert file_digests(model_dir) == before
    assert set(hub.files("alice/tiny-mesh")) == {".gitattributes"}


def test_unreachable_endpoint(hub, model_dir, monkeypatch, capfd):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    before = file_digests(model_dir)
    code, _, err = invoke(capfd, "push", str(model_dir), "alice/tiny-mesh")
    assert_one_clear_line(code, err, "cannot reach", endpoint)
    assert file_digests(model_dir) == before


def test_offline_mode(hub, model_dir, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = file_digests(model_dir)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        push_to_hub(model_dir, "alice/tiny-mesh", token=WRITE_TOKEN)
    assert hub.log == [] and file_digests(model_dir) == before


def test_not_a_converted_model(hub, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    code, _, err = invoke(capfd, "push", str(folder), "alice/tiny-mesh")
    assert_one_clear_line(code, err, "no weights")
    code, _, err = invoke(capfd, "push", str(tmp_path / "missing"), "alice/tiny-mesh")
    assert_one_clear_line(code, err, "not a directory")
    assert hub.log == []


def test_credentials_in_the_endpoint_are_never_shown(hub, model_dir, monkeypatch, capfd):
    """An HF_ENDPOINT of https://user:password@host (a proxy's login) was printed in every message."""
    port = closed_port()
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", f"http://alice:s3cr3tPass@127.0.0.1:{port}")
    code, _, err = invoke(capfd, "push", str(model_dir), "alice/tiny-mesh")
    assert_one_clear_line(code, err, f"http://***@127.0.0.1:{port}")
    assert "s3cr3tPass" not in err


def test_invalid_repo_id(hub, model_dir):
    with pytest.raises(UserError, match="invalid repository id"):
        push_to_hub(model_dir, "alice/tiny/mesh", token=WRITE_TOKEN)
    assert hub.log == []


# ----------------------------------------------------------------------------- error messages


def _http_error(status: int, body: dict) -> HfHubHTTPError:
    request = httpx.Request("POST", "http://hub.test/api/models/alice/x/commit/main")
    response = httpx.Response(status, json=body, request=request)
    return HfHubHTTPError(f"{status} error", response=response, server_message=body.get("error"))


@pytest.mark.parametrize(
    ("status", "expected"),
    [(401, "401 Unauthorized"), (403, "403 Forbidden"), (404, "404 Not Found"),
     (500, "500 Internal Server Error"), (502, "502 Bad Gateway")],
)
def test_http_errors_become_one_line(status, expected):
    message = http_error_message(_http_error(status, {"error": "nope\nsecond line"}), "alice/x", "http://hub.test")
    assert expected in message
    assert "nope" in message and "second line" not in message
    assert "\n" not in message


def test_tokens_are_scrubbed_from_server_messages():
    error = _http_error(500, {"error": f"boom, Authorization: Bearer {WRITE_TOKEN}"})
    user_error = hub_error(error, "alice/x", "http://hub.test", WRITE_TOKEN)
    assert isinstance(user_error, UserError)
    assert WRITE_TOKEN not in str(user_error) and "500" in str(user_error)
    # Token-shaped strings are hidden even when they are not the token in use.
    assert "hf_" not in scrub(f"got {READ_TOKEN} and Bearer abc.def", WRITE_TOKEN)
    assert "abc.def" not in scrub("Bearer abc.def", None)


def test_unknown_errors_are_not_disguised():
    assert hub_error(KeyError("x"), "alice/x", "http://hub.test", WRITE_TOKEN) is None


# ----------------------------------------------------------------------------- convert --push-to-hub


def test_convert_then_push(hub, tiny_pythia, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    out = tmp_path / "converted"
    code, stdout, err = invoke(capfd, str(tiny_pythia), "--loops", "2", "-o", str(out), "--push-to-hub", "alice/conv", "--json")
    assert code == 0, err
    assert json.loads(stdout)["url"] == f"{hub.endpoint}/alice/conv"
    remote = hub.files("alice/conv")
    assert {"model.safetensors", "modeling_mesh.py", "conversion.json", "README.md"} <= set(remote)
    assert b'from_pretrained("alice/conv"' in remote["README.md"] or b"alice/conv" in remote["README.md"]


def test_convert_keeps_the_result_when_the_push_fails(hub, tiny_pythia, tmp_path, capfd):
    out = tmp_path / "converted"
    code, _, err = invoke(capfd, str(tiny_pythia), "--loops", "2", "-o", str(out), "--push-to-hub", "alice/conv")
    assert_one_clear_line(code, err, "but the upload failed")
    assert (out / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- converting from the Hub


def test_convert_a_pythia_alias_at_a_revision_from_the_hub(tmp_path):
    """`mesh-convert pythia-14m --revision stepN` downloads EleutherAI/pythia-14m at that branch.
    Runs the CLI in a fresh process: huggingface_hub reads HF_ENDPOINT when it is imported."""
    from conftest import make_tiny_pythia

    token = "hf_eleuther_writes"
    with HubStandin(tmp_path / "standin", {token: User("EleutherAI", write=True)}) as standin:
        old, new = tmp_path / "old", tmp_path / "new"
        make_tiny_pythia(old, seed=1)
        model = make_tiny_pythia(new, seed=2)
        api = HfApi(endpoint=standin.endpoint, token=token)
        api.create_repo("EleutherAI/pythia-14m")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(constants, "HF_HUB_DISABLE_XET", True)
            api.upload_folder(repo_id="EleutherAI/pythia-14m", folder_path=old)
            api.create_branch("EleutherAI/pythia-14m", branch="step1000")
            api.upload_folder(repo_id="EleutherAI/pythia-14m", folder_path=new, revision="step1000")

        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
        env.update(HF_ENDPOINT=standin.endpoint, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5")

        def cli(*args):
            return subprocess.run([sys.executable, "-m", "mesh_convert.cli", *args], env=env, cwd=tmp_path,
                                  capture_output=True, text=True, timeout=300)

        out = tmp_path / "converted"
        done = cli("pythia-14m", "--revision", "step1000", "--loops", "2", "--relax-rank", "full", "--router-gap", "40",
                   "-o", str(out), "--json")
        assert done.returncode == 0, done.stderr[-3000:]
        info = json.loads(done.stdout)
        assert info["source"]["model"] == "EleutherAI/pythia-14m" and info["source"]["revision"] == "step1000"
        assert info["layout"] == "1+3R2+1"  # from the downloaded config.json, not the suite's facts

        missing = cli("pythia-14m", "--revision", "step9", "--loops", "2", "-o", str(tmp_path / "x"))
        assert missing.returncode == 1 and "Traceback" not in missing.stderr
        assert "revision step9 not found" in missing.stderr
        assert not (tmp_path / "x").exists()
        assert standin.unhandled == []

    x = torch.randint(0, 128, (1, 10))
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(converted(x).logits, model(x).logits, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- evaluation data


def test_wikitext2_is_fetched_from_the_hub_when_no_data_folder_has_it(tmp_path, monkeypatch):
    """`eval --data wikitext2` on a machine without the data: the parquet comes from the Hub's
    Salesforce/wikitext dataset, and its rows joined are kept as wiki.test.raw for later runs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mesh_convert.eval import data as eval_data

    rows = ["", " = Valkyria Chronicles = \n", "", " Senjō no Valkyria 3 is a game . \n"]
    parquet = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(pa.table({"text": rows}), parquet)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(eval_data, "data_dirs", lambda: [tmp_path / "nowhere", eval_data.cache_data_dir()])
    monkeypatch.setenv(eval_data.CACHE_ENV, str(tmp_path / "mesh-cache"))
    token = "hf_salesforceWrites0123456789"
    with HubStandin(tmp_path / "standin", {token: User("Salesforce", write=True)}) as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.endpoint)
        api = HfApi(endpoint=standin.endpoint, token=token)
        api.create_repo("Salesforce/wikitext", repo_type="dataset")
        api.upload_file(path_or_fileobj=parquet, path_in_repo="wikitext-2-raw-v1/test-00000-of-00001.parquet",
                        repo_id="Salesforce/wikitext", repo_type="dataset")
        path, task = eval_data.resolve_data("wikitext2")
        assert standin.unhandled == []
    assert path == tmp_path / "mesh-cache" / "data" / "wikitext-2-raw" / "wiki.test.raw" and task == "perplexity"
    assert path.read_text(encoding="utf-8") == "".join(rows)
    assert eval_data.resolve_data("wikitext2")[0] == path  # the stand-in is gone: found in the cache

    path.unlink()  # gone from both caches, and offline: a one-line error, no partial file
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as info:
        eval_data.resolve_data("wikitext2")
    message = str(info.value)
    assert "Salesforce/wikitext" in message and eval_data.DATA_ENV in message and "\n" not in message
    assert not path.exists() and not list(path.parent.glob("*.partial"))


def test_wikitext2_without_network_is_one_line_at_once(tmp_path, monkeypatch, capfd):
    """No network and no copy: the Hub is asked once (its download retried for some 25 s, printing
    ten lines) and the answer is one line."""
    import socket

    from mesh_convert.eval import data as eval_data

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"  # nothing listens there
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(eval_data, "data_dirs", lambda: [tmp_path / "nowhere"])
    monkeypatch.setenv(eval_data.CACHE_ENV, str(tmp_path / "mesh-cache"))
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(UserError, match=f"cannot reach the Hub at {endpoint}"):
        eval_data.resolve_data("wikitext2")
    assert "Retrying" not in capfd.readouterr().err


# ----------------------------------------------------------------------------- a failing or silent Hub


def assert_ends_with_one_error_line(code: int, err: str, *needles: str) -> None:
    """Exit 1, no traceback, and one `error:` message ending the output; huggingface_hub's own
    retry warnings and upload progress bar (left open on failure) may precede it."""
    assert code == 1, err
    assert "Traceback" not in err
    errors = re.findall(r"error: [^\r\n]*", err)
    assert err.rstrip().endswith(errors[-1] if errors else "error:"), err
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    for token in (WRITE_TOKEN, READ_TOKEN, WRONG_TOKEN):
        assert token not in err


def test_a_failed_commit_in_a_log_is_its_one_line_without_upload_bars(hub, model_dir, monkeypatch, capfd):
    """Where stderr is no terminal (a log, a batch job), huggingface_hub's upload bars went above the line."""
    hub.fail("POST", r"/api/models/alice/tiny-mesh/commit/main", 500)
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    code, _, err = invoke(capfd, "push", str(model_dir), "alice/tiny-mesh")
    assert_one_clear_line(code, err, "500", "alice/tiny-mesh")


def test_an_lfs_upload_failing_after_its_retries_is_one_line(hub, model_dir, monkeypatch, capfd):
    hub.fail("PUT", r"/__lfs__/.*", 500)  # huggingface_hub retries this five times, then wraps the error
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    before = file_digests(model_dir)
    code, _, err = invoke(capfd, "push", str(model_dir), "alice/tiny-mesh")
    assert_ends_with_one_error_line(code, err, "500", "alice/tiny-mesh", hub.endpoint)
    assert file_digests(model_dir) == before
    assert [status for method, _, status in hub.log if method == "PUT"] == [500] * 6


def test_a_hub_that_never_answers_times_out_and_says_so(hub, model_dir, monkeypatch, capfd):
    hub.fail("POST", r"/api/repos/create", None)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    before = file_digests(model_dir)
    code, _, err = invoke(capfd, "push", str(model_dir), "alice/tiny-mesh")
    assert_ends_with_one_error_line(code, err, "did not answer in time", "HF_HUB_DOWNLOAD_TIMEOUT=1 s")
    assert file_digests(model_dir) == before


def test_a_hub_that_never_answers_a_conversions_question_times_out(hub, tmp_path, monkeypatch, capfd):
    """The first question a conversion asks (the repo's files) passed no timeout of its own, which
    left the client's unset: a server that accepted and never answered held it forever."""
    hub.fail("GET", r"/api/models/.*", None)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code, _, err = invoke(capfd, "alice/tiny", "--loops", "2", "-o", str(tmp_path / "out"))
    assert_ends_with_one_error_line(code, err, "did not answer in time", "HF_HUB_DOWNLOAD_TIMEOUT=1 s")
    assert not (tmp_path / "out").exists()


def test_an_upload_that_is_never_answered_says_how_long_it_waited(hub, model_dir, monkeypatch, capfd):
    hub.fail("POST", r"/api/models/alice/tiny-mesh/commit/main", None)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    monkeypatch.setattr(io, "UPLOAD_ANSWER_SECONDS", 2.0)
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    before = file_digests(model_dir)
    code, _, err = invoke(capfd, "push", str(model_dir), "alice/tiny-mesh")
    assert_ends_with_one_error_line(code, err, "did not answer in time", "HF_HUB_DOWNLOAD_TIMEOUT=1 s a request",
                          "2 s for the upload's answer")
    assert file_digests(model_dir) == before


def test_only_the_commit_waits_longer_than_an_api_call(hub, model_dir, monkeypatch, capfd):
    """The upload's long wait is for the commit's answer: a preupload question as slow as that
    would be waited for six times over (huggingface_hub retries a timed-out request five times),
    which held a push for minutes on a server that never answered it."""
    import huggingface_hub.utils._http as hub_http

    hub.delay("POST", r"/api/models/alice/tiny-mesh/preupload/main", 2.5)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    monkeypatch.setattr(io, "UPLOAD_ANSWER_SECONDS", 10.0)
    monkeypatch.setattr(hub_http, "time", SimpleNamespace(sleep=lambda seconds: None))  # the retries' back-off
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    code, _, err = invoke(capfd, "push", str(model_dir), "alice/tiny-mesh")
    assert_ends_with_one_error_line(code, err, "did not answer in time", "HF_HUB_DOWNLOAD_TIMEOUT=1 s")
    assert "model.safetensors" not in hub.files("alice/tiny-mesh")


def test_a_commit_the_hub_takes_longer_to_check_than_an_api_call_may_take_still_lands(hub, model_dir, monkeypatch, capfd):
    """The Hub may take up to a minute to answer a commit: the short API timeout must not cut it off."""
    hub.delay("POST", r"/api/models/alice/tiny-mesh/commit/main", 2.5)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    code, _, err = invoke(capfd, "push", str(model_dir), "alice/tiny-mesh")
    assert code == 0, err
    assert "model.safetensors" in hub.files("alice/tiny-mesh")


@pytest.mark.parametrize("command", ["push", "convert"])
def test_a_token_that_is_not_ascii_is_named_as_the_problem(hub, model_dir, monkeypatch, capfd, command):
    monkeypatch.setenv("HF_TOKEN", "hf_tökenWithAccents0123456789")
    argv = ["push", str(model_dir), "alice/tiny-mesh"] if command == "push" else ["alice/tiny-mesh", "--loops", "2", "--dry-run"]
    code, _, err = invoke(capfd, *argv)
    assert_ends_with_one_error_line(code, err, "token", "not ASCII", "HF_TOKEN")
    assert "tökenWithAccents" not in err


def test_a_hub_that_fails_while_fetching_is_not_reported_as_a_missing_file(hub, tmp_path, monkeypatch, capfd):
    """huggingface_hub reports a failed lookup with nothing cached as LocalEntryNotFoundError, a
    subclass of EntryNotFoundError: the failure must be named, not "no such file"."""
    HfApi(endpoint=hub.endpoint, token=WRITE_TOKEN).create_repo("alice/tiny")
    hub.fail("HEAD", r"/alice/tiny/resolve/.*", 503)
    # Download URLs come from constants set at import; point them at the stand-in too.
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    code, _, err = invoke(capfd, "alice/tiny", "--loops", "2", "--dry-run")
    assert_ends_with_one_error_line(code, err, "503", "alice/tiny", "not in the local cache")
    assert "no such file" not in err
    assert list(workdir.iterdir()) == []
    assert {status for method, _, status in hub.log if method == "HEAD"} == {503}
