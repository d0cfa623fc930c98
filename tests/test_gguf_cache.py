"""The GGUF dequantisation cache (nora.pretrained.dequantized_gguf): a GGUF checkpoint is dequantised once and the
copy reused by every later load — train, eval and serve share it — keyed by the file, refreshed when it changes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package writes the test checkpoint (a dev dependency)")

import nora.pretrained as pretrained  # noqa: E402


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama in GGUF (float32 tensors, a byte-fallback llama tokenizer), as llama.cpp lays it out."""
    vocab, hidden, ffn, layers, heads, kv = 64, 32, 48, 2, 4, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(vocab - 3)])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([2, 3, 3] + [6] * (vocab - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    rng = np.random.default_rng(seed)

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    tensor("token_embd.weight", vocab, hidden)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", hidden)
        tensor(f"blk.{i}.attn_q.weight", hidden, hidden)
        tensor(f"blk.{i}.attn_k.weight", hidden // heads * kv, hidden)
        tensor(f"blk.{i}.attn_v.weight", hidden // heads * kv, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_norm.weight", hidden)
        tensor(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_up.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ffn)
    tensor("output_norm.weight", hidden)
    tensor("output.weight", vocab, hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_is_dequantised_once_and_the_copy_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("NORA_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    write_tiny_gguf(folder / "tiny.gguf")
    from transformers import AutoModelForCausalLM

    direct = AutoModelForCausalLM.from_pretrained(folder, gguf_file="tiny.gguf")
    ids = torch.tensor([[1, 5, 9, 12]])

    first = pretrained.load_model(str(folder), gguf_file="tiny.gguf")
    cached = pretrained.dequantized_gguf(str(folder), "tiny.gguf")
    assert cached is not None and cached.parent == tmp_path / "cache" / "gguf" and (cached / "config.json").is_file()
    calls = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, name, *args, **kwargs):
        calls.append(kwargs.get("gguf_file"))
        return real(cls, name, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    again = pretrained.load_model(str(folder), gguf_file="tiny.gguf")
    tokenizer = pretrained.load_tokenizer(str(folder), gguf_file="tiny.gguf")
    assert calls == [None]  # the second load read the dequantised copy, not the GGUF
    with torch.no_grad():
        for model in (first, again):
            assert torch.equal(model(input_ids=ids).logits, direct(input_ids=ids).logits)
    assert tokenizer("hi")["input_ids"] == [1]  # the tokenizer comes from the copy too (bos, then byte fallback)

    write_tiny_gguf(folder / "tiny.gguf", seed=1)  # a changed file: a new copy
    assert pretrained.dequantized_gguf(str(folder), "tiny.gguf") != cached
    monkeypatch.setenv("NORA_GGUF_CACHE", "0")
    assert pretrained.dequantized_gguf(str(folder), "tiny.gguf") is None
