"""lm-evaluation-harness interop: a nora adapter exported with export_lora, evaluated by `lm_eval --model hf
--model_args pretrained=BASE,peft=EXPORT` on a local task, scores what nora's log-likelihood protocol scores."""

from __future__ import annotations

import json

import pytest
import torch
from test_eval_support import byte_llama, byte_tokenizer, items

import nora
from nora.evaluation import LoglikRequest, continuation_logliks, score_commonsense

lm_eval = pytest.importorskip("lm_eval", reason='lm-eval is not installed (pip install -e ".[eval]")')

TASK_YAML = """\
task: nora_local_commonsense
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def test_lm_eval_scores_an_exported_adapter_as_nora_does(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = byte_tokenizer()
    byte_llama().save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    adapted = nora.get_peft_model(
        type(byte_llama()).from_pretrained(tmp_path / "base"), nora.NoraConfig(r=8, inner_r=2)
    )
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    adapted.export_lora(tmp_path / "export")
    records = items()
    docs = [{"prompt": i.prompt, "choices": list(i.choices), "gold": i.gold} for i in records]
    (tmp_path / "data.json").write_text(json.dumps(docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local.yaml").write_text(TASK_YAML.format(data=tmp_path / "data.json"))

    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tmp_path / 'base'},peft={tmp_path / 'export'},dtype=float32",
        tasks=["nora_local_commonsense"],
        task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
        device="cpu",
        batch_size=3,
        bootstrap_iters=0,
        log_samples=True,
    )
    theirs = out["results"]["nora_local_commonsense"]
    ours = score_commonsense(adapted, tokenizer, records, ["loglik"])["loglik"]
    assert theirs["acc,none"] == pytest.approx(ours["acc"]) and theirs["acc_norm,none"] == pytest.approx(
        ours["acc_norm"]
    )
    our_logliks = continuation_logliks(adapted, tokenizer, [LoglikRequest(i.prompt, i.choices) for i in records])
    for sample in out["samples"]["nora_local_commonsense"]:
        lm_eval_logliks = [resp[0][0] for resp in sample["resps"]]
        assert lm_eval_logliks == pytest.approx(our_logliks[sample["doc_id"]], abs=1e-3)
