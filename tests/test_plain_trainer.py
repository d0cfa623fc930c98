"""A nora model in the plain transformers `Trainer` and TRL `SFTTrainer`, written as for a PEFT model: the data
columns reach the model, the loss falls, `resume_from_checkpoint` ends where an uninterrupted run ends, the
checkpoints are whole state dicts (tied embeddings stored once) and nora says so once, naming the remedy. A model
loaded from a GGUF file (dequantised to float) trains there like any float model."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest
import torch
from conftest import RECORDS, char_tokenizer, tiny_llama
from safetensors.torch import load_file

import nora

NOTE = "saves a nora model as its whole state dict"


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory) -> Path:
    """A tiny Llama whose output head is tied to its input embeddings, as SmolLM2's is."""
    directory = tmp_path_factory.mktemp("base") / "llm"
    tokenizer = char_tokenizer(directory)
    tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=True).save_pretrained(
        directory
    )
    return directory


def _model(llm_dir: Path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return nora.get_peft_model(AutoModelForCausalLM.from_pretrained(llm_dir), nora.NoraConfig(r=16, inner_r=4, seed=0))


def _trainer(llm_dir: Path, out: Path, **overrides):
    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    texts = [f"{r['instruction']} {r['input']} {r['output']}" for r in RECORDS]
    rows = [{**tokenizer(t), "text": t, "id": i} for i, t in enumerate(texts)]  # text, id: columns forward lacks
    for row in rows:
        row["labels"] = list(row["input_ids"])
    data = Dataset.from_list(rows)
    values = dict(output_dir=str(out), max_steps=8, save_steps=4, per_device_train_batch_size=8, learning_rate=3e-2,
                  logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True)  # fmt: skip
    return Trainer(model=_model(llm_dir), args=TrainingArguments(**{**values, **overrides}), train_dataset=data,
                   eval_dataset=data.select(range(16)), processing_class=tokenizer,
                   data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))  # fmt: skip


def _sft_trainer(llm_dir: Path, out: Path):
    pytest.importorskip("trl", reason="TRL is the [trl] extra; pip install -e '.[trl]' to test SFTTrainer")
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_list([{"prompt": f"{r['instruction']} {r['input']}", "completion": f" {r['output']}"}
                              for r in RECORDS])  # fmt: skip
    args = SFTConfig(output_dir=str(out), max_steps=8, save_steps=4, per_device_train_batch_size=8, learning_rate=3e-2,
                     logging_steps=1, report_to=[], max_length=64, seed=0, disable_tqdm=True, bf16=False)  # fmt: skip
    return SFTTrainer(model=_model(llm_dir), args=args, train_dataset=data,
                      processing_class=AutoTokenizer.from_pretrained(llm_dir))  # fmt: skip


