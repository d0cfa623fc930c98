"""Convert a llama2.c checkpoint (Karpathy's `run.c` format) and its tokenizer to a transformers Llama directory.

The checkpoint is llama2.c's legacy ("version 0") float32 format: a header of seven int32 — dim, hidden_dim,
n_layers, n_heads, n_kv_heads, vocab_size, seq_len, with a negative vocab_size meaning the classifier is not
shared with the token embedding — followed by the tensors in this order: token_embedding, rms_att (per layer),
wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, freq_cis_real, freq_cis_imag, and wcls when unshared. Each matrix
is stored row-major as out × in, the layout of an nn.Linear weight.

llama2.c rotates interleaved pairs (q[2i], q[2i+1]) as Meta's Llama does, while transformers' Llama rotates the
two halves of each head; q and k rows are permuted exactly as transformers' `convert_llama_weights_to_hf` does
for Meta checkpoints (k with n_kv_heads heads), so the converted model computes the same logits as run.c.

The tokenizer file is llama2.c's `tokenizer.bin`: int32 max_token_length, then per token float32 score, int32
length and the piece's bytes (spaces as ' ', byte tokens as "<0xXX>"). It becomes a `tokenizers` BPE tokenizer
with byte fallback whose merges are derived from the scores (a merge's rank is its result's score), which is the
greedy highest-score-pair merging of run.c's `encode`. Differences from run.c's encoder, all outside ordinary
text: (1) the special-token strings "<s>", "</s>" and "<unk>" written in the input are read as those special
tokens, where run.c spells them out character by character; (2) should two different merges that make the same
piece overlap in one input (tokens x y z with x+y == y+z), run.c merges the leftmost and transformers the
lower-ranked one (no such case exists in the stories260K vocabulary). BOS (id 1) is prepended like run.c's
`encode(..., bos=1, eos=0)`, and " " is prepended to the text like run.c's dummy prefix.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_replace_dir, atomic_save_safetensors
from ..errors import AdapterError

HEADER = struct.Struct("<7i")
_AK42_MAGIC = 0x616B3432  # llama2.c export.py --version 1/2 files start with "ak42"
_BYTE_PIECE = re.compile(rb"<0x[0-9A-Fa-f]{2}>")
SPECIAL = ("<unk>", "<s>", "</s>")  # run.c hard-codes BOS = 1 and EOS = 2
_PORTABLE_CLASS = {"tokenizer_class": "PreTrainedTokenizerFast"}
RMS_NORM_EPS = 1e-5  # run.c's rmsnorm
ROPE_THETA = 10000.0  # run.c's RoPE frequencies


@dataclass(frozen=True)
class Llama2cHeader:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int  # always positive here; see shared_classifier
    seq_len: int
    shared_classifier: bool

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_size * self.n_kv_heads

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """The tensors in file order, with their shapes."""
        L, d, h, V = self.n_layers, self.dim, self.hidden_dim, self.vocab_size
        shapes = [
            ("token_embedding", (V, d)),
            ("rms_att", (L, d)),
            ("wq", (L, d, d)),
            ("wk", (L, self.kv_dim, d)),
            ("wv", (L, self.kv_dim, d)),
            ("wo", (L, d, d)),
            ("rms_ffn", (L, d)),
            ("w1", (L, h, d)),
            ("w2", (L, d, h)),
            ("w3", (L, h, d)),
            ("rms_final", (d,)),
            ("freq_cis_real", (self.seq_len, self.head_size // 2)),
            ("freq_cis_imag", (self.seq_len, self.head_size // 2)),
        ]
        if not self.shared_classifier:
            shapes.append(("wcls", (V, d)))
        return shapes

    def file_size(self) -> int:
        return HEADER.size + 4 * sum(int(np.prod(shape)) for _, shape in self.tensor_shapes())


def _require_file(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"{what} {path} does not exist.")
    if not path.is_file():
        raise AdapterError(f"{what} {path} is not a file.")
    return path


def read_header(checkpoint: str | os.PathLike) -> Llama2cHeader:
    path = _require_file(Path(checkpoint), "llama2.c checkpoint")
    with open(path, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise AdapterError(
            f"{path} is {len(raw)} bytes: too short for a llama2.c checkpoint, whose header alone is {HEADER.size} "
            "bytes. The file is truncated or not a llama2.c model."
        )
    if struct.unpack_from("<I", raw)[0] == _AK42_MAGIC:
        version = struct.unpack_from("<i", raw, 4)[0]
        raise AdapterError(
            f"{path} is a llama2.c export of version {version} (it starts with the 'ak42' magic); this converter "
            "reads the legacy version-0 float32 format that run.c loads. Re-export it with llama2.c's "
            "`export.py --version 0`."
        )
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = HEADER.unpack(raw)
    fields = dict(dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads)
    fields.update(seq_len=seq_len)
    bad = {k: v for k, v in fields.items() if v <= 0}
    if bad or vocab_size == 0:
        raise AdapterError(
            f"{path} has a malformed llama2.c header {fields | {'vocab_size': vocab_size}}: "
            f"{'fields ' + str(sorted(bad)) + ' must be positive' if bad else 'vocab_size is 0'}. "
            "It is not a llama2.c checkpoint, or it is damaged."
        )
    problems = []
    if dim % n_heads:
        problems.append(f"dim={dim} is not a multiple of n_heads={n_heads}")
    elif (dim // n_heads) % 2:
        problems.append(f"the head size dim/n_heads={dim // n_heads} is odd (RoPE rotates pairs)")
    if n_heads % n_kv_heads:
        problems.append(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
    if problems:
        raise AdapterError(f"{path} has a malformed llama2.c header: {'; '.join(problems)}.")
    return Llama2cHeader(
        dim, hidden_dim, n_layers, n_heads, n_kv_heads, abs(vocab_size), seq_len, shared_classifier=vocab_size > 0
    )


def read_llama2c_checkpoint(checkpoint: str | os.PathLike) -> tuple[Llama2cHeader, dict[str, np.ndarray]]:
    """The header and every tensor of a llama2.c checkpoint (float32, shapes as in `Llama2cHeader`)."""
    path = Path(checkpoint)
    header = read_header(path)
    expected, actual = header.file_size(), path.stat().st_size
    if actual != expected:
        how = "truncated" if actual < expected else f"{actual - expected} bytes longer than that"
        raise AdapterError(
            f"{path} is {actual} bytes but its header {header} describes a {expected}-byte checkpoint: the file "
            f"is {how}. Copy or export it again (a legacy version-0 llama2.c export is expected)."
        )
    flat = np.fromfile(path, dtype="<f4", offset=HEADER.size)
    tensors, offset = {}, 0
    for name, shape in header.tensor_shapes():
        n = int(np.prod(shape))
        tensors[name] = flat[offset : offset + n].reshape(shape)
        offset += n
    for name, t in tensors.items():
        if not np.isfinite(t).all():
            raise AdapterError(f"{path}: tensor {name} holds NaN or infinite values; the checkpoint is damaged.")
    return header, tensors


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q or k projection from interleaved RoPE pairs (Meta, llama2.c) to transformers' half split."""
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def hf_state_dict(header: Llama2cHeader, tensors: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, dtype=np.float32, copy=True))

    sd = {"model.embed_tokens.weight": t(tensors["token_embedding"]), "model.norm.weight": t(tensors["rms_final"])}
    for i in range(header.n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = t(tensors["rms_att"][i])
        sd[p + "self_attn.q_proj.weight"] = permute_rotary(t(tensors["wq"][i]), header.n_heads).contiguous()
        sd[p + "self_attn.k_proj.weight"] = permute_rotary(t(tensors["wk"][i]), header.n_kv_heads).contiguous()
        sd[p + "self_attn.v_proj.weight"] = t(tensors["wv"][i])
        sd[p + "self_attn.o_proj.weight"] = t(tensors["wo"][i])
        sd[p + "post_attention_layernorm.weight"] = t(tensors["rms_ffn"][i])
        sd[p + "mlp.gate_proj.weight"] = t(tensors["w1"][i])
        sd[p + "mlp.down_proj.weight"] = t(tensors["w2"][i])
        sd[p + "mlp.up_proj.weight"] = t(tensors["w3"][i])
    if not header.shared_classifier:
        sd["lm_head.weight"] = t(tensors["wcls"])
    return sd


def hf_config(header: Llama2cHeader):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=header.vocab_size,
        hidden_size=header.dim,
        intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers,
        num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads,
        head_dim=header.head_size,
        max_position_embeddings=header.seq_len,
        hidden_act="silu",
        rms_norm_eps=RMS_NORM_EPS,
        rope_theta=ROPE_THETA,
        tie_word_embeddings=header.shared_classifier,
        bos_token_id=1,
        eos_token_id=2,
        architectures=["LlamaForCausalLM"],
        torch_dtype="float32",
    )


