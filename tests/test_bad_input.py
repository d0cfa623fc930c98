"""Bad input as a new user gives it: each failure found in issue 11, and for every command each malformed option,
file and path. Every one ends in a clean exit (code 1 or 2), no traceback, and a message naming the problem and
the fix, before any slow step (nothing loads, no run directory appears)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import RECORDS, char_tokenizer, save_tiny_llm, shared_path, tiny_bert, tiny_llama
from typer.testing import CliRunner

import nora
from nora.cli import app
from nora.errors import AdapterError
from nora.training import TrainConfig, train
from nora.training.data import encode_classification, load_records

BOX = re.compile(r"[│╭╮╰╯─]")
ENV = {"COLUMNS": "250", "NO_COLOR": "1"}


def refused(args: list[str], *patterns: str, env: dict[str, str] | None = None) -> str:
    """Run `nora ARGS`: it must fail cleanly (exit 1 or 2, no traceback) with a message matching every pattern."""
    result = CliRunner().invoke(app, [str(a) for a in args], env={**ENV, **(env or {})})
    text = " ".join(BOX.sub(" ", result.output).split())
    assert result.exit_code in (1, 2), f"exit {result.exit_code}: {text}"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output, text
    for pattern in patterns:
        assert re.search(pattern, text), f"{pattern!r} not in: {text}"
    return text


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory) -> Path:
    return save_tiny_llm(tmp_path_factory.mktemp("base") / "llm")


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> Path:
    """A tiny BERT sequence classifier with a real tokenizer, saved as a model directory."""
    from transformers import BertConfig, BertForSequenceClassification

    directory = tmp_path_factory.mktemp("base") / "bert"
    tokenizer = char_tokenizer(directory)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    BertForSequenceClassification(cfg).save_pretrained(directory)
    return directory


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.json"
    path.write_text(json.dumps(RECORDS))
    return path


def train_args(model: Path, data: Path, out: Path, *extra: object) -> list[object]:
    return ["train", "--model", model, "--data", data, "-o", out, "--no-progress", "--no-plot", *extra]


# ---- the CLI matrix: `nora train` options --------------------------------------------------------------------
TRAIN_OPTIONS = [
    (["--learning-rate", "-1"], r"learning_rate=-1.0 must be a positive number"),
    (["--learning-rate", "0"], r"learning_rate=0.0 must be a positive number .* default 0.002"),
    (["--rank", "-4"], r"r=-4 is not a rank: give a whole number ≥ 1"),
    (["--rank", "0"], r"r=0 is not a rank"),
    (["--rank", "1.5"], r"r=1.5 is not a rank"),
    (["--inner-rank", "0"], r"inner_r=0 must be a positive rank"),
    (["--rank", "4", "--inner-rank", "8"], r"inner_r=8 is larger than the outer rank r=4"),
    (["--batch-size", "0"], r"batch_size=0 must be at least 1"),
    (["--grad-accum", "0"], r"grad_accum=0 must be at least 1"),
    (["--max-steps", "0"], r"max_steps=0 must be at least 1"),
    (["--epochs", "0"], r"epochs=0.0 must be positive"),
    (["--warmup-ratio", "1.5"], r"warmup_ratio=1.5 must lie in \[0, 1\)"),
    (["--warmup-steps", "-3"], r"warmup_steps=-3 must be 0 or more"),
    (["--weight-decay", "-1"], r"weight_decay=-1.0 must be 0 or a positive number"),
    (["--max-grad-norm", "-1"], r"max_grad_norm=-1.0 must be positive"),
    (["--eval-fraction", "1"], r"eval_fraction=1.0 must lie in \[0, 1\)"),
    (["--seed", "-1"], r"seed=-1 must lie in \[0, 2\^32\)"),
    (["--max-length", "0"], r"max_length=0 must be at least 1"),
    (["--eval-steps", "0"], r"eval_steps=0 must be at least 1"),
    (["--save-steps", "0"], r"save_steps=0 must be at least 1"),
    (["--max-examples", "0"], r"max_examples=0 must be at least 1"),
    (["--dropout", "1.5"], r"dropout=1.5 must lie in \[0, 1\)"),
    (["--method", "nosuch"], r"method='nosuch': choose one of \['dora', 'head-only', 'lora'"),
    (["--task", "nosuch"], r"task='nosuch': choose one of"),
    (["--precision", "fp8"], r"precision='fp8': choose one of"),
    (["--lr-scheduler", "wavy"], r"lr_scheduler='wavy': choose one of"),
    (["--adapter-option", "inner"], r"--adapter-option 'inner': write KEY=VALUE"),
    (["--adapter-option", "nosuch=1"], r"adapter options \['nosuch'\] are not fields of NoraConfig"),
    (["--adapter-option", "inner=sideways"], r"inner='sideways': use 'serial'"),
    (["--resume", "/nope/checkpoint-1"], r"--resume /nope/checkpoint-1: no such checkpoint directory"),
    (["--eval-tasks", "nosuch"], r"unknown task 'nosuch'"),
    (["--labels", "a,b"], r"labels fix a classifier's label set: they need --task seq-cls"),
    (["--eval-fraction", "0.2", "--eval-data", "x.json"], r"give eval_data or eval_fraction, not both"),
    (["--gguf-file", "model.gguf"], r"holds no GGUF file 'model.gguf'"),
]


@pytest.mark.bad_input("train", "malformed")
@pytest.mark.parametrize(("extra", "message"), TRAIN_OPTIONS, ids=[" ".join(o) for o, _ in TRAIN_OPTIONS])
def test_train_refuses_each_bad_option_before_loading(llm_dir, data_file, tmp_path, extra, message):
    out = tmp_path / "run"
    start = time.perf_counter()
    refused(train_args(llm_dir, data_file, out, *extra), message)
    assert not out.exists(), "a refused run must not create its output directory"
    assert time.perf_counter() - start < 30


@pytest.mark.bad_input("train", "missing")
def test_train_refuses_bad_model_paths_at_once(llm_dir, data_file, tmp_path):
    """A missing local path fails at once naming it; a hub name offline says it cannot be fetched and how to point
    at a local copy (transformers alone retried for ~50 s, then printed a 100-line traceback)."""
    from nora.pretrained import hub_reachable

    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.gguf").write_text("x")
    cases = [
        ("./no-such-model", r"--model ./no-such-model: no such directory"),
        (tmp_path / "missing" / "model", r"no such directory"),
        (tmp_path / "empty", r"holds no config.json, so it is not a transformers model directory"),
        (tmp_path / "weights.gguf", r"weights.gguf is not a GGUF file \(it does not start with GGUF\); check the path"),
        ("bad name!!", r"neither an existing directory nor a hub id like 'owner/name'"),
    ]
    for model, message in cases:
        start = time.perf_counter()
        refused(train_args(model, data_file, tmp_path / "run"), message)
        assert time.perf_counter() - start < 15
    hub_reachable.cache_clear()
    try:
        start = time.perf_counter()
        refused(
            train_args("nosuch-owner/nosuch-model", data_file, tmp_path / "run"),
            r"not a local directory, not in the Hugging Face cache, and the hub cannot be reached",
            r"hf download nosuch-owner/nosuch-model --local-dir DIR",
            env={"HF_HUB_OFFLINE": "1"},
        )
        assert time.perf_counter() - start < 15
    finally:
        hub_reachable.cache_clear()


@pytest.mark.bad_input("train", "missing")
@pytest.mark.bad_input("train", "malformed")
def test_train_refuses_bad_config_files(llm_dir, data_file, tmp_path):
    cases = {
        "missing.yaml": (None, r"config file .*missing.yaml does not exist"),
        "bad.yaml": ("model: [unclosed", r"config file .*bad.yaml is not valid YAML"),
        "list.yaml": ("- a\n- b\n", r"must hold a mapping of option: value, not list"),
        "type.yaml": ("learning_rate: fast\n", r"option learning_rate='fast' must be float \| None"),
        "unknown.yaml": (
            "learnign_rate: 1e-3\n",
            r"unknown training option 'learnign_rate' \(did you mean 'learning_rate'\?\)",
        ),
        "adapter.yaml": ("adapter: 5\n", r"option adapter=5 must be dict"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        refused(train_args(llm_dir, data_file, tmp_path / "run", "--config", path), message)
    # YAML 1.1 reads 1e-3 as a string: it is still the number the user meant
    path = tmp_path / "good.yaml"
    path.write_text("learning_rate: 1e-3\nmax_steps: '3'\n")
    from nora.cli.train import build_config

    config = build_config(path, {})
    assert config.learning_rate == 1e-3 and config.max_steps == 3


@pytest.mark.bad_input("train", "unwritable")
def test_train_refuses_occupied_or_unusable_output_dirs(llm_dir, data_file, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    refused(train_args(llm_dir, data_file, blocker), r"output dir .*a-file is a file")
    occupied = tmp_path / "old-run"
    occupied.mkdir()
    (occupied / "summary.json").write_text("{}")
    refused(train_args(llm_dir, data_file, occupied), r"already holds files; pass --resume .* --overwrite")
    bad_data = tmp_path / "bad.json"
    bad_data.write_text("[{")
    refused(train_args(llm_dir, bad_data, occupied, "--overwrite"), r"bad.json:1:3: not valid JSON")
    assert (occupied / "summary.json").read_text() == "{}", "--overwrite must not delete a run before the data is read"
    assert blocker.read_text() == "keep me"


# ---- data files ----------------------------------------------------------------------------------------------
DATA_FILES = [
    ("empty.json", "", r"empty.json is empty; give a file with at least one record"),
    ("blank.jsonl", "\n\n", r"blank.jsonl is empty"),
    ("list.json", "[]", r"list.json is an empty list"),
    ("cut.json", '[{"instruction": "x", "output": ', r"cut.json:1:33: not valid JSON \(Expecting value\)"),
    ("lines.json", '{"a": 1}\n{"a": 2}\n', r"lines.json:2:1: not valid JSON .*one object per line is .jsonl"),
    ("object.json", '{"instruction": "x"}', r"holds a JSON dict; training data is a JSON list of records"),
    ("scalar.json", '[{"instruction": "a", "output": "b"}, 7]', r"scalar.json record 1: a int, not an object"),
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a",\n', r"bad.jsonl:2:\d+: not valid JSON"),
    ("list.jsonl", '{"instruction": "a", "output": "b"}\n[1]\n', r"list.jsonl:2: a JSON list, not an object"),
    ("latin1.json", b'[{"instruction": "caf\xe9", "output": "x"}]', r"latin1.json:1: byte \d+ is not UTF-8 .*as UTF-8"),
    ("quote.csv", 'text,label\n"open quote,1\n', r"quote.csv:\d+: not valid CSV"),
    ("short.csv", "text,label\nhello\n", r"short.csv:2: 1 comma-separated fields where the header has 2"),
    ("long.tsv", "text\tlabel\na\tb\tc\n", r"long.tsv:2: 3 tab-separated fields where the header has 2 .*quotes"),
    ("header.tsv", "text\ttext\nx\ty\n", r"header.tsv:1: the header row .* empty or repeated column names"),
    ("only-header.csv", "text,label\n", r"only-header.csv holds a header but no records"),
    ("data.xml", "<a/>", r"data.xml: unknown type '.xml'; use one of .json .jsonl .csv .tsv .txt"),
    ("columns.jsonl", '{"question": "q", "answer": "a"}\n', r"causal-LM training needs `instruction` \+ `output`"),
    ("gap.json", json.dumps([RECORDS[0], {"instruction": "y"}]), r"gap.json record 1: no value in column 'output'"),
]


@pytest.mark.bad_input("train", "malformed")
@pytest.mark.parametrize(("name", "content", "message"), DATA_FILES, ids=[n for n, _, _ in DATA_FILES])
def test_each_malformed_data_file_is_named_with_where_and_why(llm_dir, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    refused(train_args(llm_dir, path, tmp_path / "run"), message)
    assert not (tmp_path / "run").exists()


@pytest.mark.bad_input("train", "missing")
def test_missing_data_paths(llm_dir, tmp_path):
    refused(train_args(llm_dir, tmp_path / "missing.json", tmp_path / "run"), r"missing.json does not exist")
    refused(train_args(llm_dir, "./nope/train.json", tmp_path / "run"), r"data file ./nope/train.json does not exist")
    twice = tmp_path / "twice"
    twice.mkdir()
    (twice / "train.json").write_text(json.dumps(RECORDS))
    (twice / "train.jsonl").write_text("")
    refused(train_args(llm_dir, twice, tmp_path / "run"), r"holds \['train.json', 'train.jsonl'\]; name the file")


# ---- GLUE TSV files: read as GLUE does, by one reader for training and evaluation ------------------------------
MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"


def test_tsv_quotes_are_characters_not_quoting(tmp_path):
    """A stray `"` swallowed the tab after it (the row's second sentence slid into the first and its label became
    None, learned as a third class). Read as GLUE reads it, the row keeps its five fields."""
    path = tmp_path / "MRPC" / "train.tsv"
    path.parent.mkdir()
    path.write_text(
        MRPC_HEADER
        + '1\t1\t2\tHe said "no way.\tHe refused.\n'
        + '0\t3\t4\tThe sky is green.\tThe sea is "blue" today.\n'
    )
    rows = load_records(str(path))
    assert [r["#1 String"] for r in rows] == ['He said "no way.', "The sky is green."]
    assert [r["Quality"] for r in rows] == ["1", "0"]
    assert [r.where for r in rows] == [f"{path}:2", f"{path}:3"]
    from nora.evaluation import load_classification, resolve_tasks

    (spec,) = resolve_tasks([path], None)
    examples = load_classification(spec)
    assert [e.texts for e in examples] == [(r["#1 String"], r["#2 String"]) for r in rows]
    assert [e.label for e in examples] == [1, 0]


def test_real_glue_files_parse_whole_with_binary_labels():
    """The shared GLUE files as distributed: every row whole, two classes, the same rows for training and eval."""
    from nora.evaluation import load_classification, resolve_tasks

    for task, count, label in (("MRPC", 3667, "Quality"), ("SST-2", 67349, "label"), ("CoLA", 8551, "label")):
        path = shared_path("data", "glue", task, "train.tsv")
        rows = load_records(str(path))
        assert len(rows) == count, task
        assert {r[label] for r in rows} == {"0", "1"}, task
        (spec,) = resolve_tasks([path], None)
        examples = load_classification(spec)
        assert [e.label for e in examples] == [int(r[label]) for r in rows]
    mrpc = load_records(str(shared_path("data", "glue", "MRPC", "train.tsv")))
    assert sum('"' in r["#1 String"] + r["#2 String"] for r in mrpc) > 0  # the quotes that broke the CSV reader


@pytest.mark.bad_input("train", "malformed")
def test_classification_labels_are_never_guessed(llm_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llm_dir)
    empty = tmp_path / "empty.tsv"
    empty.write_text("sentence\tlabel\nfine\t1\nno label here\t\n")
    with pytest.raises(AdapterError, match=r"empty.tsv:3: no label in column 'label'.*fix or remove the row"):
        encode_classification(load_records(str(empty)), tok, 32, None, str(empty))
    missing = [{"text": "a", "label": "x"}, {"text": "b"}]
    with pytest.raises(AdapterError, match=r"no label in column 'label'"):
        encode_classification(missing, tok, 32, None, "rows")
    stsb = tmp_path / "STS-B" / "train.tsv"
    stsb.parent.mkdir()
    stsb.write_text(
        "index\tgenre\tsentence1\tsentence2\tscore\n"
        '0\tmain\tA "plane" is taking off.\tAn air plane is taking off.\t5.000\n'
        "1\tmain\tA man plays a flute.\tA man plays a big flute.\t3.800\n"
    )
    rows = load_records(str(stsb))  # parses (it failed with "Error tokenizing data")
    assert [r["score"] for r in rows] == ["5.000", "3.800"]
    with pytest.raises(AdapterError, match=r"train.tsv:3: label '3.800' in column 'score' .* regression target"):
        encode_classification(rows, tok, 32, None, str(stsb), label_column="score")


def test_every_run_prints_its_label_set(classifier_dir, tmp_path, capsys):
    path = tmp_path / "train.csv"
    path.write_text("text,label\n" + "".join(f"Add {i} and two.,{'pos' if i % 2 else 'neg'}\n" for i in range(16)))
    cfg = TrainConfig(
        model=str(classifier_dir), task="seq-cls", data=str(path), output_dir=str(tmp_path / "r"), method="lora",
        adapter={"r": 2}, max_steps=1, batch_size=8, progress=False, plot=False,
    )  # fmt: skip
    train(cfg)
    assert "labels: 2 classes, ids 0..1 = ['neg', 'pos']" in capsys.readouterr().out


# ---- `nora eval`, `nora serve`, `nora demo`, `nora plot`, `nora convert` --------------------------------------
@pytest.mark.bad_input("eval", "missing")
@pytest.mark.bad_input("eval", "malformed")
def test_eval_refuses_bad_options_before_loading(llm_dir, tmp_path):
    tasks = tmp_path / "boolq.json"
    tasks.write_text(json.dumps([{"instruction": "Is it? Answer format: true/false", "input": "", "answer": "true"}]))
    base = [llm_dir, "--tasks", tasks]
    cases = [
        ([*base, "--protocol", "bogus"], r"--protocol bogus: not a protocol; choose from loglik, loglik-label"),
        ([*base, "--limit", "0"], r"Invalid value for '--limit'"),
        ([*base, "--batch-size", "0"], r"Invalid value for '--batch-size'"),
        ([*base, "--num-beams", "0"], r"Invalid value for '--num-beams'"),
        ([*base, "--max-new-tokens", "0"], r"Invalid value for '--max-new-tokens'"),
        ([*base, "--threads", "0"], r"Invalid value for '--threads'"),
        ([*base, "--dtype", "float8"], r"--dtype 'float8': choose one of"),
        ([*base, "--device", "tpu:x"], r"--device 'tpu:x' is not a device; use auto, cpu, cuda or cuda:N"),
        ([*base, "--output", tmp_path], r"--output .* is a directory; give a file path"),
        ([*base, "--adapter", tmp_path / "nope"], r"--adapter .*nope: no such directory"),
        ([*base, "--adapter", tmp_path], r"has no adapter_config.json: not an adapter directory"),
        ([tmp_path / "nope", "--tasks", tasks], r"MODEL .*nope: no such directory"),
        ([llm_dir, "--tasks", "nosuch"], r"unknown task 'nosuch'"),
        ([llm_dir, "--tasks", tmp_path / "missing.json"], r"unknown task"),
    ]
    if not torch.cuda.is_available():
        cases.append(([*base, "--device", "cuda"], r"--device cuda: this machine has no CUDA device"))
    for args, message in cases:
        refused(["eval", *args], message)


@pytest.mark.bad_input("serve", "missing")
@pytest.mark.bad_input("serve", "malformed")
def test_serve_refuses_bad_options_before_loading(llm_dir, tmp_path):
    base = ["serve", "--base", llm_dir]
    cases = [
        (["serve", "--base", tmp_path / "nope"], r"--base .*nope: no such directory"),
        ([*base, "--port", "70000"], r"Invalid value for '--port'"),
        ([*base, "--max-batch-size", "0"], r"Invalid value for '--max-batch-size'"),
        ([*base, "--max-queue", "0"], r"Invalid value for '--max-queue'"),
        ([*base, "--batch-window-ms", "-1"], r"Invalid value for '--batch-window-ms'"),
        ([*base, "--reserve-adapters", "-5"], r"Invalid value for '--reserve-adapters'"),
        ([*base, "--dtype", "float8"], r"--dtype 'float8': choose one of"),
        ([*base, "--device", "tpu:x"], r"--device 'tpu:x' is not a device"),
        ([*base, "--log-level", "loud"], r"'loud': choose one of critical, error"),
        ([*base, "--adapter", "nameonly"], r"--adapter 'nameonly': write NAME=PATH"),
        ([*base, "--adapter", f"a={tmp_path / 'nope'}"], r"nope is not a directory"),
        ([*base, "--adapter-root", tmp_path / "nope"], r"is not a directory"),
        ([*base, "--chat-template", tmp_path / "nope.jinja"], r"Invalid value for '--chat-template'"),
        ([*base, "--tokenizer", tmp_path / "nope"], r"--tokenizer .*nope: no such directory"),
    ]
    for args, message in cases:
        refused(args, message)


@pytest.mark.bad_input("demo", "malformed")
@pytest.mark.bad_input("plot", "missing")
@pytest.mark.bad_input("plot", "malformed")
@pytest.mark.bad_input("convert", "missing")
@pytest.mark.bad_input("convert", "malformed")
def test_demo_plot_and_convert_refuse_bad_input(tmp_path):
    refused(["demo", "--steps", "0", "-o", tmp_path / "d"], r"Invalid value for '--steps'")
    refused(["plot", tmp_path / "nope"], r"run directory .*nope does not exist")
    refused(["plot", tmp_path], r"log.jsonl does not exist: not a training run directory")
    refused(["plot", tmp_path, "--layer", "x"], r"--layer chooses layers for --spectrum")
    refused(
        ["convert", "llama2c", tmp_path / "nope.bin", "-o", tmp_path / "c"], r"checkpoint .*nope.bin does not exist"
    )
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 10)
    refused(["convert", "llama2c", junk, "-o", tmp_path / "c"], r"junk.bin")


# ---- adapters: deleting, loading, messages -------------------------------------------------------------------
def test_delete_adapter_with_modules_to_save():
    """It raised `TypeError: ModuleDict.pop() takes 2 positional arguments` for every classifier adapter."""
    model = nora.get_peft_model(tiny_bert(num_labels=2), nora.LoraConfig(r=2, modules_to_save=["classifier"]))
    model.add_adapter("other", nora.LoraConfig(r=2, modules_to_save=["classifier"]))
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]
    (copy,) = model.trainable_copies().values()
    assert list(copy.copies) == ["default"] and copy.active == "default"
    model.delete_adapter("default")
    assert not model.peft_config and copy.current() is copy.original


def test_classifier_adapter_for_another_label_count_names_the_shape(tmp_path):
    """The rollback of a failed load ran delete_adapter, whose TypeError hid the real error."""
    four = nora.get_peft_model(tiny_bert(num_labels=4), nora.LoraConfig(r=2, modules_to_save=["classifier"]))
    four.save_pretrained(tmp_path / "four")
    with pytest.raises(AdapterError, match=r"classifier.weight is \[4, 32\] in the file but \[2, 32\] here"):
        nora.AdaptedModel.from_pretrained(tiny_bert(num_labels=2), tmp_path / "four")
    two = nora.get_peft_model(tiny_bert(num_labels=2), nora.LoraConfig(r=2))
    with pytest.raises(AdapterError, match=r"\[4, 32\] in the file but \[2, 32\] here"):
        two.load_adapter(tmp_path / "four", "four")
    assert list(two.peft_config) == ["default"]


def test_adapter_directory_messages_say_what_is_wrong(tmp_path):
    model = nora.get_peft_model(tiny_llama(), nora.NoraConfig(r=8, inner_r=2))
    model.add_adapter("other", nora.NoraConfig(r=8, inner_r=2))
    model.save_pretrained(tmp_path / "saved", selected_adapters=["other"])
    with pytest.raises(AdapterError, match=r"adapter directory .*missing does not exist; check the path"):
        nora.AdaptedModel.from_pretrained(tiny_llama(), tmp_path / "missing")
    with pytest.raises(AdapterError, match=r"adapters in sub-directories \['other'\] .* load .*saved/other"):
        nora.AdaptedModel.from_pretrained(tiny_llama(), tmp_path / "saved")
    nora.AdaptedModel.from_pretrained(tiny_llama(), tmp_path / "saved" / "other")  # where the message points
    model.save_pretrained(tmp_path / "edited")
    cfg_path = tmp_path / "edited" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    layer = next(iter(cfg["nora"]["layers"]))
    cfg["nora"]["layers"][layer]["r"] = 4
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=r"adapter_config.json was edited or damaged after saving"):
        nora.AdaptedModel.from_pretrained(tiny_llama(), tmp_path / "edited")
    with pytest.raises(AdapterError, match=r"made for a different base model"):
        nora.AdaptedModel.from_pretrained(tiny_llama(seed=1), tmp_path / "saved" / "other")


def test_default_ranks_fit_a_model_narrower_than_them(stories260k_dir):
    """NoRA's default outer rank (128) was refused by the 260K TinyStories Llama (width 64)."""
    from transformers import AutoModelForCausalLM

    for method in ("nora", "svfit", "lora-xs", "lora"):
        config = TrainConfig(model=str(stories260k_dir), method=method).adapter_config()
        base = AutoModelForCausalLM.from_pretrained(stories260k_dir)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = nora.get_peft_model(base, config)
        widths = {n: min(layer.shape) for n, layer in model.layers().items()}
        ranks = {n: layer.adapters["default"].r for n, layer in model.layers().items()}
        assert ranks == {n: min(config.r, w) for n, w in widths.items()}, method
        clamped = any(config.r > w for w in widths.values())
        assert clamped == any("takes its min(d, k)" in str(w.message) for w in caught), method
    with pytest.raises(AdapterError, match=r"rank r=128 is larger than min\(d, k\)"):
        nora.get_peft_model(AutoModelForCausalLM.from_pretrained(stories260k_dir), nora.NoraConfig(r=128))


