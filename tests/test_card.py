"""The model card built from conversion.json."""

import copy
import io
import json
import re
import shlex

import pytest
from huggingface_hub import ModelCard

from mesh_convert.artifacts.record import ConversionRecord
from mesh_convert.errors import UserError
from mesh_convert.artifacts.card import REDUCTION_LABEL, build_model_card, hub_model_id, parameter_rows, write_model_card

INFO = {
    "mesh_convert_version": "0.1.0",
    "command": "mesh-convert pythia-160m --loops 2",
    "source": {"model": "EleutherAI/pythia-160m", "revision": "main", "model_type": "gpt_neox",
               "license": "apache-2.0", "num_layers": 12, "hidden_size": 768, "num_attention_heads": 12},
    "layout": "2+4R2+2", "prelude": 2, "core": 4, "loops": 2, "coda": 2,
    "variant": "mesh", "tie": "average", "slots": 5, "router_gap": 8.0, "relax_rank": 0, "dtype": "float16",
    "layer_map": {"prelude": [[0], [1]], "core": [[2, 6], [3, 7], [4, 8], [5, 9]], "coda": [[10], [11]]},
    "params": {"original_nonembedding": 85056000, "converted_nonembedding": 56705280, "routers": 23070,
               "relax": 0, "embedding": 77266944, "total": 133995294},
    "training": {"recipe": "heal", "method": "lora", "tokens": 2000000, "steps": 10, "final_loss": 2.25},
    "eval_results": [{"task": "wikitext2", "metric": "perplexity", "value": 30.1},
                     {"task": "piqa", "metric": "acc", "value": 0.6271}],
}


def reparse(card: ModelCard) -> ModelCard:
    """What the Hub (or `ModelCard.load`) would read back from the written README."""
    return ModelCard(str(card))


def table_value(text: str, label: str) -> str:
    match = re.search(rf"^\| {re.escape(label)} \| (.+?) \|$", text, re.MULTILINE)
    assert match, f"no row {label!r}"
    return match.group(1)


def test_metadata():
    data = reparse(build_model_card(INFO, repo_id="alice/pythia-160m-mesh")).data
    assert data.base_model == "EleutherAI/pythia-160m"
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert data.license == "apache-2.0"
    assert {"mesh", "recursive-transformer", "custom_code"} <= set(data.tags)
    assert data.model_name == "pythia-160m-mesh"
    results = {(r.dataset_type, r.metric_type): r.metric_value for r in data.eval_results}
    assert results == {("wikitext", "perplexity"): 30.1, ("ybisk/piqa", "acc"): 0.6271}


def test_parameter_table():
    text = build_model_card(INFO).text
    assert table_value(text, "original model, non-embedding") == "85,056,000"
    assert table_value(text, "converted layers (stored once), non-embedding") == "56,705,280"
    assert table_value(text, "MeSH routers") == "23,070"
    assert table_value(text, "relaxation deltas") == "0"
    # The converted model's non-embedding count includes its routers: 56,705,280 + 23,070.
    assert table_value(text, "**converted model, non-embedding**") == "**56,728,350**"
    assert table_value(text, REDUCTION_LABEL) == "33.3%"  # 1 - 56,728,350 / 85,056,000
    assert table_value(text, "converted model, total") == "133,995,294"


def test_relaxation_counts_toward_the_converted_size():
    rows = dict(map(tuple, parameter_rows({"original_nonembedding": 1000, "converted_nonembedding": 500,
                                           "routers": 0, "relax": 250})))
    assert rows["**converted model, non-embedding**"] == "**750**"
    assert rows[REDUCTION_LABEL] == "25.0%"


def test_body_sections():
    text = build_model_card(INFO, repo_id="alice/pythia-160m-mesh").text
    assert "arXiv 2510.07739" in text and "https://arxiv.org/abs/2510.07739" in text
    assert "`2+4R2+2`" in text
    assert "| core (×2) | 1 | 3, 7 |" in text and "| coda | 1 | 11 |" in text
    assert "mesh-convert pythia-160m --loops 2" in text
    for fact in ("tie strategy: `average`", "router bias gap: `8.0`", "relaxation rank: `0 (none)`"):
        assert fact in text
    assert "## Training" in text and "method: lora" in text and "tokens: 2,000,000" in text
    assert "| wikitext2 | perplexity | 30.1 |" in text and "| piqa | acc | 0.6271 |" in text