# ---- tokenizer ---------------------------------------------------------------------------------------------------
def read_llama2c_tokenizer(path: str | os.PathLike, vocab_size: int) -> list[tuple[bytes, float]]:
    """The (piece, score) pairs of a llama2.c tokenizer.bin holding `vocab_size` tokens."""
    path = _require_file(Path(path), "llama2.c tokenizer")
    data = path.read_bytes()
    if len(data) < 4:
        raise AdapterError(f"{path} is {len(data)} bytes: not a llama2.c tokenizer (it is truncated or empty).")
    (max_len,) = struct.unpack_from("<i", data)
    if max_len <= 0:
        raise AdapterError(f"{path} has max_token_length={max_len}: not a llama2.c tokenizer file.")
    pieces, offset = [], 4
    for i in range(vocab_size):
        if offset + 8 > len(data):
            raise AdapterError(
                f"{path} ends after {i} tokens but the model's vocabulary has {vocab_size}: the tokenizer is "
                "truncated or belongs to another model."
            )
        score, n = struct.unpack_from("<fi", data, offset)
        offset += 8
        if n < 0 or n > max_len or offset + n > len(data):
            raise AdapterError(
                f"{path}: token {i} claims {n} bytes (max_token_length {max_len}, {len(data) - offset} left): "
                "the tokenizer file is malformed or truncated."
            )
        pieces.append((data[offset : offset + n], score))
        offset += n
    if offset != len(data):
        raise AdapterError(
            f"{path} holds more than the model's {vocab_size} tokens ({len(data) - offset} bytes are left over): "
            "it belongs to another model."
        )
    return pieces