# ---- what a run records ----------------------------------------------------------------------------------------
def test_train_config_records_the_values_used(llm_dir, data_file, tmp_path):
    """learning_rate was recorded as null when the method's default was used."""
    out = tmp_path / "run"
    cfg = TrainConfig(
        model=str(llm_dir), data=str(data_file), output_dir=str(out), method="lora", max_steps=2, batch_size=8,
        progress=False, plot=False,
    )  # fmt: skip
    train(cfg)
    recorded = json.loads((out / "train_config.json").read_text())
    assert recorded["learning_rate"] == 5e-4
    assert recorded["adapter"]["r"] == 16 and recorded["adapter"]["alpha"] == 32.0
    assert recorded["adapter"]["target_modules"] == "all-linear" and recorded["adapter"]["dropout"] == 0.0
    from nora.cli.train import build_config

    again = build_config(out / "train_config.json", {"output_dir": str(tmp_path / "again")})  # `--config` it
    assert again.lr == 5e-4 and again.adapter_config() == cfg.adapter_config()
    assert again.resolved() == {**recorded, "output_dir": str(tmp_path / "again")}


def test_summary_after_resume_covers_the_whole_run(llm_dir, data_file, tmp_path):
    out = tmp_path / "run"
    cfg = dict(
        model=str(llm_dir), data=str(data_file), eval_data=str(data_file), output_dir=str(out), method="nora",
        adapter={"r": 8, "inner_r": 2}, max_steps=4, save_steps=2, save_total_limit=3, batch_size=8,
        progress=False, plot=False,
    )  # fmt: skip
    whole = train(TrainConfig(**cfg)).summary
    checkpoint = out / "checkpoints" / "checkpoint-00000002"
    before = json.loads((checkpoint / "state.json").read_text())["progress"]
    shutil.rmtree(out / "adapter")
    resumed = train(TrainConfig(**cfg, resume=str(checkpoint))).summary
    assert resumed["steps"] == 4 and resumed["tokens_seen"] == whole["tokens_seen"]
    assert resumed["first_loss"] == pytest.approx(whole["first_loss"], abs=1e-6)
    assert resumed["initial_eval_loss"] == pytest.approx(whole["initial_eval_loss"], abs=1e-6)
    assert resumed["wall_time_s"] > before["wall_time_s"] > 0


