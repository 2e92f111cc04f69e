"""Evaluation: sliding-window perplexity, the LAMBADA protocol, data loading and `mesh-convert eval`.

Models are tiny random checkpoints (conftest) with a character-level tokenizer built here, so
every number can be recomputed naively in the test.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from tokenizers import processors
from torch import nn
from transformers import PreTrainedTokenizerFast
from types import SimpleNamespace

from conftest import make_tiny_pythia
from helpers import CHAR_IDS, CHARS, char_tokenizer_fast, invoke
from mesh_convert.eval import data as eval_data
from mesh_convert.eval.data import DATA_ENV, cache_data_dir, load_text_dataset, resolve_data
from mesh_convert.eval.lambada import encode_pair, lambada, lambada_split
from mesh_convert.eval.perplexity import perplexity, sliding_windows
from mesh_convert.eval.tasks import lm_eval_tasks
from mesh_convert.errors import UserError
from mesh_convert.loading import load_model, load_tokenizer

# The character tokenizer's ids (98 < the tiny models' 128): one token per ASCII character, so
# token counts and byte counts of test texts are known by eye.
ID = CHAR_IDS

TEXT = (
    "The quick brown fox jumps over the lazy dog. A recursive transformer loops a shared block "
    "of layers; MeSH adds a memory buffer and routers between the loops.\nEnd."
)

BOS = len(CHARS)  # an id the tiny models know, outside the character vocabulary


def bos_char_tokenizer() -> PreTrainedTokenizerFast:
    """The character tokenizer, adding a BOS token before every text as Llama's tokenizers do."""
    tok = char_tokenizer_fast().backend_tokenizer
    tok.add_special_tokens(["<s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<eos>", unk_token="<unk>")


def ids_of(text: str) -> list[int]:
    return [ID.get(c, ID["<unk>"]) for c in text]


@pytest.fixture
def model_dir(tiny_pythia) -> Path:
    char_tokenizer_fast().save_pretrained(tiny_pythia)
    return tiny_pythia


@pytest.fixture
def loaded(model_dir):
    return load_model(str(model_dir)), load_tokenizer(str(model_dir))


# ------------------------------------------------------------------------- sliding windows


@pytest.mark.parametrize(
    ("n", "context", "stride"), [(2, 8, 4), (9, 8, 8), (10, 8, 8), (50, 8, 3), (50, 8, 1), (37, 16, 16)]
)
def test_windows_score_every_token_once_with_enough_context(n, context, stride):
    windows = sliding_windows(n, context, stride)
    scored = [p for w in windows for p in range(w.end - w.scored, w.end)]
    assert scored == list(range(1, n))
    for i, w in enumerate(windows):
        assert w.end - 1 - w.begin <= context  # inputs fit the model
        if i > 0:  # outside the first window a scored token sees >= context - stride + 1 tokens
            assert (w.end - w.scored) - w.begin >= context - stride + 1


def test_tokenizer_and_model_agree_with_test_helper(loaded):
    _, tokenizer = loaded
    assert tokenizer(TEXT, add_special_tokens=False)["input_ids"] == ids_of(TEXT)


def test_perplexity_with_one_window_equals_one_plain_forward(loaded):
    model, tokenizer = loaded
    text = TEXT[:60]  # 60 tokens: inputs 59 <= context 64, a single window
    result = perplexity(model, tokenizer, text)
    ids = torch.tensor([ids_of(text)])
    with torch.no_grad():
        mean_nll = model(input_ids=ids, labels=ids).loss.item()
    assert result.tokens == 59
    assert result.nats == pytest.approx(mean_nll * 59, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(mean_nll), rel=1e-5)


def test_perplexity_starts_from_bos_when_the_tokenizer_adds_one(loaded):
    """As lm-eval's HFLM, which encodes with the tokenizer's defaults: the BOS token comes first,
    so the text's first token is scored too."""
    model, _ = loaded
    tokenizer = bos_char_tokenizer()
    text = TEXT[:60]
    assert tokenizer(text)["input_ids"] == [BOS, *ids_of(text)]
    result = perplexity(model, tokenizer, text)
    ids = torch.tensor([[BOS, *ids_of(text)]])
    with torch.no_grad():
        mean_nll = model(input_ids=ids, labels=ids).loss.item()
    assert result.tokens == 60
    assert result.nats == pytest.approx(mean_nll * 60, rel=1e-5)


def naive_sliding_nats(model, ids: list[int], context: int, stride: int) -> float:
    """Token p >= 1 is scored in the first window whose targets reach it: window k's targets end
    at min(context + 1 + k * stride, n), its inputs are the `context` tokens before that end.
    One forward per token over that window's tokens before p; -log softmax summed."""
    n, total = len(ids), 0.0
    for p in range(1, n):
        k = 0
        while min(context + 1 + k * stride, n) <= p:
            k += 1
        begin = max(0, min(context + 1 + k * stride, n) - 1 - context)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[begin:p]])).logits[0, -1]
        total -= torch.log_softmax(logits.double(), dim=-1)[ids[p]].item()
    return total