def build_tokenizer(pieces: list[tuple[bytes, float]], model_max_length: int):
    """A transformers fast tokenizer reproducing run.c's encode/decode over these pieces."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    if len(pieces) < len(SPECIAL):
        raise AdapterError(f"a llama2.c vocabulary needs at least {len(SPECIAL)} tokens (<unk>, <s>, </s>).")
    vocab: dict[str, int] = {}
    scores: dict[str, float] = {}
    for i, (raw, score) in enumerate(pieces):
        if i < len(SPECIAL):
            piece = SPECIAL[i]  # llama2.c's export writes "\n<s>\n" and "\n</s>\n" for these
        elif _BYTE_PIECE.fullmatch(raw):
            piece = raw.decode("ascii").upper().replace("0X", "0x")
        else:
            try:
                piece = raw.decode("utf-8").replace(" ", "▁")
            except UnicodeDecodeError as e:
                raise AdapterError(f"tokenizer piece {i} ({raw!r}) is not valid UTF-8 ({e}).") from e
            scores[piece] = score
        if piece in vocab:
            raise AdapterError(f"tokenizer pieces {vocab[piece]} and {i} are both {piece!r}.")
        vocab[piece] = i
    # A merge l + r -> p for every split of a piece p into two pieces, ranked by p's score (higher first) as
    # run.c merges the best-scoring pair first; equal scores keep vocabulary order, as transformers' converter.
    merges = []
    for piece, score in scores.items():
        local = [(piece[:j], piece[j:]) for j in range(1, len(piece)) if piece[:j] in scores and piece[j:] in scores]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges.extend((-score, vocab[piece], k, lr) for k, lr in enumerate(local))
    merges.sort(key=lambda m: m[:3])
    tok = Tokenizer(
        BPE(vocab=vocab, merges=[m[3] for m in merges], unk_token=SPECIAL[0], fuse_unk=True, byte_fallback=True)
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=SPECIAL[0],
        bos_token=SPECIAL[1],
        eos_token=SPECIAL[2],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


# ---- the conversion ----------------------------------------------------------------------------------------------
def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
    except ValueError:
        return False
    return True


def convert_llama2c(
    checkpoint: str | os.PathLike,
    tokenizer: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
) -> Path:
    """Write a transformers `LlamaForCausalLM` directory (config, safetensors weights, generation config and,
    given `tokenizer`, a fast tokenizer) equivalent to a llama2.c checkpoint. The directory appears complete or
    not at all. Returns `out_dir`."""
    from transformers import GenerationConfig

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise AdapterError(f"--out {out_dir} exists and is not a directory.")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise AdapterError(
                f"--out {out_dir} exists and is not empty; pass --overwrite (overwrite=True) to replace it, or "
                "choose another directory."
            )
        inputs = [checkpoint] + ([Path(tokenizer)] if tokenizer is not None else [])
        for path in inputs:
            if _inside(path, out_dir):
                raise AdapterError(f"{path} lies inside --out {out_dir}, which --overwrite would delete.")
    header, tensors = read_llama2c_checkpoint(checkpoint)
    pieces = None if tokenizer is None else read_llama2c_tokenizer(tokenizer, header.vocab_size)
    state = hf_state_dict(header, tensors)
    config = hf_config(header)
    fast = None if pieces is None else build_tokenizer(pieces, header.seq_len)

    def build(tmp: Path) -> None:
        config.save_pretrained(tmp)
        GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(tmp)
        atomic_save_safetensors(state, tmp / "model.safetensors", metadata={"format": "pt"})
        if fast is not None:
            fast.save_pretrained(tmp)
            # transformers 5 records its own "TokenizersBackend"; the older name loads in 4.x and 5.x alike.
            tok_config = tmp / "tokenizer_config.json"
            tok_config.write_text(json.dumps(json.loads(tok_config.read_text()) | _PORTABLE_CLASS, indent=2) + "\n")

    atomic_replace_dir(build, out_dir)
    return out_dir