def test_usage_snippet():
    text = build_model_card(INFO, repo_id="alice/pythia-160m-mesh").text
    assert 'AutoModelForCausalLM.from_pretrained("alice/pythia-160m-mesh", trust_remote_code=True)' in text
    assert 'AutoTokenizer.from_pretrained("alice/pythia-160m-mesh", trust_remote_code=True)' in text
    assert "model.generate(" in text
    # Without a tokenizer next to the weights, the snippet borrows the source model's.
    text = build_model_card(INFO, repo_id="alice/pythia-160m-mesh", has_tokenizer=False).text
    assert 'AutoTokenizer.from_pretrained("EleutherAI/pythia-160m")' in text


def test_write_model_card_notices_the_tokenizer(tmp_path):
    write_model_card(tmp_path, INFO)
    assert 'AutoTokenizer.from_pretrained("EleutherAI/pythia-160m")' in (tmp_path / "README.md").read_text()
    (tmp_path / "tokenizer.json").write_text("{}")
    write_model_card(tmp_path, INFO)
    assert 'AutoTokenizer.from_pretrained("path/to/converted-model", trust_remote_code=True)' in (
        tmp_path / "README.md"
    ).read_text()


@pytest.mark.parametrize(
    "strip",
    [
        ["training", "eval_results"],
        ["params", "layer_map", "command"],
        ["source"],
        ["layout", "prelude", "core", "loops", "coda"],
        list(INFO),
    ],
)
def test_missing_fields_are_left_out(strip):
    info = {k: v for k, v in copy.deepcopy(INFO).items() if k not in strip}
    card = reparse(build_model_card(info))
    assert card.data.library_name == "transformers"
    assert "from_pretrained(" in card.text
    assert "None" not in card.text and "unknown" not in card.text
    if "source" in strip:
        assert card.data.base_model is None and card.data.license is None
    if "eval_results" in strip:
        assert not card.data.eval_results and "Not evaluated yet" in card.text
    if "params" in strip:
        assert "## Parameters" not in card.text


def test_none_values_are_left_out():
    info = copy.deepcopy(INFO)
    info.update(source=None, params={"original_nonembedding": None, "converted_nonembedding": 5},
                layer_map=None, training={"steps": None}, variant=None, relax_rank=None,
                eval_results=[{"task": "sciq", "metric": "acc", "value": 0.8}])
    card = reparse(build_model_card(info))
    assert card.data.base_model is None
    assert [r.dataset_type for r in card.data.eval_results] == ["allenai/sciq"]
    assert "## Training" not in card.text and "## Layer map" not in card.text
    assert "original model" not in card.text and "reduction" not in card.text
    assert table_value(card.text, "converted layers (stored once), non-embedding") == "5"
    assert build_model_card(None).data.library_name == "transformers"


@pytest.mark.parametrize(
    "content, problem",
    [('{"training": {"steps": "many"}}', "training.steps"), ('{"eval_results": ["junk"]}', "eval_results.0"),
     ("[1, 2]", "conversion.json"), ("{not json", "conversion.json")],
)
def test_a_malformed_record_is_one_clear_error(tmp_path, content, problem):
    (tmp_path / "conversion.json").write_text(content)
    with pytest.raises(UserError, match=re.escape(problem)):
        ConversionRecord.read(tmp_path)


def test_a_null_command_is_published_as_null(monkeypatch):
    """Cutting the paths out of a command line must not take a null one for "read standard input"."""
    monkeypatch.setattr("sys.stdin", io.StringIO("typed on stdin\n"))
    record = ConversionRecord.model_validate({"command": None, "layout": "1+1R2+1"})
    assert record.published().command is None


def test_records_of_the_old_init_command_still_read(tmp_path):
    """`init` used to write its counts under `parameters`; such a model's card still shows them."""
    old = {"init": {"size": "custom", "loops": 2}, "seed": 0,
           "parameters": {"nonembedding": 41_184, "routers": 990, "relax": 0, "embedding": 8_192, "total": 50_366}}
    (tmp_path / "conversion.json").write_text(json.dumps(old))
    record = ConversionRecord.read(tmp_path)
    assert record.params.converted_nonembedding == 41_184 and record.init == old["init"]
    write_model_card(tmp_path, record)
    text = (tmp_path / "README.md").read_text()
    assert table_value(text, "converted layers (stored once), non-embedding") == "41,184"
    assert table_value(text, "converted model, total") == "50,366"


@pytest.mark.parametrize(
    ("name", "expected"),
    [("EleutherAI/pythia-160m", True), ("/models/pythia", False), ("./out/pythia", False),
     ("~/pythia", False), ("pythia-160m", False), ("a/b/c", False), (None, False)],
)
def test_only_hub_ids_become_base_model(name, expected):
    assert (hub_model_id(name) is not None) == expected


def test_baseline_variants_are_not_presented_as_mesh():
    info = dict(INFO, variant="anchor", params=dict(INFO["params"], routers=0))
    text = build_model_card(info).text
    assert "`anchor` baseline recurrence" in text
    assert "the routers were set" not in text


