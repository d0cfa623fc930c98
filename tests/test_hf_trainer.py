"""nora models in transformers' Trainer and TRL's SFTTrainer (nora.hf_trainer): the dataset columns reach the
model, checkpoints hold the adapter only, resume_from_checkpoint ends where an uninterrupted run ends,
load_best_model_at_end restores the best adapter, activation checkpointing and bf16 train, and save_model writes
a nora adapter directory that from_pretrained reloads."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import RECORDS, save_tiny_llm
from safetensors.torch import load_file

import nora
from nora.hf_trainer import NoraTrainer


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory) -> Path:
    return save_tiny_llm(tmp_path_factory.mktemp("base") / "llm")


def _model(llm_dir: Path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(llm_dir)
    torch.manual_seed(0)  # the inner factors' random init, as PEFT's, draws from torch's global generator
    return nora.get_peft_model(base, nora.NoraConfig(r=16, inner_r=4, seed=0))


def _dataset(llm_dir: Path):
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    texts = [f"{r['instruction']} {r['input']} {r['output']}" for r in RECORDS]
    rows = [{**tokenizer(t), "text": t, "id": i} for i, t in enumerate(texts)]  # text, id: columns forward lacks
    for row in rows:
        row["labels"] = list(row["input_ids"])
    return Dataset.from_list(rows), tokenizer


def _args(out: Path, **overrides):
    from transformers import TrainingArguments

    values = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                  save_steps=3, logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0,
                  lr_scheduler_type="linear", dataloader_num_workers=0, disable_tqdm=True)  # fmt: skip
    return TrainingArguments(**{**values, **overrides})


def _collator(tokenizer):
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)


def _trainer(llm_dir, out, lean_activations=True, **overrides):
    data, tokenizer = _dataset(llm_dir)
    evals = {"eval_dataset": data.select(range(8))} if "eval_strategy" in overrides else {}
    return NoraTrainer(model=_model(llm_dir), args=_args(out, **overrides), train_dataset=data,
                       data_collator=_collator(tokenizer), processing_class=tokenizer,
                       lean_activations=lean_activations, **evals)  # fmt: skip


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter_model.safetensors")


def test_trainer_checkpoints_hold_the_adapter_only_and_resume_exactly(tmp_path, llm_dir, recwarn):
    trainer = _trainer(llm_dir, tmp_path / "a")
    losses = [trainer.train().training_loss]
    assert not [w for w in recwarn if "whole state dict" in str(w.message)]  # the note is for the plain Trainer
    checkpoint = tmp_path / "a" / "checkpoint-3"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin"}, names  # no copy of the frozen base
    size = (checkpoint / "adapter_model.safetensors").stat().st_size
    trainable, _ = trainer.model.get_nb_trainable_parameters()
    assert size < 4 * trainable + 20_000
    assert math.isfinite(losses[0])

    resumed = _trainer(llm_dir, tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    final_a, final_b = _tensors(tmp_path / "a" / "checkpoint-6"), _tensors(tmp_path / "b" / "checkpoint-6")
    assert final_a.keys() == final_b.keys()
    for key in final_a:
        torch.testing.assert_close(final_b[key], final_a[key], rtol=0, atol=0, msg=key)
    assert any(not torch.equal(final_a[k], _tensors(checkpoint)[k]) for k in final_a)  # it did train on

    trainer.save_model(str(tmp_path / "final"))
    from transformers import AutoModelForCausalLM

    reloaded = nora.AdaptedModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llm_dir), tmp_path / "final")
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trainer.model.eval()(ids).logits)


def test_trainer_restores_the_best_adapter_at_the_end(tmp_path, llm_dir):
    # "best" = the highest eval loss, so that the best checkpoint is the first, not the one training ends on
    trainer = _trainer(llm_dir, tmp_path / "run", eval_strategy="steps", eval_steps=3, load_best_model_at_end=True,
                       metric_for_best_model="eval_loss", greater_is_better=True)  # fmt: skip
    trainer.train()
    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-3"
    trainer.save_model(str(tmp_path / "final"))
    best, last, final = (_tensors(p) for p in (tmp_path / "run" / "checkpoint-3", tmp_path / "run" / "checkpoint-6",
                                               tmp_path / "final"))  # fmt: skip
    for key, value in final.items():
        torch.testing.assert_close(value, best[key], rtol=0, atol=0, msg=key)
    assert any(not torch.equal(final[k], last[k]) for k in final)


def test_trainer_with_activation_checkpointing_and_bf16(tmp_path, llm_dir):
    plain = _trainer(llm_dir, tmp_path / "plain", max_steps=3, save_steps=100)
    plain.train()
    checkpointed = _trainer(llm_dir, tmp_path / "ckpt", max_steps=3, save_steps=100, activation_checkpointing=True)
    checkpointed.train()
    for (name, a), (_, b) in zip(plain.model.named_parameters(), checkpointed.model.named_parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)  # the same steps, recomputed
    mixed = _trainer(llm_dir, tmp_path / "bf16", max_steps=3, save_steps=100, bf16=True)
    assert math.isfinite(mixed.train().training_loss)


def test_trainer_keeps_lean_activations_by_default_and_trains_as_the_stock_layers_do(tmp_path, llm_dir):
    lean = _trainer(llm_dir, tmp_path / "lean", max_steps=3, save_steps=100)
    assert any("MLP" in line for line in lean.lean_activations) and any(
        "RMSNorm" in line for line in lean.lean_activations
    )
    lean.train()
    stock = _trainer(llm_dir, tmp_path / "stock", max_steps=3, save_steps=100, lean_activations=False)
    assert stock.lean_activations == []
    stock.train()
    for (name, a), (_, b) in zip(stock.model.named_parameters(), lean.model.named_parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)  # the same steps


def test_sft_trainer_trains_a_nora_model_to_adapter_only_checkpoints(tmp_path, llm_dir):
    pytest.importorskip("trl", reason="TRL is the [trl] extra; pip install -e '.[trl]' to test SFTTrainer")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from nora.hf_trainer import NoraSFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    data = Dataset.from_list([{"prompt": f"{r['instruction']} {r['input']}", "completion": f" {r['output']}"}
                              for r in RECORDS])  # fmt: skip
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        max_length=64,
        disable_tqdm=True,
        bf16=False,  # bf16 leaves Accelerate's autocast on the model's forward, which the comparison below avoids
    )
    assert args.gradient_checkpointing  # SFTConfig's default: nora's adapter-keeping checkpointing
    trainer = NoraSFTTrainer(model=_model(llm_dir), args=args, train_dataset=data, processing_class=tokenizer)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items() if "inner" in k or "lora" in k}
    assert math.isfinite(trainer.train().training_loss)
    names = {p.name for p in (tmp_path / "sft" / "checkpoint-2").iterdir()}
    assert "adapter_model.safetensors" in names and "model.safetensors" not in names
    trainer.save_model(str(tmp_path / "final"))
    reloaded = nora.AdaptedModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llm_dir), tmp_path / "final")
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trainer.model.eval()(ids).logits)
    after = trainer.model.state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in before.items())
