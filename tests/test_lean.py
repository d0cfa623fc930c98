"""Lean activations (nora.lean) and the chunked causal-LM loss (nora.loss): the same loss and gradients as the stock
model in float64, for each family nora knows, with and without adapters, masks and padding; fewer bytes kept."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_float_close
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

import nora
from nora.accel import enable_adapter_checkpointing, recompute_flops
from nora.layers import AdapterLayer
from nora.lean import lean_activations
from nora.loss import causal_lm_chunked_loss, chunked_causal_lm_loss, set_loss_chunking

SMALL = dict(vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0)  # fmt: skip
FAMILIES = {
    "llama": lambda: LlamaConfig(**SMALL),
    "qwen2": lambda: Qwen2Config(**SMALL),
    "qwen3": lambda: Qwen3Config(**SMALL, head_dim=4),
    "mistral": lambda: MistralConfig(**SMALL),
    "gemma2": lambda: Gemma2Config(**SMALL, head_dim=4, final_logit_softcapping=3.0),
    "gemma3": lambda: Gemma3TextConfig(**SMALL, head_dim=4),
    "phi3": lambda: Phi3Config(**SMALL),
    "qwen3_moe": lambda: Qwen3MoeConfig(
        **SMALL, head_dim=4, moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0]
    ),  # fmt: skip
}
ADAPTERS = {
    None: None,
    "nora": lambda: nora.NoraConfig(r=4, inner_r=2, target_modules="all-linear"),
    "lora": lambda: nora.LoraConfig(r=4, target_modules="all-linear"),
}


def tiny(family: str, dtype: torch.dtype = torch.float64, experts: str = "eager") -> nn.Module:
    config = FAMILIES[family]()
    config._experts_implementation = experts
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(dtype).train()


def adapted(family: str, adapter: str | None, dtype: torch.dtype = torch.float64) -> nn.Module:
    model = tiny(family, dtype)
    if adapter is None:
        return model.requires_grad_(True)  # full fine-tuning: the norms' and MLPs' weight gradients too
    model = nora.get_peft_model(model, ADAPTERS[adapter]())
    with torch.no_grad():  # LoRA's B starts at zero: move every adapter tensor so every gradient is non-trivial
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model


def padded_batch(left: bool = True) -> dict[str, torch.Tensor]:
    """Three rows: one whole, one padded on the left (not under eager attention: a float64 query that sees only
    padding gets -inf everywhere there, hence nan), one on the right."""
    torch.manual_seed(1)
    ids = torch.randint(1, 48, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, : 3 if left else 0] = 0
    mask[2, 6:] = 0  # right padding
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    loss = float64_loss(logits, batch["labels"])
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), {"inputs_embeds": embeds.grad, **grads}


def float64_loss(logits: torch.Tensor, labels: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """transformers' causal-LM loss, in float64 (its own takes the logits to float32)."""
    targets = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), targets, reduction="sum")
    return total / (count or int((targets != -100).sum()))


def assert_same(lean: tuple, stock: tuple) -> None:
    assert_float_close(lean[0], stock[0], "loss")
    assert lean[1].keys() == stock[1].keys()
    assert sum(g is not None for g in stock[1].values()) > 1
    for name, grad in stock[1].items():  # the input embedding's weight has none: the inputs are embeddings
        if grad is None:
            assert lean[1][name] is None, name
        else:
            assert_float_close(lean[1][name], grad, name)


@pytest.mark.parametrize("adapter", list(ADAPTERS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_lean_activations_give_the_stock_loss_and_gradients(family, adapter):
    stock = adapted(family, adapter)
    lean = copy.deepcopy(stock)
    changed = lean_activations(lean)
    assert any("MLP" in c for c in changed) and any("RMSNorm" in c for c in changed), changed
    batch = padded_batch(left=family != "gemma2")  # Gemma 2 attends eagerly (its logit soft-cap)
    assert_same(loss_and_grads(lean, batch), loss_and_grads(stock, batch))


def saved_bytes(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes autograd keeps for backward, each storage once, the model's parameters and buffers excluded."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()  # outside: what backward recomputes is transient, not kept
    return sum(kept.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("adapter", ["nora", "lora"])
def test_lean_activations_keep_fewer_bytes(adapter, dtype):
    stock = adapted("llama", adapter, dtype)
    lean = copy.deepcopy(stock)
    lean_activations(lean)
    batch = padded_batch()
    lean_bytes, stock_bytes = saved_bytes(lean, batch), saved_bytes(stock, batch)
    assert lean_bytes < stock_bytes, (lean_bytes, stock_bytes)


def test_an_adapted_layer_keeps_only_the_rank_r_projection():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64))
    model = nora.get_peft_model(base, nora.NoraConfig(r=8, inner_r=4, target_modules=["0"]))
    x = torch.randn(5, 64, requires_grad=True)
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    widths: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in own:
            widths.append(t.shape[-1] if t.shape[0] == 5 else t.shape[0])
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x).sum()
    out.backward()
    assert widths and max(widths) <= 8, widths  # never x (64 wide) itself


def test_peft_lora_models_are_patched_too():
    peft = pytest.importorskip("peft")
    stock = peft.get_peft_model(
        tiny("llama"), peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    lean = copy.deepcopy(stock)
    assert lean_activations(lean)
    batch = padded_batch()
    assert_same(loss_and_grads(lean, batch), loss_and_grads(stock, batch))


def test_an_unknown_family_runs_stock_saying_so_once(caplog):
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=48))
    with caplog.at_level(logging.WARNING, logger="nora.lean"):
        assert lean_activations(model) == []
    said = [r.getMessage() for r in caplog.records if r.name == "nora.lean"]
    assert len(said) == 1 and "gpt2" in said[0]