def test_written_files_have_the_permissions_of_a_plain_write(llm_dir, data_file, tmp_path):
    """Atomic writes left every file 0600 and every directory 0700, whatever the umask."""
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        cfg = TrainConfig(
            model=str(llm_dir), data=str(data_file), eval_data=str(data_file), output_dir=str(out), max_steps=2,
            save_steps=1, batch_size=8, adapter={"r": 8, "inner_r": 2}, progress=False, plot=True,
        )  # fmt: skip
        result = train(cfg)
        result.model.save_pretrained(tmp_path / "saved")
        from nora.evaluation.report import write_results

        write_results({"a": 1}, tmp_path / "results.json")
        files = [p for p in [*out.rglob("*"), *(tmp_path / "saved").rglob("*"), tmp_path / "results.json"]]
        assert any(p.name == "curves.png" for p in files) and any(p.name == "summary.json" for p in files)
        assert any(p.parent.name.startswith("checkpoint-") for p in files)
        for path in files:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))
    finally:
        os.umask(old)


def test_no_deprecated_cache_argument_warnings(llm_dir):
    """transformers warned on every eval/serve run that `past_key_values` as passed goes in 5.40."""
    import logging

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nora.evaluation.loglik import LoglikRequest, continuation_logliks

    model = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    tok = AutoTokenizer.from_pretrained(llm_dir)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("transformers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            requests = [LoglikRequest("Add one and two.", ("3 and four", "blue sky"))]
            continuation_logliks(model, tok, requests, batch_size=2)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    said = [str(w.message) for w in caught] + [r.getMessage() for r in records]
    assert not [s for s in said if "past_key_values" in s], said


def test_svd_settings_are_bounded():
    """A crafted config with niter=2**62 would spin for ever; a negative oversample crashed the solver."""
    for fields in ({"niter": 2**62}, {"niter": -1}, {"oversample": -3}):
        with pytest.raises(AdapterError, match=r"the randomized solver takes 0..64 power iterations"):
            nora.NoraConfig(r=8, inner_r=2, **fields)