def test_a_local_source_is_named_by_its_folder_not_its_path():
    """The card is published with the model: a local source's absolute path (the user's home,
    their directory layout) must not be in it."""
    info = copy.deepcopy(INFO)
    info["source"]["model"] = "/home/alice/secret-project/checkpoints/pythia-160m-step5000/"
    text = build_model_card(info).text
    assert "/home/alice" not in text and "secret-project" not in text
    assert "converted from `pythia-160m-step5000`" in text
    assert "- source model: `pythia-160m-step5000`" in text


def test_published_records_cut_absolute_paths_to_their_last_part():
    """conversion.json goes to the Hub with the model: absolute paths (POSIX or Windows, alone or in
    a flag) keep their last part, relative ones and fields never set stay as they are."""
    record = ConversionRecord.model_validate({
        "command": "mesh-convert /home/alice/ckpt --output=/home/alice/out -o/srv/x -k 2 rel/dir",
        "source": {"model": "C:\\Users\\alice\\pythia-160m"},
        "training": {"recipe": {"model": "/home/alice/m", "data": {"train": ["/data/a.txt", "b.txt"]}, "lr": 1e-3}},
    })
    published = json.loads(record.published().to_json())
    assert published == {
        "command": "mesh-convert ckpt --output=out -ox -k 2 rel/dir",
        "source": {"model": "pythia-160m"},
        "training": {"recipe": {"model": "m", "data": {"train": ["a.txt", "b.txt"]}, "lr": 1e-3}},
    }


def test_a_published_config_names_where_it_was_loaded_from_by_the_folder_only():
    """transformers' `_name_or_path`, which a config saved by another tool may hold, went up whole."""
    from mesh_convert.artifacts.record import published_config

    config = {"_name_or_path": "/home/alice/clients/acme/model", "model_type": "mesh"}
    assert published_config(config) == {"_name_or_path": "model", "model_type": "mesh"}
    assert published_config({"_name_or_path": "EleutherAI/pythia-160m"})["_name_or_path"] == "EleutherAI/pythia-160m"


def test_markdown_and_html_in_names_are_shown_as_text():
    """A folder's name (or a task's) goes into the card's title, body and tables: its markdown and
    HTML show as the characters they are (the card renders to the same HTML elements as with plain
    names), its newlines start no blocks, and the YAML metadata still parses to the same name."""
    import yaml
    from markdown_it import MarkdownIt

    def card_with(name: str, tie: str, command: str) -> ModelCard:
        info = copy.deepcopy(INFO)
        info["source"]["model"] = f"/data/{name}"
        info.update(tie=tie, command=command, eval_results=[{"task": f"task | {name}", "metric": "acc", "value": 0.5}],
                    training={"recipe": name, "method": "lora", "steps": 3})
        return build_model_card(info)

    def elements(card: ModelCard) -> list[str]:
        return re.findall(r"<(/?[a-z0-9]+)", MarkdownIt("commonmark").enable("table").render(card.text))

    name = "<script>alert(1) <img src=x onerror=alert(2)> **b** [a](javascript:alert(3)) `c` | ~s~ &amp;\n# Forged"
    hostile = card_with(name, "``` <b>tie", f"mesh-convert '{name}' --loops 2\n```\n<b>outside")
    assert elements(hostile) == elements(card_with("plain", "plain", "mesh-convert plain --loops 2"))
    html = MarkdownIt("commonmark").enable("table").render(hostile.text)
    assert "&lt;script&gt;alert(1)" in html and "&amp;amp;" in html
    front = yaml.safe_load(str(hostile).split("---\n")[1])
    assert front["model-index"][0]["name"].startswith(name)


@pytest.mark.parametrize(
    ("path", "published"),
    [("../../clients/acme/model", "model"), ("./out/", "out"), ("~/models/m", "m"), ("runs/acme/model", "model"),
     ("..\\clients\\acme", "acme"), ("..", ".."),
     # Left as they are: a name, DIR/NAME (a Hub id is written so), a URL.
     ("pythia-14m", "pythia-14m"), ("EleutherAI/pythia-14m", "EleutherAI/pythia-14m"),
     ("https://example.com/a/b", "https://example.com/a/b")],
)
def test_published_records_cut_relative_paths_to_their_last_part(path, published):
    """A relative path that climbs or goes down several folders tells where the user keeps their
    work (`../../clients/<name>/model`): published, it is the folder's name."""
    record = ConversionRecord.model_validate({"output": path, "command": shlex.join(["mesh-convert", path, "-o", path])})
    assert record.published().output == published
    assert record.published().command == shlex.join(["mesh-convert", published, "-o", published])