def test_lean_activations_switch_off_to_the_stock_forwards():
    model = tiny("llama")
    lean_activations(model)
    restored = lean_activations(model, enable=False)
    assert restored and all("forward" not in m.__dict__ for m in model.modules())


def test_moe_experts_under_batched_matmuls_give_the_stock_gradients():
    stock = tiny("qwen3_moe", experts="batched_mm").requires_grad_(True)
    lean = copy.deepcopy(stock)
    changed = lean_activations(lean)
    assert any(c.startswith("Qwen3MoeExperts ×1: gated product") for c in changed), changed
    batch = padded_batch()
    assert_same(loss_and_grads(lean, batch), loss_and_grads(stock, batch))
    lean_activations(lean, enable=False)
    assert all("_apply_gate" not in m.__dict__ for m in lean.modules())


def test_eager_attention_goes_through_sdpa():
    config = LlamaConfig(**SMALL)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).double()
    stock = copy.deepcopy(model)
    assert "attention: eager → sdpa" in lean_activations(model)
    assert model.config._attn_implementation == "sdpa"
    batch = padded_batch(left=False)
    (loss, grads), (want_loss, want) = loss_and_grads(model, batch), loss_and_grads(stock, batch)
    # eager attention takes its softmax in float32: the two agree to float32's tolerance, not float64's
    assert_float_close(loss.float(), want_loss.float())
    for name, grad in want.items():
        if grad is not None:
            assert_float_close(grads[name].float(), grad.float(), name)


# ---- the chunked loss ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 5, 7, 1000])
def test_chunked_loss_equals_transformers_loss(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(3, 9, 16, dtype=torch.float64, requires_grad=True)
    head = nn.Linear(16, 48, bias=False).double()
    labels = torch.randint(0, 48, (3, 9))
    labels[0, :4] = -100
    labels[2, 7:] = -100
    logits = head(hidden)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 48), labels[:, 1:].reshape(-1), ignore_index=-100)
    expected.backward()
    want = (hidden.grad.clone(), head.weight.grad.clone())
    hidden.grad, head.weight.grad = None, None
    loss = chunked_causal_lm_loss(hidden, head, labels, chunk_tokens=chunk)
    loss.backward()
    assert_float_close(loss, expected)
    assert_float_close(hidden.grad, want[0])
    assert_float_close(head.weight.grad, want[1])


def test_chunked_loss_refuses_a_bad_chunk_size():
    with pytest.raises(nora.AdapterError, match="chunk_tokens=0"):
        chunked_causal_lm_loss(torch.zeros(1, 2, 4), nn.Linear(4, 8), torch.zeros(1, 2, dtype=torch.long), 0)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3_moe"])
@pytest.mark.parametrize("adapter", [None, "nora"])
def test_the_causal_lm_task_loss_in_chunks_equals_the_model_loss(family, adapter):
    stock = adapted(family, adapter)
    if adapter is not None:  # the head adapted too: the chunked path runs nora's lm_head
        stock = nora.get_peft_model(tiny(family), nora.LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))
        with torch.no_grad():
            for p in stock.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
    chunked = copy.deepcopy(stock)
    set_loss_chunking(chunked, 4)
    batch = padded_batch(left=family != "gemma2")
    count = int((batch["labels"][:, 1:] != -100).sum())
    expected = float64_loss(stock(**batch).logits, batch["labels"], count)
    expected.backward()
    result = causal_lm_chunked_loss(chunked, batch, count)
    assert result is not None
    result[0].backward()
    assert_float_close(result[0], expected)
    for (name, p), q in zip(chunked.named_parameters(), stock.parameters(), strict=True):
        if p.requires_grad:
            assert_float_close(p.grad, q.grad, name)