@pytest.mark.parametrize(("context", "stride", "batch_size"), [(32, 8, 3), (32, 32, 2), (24, 16, 1)])
def test_perplexity_equals_naive_per_token_computation(loaded, context, stride, batch_size):
    model, tokenizer = loaded
    result = perplexity(model, tokenizer, TEXT, context=context, stride=stride, batch_size=batch_size)
    ids = ids_of(TEXT)
    assert result.tokens == len(ids) - 1
    assert (result.context, result.stride) == (context, stride)
    assert result.nats == pytest.approx(naive_sliding_nats(model, ids, context, stride), rel=1e-5)


def test_stride_changes_the_result(loaded):
    """Guards the naive test above against a schedule that ignores stride altogether."""
    model, tokenizer = loaded
    overlapping = perplexity(model, tokenizer, TEXT, context=16, stride=4)
    disjoint = perplexity(model, tokenizer, TEXT, context=16, stride=16)
    assert overlapping.tokens == disjoint.tokens
    assert overlapping.nats != pytest.approx(disjoint.nats, rel=1e-6)


def test_bits_per_byte_counts_utf8_bytes_of_the_evaluated_text(loaded):
    model, tokenizer = loaded
    text = "Café crème, naïve façade: déjà vu. " * 3  # accented letters are 2 bytes each
    result = perplexity(model, tokenizer, text, context=32, stride=16)
    assert result.bytes == len(text.encode("utf-8")) > len(text)
    assert result.bits_per_byte == pytest.approx(result.nats / (math.log(2) * result.bytes))

    limited = perplexity(model, tokenizer, text, context=32, stride=16, max_tokens=20)
    assert limited.tokens == 19
    assert limited.bytes == len(text[:20].encode("utf-8"))  # one character per token here
    assert limited.to_dict()["bits_per_byte"] == pytest.approx(limited.nats / (math.log(2) * limited.bytes))


def test_perplexity_rejects_bad_settings(loaded):
    model, tokenizer = loaded
    with pytest.raises(UserError, match="exceeds"):
        perplexity(model, tokenizer, TEXT, context=65)  # the tiny model has 64 positions
    with pytest.raises(UserError, match="stride"):
        perplexity(model, tokenizer, TEXT, context=16, stride=17)
    with pytest.raises(UserError, match="fewer than 2 tokens"):
        perplexity(model, tokenizer, "x")


def test_tokenizer_that_does_not_fit_the_model_is_a_user_error(tmp_path):
    make_tiny_pythia(tmp_path / "small", vocab_size=64)
    model = load_model(str(tmp_path / "small"))
    with pytest.raises(UserError, match="do not match"):
        perplexity(model, char_tokenizer_fast(), TEXT)


# --------------------------------------------------------------------------------- LAMBADA


def test_lambada_split_takes_the_last_space_separated_word():
    assert lambada_split("He opened the door") == ("He opened the", " door")
    # lm-eval splits on ' ' only: a newline stays inside the target.
    assert lambada_split("the rest of\n\nPower") == ("the rest", " of\n\nPower")
    with pytest.raises(UserError):
        lambada_split("nospace")


def test_encode_pair_moves_trailing_spaces_into_the_target():
    tokenizer = char_tokenizer_fast()
    assert encode_pair(tokenizer, "ab  ", "c") == (ids_of("ab"), ids_of("  c"))
    assert encode_pair(tokenizer, "", " c") == ([ID["<eos>"]], ids_of(" c"))
    bos_tokenizer = bos_char_tokenizer()
    assert encode_pair(bos_tokenizer, "ab  ", "c") == ([BOS, *ids_of("ab")], ids_of("  c"))
    assert encode_pair(bos_tokenizer, "", " c") == ([BOS], ids_of(" c"))