def _train(trainer, **kwargs) -> list[str]:
    """Train; the nora notes said meanwhile."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(**kwargs)
    return [str(w.message) for w in caught if NOTE in str(w.message)]


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _check_whole_state_dict_run(make, tmp_path: Path, remedy: str) -> None:
    trainer = make(tmp_path / "a")
    notes = _train(trainer)
    assert len(notes) == 1 and remedy in notes[0], notes  # once, at the start, not per step or checkpoint
    losses = _losses(trainer)
    assert len(losses) == 8 and sum(losses[-3:]) < sum(losses[:3]), losses

    checkpoint = tmp_path / "a" / "checkpoint-4"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= names, names
    assert "adapter_config.json" not in names  # what the plain Trainer writes: the whole model, not an adapter
    saved = load_file(checkpoint / "model.safetensors")
    assert saved.keys() == trainer.model.state_dict().keys()
    assert "model.model.embed_tokens.weight" in saved and "model.lm_head.weight" not in saved  # tied: stored once
    assert any(".inner_A" in k for k in saved) and any("q_proj.base_layer.weight" in k for k in saved)

    restored = make(tmp_path / "c")
    restored._load_from_checkpoint(str(checkpoint))  # what resume_from_checkpoint does to the model
    for key, value in restored.model.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=key)

    resumed = make(tmp_path / "b")
    assert len(_train(resumed, resume_from_checkpoint=str(checkpoint))) == 1
    final_a, final_b = (load_file(tmp_path / run / "checkpoint-8" / "model.safetensors") for run in "ab")
    assert final_a.keys() == final_b.keys()
    for key in final_a:  # the same machine computes both: resume is exact
        torch.testing.assert_close(final_b[key], final_a[key], rtol=0, atol=0, msg=key)
    assert any(not torch.equal(final_a[k], saved[k]) for k in final_a)  # it trained on after the checkpoint
    lm_head, embed = resumed.model.model.lm_head.weight, resumed.model.model.model.embed_tokens.weight
    assert lm_head is embed  # loading the checkpoint kept the tie
    resumed.model.load_state_dict(final_a)  # strict: the tied name left out is filled from its twin
    torch.testing.assert_close(resumed.model.model.lm_head.weight, final_a["model.model.embed_tokens.weight"])


def test_plain_trainer_keeps_the_data_columns_and_its_eval_loss_falls(tmp_path, llm_dir):
    trainer = _trainer(llm_dir, tmp_path / "run", save_strategy="no")
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # text, id dropped; the model's inputs kept
    assert trainer.label_names == ["labels"]  # read off the base's forward, so evaluation computes the loss
    before = trainer.evaluate()["eval_loss"]
    _train(trainer)
    assert trainer.evaluate()["eval_loss"] < before


def test_plain_trainer_resumes_exactly_and_says_once_what_it_saves(tmp_path, llm_dir):
    _check_whole_state_dict_run(lambda out: _trainer(llm_dir, out), tmp_path, "NoraTrainer in place of Trainer")


def test_plain_sft_trainer_resumes_exactly_and_says_once_what_it_saves(tmp_path, llm_dir):
    _check_whole_state_dict_run(
        lambda out: _sft_trainer(llm_dir, out), tmp_path, "NoraSFTTrainer in place of SFTTrainer"
    )


def test_the_adapted_forward_has_the_base_signature_and_pickles(llm_dir):
    import inspect

    model = _model(llm_dir)
    params = inspect.signature(model.forward).parameters
    assert {"input_ids", "attention_mask", "labels", "adapter_names"} <= params.keys()
    assert params["adapter_names"].kind is inspect.Parameter.KEYWORD_ONLY
    assert type(model).__name__ == "AdaptedModel" and isinstance(model, nora.AdaptedModel)
    other = type(model)(torch.nn.Linear(4, 2))  # the class of one base, given another: that one's signature
    assert list(inspect.signature(other.forward).parameters) == ["input", "adapter_names"]
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    copy = pickle.loads(pickle.dumps(model))
    assert type(copy) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(copy(ids).logits, model(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(model(ids, adapter_names=["default"]).logits, model(ids).logits)


MARKS = ("hf_quantizer", "is_quantized", "quantization_method")


def _marked(model) -> list[str]:
    """The quantization marks transformers left on `model` and its config."""
    config = [f"config.{n}" for n in ("quantization_config", "_is_quantized") if n in vars(model.config)]
    return [n for n in MARKS if n in vars(model)] + config


def test_a_dequantised_gguf_model_is_a_float_model_that_a_plain_sft_trainer_trains(tmp_path):
    write_tiny_gguf = pytest.importorskip("test_gguf_cache").write_tiny_gguf  # skips where gguf is not installed
    pytest.importorskip("trl", reason="TRL is the [trl] extra; pip install -e '.[trl]' to test SFTTrainer")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_utils import validate_quantization_for_training
    from trl import SFTConfig, SFTTrainer

    folder = tmp_path / "model"
    folder.mkdir()
    write_tiny_gguf(folder / "tiny.gguf")
    base = AutoModelForCausalLM.from_pretrained(folder, gguf_file="tiny.gguf")
    assert set(_marked(base)) >= {"hf_quantizer", "is_quantized"}  # what transformers leaves on a float model
    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(base)

    model = nora.get_peft_model(base, nora.NoraConfig(r=16, inner_r=4, seed=0))
    assert _marked(base) == [] and all(p.dtype == torch.float32 for p in base.parameters())
    validate_quantization_for_training(model)
    before = {k: v.clone() for k, v in model.state_dict().items() if ".inner_" in k}
    data = Dataset.from_list([{"prompt": f"{r['instruction']} {r['input']}", "completion": f" {r['output']}"}
                              for r in RECORDS])  # fmt: skip
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=8, learning_rate=1e-2,
                     report_to=[], max_length=64, save_strategy="no", disable_tqdm=True, bf16=False)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="tiny.gguf")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f".*{NOTE}")
        SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer).train()
    after = model.state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in before.items())


@pytest.mark.parametrize("cache", ["on", "off"])
def test_nora_loads_a_gguf_file_as_a_float_model(tmp_path, monkeypatch, cache):
    write_tiny_gguf = pytest.importorskip("test_gguf_cache").write_tiny_gguf
    from nora.pretrained import load_model

    monkeypatch.setenv("NORA_GGUF_CACHE", "1" if cache == "on" else "0")
    folder = tmp_path / "model"
    folder.mkdir()
    write_tiny_gguf(folder / "tiny.gguf")
    model = load_model(str(folder), gguf_file="tiny.gguf")
    assert _marked(model) == []
    model.save_pretrained(tmp_path / "saved")  # a GGUF-marked model refuses: its quantizer does not serialize


def test_only_a_fully_dequantised_gguf_model_loses_its_marks():
    from torch import nn

    from nora.hf_compat import clear_gguf_quantization

    packed = tiny_llama()
    packed.__dict__.update(hf_quantizer=object(), is_quantized=True, quantization_method="gguf")
    packed.model.register_parameter("blocks", nn.Parameter(torch.zeros(4, dtype=torch.uint8), requires_grad=False))
    assert not clear_gguf_quantization(packed) and _marked(packed) == list(MARKS)  # blocks kept packed: quantized
    bnb = tiny_llama()
    bnb.__dict__.update(hf_quantizer=object(), is_quantized=True, quantization_method="bitsandbytes")
    assert not clear_gguf_quantization(bnb) and _marked(bnb) == list(MARKS)