# ---- nora train ---------------------------------------------------------------------------------------------------
def test_nora_train_runs_lean_by_default_and_the_switch_gives_the_same_loss_curve(tmp_path):
    import json

    from conftest import RECORDS, save_tiny_llm
    from typer.testing import CliRunner

    from nora.cli import app

    model, data = save_tiny_llm(tmp_path / "base"), tmp_path / "train.json"
    data.write_text(json.dumps(RECORDS[:16]))
    common = ["train", "--model", model, "--data", data, "--eval-data", data, "--max-steps", "4",
              "--logging-steps", "1", "--batch-size", "4", "--no-progress", "--no-plot",
              "--loss-chunk-tokens", "8"]  # fmt: skip
    curves, summaries = [], []
    for name, extra in (("lean", []), ("stock", ["--no-lean-activations", "--loss-chunk-tokens", "0"])):
        out = tmp_path / name
        result = CliRunner().invoke(app, [str(a) for a in [*common, "--output-dir", out, *extra]])
        assert result.exit_code == 0, result.output
        lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in lines if "loss" in r] + [r["eval_loss"] for r in lines if "eval_loss" in r]
        curves.append(torch.tensor(losses, dtype=torch.float64))
        summaries.append(json.loads((out / "summary.json").read_text())["accelerations"])
    assert summaries[0]["lean_activations"].startswith("on: LlamaMLP ×2"), summaries[0]
    assert "lean_activations" not in summaries[1]
    assert len(curves[0]) >= 5  # four steps and the final evaluation
    torch.testing.assert_close(curves[0], curves[1], rtol=1e-5, atol=1e-5)


def adapter_layers(model: nn.Module) -> list[AdapterLayer]:
    return [m for m in model.modules() if isinstance(m, AdapterLayer)]


# ---- adapter-aware checkpointing ----------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter", [None, "nora", "lora"])
def test_checkpointing_with_lean_activations_gives_the_stock_gradients(adapter):
    stock = adapted("llama", adapter)
    both = copy.deepcopy(stock)
    enable_adapter_checkpointing(both)
    lean_activations(both)
    batch = padded_batch()
    assert_same(loss_and_grads(both, batch), loss_and_grads(stock, batch))


@pytest.mark.parametrize("lean", [False, True])
def test_checkpointing_recomputes_the_base_and_never_an_adapters_input_projection(lean):
    """recompute_flops: nora's checkpointing recomputes less than plain checkpointing by at least the adapters' input
    projections (x·Vᵣᵀ, kept from the first forward), and less than a whole forward; counted with lean activations
    too (their backward runs autograd.grad, which FlopCounterMode's module tracker refuses)."""
    torch.manual_seed(0)
    config = LlamaConfig(**{**SMALL, "hidden_size": 64, "intermediate_size": 128})
    model = nora.get_peft_model(AutoModelForCausalLM.from_config(config).double().train(), nora.NoraConfig(r=8))
    if lean:
        assert lean_activations(model)
    ids = torch.randint(0, 48, (2, 40))
    inputs = {"input_ids": ids, "labels": ids}
    kept, plain = recompute_flops(model, inputs), recompute_flops(model, inputs, keep_adapter_projections=False)
    projections = sum(2 * ids.numel() * m.shape[1] * m.adapters["default"].r for m in adapter_layers(model))
    assert kept["step"] == plain["step"] and 0 < kept["recompute"] < kept["forward"]
    assert plain["recompute"] - kept["recompute"] >= projections
    assert not model.model.is_activation_checkpointing  # left as it was


def test_a_negative_loss_chunk_is_refused_before_anything_loads():
    from nora.training import TrainConfig

    with pytest.raises(nora.AdapterError, match="loss_chunk_tokens=-1 must be at least 1, 0"):
        TrainConfig(model="m", data="d.json", loss_chunk_tokens=-1)


def test_the_chunked_loss_keeps_no_logits():
    torch.manual_seed(0)
    hidden = torch.randn(2, 33, 16, requires_grad=True)
    head = nn.Linear(16, 4096, bias=False).requires_grad_(False)
    labels = torch.randint(0, 4096, (2, 33))
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() != head.weight.untyped_storage().data_ptr():
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_causal_lm_loss(hidden, head, labels, chunk_tokens=16)
    # the hidden states (a copy of the targeted rows) and two index vectors; one chunk's logits alone take 256 KiB
    assert 0 < sum(kept.values()) <= hidden.numel() * 4 + 2 * labels.numel() * 8


def test_lean_activations_under_autocast_give_the_stock_gradients():
    stock = adapted("llama", "nora", torch.float32)
    lean = copy.deepcopy(stock)
    lean_activations(lean)
    batch = padded_batch()
    results = []
    for model in (lean, stock):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert_same(results[0], results[1])