class SuccessorLM(nn.Module):
    """A rigged causal LM: after character a it predicts `successor[a]` with logit 8 (all other
    ids 0); characters without a successor predict id 0. Known answers, exact NLLs."""

    VOCAB = 128
    LOGIT = 8.0

    def __init__(self, successor: dict[str, str]):
        super().__init__()
        self.table = torch.zeros(self.VOCAB, dtype=torch.long)
        for a, b in successor.items():
            self.table[ID[a]] = ID[b]
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the module a device
        self.config = SimpleNamespace(max_position_embeddings=64, vocab_size=self.VOCAB)
        self.seen: list[list[int]] = []

    def forward(self, input_ids, attention_mask=None, **kwargs):
        for row, mask in zip(input_ids, attention_mask if attention_mask is not None else input_ids * 0 + 1):
            self.seen.append(row[mask.bool()].tolist())
        logits = torch.zeros(*input_ids.shape, self.VOCAB)
        logits.scatter_(-1, self.table[input_ids].unsqueeze(-1), self.LOGIT)
        return SimpleNamespace(logits=logits)


def test_lambada_protocol_on_a_rigged_model():
    model = SuccessorLM({"x": " ", " ": "a", "a": "b", "b": "c", "y": "q"})
    lines = [
        "xx abc",  # every target token predicted: correct
        "xx abd",  # last target token wrong
        "xx zbc",  # second token wrong, later ones right
        "yy abc",  # first token wrong, later ones right
    ]
    result = lambada(model, char_tokenizer_fast(), lines, batch_size=3)
    assert result.greedy == [True, False, False, False]
    assert (result.count, result.correct, result.accuracy) == (4, 1, 0.25)

    # Each target token costs log(e^8 + 127) - 8 when predicted, log(e^8 + 127) when not.
    norm = math.log(math.exp(SuccessorLM.LOGIT) + SuccessorLM.VOCAB - 1)
    hit, miss = norm - SuccessorLM.LOGIT, norm
    expected = [4 * hit, 3 * hit + miss, 2 * hit + 2 * miss, 3 * hit + miss]
    # "xx zbc": ' '->z misses, z->b misses (z has no successor), b->c hits, x->' ' hits.
    assert result.target_nats == pytest.approx(expected, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(sum(expected) / 4), rel=1e-6)
    # The model saw context + target without the target's last character.
    assert sorted(model.seen) == sorted(ids_of(line[:-1]) for line in lines)


LAMBADA_LINES = [
    "She looked at the sky and said the word: rain",
    "A short one: cat",
    # Longer than the model's 64 positions: the context is cut from the left, as in lm-eval.
    "Long ago, in a valley between two rivers, there lived a miller whose mill never stopped; "
    "people came from far away to buy his flour",
    "Tabs\tand\nnewlines stay in the context of this line's last word",
    "x y",
]


def naive_lambada(model, lines: list[str], max_length: int = 64) -> tuple[list[float], list[bool]]:
    """One unpadded forward per line over context+target (last `max_length` + 1 ids, minus the
    final one); NLL and greedy match over the target's positions."""
    nlls, greedy = [], []
    for line in lines:
        context, word = line.rsplit(" ", 1)
        ctx, tgt = ids_of(context), ids_of(" " + word)
        inputs = (ctx + tgt)[-(max_length + 1) :][:-1]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([inputs])).logits[0, -len(tgt) :].double()
        nlls.append(-sum(torch.log_softmax(logits[i], -1)[t].item() for i, t in enumerate(tgt)))
        greedy.append(logits.argmax(-1).tolist() == tgt)
    return nlls, greedy


@pytest.mark.parametrize("batch_size", [1, 4])
def test_lambada_equals_naive_computation_on_a_real_model(loaded, batch_size):
    model, tokenizer = loaded
    result = lambada(model, tokenizer, LAMBADA_LINES, batch_size=batch_size)
    nlls, greedy = naive_lambada(model, LAMBADA_LINES)
    assert result.target_nats == pytest.approx(nlls, rel=1e-5)
    assert result.greedy == greedy
    assert result.perplexity == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)


# ------------------------------------------------------------------------------------ data


