"""The llama2.c converter on the real stories260K checkpoint: the converted transformers model computes run.c's
logits (checked against a NumPy port of run.c's forward pass read straight from the .bin), writes stories, its
tokenizer encodes as run.c's `encode` does; and the converter's errors."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_path
from typer.testing import CliRunner

from nora import AdapterError
from nora.cli import app
from nora.convert import convert_llama2c

runner = CliRunner()


@pytest.fixture(scope="module")
def source() -> Path:
    path = shared_path("models", "stories260K")
    if not path.is_dir():
        pytest.skip(f"{path} is absent (the llama2.c stories260K model and tokenizer)")
    return path


@pytest.fixture(scope="module")
def hf(stories260k_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(stories260k_dir).eval(), AutoTokenizer.from_pretrained(stories260k_dir)


# ---- an independent reading of run.c -----------------------------------------------------------------------------
def read_run_c_weights(path: Path) -> tuple[dict, dict]:
    """llama2.c's `memory_map_weights`, in float64."""
    raw = path.read_bytes()
    keys = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    p = dict(zip(keys, struct.unpack_from("<7i", raw), strict=True))
    shared = p["vocab_size"] > 0
    p["vocab_size"] = abs(p["vocab_size"])
    data = np.frombuffer(raw, dtype="<f4", offset=28).astype(np.float64)
    L, d, h, V, hs = p["n_layers"], p["dim"], p["hidden_dim"], p["vocab_size"], p["dim"] // p["n_heads"]
    kv = p["n_kv_heads"] * hs
    order = [
        ("token_embedding_table", (V, d)),
        ("rms_att_weight", (L, d)),
        ("wq", (L, d, d)),
        ("wk", (L, kv, d)),
        ("wv", (L, kv, d)),
        ("wo", (L, d, d)),
        ("rms_ffn_weight", (L, d)),
        ("w1", (L, h, d)),
        ("w2", (L, d, h)),
        ("w3", (L, h, d)),
        ("rms_final_weight", (d,)),
        ("freq_cis_real", (p["seq_len"], hs // 2)),
        ("freq_cis_imag", (p["seq_len"], hs // 2)),
    ] + ([] if shared else [("wcls", (V, d))])
    w, off = {}, 0
    for name, shape in order:
        n = int(np.prod(shape))
        w[name] = data[off : off + n].reshape(shape)
        off += n
    assert off == data.size
    w.setdefault("wcls", w["token_embedding_table"])
    return p, w


def run_c_logits(p: dict, w: dict, tokens: list[int]) -> np.ndarray:
    """run.c's `forward` for each position in turn (KV cache, interleaved RoPE from the stored freq_cis tables,
    grouped-query attention, SwiGLU), returning the logits at every position."""
    d, hs = p["dim"], p["dim"] // p["n_heads"]
    kv_dim, kv_mul = p["n_kv_heads"] * hs, p["n_heads"] // p["n_kv_heads"]

    def rmsnorm(x, weight):
        return weight * x / np.sqrt(np.mean(x * x) + 1e-5)

    key_cache = np.zeros((p["n_layers"], len(tokens), kv_dim))
    value_cache = np.zeros_like(key_cache)
    out = []
    for pos, token in enumerate(tokens):
        x = w["token_embedding_table"][token].copy()
        fcr, fci = w["freq_cis_real"][pos], w["freq_cis_imag"][pos]
        for layer in range(p["n_layers"]):
            xb = rmsnorm(x, w["rms_att_weight"][layer])
            q, k, v = w["wq"][layer] @ xb, w["wk"][layer] @ xb, w["wv"][layer] @ xb
            for i in range(0, d, 2):
                c, s = fcr[(i % hs) // 2], fci[(i % hs) // 2]
                q[i], q[i + 1] = q[i] * c - q[i + 1] * s, q[i] * s + q[i + 1] * c
                if i < kv_dim:
                    k[i], k[i + 1] = k[i] * c - k[i + 1] * s, k[i] * s + k[i + 1] * c
            key_cache[layer, pos], value_cache[layer, pos] = k, v
            xb = np.zeros(d)
            for head in range(p["n_heads"]):
                qh = q[head * hs : (head + 1) * hs]
                kh = (head // kv_mul) * hs
                att = key_cache[layer, : pos + 1, kh : kh + hs] @ qh / np.sqrt(hs)
                att = np.exp(att - att.max())
                att /= att.sum()
                xb[head * hs : (head + 1) * hs] = att @ value_cache[layer, : pos + 1, kh : kh + hs]
            x = x + w["wo"][layer] @ xb
            xb = rmsnorm(x, w["rms_ffn_weight"][layer])
            h1, h3 = w["w1"][layer] @ xb, w["w3"][layer] @ xb
            x = x + w["w2"][layer] @ (h1 / (1 + np.exp(-h1)) * h3)
        out.append(w["wcls"] @ rmsnorm(x, w["rms_final_weight"]))
    return np.stack(out)


def read_run_c_vocab(path: Path, vocab_size: int) -> tuple[list[bytes], list[float]]:
    data = path.read_bytes()
    pieces, scores, off = [], [], 4
    for _ in range(vocab_size):
        score, n = struct.unpack_from("<fi", data, off)
        pieces.append(data[off + 8 : off + 8 + n])
        scores.append(score)
        off += 8 + n
    return pieces, scores


def run_c_encode(text: str, pieces: list[bytes], scores: list[float]) -> list[int]:
    """run.c's `encode(text, bos=1, eos=0)`: dummy-prefix space, code points (byte fallback at id byte + 3), then
    repeatedly merge the adjacent pair whose concatenation has the best score (leftmost on ties)."""
    lookup = {piece: i for i, piece in enumerate(pieces)}
    tokens = [1]
    if text:
        tokens.append(lookup[b" "])
    for ch in text:
        b = ch.encode()
        tokens.extend([lookup[b]] if b in lookup else [byte + 3 for byte in b])
    while True:
        best, best_i, best_id = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            merged = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]])
            if merged is not None and scores[merged] > best:
                best, best_i, best_id = scores[merged], i, merged
        if best_i < 0:
            return tokens
        tokens[best_i : best_i + 2] = [best_id]


# ---- the model ---------------------------------------------------------------------------------------------------
def test_converted_logits_equal_run_c(source, hf):
    model, _ = hf
    p, w = read_run_c_weights(source / "stories260K.bin")
    assert p["n_kv_heads"] < p["n_heads"]  # the k permutation must use n_kv_heads: this model checks it
    pieces, scores = read_run_c_vocab(source / "tok512.bin", p["vocab_size"])
    tokens = run_c_encode("Once upon a time, there was a little girl named Lily. She", pieces, scores)
    expected = run_c_logits(p, w, tokens)
    with torch.no_grad():
        got = model(torch.tensor([tokens])).logits[0].double().numpy()
    assert got.shape == expected.shape == (len(tokens), p["vocab_size"])
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_config_records_run_c_constants(hf):
    config = hf[0].config
    assert config.rms_norm_eps == 1e-5 and config.tie_word_embeddings is True
    assert config.max_position_embeddings == 512 and config.num_key_value_heads == 4
    theta = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
    assert theta == 10000.0
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)


def test_an_unshared_classifier_is_converted(source, tmp_path):
    """A negative vocab_size means a separate wcls at the end of the file."""
    raw = (source / "stories260K.bin").read_bytes()
    header = list(struct.unpack_from("<7i", raw))
    wcls = np.random.default_rng(0).normal(0, 0.05, (header[5], header[0])).astype("<f4")
    header[5] = -header[5]
    path = tmp_path / "unshared.bin"
    path.write_bytes(struct.pack("<7i", *header) + raw[28:] + wcls.tobytes())
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(convert_llama2c(path, None, tmp_path / "out")).eval()
    assert model.config.tie_word_embeddings is False
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    p, w = read_run_c_weights(path)
    tokens = [1, 403, 407, 261, 378]
    with torch.no_grad():
        got = model(torch.tensor([tokens])).logits[0].double().numpy()
    np.testing.assert_allclose(got, run_c_logits(p, w, tokens), atol=1e-4, rtol=0)


def test_greedy_generation_from_bos_writes_a_story(hf):
    model, tok = hf
    with torch.no_grad():
        out = model.generate(torch.tensor([[1]]), max_new_tokens=120, do_sample=False, pad_token_id=0)
    text = tok.decode(out[0], skip_special_tokens=True)
    words = set(text.replace(",", " ").replace(".", " ").split())
    common = {"Once", "upon", "the", "was", "a", "She", "He", "to", "and", "day"}
    assert len(words & common) >= 5, text
    assert sum(ch.isascii() for ch in text) / len(text) > 0.98, text


# ---- the tokenizer -----------------------------------------------------------------------------------------------
TEXTS = [
    "Once upon a time",
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.",
    'Tom said, "I don\'t want to go!"\nHis mom smiled.',
    "  two leading spaces and  a double space",
    "numbers 1234 and symbols: (a) [b] {c} ~ | <s> % @ #",
    "unicode: café, naïve — “quotes” 漢字 😀",
    "x",
]


def test_tokenizer_round_trips_and_encodes_as_run_c(source, hf):
    model, tok = hf
    pieces, scores = read_run_c_vocab(source / "tok512.bin", 512)
    ids = tok("Once upon a time").input_ids
    assert ids[0] == tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert tok.decode(ids, skip_special_tokens=True) == "Once upon a time"
    with torch.no_grad():
        story = model.generate(torch.tensor([[1]]), max_new_tokens=100, do_sample=False, pad_token_id=0)[0]
    texts = TEXTS + [tok.decode(story, skip_special_tokens=True)]
    for text in texts:
        if "<s>" in text:  # the one documented difference: run.c spells special-token strings out
            continue
        ids = tok(text).input_ids
        assert ids == run_c_encode(text, pieces, scores), text
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok("<s>").input_ids, skip_special_tokens=False) == "<s><s>"


def test_tokenizer_loads_offline_with_auto_tokenizer(stories260k_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories260k_dir, local_files_only=True)
    assert len(tok) == 512 and tok.convert_ids_to_tokens([0, 1, 2, 3, 265]) == [
        "<unk>",
        "<s>",
        "</s>",
        "<0x00>",
        "▁the",
    ]


# ---- errors ------------------------------------------------------------------------------------------------------
@pytest.mark.bad_input("convert", "missing")
def test_a_missing_checkpoint_or_tokenizer_is_named(source, tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        convert_llama2c(tmp_path / "nope.bin", None, tmp_path / "out")
    with pytest.raises(AdapterError, match="tokenizer .*does not exist"):
        convert_llama2c(source / "stories260K.bin", tmp_path / "tok.bin", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.bad_input("convert", "malformed")
@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda raw: raw[:-100], "is truncated"),
        (lambda raw: raw + b"\0" * 8, "8 bytes longer"),
        (lambda raw: raw[:20], "too short"),
        (lambda raw: struct.pack("<7i", 0, 172, 5, 8, 4, 512, 512) + raw[28:], r"\['dim'\] must be positive"),
        (lambda raw: struct.pack("<7i", 64, 172, 5, 8, 3, 512, 512) + raw[28:], "not a multiple of n_kv_heads"),
        (lambda raw: struct.pack("<2i", 0x616B3432, 1) + raw[8:], "version 1"),
    ],
)
def test_a_malformed_checkpoint_is_refused(source, tmp_path, mutate, message):
    path = tmp_path / "bad.bin"
    path.write_bytes(mutate((source / "stories260K.bin").read_bytes()))
    with pytest.raises(AdapterError, match=message):
        convert_llama2c(path, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.bad_input("convert", "malformed")
def test_a_tokenizer_of_another_size_is_refused(source, tmp_path):
    raw = (source / "tok512.bin").read_bytes()
    (tmp_path / "short.bin").write_bytes(raw[:-40])
    with pytest.raises(AdapterError, match="truncated"):
        convert_llama2c(source / "stories260K.bin", tmp_path / "short.bin", tmp_path / "out")
    (tmp_path / "long.bin").write_bytes(raw + struct.pack("<fi", 0.0, 1) + b"z")
    with pytest.raises(AdapterError, match="more than the model's 512 tokens"):
        convert_llama2c(source / "stories260K.bin", tmp_path / "long.bin", tmp_path / "out")


@pytest.mark.bad_input("convert", "unwritable")
@pytest.mark.bad_input("convert", "interrupted")
def test_a_non_empty_out_dir_needs_overwrite_and_survives_a_failed_conversion(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(AdapterError, match="not empty; pass --overwrite"):
        convert_llama2c(source / "stories260K.bin", None, out)
    (tmp_path / "bad.bin").write_bytes((source / "stories260K.bin").read_bytes()[:-4])
    with pytest.raises(AdapterError, match="truncated"):
        convert_llama2c(tmp_path / "bad.bin", None, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    convert_llama2c(source / "stories260K.bin", None, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterError, match="not a directory"):
        convert_llama2c(source / "stories260K.bin", None, tmp_path / "file")


@pytest.mark.bad_input("convert", "hostile")
def test_overwrite_refuses_to_delete_its_own_input(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.bin").write_bytes((source / "stories260K.bin").read_bytes())
    with pytest.raises(AdapterError, match="would delete"):
        convert_llama2c(out / "model.bin", None, out, overwrite=True)
    assert (out / "model.bin").is_file()


@pytest.mark.bad_input("convert", "missing")
def test_cli_converts_and_reports_errors(source, tmp_path):
    args = ["convert", "llama2c", str(source / "stories260K.bin"), "--tokenizer", str(source / "tok512.bin")]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "converted" in result.output and (tmp_path / "out" / "tokenizer.json").is_file()
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--overwrite" in result.output
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "out"), "--overwrite"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["convert", "llama2c", str(tmp_path / "missing.bin"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "does not exist" in result.output
