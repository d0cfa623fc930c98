"""Training: every method learns, prompt masking, resume after kill -9, 2-process DDP, YAML = CLI, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import RECORDS, ROOT, save_tiny_llm
from safetensors.torch import load_file

from nora.errors import AdapterError
from nora.prompts import format_prompt
from nora.training import TrainConfig, TrainingError, train
from nora.training.data import IGNORE, encode_causal


@pytest.fixture
def llm_dir(tmp_path: Path) -> Path:
    """A tiny Llama and its tokenizer saved as a model directory, like a hub checkout."""
    return save_tiny_llm(tmp_path / "base")


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.json"
    path.write_text(json.dumps(RECORDS))
    return path


def config(llm_dir: Path, data_file: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(
        model=str(llm_dir), data=str(data_file), eval_data=str(data_file), output_dir=str(out), batch_size=8,
        max_steps=30, logging_steps=5, progress=False, plot=False, adapter={"r": 8, "inner_r": 4},
        method="nora",
    )  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


ADAPTERS = {
    "nora": {},  # its defaults: r = 128 lowered to each layer's min(d, k), r' = r/4, placement "none"
    "svfit": {"r": 32},
    "lora": {"r": 4},
    "pissa": {"r": 4},
    "lora-xs": {"r": 8},
    "dora": {"r": 4},
}


@pytest.mark.parametrize("method", sorted(ADAPTERS))
def test_every_method_lowers_the_loss_on_real_weights(stories260k_dir, data_file, tmp_path, method):
    """The 260K TinyStories Llama (real pretrained weights) learns the instruction data with each method's
    default learning rate."""
    cfg = config(stories260k_dir, data_file, tmp_path / method, method=method, adapter=ADAPTERS[method], max_steps=40)
    result = train(cfg)
    s = result.summary
    assert s["eval_loss"] < 0.8 * s["initial_eval_loss"], (s["initial_eval_loss"], s["eval_loss"])
    assert (result.adapter_dir / "adapter_config.json").is_file()
    assert s["trainable_params"] > 0 and s["adapter_bytes"] > 0 and s["steps"] == 40
    lines = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == [5, 10, 15, 20, 25, 30, 35, 40]


def test_prompt_masking_masks_exactly_the_prompt(llm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llm_dir)
    rows = [RECORDS[7], RECORDS[-1]]
    encoded = encode_causal(rows, tok, max_length=512).examples
    for row, ex in zip(rows, encoded, strict=True):
        prompt_text = format_prompt(row["instruction"], row["input"])
        prompt = [tok.bos_token_id] + tok(prompt_text, add_special_tokens=False)["input_ids"]
        whole = [tok.bos_token_id] + tok(prompt_text + row["output"], add_special_tokens=False)["input_ids"]
        assert ex["input_ids"] == whole + [tok.eos_token_id]
        assert ex["labels"] == [IGNORE] * len(prompt) + ex["input_ids"][len(prompt) :]
        assert ex["labels"][len(prompt)] != IGNORE
    unmasked = encode_causal(rows, tok, max_length=512, mask_prompt=False).examples
    assert unmasked[0]["labels"] == unmasked[0]["input_ids"]


def test_training_tokens_are_those_inference_and_scoring_see_with_a_sentencepiece_tokenizer(stories260k_dir):
    """The llama2.c tokenizer adds a dummy-prefix `▁`: tokenised alone, "the" is `▁the`, but after the prompt's
    newline it is not. Training must learn the tokens the log-likelihood protocol scores."""
    from transformers import AutoTokenizer

    from nora.evaluation.loglik import LoglikRequest, _encode

    tok = AutoTokenizer.from_pretrained(stories260k_dir)
    row = {"instruction": "Pick the right word", "input": "", "output": "the answer is one"}
    (ex,) = encode_causal([row], tok, max_length=512).examples
    prompt = format_prompt(row["instruction"], row["input"])
    scored = _encode(tok, LoglikRequest(prompt, (row["output"],)), max_length=512)
    assert ex["input_ids"][:-1] == scored.context + scored.continuations[0]
    learned = [t for t in ex["labels"] if t != IGNORE][:-1]  # without EOS
    assert learned == scored.continuations[0][-len(learned) :]  # the scored tokens (after the prompt's newline)
    alone = tok(row["output"], add_special_tokens=False)["input_ids"]
    assert learned[0] != alone[0] and tok.convert_ids_to_tokens(alone[0]).startswith("▁")


def test_truncation_is_counted_and_overlong_prompts_dropped(llm_dir, data_file, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llm_dir)
    prompt_len = len(tok(format_prompt(RECORDS[0]["instruction"]), add_special_tokens=False)["input_ids"]) + 1
    enc = encode_causal(RECORDS[:3], tok, max_length=prompt_len + 1)
    assert enc.truncated == 3 and enc.dropped == 0
    assert all(len(e["input_ids"]) == prompt_len + 1 for e in enc.examples)
    assert encode_causal(RECORDS[:3], tok, max_length=prompt_len).dropped == 3
    result = train(config(llm_dir, data_file, tmp_path / "t", max_length=40, max_steps=2))
    assert result.summary["truncated"] > 0


def _awsvd_scales(model) -> dict[str, torch.Tensor]:
    return {n: layer.basis_of(layer.core("default")).scales for n, layer in model.layers().items()}


def test_awsvd_training_measures_its_scales_on_the_first_training_batches(llm_dir, data_file, tmp_path, recwarn):
    """awsvd=True in a training run calibrates on the run's own first batches (not plain SVD with a warning); the
    scales travel in the adapter file, so the saved adapter reproduces the trained model."""
    from transformers import AutoModelForCausalLM

    from nora import AdaptedModel

    adapter = {"r": 8, "inner_r": 4, "awsvd": True}
    runs = {n: train(config(llm_dir, data_file, tmp_path / f"c{n}", adapter=adapter, max_steps=4,
                            calibration_batches=n)) for n in (1, 2)}  # fmt: skip
    assert not [w for w in recwarn if "calibration_data" in str(w.message)]
    one, two = (_awsvd_scales(runs[n].model) for n in (1, 2))
    assert one.keys() == two.keys() and all(s is not None for s in one.values())
    assert any(not torch.equal(one[n], two[n]) for n in one)  # measured on the data: more batches, other scales
    base = AutoModelForCausalLM.from_pretrained(llm_dir)
    loaded = AdaptedModel.from_pretrained(base, runs[2].adapter_dir).eval()
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    trained = runs[2].model.eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)


def _adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _assert_same_adapter(a: Path, b: Path, atol: float = 1e-6) -> None:
    ta, tb = _adapter_tensors(a), _adapter_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=atol, rtol=1e-5, msg=k)


def test_accelerations_train_the_same_adapter_or_fall_back_saying_why(llm_dir, data_file, tmp_path):
    """--gradient-checkpointing (nora's policy) gives the adapter of a plain run; --liger and --compile, where
    CUDA is absent, fall back with a warning and the reason in summary.json."""
    plain = train(config(llm_dir, data_file, tmp_path / "plain", max_steps=6))
    with pytest.warns(UserWarning) as caught:
        fast = train(
            config(
                llm_dir,
                data_file,
                tmp_path / "fast",
                max_steps=6,
                gradient_checkpointing=True,
                liger=True,
                compile=True,
            )  # fmt: skip
        )
    _assert_same_adapter(fast.run_dir, plain.run_dir, atol=1e-5)
    accelerations = fast.summary["accelerations"]
    assert accelerations["gradient_checkpointing"].startswith("on")
    assert set(plain.summary["accelerations"]) == {"lean_activations"}  # nora's default, exact
    if not torch.cuda.is_available():
        assert accelerations["liger"].startswith("off (no CUDA device")
        assert accelerations["compile"].startswith("off (no CUDA device")
        messages = " ".join(str(w.message) for w in caught)
        assert "liger: off" in messages and "compile: off" in messages


def _write_yaml(path: Path, cfg: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def test_resume_after_kill_matches_an_uninterrupted_run(llm_dir, data_file, tmp_path):
    # 12 steps an epoch (48 examples / 4), so the resumed part crosses epochs; the kill comes at the checkpoint a
    # third of the way in, which leaves the run most of its steps to still be going when SIGKILL arrives
    max_steps, save_steps = 24, 4
    kill_at = max_steps // 3 // save_steps * save_steps
    common = dict(
        model=str(llm_dir), data=str(data_file), output_dir=str(tmp_path / "killed"), batch_size=4,
        max_steps=max_steps, save_steps=save_steps, logging_steps=2, progress=False, plot=False, method="nora",
        adapter={"r": 8, "inner_r": 4}, lr_scheduler="cosine", warmup_steps=5, group_by_length=True,
    )  # fmt: skip
    common["adapter"]["dropout"] = 0.1  # exercises the RNG state too (and group_by_length the epoch order)
    yaml_file = _write_yaml(tmp_path / "run.yaml", common)
    proc = subprocess.Popen(
        [sys.executable, "-m", "nora", "train", "--config", str(yaml_file)],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    ckpt_root = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpt_root.is_dir() and any(p.name == f"checkpoint-{kill_at:08d}" for p in ckpt_root.iterdir()):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (tmp_path / "killed" / "adapter").exists()
    # the uninterrupted run trains only now: beside the process, a slow or busy machine could let that one finish
    fresh = train(TrainConfig(**{**common, "output_dir": str(tmp_path / "fresh")}))
    resumed = train(TrainConfig(**{**common, "resume": "latest"}))
    assert resumed.summary["steps"] == max_steps
    _assert_same_adapter(resumed.run_dir, fresh.run_dir)
    steps = [json.loads(line)["step"] for line in (resumed.run_dir / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == max_steps  # no duplicated steps from before the kill


def test_group_by_length_batches_similar_lengths_and_still_takes_every_example_once(llm_dir, tmp_path):
    from nora.training.trainer import Run

    rows = [{"text": "word " * n} for n in [1, 30, 2, 25, 3, 20, 4, 15, 5, 10, 6, 40] * 8]  # 96 examples
    (tmp_path / "lengths.json").write_text(json.dumps(rows))
    runs = {}
    for grouped in (False, True):
        cfg = config(llm_dir, tmp_path / "lengths.json", tmp_path / f"run{grouped}", eval_data=None, batch_size=4,
                     group_by_length=grouped, max_length=64)  # fmt: skip
        runs[grouped] = Run(cfg)
    run = runs[True]
    padded = {}
    for grouped, r in runs.items():
        order = r._epoch_order(0)
        assert sorted(order) == list(range(96))  # every example once an epoch
        widths = [max(len(r.train_examples[i]["input_ids"]) for i in order[s : s + 4]) for s in range(0, 96, 4)]
        padded[grouped] = sum(widths) * 4
    assert padded[True] < 0.7 * padded[False], padded
    assert run._epoch_order(1) != run._epoch_order(0)  # reshuffled each epoch
    again = Run(config(llm_dir, tmp_path / "lengths.json", tmp_path / "again", eval_data=None, batch_size=4,
                       group_by_length=True, max_length=64))  # fmt: skip
    assert again._epoch_order(1) == run._epoch_order(1)  # a function of (seed, epoch): resume continues exactly


def _torchrun(yaml_file: Path) -> None:
    # --standalone: a free port for the rendezvous (a fixed one clashes with any other suite running beside this)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [*cmd, "-m", "nora", "train", "--config", str(yaml_file)], cwd=ROOT, env=env, capture_output=True, timeout=300
    )
    assert run.returncode == 0, run.stderr.decode()[-3000:]


def test_two_process_ddp_matches_single_process(llm_dir, data_file, tmp_path):
    common = dict(
        model=str(llm_dir), data=str(data_file), max_steps=6, logging_steps=1, progress=False, plot=False,
        method="nora", adapter={"r": 8, "inner_r": 4}, grad_accum=2,
    )  # fmt: skip
    _torchrun(_write_yaml(tmp_path / "ddp.yaml", {**common, "batch_size": 2, "output_dir": str(tmp_path / "ddp")}))
    single = train(TrainConfig(**common, batch_size=4, output_dir=str(tmp_path / "single")))
    _assert_same_adapter(tmp_path / "ddp", single.run_dir, atol=1e-5)
    ddp_summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp_summary["processes"] == 2 and ddp_summary["global_batch"] == single.summary["global_batch"] == 8
    assert ddp_summary["final_loss"] == pytest.approx(single.summary["final_loss"], rel=1e-5)


def test_yaml_and_cli_options_agree(tmp_path):
    from nora.cli.train import build_config

    yaml_file = _write_yaml(
        tmp_path / "c.yaml",
        {
            "model": "m", "data": "d.json", "method": "nora", "rank": 64, "inner-rank": 4, "alpha": 32,
            "learning-rate": 1e-3, "batch_size": 2, "grad_accum": 4, "target_modules": ["q_proj", "v_proj"],
            "adapter": {"inner": "out"}, "eval_tasks": "boolq,piqa", "precision": "bf16",
        },
    )  # fmt: skip
    from_yaml = build_config(yaml_file, {})
    from_cli = build_config(
        None,
        dict(
            model="m", data="d.json", method="nora", rank=64, inner_rank=4, alpha=32.0, learning_rate=1e-3,
            batch_size=2, grad_accum=4, target_modules=["q_proj", "v_proj"], adapter_option=["inner=out"],
            eval_tasks="boolq,piqa", precision="bf16",
        ),
    )  # fmt: skip
    assert from_yaml == from_cli
    assert from_cli.adapter_config().inner == "out" and from_cli.adapter_config().r == 64
    override = build_config(yaml_file, {"learning_rate": 5e-4, "rank": 32})
    assert override.lr == 5e-4 and override.adapter["r"] == 32 and override.adapter["inner_r"] == 4


def test_cli_help_documents_the_options():
    from typer.testing import CliRunner

    from nora.cli import app

    out = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    for option in ("--learning-rate", "--grad-accum", "--save-steps", "--resume", "--mask-prompt", "--precision"):
        assert option in out


def test_several_data_files_make_one_mixture(tmp_path):
    from nora.training.data import load_records

    a, b = tmp_path / "a.json", tmp_path / "b.jsonl"
    a.write_text(json.dumps(RECORDS[:3]))
    b.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[3:5]))
    assert load_records(f"{a},{b}") == RECORDS[:5]


def test_bad_input_gives_clear_errors(llm_dir, data_file, tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        train(config(llm_dir, tmp_path / "missing.json", tmp_path / "a"))
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "x", "output": ')
    with pytest.raises(AdapterError, match=r"bad.json:1:33: not valid JSON \(Expecting value\)"):
        train(config(llm_dir, bad, tmp_path / "b"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(AdapterError, match="empty.jsonl is empty"):
        train(config(llm_dir, empty, tmp_path / "c"))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(AdapterError, match="instruction"):
        train(config(llm_dir, wrong, tmp_path / "d", eval_data=None))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(TrainingError, match="cannot write to output dir"):
        train(config(llm_dir, data_file, blocker / "run"))
    with pytest.raises(AdapterError, match="not fields of NoraConfig"):
        config(llm_dir, data_file, tmp_path / "e", adapter={"rank": 4})
    done = train(config(llm_dir, data_file, tmp_path / "f", max_steps=1))
    with pytest.raises(TrainingError, match="already holds files"):
        train(config(llm_dir, data_file, done.run_dir))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(llm_dir, data_file, tmp_path):
    cfg = config(
        llm_dir, data_file, tmp_path / "nan", method="lora", adapter={"r": 4}, learning_rate=1e8, max_grad_norm=None,
        save_steps=1, max_steps=50, eval_data=None, save_total_limit=1,
    )  # fmt: skip
    with pytest.raises(TrainingError, match=r"the loss became (nan|inf).*last good checkpoint is .*checkpoint-"):
        train(cfg)
    kept = list((tmp_path / "nan" / "checkpoints").glob("checkpoint-*"))
    assert len(kept) == 1 and (kept[0] / "state.json").is_file()
    assert not (tmp_path / "nan" / "adapter").exists()


def test_cli_trains_and_prints_the_summary(llm_dir, data_file, tmp_path):
    from typer.testing import CliRunner

    from nora.cli import app

    args = ["train", "--model", str(llm_dir), "--data", str(data_file), "--eval-fraction", "0.25"]
    args += ["--max-steps", "3", "--batch-size", "4", "--rank", "8", "--inner-rank", "2"]
    args += ["--no-progress", "--no-plot", "-o", str(tmp_path / "r")]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "training summary" in result.output and "trainable params" in result.output and "eval_loss" in result.output
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["eval_examples"] == 12 and summary["examples"] == 36
    again = CliRunner().invoke(app, args)
    assert again.exit_code != 0 and "already holds files" in again.output


def test_classification_data_errors_and_pairs(llm_dir, tmp_path):
    from transformers import AutoTokenizer

    from nora.training.data import encode_classification, load_records

    tok = AutoTokenizer.from_pretrained(llm_dir)
    csv = tmp_path / "train.csv"
    csv.write_text("text,label\nAdd one and two.,pos\nName the sky.,neg\nAdd two and three.,pos\n")
    enc = encode_classification(load_records(str(csv)), tok, 64, None, "train.csv")
    assert enc.labels == ["neg", "pos"] and [e["label"] for e in enc.examples] == [1, 0, 1]
    with pytest.raises(AdapterError, match=r"dev.csv: label 'maybe' is outside the label set \['neg', 'pos'\]"):
        rows = [{"text": "x", "label": "maybe"}]
        encode_classification(rows, tok, 64, enc.labels, "dev.csv")
    with pytest.raises(AdapterError, match=r"lacks column\(s\) \['label'\]"):
        encode_classification([{"text": "x", "y": 1}], tok, 64, None, "d")
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("sentence1\tsentence2\tlabel\nAdd one.\tAdd two.\t1\nName it.\tAdd two.\t0\n")
    pairs = encode_classification(load_records(str(tsv)), tok, 64, None, "pairs.tsv")
    single = tok("Add one.", "Add two.")["input_ids"]
    assert pairs.examples[0]["input_ids"] == single and pairs.labels == ["0", "1"]
    long = encode_classification([{"text": "Add one and two. " * 20, "label": 1}], tok, 8, None, "d")
    assert long.truncated == 1 and len(long.examples[0]["input_ids"]) == 8


def test_two_process_fsdp_matches_single_process_and_resumes(llm_dir, data_file, tmp_path):
    import shutil

    common = dict(
        model=str(llm_dir), data=str(data_file), max_steps=6, logging_steps=1, progress=False, plot=False,
        method="nora", adapter={"r": 8, "inner_r": 4}, grad_accum=2, lr_scheduler="cosine",
    )  # fmt: skip
    fsdp = {**common, "batch_size": 2, "fsdp": True, "save_steps": 3}
    _torchrun(_write_yaml(tmp_path / "a.yaml", {**fsdp, "output_dir": str(tmp_path / "fsdp")}))
    single = train(TrainConfig(**common, batch_size=4, output_dir=str(tmp_path / "single")))
    _assert_same_adapter(tmp_path / "fsdp", single.run_dir, atol=1e-5)
    # resume the sharded run from its step-3 checkpoint (optimizer state gathered and re-sharded)
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        tmp_path / "fsdp" / "checkpoints" / "checkpoint-00000003",
        tmp_path / "resumed" / "checkpoints" / "checkpoint-00000003",
    )
    resumed = {**fsdp, "output_dir": str(tmp_path / "resumed"), "resume": "latest"}
    _torchrun(_write_yaml(tmp_path / "b.yaml", resumed))
    _assert_same_adapter(tmp_path / "resumed", tmp_path / "fsdp", atol=1e-6)


def test_nora_training_defaults_and_a_rank_given_alone():
    """`nora train --method nora` uses r' = 32 on placement "none"; a rank given without an inner rank keeps r' = r/4
    (the defaults' ratio) instead of refusing r' > r; an inner rank given is kept."""
    from nora.methods import METHODS

    def fields(**adapter):  # r' of a layer wide enough for r
        cfg = TrainConfig(model="m", data="d.json", method="nora", adapter=adapter).adapter_config()
        return cfg.r, METHODS["nora"].inner_rank(cfg, cfg.r), cfg.placement

    assert fields() == (128, 32, "none")
    assert fields(r=8) == (8, 2, "none") and fields(r=2) == (2, 1, "none")
    assert fields(r=8, inner_r=4) == (8, 4, "none") and fields(inner_r=8, placement="sqrt") == (128, 8, "sqrt")