def test_load_text_dataset_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n\nworld\n", encoding="utf-8")
    text_data = load_text_dataset(tmp_path / "a.txt")
    assert text_data.documents == ["hello\n\nworld\n"] and text_data.default_task == "perplexity"
    (tmp_path / "b.jsonl").write_text('{"text": "one two"}\n\n{"text": "three four", "id": 2}\n')
    jsonl = load_text_dataset(str(tmp_path / "b.jsonl"))
    assert jsonl.documents == ["one two", "three four"]
    assert jsonl.text() == "one two\n\nthree four"


@pytest.mark.parametrize(
    ("content", "message"),
    [('{"text": "ok"}\n{"title": "no text"}\n', 'line 2 has no string "text" field'),
     ('{"text": "ok"}\nnot json\n', "line 2 is not valid JSON"),
     ("\n\n", "holds no text"),
     ('{"text": "a \\ud800 b"}\n', "line 1: the text holds an unpaired surrogate"),
     ('{"text": "a", "b": ' + "[" * 100_000 + "]" * 100_000 + "}\n", "line 1 is not valid JSON: nested more than 64"),
     ('{"text": "a", "b": ' + "9" * 100_000 + "}\n", r"line 1 is not valid JSON: Exceeds the limit \(4300 digits\)")],
)
def test_load_text_dataset_rejects_bad_jsonl(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(UserError, match=message):
        load_text_dataset(tmp_path / "bad.jsonl")


def test_named_data_is_found_through_the_environment(tmp_path, monkeypatch):
    target = tmp_path / "wikitext-2-raw" / "wiki.test.raw"
    target.parent.mkdir()
    target.write_text(" = Title = \n")
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    dataset = load_text_dataset("wikitext2")
    assert dataset.path == target and dataset.default_task == "perplexity"


def test_missing_named_data_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(eval_data, "data_dirs", lambda: [tmp_path / "nowhere"])
    with pytest.raises(UserError) as info:
        load_text_dataset("lambada")
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "lambada_openai" / "lambada_test.jsonl") in message
    assert DATA_ENV in message and "\n" not in message


def test_data_is_looked_for_where_the_environment_says_and_in_the_cache_only(monkeypatch):
    """Not relative to the package: an installed one has no source checkout (and no ../shared) around it."""
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert eval_data.data_dirs() == [cache_data_dir()]


def test_shared_data_resolves_when_present(shared_dir, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(shared_dir / "data"))
    path, task = resolve_data("lambada")
    assert path == shared_dir / "data" / "lambada_openai" / "lambada_test.jsonl" and task == "lambada"


def test_real_tokenizer_target_starts_with_its_space_token(shared_dir):
    """With the GPT-NeoX BPE, the target's first token is the word with its leading space."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shared_dir / "tokenizers" / "gpt-neox-20b")
    context, target = lambada_split("Hello world")
    assert encode_pair(tokenizer, context, target) == ([12092], [1533])


# ------------------------------------------------------------------------------------- CLI


@pytest.fixture
def two_models(tmp_path, tiny_mesh_model, monkeypatch) -> Path:
    """`pythia/` (GPT-NeoX) and `mesh/` (MeSH) beside a text file, cwd = that folder; `bare/`
    is a GPT-NeoX checkpoint saved without a tokenizer."""
    make_tiny_pythia(tmp_path / "pythia")
    make_tiny_pythia(tmp_path / "bare", seed=1)
    tiny_mesh_model.save_pretrained(tmp_path / "mesh")
    for name in ("pythia", "mesh"):
        char_tokenizer_fast().save_pretrained(tmp_path / name)
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "lines.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in LAMBADA_LINES))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_cli_json_reports_several_models_side_by_side(two_models, capsys):
    args = ["pythia", "mesh", "--data", "text.txt", "--context", "32", "--stride", "16", "--json"]
    code, out, err = invoke(capsys, "eval", *args)
    assert code == 0, err
    report = json.loads(out)  # stdout is the JSON document and nothing else
    assert [r["model"] for r in report["results"]] == ["pythia", "mesh"]
    assert report["data"]["task"] == "perplexity"
    for entry in report["results"]:
        model = load_model(str(two_models / entry["model"]))
        expected = perplexity(model, char_tokenizer_fast(), TEXT, context=32, stride=16)
        assert entry["perplexity"]["nats"] == pytest.approx(expected.nats, rel=1e-6)
        assert entry["perplexity"]["tokens"] == len(TEXT) - 1
        assert entry["perplexity"]["bytes"] == len(TEXT.encode())
    first, second = (r["perplexity"]["perplexity"] for r in report["results"])
    assert first != pytest.approx(second)


def test_cli_lambada_task_on_a_jsonl(two_models, capsys):
    args = ["pythia", "--data", "lines.jsonl", "--task", "lambada", "--limit", "3", "--json"]
    code, out, err = invoke(capsys, "eval", *args)
    assert code == 0, err
    [entry] = json.loads(out)["results"]
    model = load_model(str(two_models / "pythia"))
    expected = lambada(model, char_tokenizer_fast(), LAMBADA_LINES[:3])
    assert entry["lambada"]["count"] == 3
    assert entry["lambada"]["perplexity"] == pytest.approx(expected.perplexity, rel=1e-5)
    assert entry["lambada"]["accuracy"] == expected.accuracy


def test_cli_tokenizer_option_serves_a_bare_checkpoint(two_models, capsys):
    code, out, err = invoke(capsys, "eval", "bare", "--tokenizer", "pythia", "--data", "text.txt", "--json")
    assert code == 0, err
    assert json.loads(out)["results"][0]["perplexity"]["tokens"] == len(TEXT) - 1


def test_cli_prints_one_table_with_both_models(two_models, capsys):
    code, out, _ = invoke(capsys, "eval", "pythia", "mesh", "--data", "text.txt", "--context", "32")
    assert code == 0
    assert "Perplexity on text.txt (context 32, stride 16)" in out
    assert "pythia" in out and "mesh" in out and "ppl vs first" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing-model", "--data", "text.txt"], "model directory missing-model does not exist"),
        (["pythia", "--data", "absent.txt"], "data file not found: absent.txt"),
        (["pythia", "--data", "notext.jsonl", "--task", "lambada"], 'line 1 has no string "text" field'),
        (["pythia", "--data", "text.txt", "--context", "8", "--stride", "9"], "cannot exceed --context"),
        (["pythia", "bare", "--data", "text.txt"], "no tokenizer files in bare; pass --tokenizer DIR"),
    ],
)
def test_cli_bad_input_is_one_line_without_traceback(two_models, capsys, args, message):
    (two_models / "notext.jsonl").write_text('{"title": "x"}\n')
    code, out, err = invoke(capsys, "eval", *args)
    assert code == 1
    assert out == ""
    assert message in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_tasks_without_lm_eval_says_how_to_install(two_models, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    code, _, err = invoke(capsys, "eval", "pythia", "--tasks", "lambada_openai")
    assert code == 1
    assert "pip install 'mesh-convert[eval]'" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------- lm-eval (optional)

LM_EVAL_TASK = """\
task: lambada_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.mark.parametrize("adds_bos", [False, True], ids=["no-bos", "bos"])
def test_lm_eval_local_task_agrees_with_our_lambada(tmp_path, loaded, monkeypatch, adds_bos):
    """lm-eval's own lambada_openai recipe over a local jsonl (offline) must give the numbers
    `lambada()` gives, with a tokenizer that adds a BOS token too. The model is nudged to
    always predict a space, so that the lines ending in spaces are answered right and accuracy
    is not trivially 0."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    model, tokenizer = loaded
    if adds_bos:
        tokenizer = bos_char_tokenizer()
    with torch.no_grad():
        bias = model.gpt_neox.final_layer_norm.bias
        bias.copy_(torch.randn_like(bias))
        model.get_output_embeddings().weight[ID[" "]] = bias
    lines = LAMBADA_LINES[:3] + ["trailing spaces win   ", "so  does   this   "]
    (tmp_path / "lines.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "lambada_local.yaml").write_text(LM_EVAL_TASK.format(data=tmp_path / "lines.jsonl"))

    ours = lambada(model, tokenizer, lines)
    theirs = lm_eval_tasks(model, tokenizer, ["lambada_local"], include_path=tmp_path / "tasks")["lambada_local"]
    assert ours.accuracy == 0.4  # the two all-space targets
    assert theirs["acc"] == ours.accuracy
    assert theirs["perplexity"] == pytest.approx(ours.perplexity, rel=1e-4)
