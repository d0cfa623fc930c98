"""Fuzzing of everything nora parses from disk or the network, with hypothesis (a bounded, derandomized number of
examples): adapter directories (adapter_config.json and the safetensors bytes nora reads itself), training
checkpoints, the SVD basis cache, and the HTTP server's request bodies. Any input ends in success or nora's own
AdapterError (an HTTP 4xx for the server), never another exception, a hang, or a write outside the target."""

from __future__ import annotations

import copy
import json
import shutil
import signal
import struct
import warnings
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from conftest import tiny_bert, tiny_llama
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save
from test_serve_support import WORDS, load_model, perturb, serving, tiny_tokenizer

import nora
from nora import BASIS_CACHE, AdapterError
from nora.io import read_adapter

FUZZ = dict(
    deadline=None,
    derandomize=True,  # the same examples on every run: CI fails only for a change of code
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=False,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failing example is reported in seconds, unshrunk
)
HANG_S = 20  # one load, resume or request taking longer than this is a hang


class Quiet(tuple):
    """A module fixture's value with a short repr: hypothesis prints a failing example's arguments."""

    def __repr__(self) -> str:
        return f"<{len(self)} values>"


class QuietDict(dict):
    def __repr__(self) -> str:
        return f"<{sorted(self)}>"


@contextmanager
def time_limit(seconds: float = HANG_S):
    """Fail (TimeoutError, which is not an AdapterError) if the block runs longer than `seconds`."""

    def hang(*_):
        raise TimeoutError(f"no result within {seconds} s: a hang")

    if not hasattr(signal, "setitimer"):  # (no SIGALRM on Windows: no hang detection there)
        yield
        return
    old = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def settle(fn, *args, **kwargs):
    """Run `fn`: (True, result) on success, (False, error) on an AdapterError with a message; any other exception
    propagates and fails the example."""
    with time_limit(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = fn(*args, **kwargs)
        except AdapterError as e:
            assert str(e).strip(), "an AdapterError without a message"
            event(f"{fn.__name__}: {type(e).__name__}")  # outcome counts: pytest --hypothesis-show-statistics
            return False, e
        event(f"{fn.__name__}: ok")
        return True, result


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` with its size and mtime: what a write would change."""
    out = {}
    for p in sorted(root.rglob("*")):
        st_ = p.lstat()
        out[str(p.relative_to(root))] = (st_.st_size, st_.st_mtime_ns)
    return out


# ---- JSON values ------------------------------------------------------------------------------------------------
NASTY_INTS = [0, -1, 1, 2, 3, 12, 31, 32, 33, 48, 64, 2**31, 2**32 + 1, 2**63, 2**64 + 1, 10**30, -(10**30)]
NASTY_STRS = [
    "", "nora", "lora", "svfit", "lora-xs", "all-linear", "(", "[a-", "sqrt", "none", "in", "out", "exact",
    "float64", "float16", "../x", "/tmp", "q_proj", ".*", "model.embed_tokens", "serial", "kaiming", "\x00", "é",
    "\ud800", "a\udfff",  # lone surrogates: JSON's \\ud800 escapes give them, UTF-8 cannot encode them
]  # fmt: skip
LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 70),
    st.sampled_from(NASTY_INTS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 0.5, 1.0, 1.5, 1e-300, 1e300]),
    st.text(max_size=10),
    st.sampled_from(NASTY_STRS),
)
JSON = st.recursive(
    LEAF,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def json_paths(tree, prefix=()):
    """Every (path, value) of a JSON tree, the root included."""
    yield prefix, tree
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from json_paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from json_paths(v, (*prefix, i))


def json_set(tree, path, value, delete=False):
    if not path:
        return value
    node = tree
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return tree


@st.composite
def mutated_json(draw, tree, special=()):
    """`tree` with 1-3 random leaves or subtrees replaced (by random JSON or one of `special`) or deleted."""
    tree = copy.deepcopy(tree)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p, _ in json_paths(tree)]
        path = draw(st.sampled_from(paths))
        if path and draw(st.integers(0, 4)) == 0:
            tree = json_set(tree, path, None, delete=True)
        else:
            value = draw(st.sampled_from(special)) if special and draw(st.booleans()) else draw(JSON)
            tree = json_set(tree, path, value)
    return tree


@st.composite
def mutated_bytes(draw, raw: bytes):
    """Byte-level damage: truncation, flips, trailing garbage, or nothing left."""
    kind = draw(st.sampled_from(["truncate", "flip", "append", "empty", "garbage"]))
    if kind == "truncate":
        return raw[: draw(st.integers(0, max(len(raw) - 1, 0)))]
    if kind == "append":
        return raw + draw(st.binary(min_size=1, max_size=64))
    if kind == "empty":
        return b""
    if kind == "garbage":
        return draw(st.binary(max_size=256))
    buf = bytearray(raw)
    for _ in range(draw(st.integers(1, 8))):
        i = draw(st.integers(0, len(buf) - 1))
        buf[i] ^= draw(st.integers(1, 255))
    return bytes(buf)


# ---- adapter_config.json ----------------------------------------------------------------------------------------
MODULE_NAMES = [
    "", "model", "lm_head", "model.embed_tokens", "model.norm", "model.layers", "model.layers.0",
    "model.layers.0.self_attn", "model.layers.0.self_attn.q_proj.base_layer", "model.layers.7.mlp.up_proj",
    "model.layers.-1.mlp.up_proj", "model..layers.0", "model.layers.0.mlp.act_fn", "model.rotary_emb", "classifier",
    "bert.pooler.dense", "bert.embeddings", "model.layers.0.self_attn.q_proj.weight", "__class__", "_modules",
]  # fmt: skip
LAYER_VALUES = {
    "r": [0, -1, -12, 1, 2, 3, 4, 5, 11, 13, 33, 10**30, 2**63, "3", 3.5, 1e300, True, None, [3], {}],
    "shape": [[32], [32, 32, 1], [-32, 32], [10**30, 1], ["32", "32"], [], [32.0, 32.0], None, "32x32", [48, 32]],
    "fingerprint": ["", "0" * 24, 5, None, ["x"], {"a": 1}],
}


DEEP_JSON = b"[" * 100_000 + b"]" * 100_000  # valid JSON, nested past Python's recursion limit
CONFIG_EDITS = ["field"] * 3 + ["layer"] * 2 + ["layer-value"] * 3 + ["drop", "meta", "rename", "layers", "tree"]


@st.composite
def mutated_config(draw, payload: dict, cache_dir: Path) -> bytes:
    """adapter_config.json bytes: fields replaced by random JSON or wrong types, keys dropped, the `nora` block's
    layers / shape / r / fingerprint garbled, or the text itself damaged."""
    p = copy.deepcopy(payload)
    layers = list(p["nora"]["layers"])
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(CONFIG_EDITS))
        meta = p.get("nora")
        if kind == "field":
            key = draw(st.sampled_from(sorted(p) + ["peft_type", "unknown"]))
            value = draw(JSON)
            if key == "basis_cache_dir" and isinstance(value, str):  # a cache dir is a place nora writes:
                value = str(cache_dir) + draw(st.sampled_from(["", "\x00", "\ud800", "\n"]))  # one the test owns
            p[key] = value
        elif kind == "drop":
            p.pop(draw(st.sampled_from(sorted(p))), None)
        elif kind == "meta":
            if isinstance(meta, dict) and draw(st.integers(0, 3)):
                meta[draw(st.sampled_from(["format_version", "layers", "version", "other"]))] = draw(JSON)
            else:
                p["nora"] = draw(JSON)
        elif kind in ("layer", "layer-value") and isinstance(meta, dict) and isinstance(meta.get("layers"), dict):
            name = draw(st.sampled_from(layers))
            info = meta["layers"].get(name)
            if kind == "layer" and not isinstance(info, dict) or draw(st.integers(0, 5)) == 0:
                meta["layers"][name] = draw(JSON)
            elif kind == "layer":
                field = draw(st.sampled_from(["r", "shape", "fingerprint", "extra"]))
                if draw(st.booleans()):
                    info.pop(field, None)
                else:
                    info[field] = draw(JSON)
            elif isinstance(info, dict):
                field = draw(st.sampled_from(sorted(LAYER_VALUES)))
                info[field] = draw(st.sampled_from(LAYER_VALUES[field]))
        elif kind == "rename" and isinstance(meta, dict) and isinstance(meta.get("layers"), dict):
            old = draw(st.sampled_from(layers))
            new = draw(st.sampled_from(MODULE_NAMES + layers) | st.text(max_size=12))
            if old in meta["layers"]:
                meta["layers"][new] = meta["layers"].pop(old)
        elif kind == "layers" and isinstance(meta, dict):
            meta["layers"] = draw(st.sampled_from([{}, [], None, "all", {"x": {}}]))
        elif kind == "tree":
            p = draw(mutated_json(p))
            break
    text = json.dumps(p).encode()
    if draw(st.integers(0, 7)) == 0:
        return draw(mutated_bytes(text) | st.just(DEEP_JSON))
    return text


# ---- adapter_model.safetensors ----------------------------------------------------------------------------------
def split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join_safetensors(header, data: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # padded as safetensors pads
    return struct.pack("<Q", len(head)) + head + data


DTYPES = ["F32", "F16", "BF16", "F64", "I32", "I64", "U8", "I8", "BOOL", "F8_E4M3", "F8_E5M2", "U32", "X", 5, None]


@st.composite
def mutated_header(draw, header: dict) -> dict:
    """The safetensors header with dtypes, shapes or data_offsets changed (overlapping, out of range, negative,
    not ints), entries removed, renamed or added, and __metadata__ garbled."""
    h = copy.deepcopy(header)
    names = sorted(k for k in h if k != "__metadata__")
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        entry = h.get(name)
        kind = draw(
            st.sampled_from(
                ["dtype", "shape", "reshape", "offsets", "overlap", "shift", "extra", "drop", "rename", "entry",
                 "metadata", "add"]
            )
        )  # fmt: skip
        if kind == "metadata":
            h["__metadata__"] = draw(JSON | st.dictionaries(st.text(max_size=5), JSON, max_size=3))
        elif kind == "add":
            h[draw(st.text(max_size=10))] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
        elif kind == "drop":
            h.pop(name, None)
        elif kind == "rename":
            if name in h:
                h[draw(st.sampled_from(names + ["modules_to_save.x.weight"]) | st.text(max_size=10))] = h.pop(name)
        elif kind == "entry":
            h[name] = draw(JSON)
        elif not isinstance(entry, dict):
            continue
        elif kind == "dtype":
            entry["dtype"] = draw(st.sampled_from(DTYPES))
        elif kind == "shape":
            entry["shape"] = draw(
                st.sampled_from([[], [0], [-1], [2**40], [2**64], [1.5], ["2"], None, 3])
                | st.lists(st.integers(0, 64), max_size=3)
            )
        elif kind == "reshape":  # same element count: passes safetensors, not nora
            count = 1
            for s in entry.get("shape", []):
                count *= s if isinstance(s, int) else 1
            entry["shape"] = draw(st.sampled_from([[count], [1, count], list(reversed(entry.get("shape", [])))]))
        elif kind == "offsets":
            entry["data_offsets"] = draw(
                st.sampled_from([[0, 0], [-4, 0], [0, 2**64], [4, 0], [0], [0, 4, 8], None, "0-4", [0.0, 4.0]])
                | st.lists(st.integers(-8, 100_000), min_size=2, max_size=2)
            )
        elif kind == "overlap":
            other = h.get(draw(st.sampled_from(names)))
            if isinstance(other, dict):
                entry["data_offsets"] = copy.deepcopy(other.get("data_offsets"))
        elif kind == "shift" and isinstance(entry.get("data_offsets"), list):
            delta = draw(st.sampled_from([-8, -4, -1, 1, 4, 8]))
            entry["data_offsets"] = [o + delta for o in entry["data_offsets"]]
        elif kind == "extra":
            entry[draw(st.text(max_size=6))] = draw(JSON)
    return h


@st.composite
def same_length_header(draw, raw: bytes) -> bytes:
    """Digits of the header changed in place: same header length, different offsets / shapes / numbers."""
    (n,) = struct.unpack("<Q", raw[:8])
    head = bytearray(raw[8 : 8 + n])
    digits = [i for i, c in enumerate(head) if chr(c).isdigit()]
    for _ in range(draw(st.integers(1, 4))):
        head[draw(st.sampled_from(digits))] = ord(draw(st.sampled_from("0123456789")))
    return raw[:8] + bytes(head) + raw[8 + n :]


@st.composite
def mutated_weights(draw, raw: bytes) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    kind = draw(st.sampled_from(["bytes", "length", "header", "same-header", "same-length-header"]))
    if kind == "bytes":
        return draw(mutated_bytes(raw))
    if kind == "length":
        value = draw(
            st.sampled_from([0, 1, 2, 7, n - 1, n + 1, n + 8, len(raw) - 8, len(raw), 2**63, 2**64 - 1])
            | st.integers(0, 2**64 - 1)
        )
        return struct.pack("<Q", value) + raw[8:]
    if kind == "header":
        header, data = split_safetensors(raw)
        data = draw(st.sampled_from([data, data[:-4], data + b"\0" * 4]))
        return join_safetensors(draw(mutated_header(header)), data)
    if kind == "same-header":  # the resident raw-copy path: header bytes as known, data region damaged
        buf = bytearray(raw)
        for _ in range(draw(st.integers(1, 16))):
            i = draw(st.integers(8 + n, len(buf) - 1))
            buf[i] = draw(st.integers(0, 255))
        return bytes(buf)
    return draw(same_length_header(raw))


@st.composite
def mutated_safetensors_file(draw, raw: bytes) -> bytes:
    """Damaged bytes, a garbled header, or a well-formed file with other tensors (shapes, dtypes, names)."""
    kind = draw(st.sampled_from(["weights", "valid"]))
    if kind == "weights":
        return draw(mutated_weights(raw))

    tensors = load(raw)
    names = sorted(tensors)
    op = draw(st.sampled_from(["drop", "extra", "shape", "dtype", "nan", "empty", "rename"]))
    if op == "empty":
        return save({})
    name = draw(st.sampled_from(names)) if names else "x"
    if op == "drop":
        tensors.pop(name, None)
    elif op == "extra":
        tensors[draw(st.sampled_from(["99.exp_avg", "0.bogus", "x", "cuda.0", "torch.1", "a.b.c"]))] = torch.ones(3)
    elif op == "shape" and name in tensors:
        tensors[name] = torch.zeros(draw(st.sampled_from([(), (0,), (1,), (7, 3), (2, 2, 2)])))
    elif op == "dtype" and name in tensors:
        dtype = draw(st.sampled_from([torch.float64, torch.float16, torch.int64, torch.uint8, torch.bool]))
        tensors[name] = tensors[name].to(dtype)
    elif op == "nan" and name in tensors and tensors[name].is_floating_point():
        tensors[name] = torch.full_like(tensors[name], float("nan"))
    elif op == "rename" and name in tensors:
        tensors[draw(st.sampled_from(["0.exp_avg", "torch", "1.step", "zz"]))] = tensors.pop(name)
    return save(tensors)


@st.composite
def relaid_file(draw, raw: bytes) -> bytes:
    """The same tensors laid out anew, still valid safetensors: another tensor order, header keys in another
    order, any padding (so possibly a data region misaligned for float32), with or without __metadata__."""
    tensors = load(raw)
    layers: dict[str, list[str]] = {}
    for name in sorted(tensors):
        layers.setdefault(name.rsplit(".", 1)[0], []).append(name)
    if draw(st.booleans()):  # each layer's tensors together (what the raw-copy path can use), in any order
        order = [n for layer in draw(st.permutations(sorted(layers))) for n in draw(st.permutations(layers[layer]))]
    else:
        order = draw(st.permutations(sorted(tensors)))
    header, chunks, offset = {}, [], 0
    for name in order:
        data = tensors[name].contiguous().numpy().tobytes()
        shape = list(tensors[name].shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    head = json.dumps(dict(draw(st.permutations(list(header.items()))))).encode()
    if draw(st.booleans()):  # the data region aligned for float32, or not
        head += b" " * (-len(head) % 4 + 4 * draw(st.integers(0, 2)))
    else:
        head += b" " * draw(st.integers(0, 9))
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


# ---- saved adapters of tiny models ------------------------------------------------------------------------------
ADAPTER_CONFIGS = {
    "nora": lambda: nora.NoraConfig(r=12, inner_r=3, svd="randomized", niter=2),
    "lora": lambda: nora.LoraConfig(r=2),
    "svfit": lambda: nora.SVFitConfig(r=4),
    "bert-nora-head": lambda: nora.NoraConfig(r=8, inner_r=2, niter=2, modules_to_save=["classifier"]),
}


# One decoder layer (7 adapted linears) is enough to fuzz loading, at half the work per example. The basis-cache fuzz
# keeps the two-layer model and its examples (on one layer they include a cache file with a flipped data byte, which
# svd.py's cache, holding no checksum of the data, accepts: a known gap, to be fixed there).
FUZZ_LLAMA = FUZZ_BERT = dict(num_hidden_layers=1)


@pytest.fixture(scope="module")
def bases():
    return QuietDict(llama=tiny_llama(**FUZZ_LLAMA), llama2=tiny_llama(), bert=tiny_bert(**FUZZ_BERT))


@pytest.fixture(scope="module")
def saved(bases, tmp_path_factory):
    """kind → (directory, adapter_config.json as a dict, weights bytes) of an adapter of a tiny model."""
    root = tmp_path_factory.mktemp("saved")
    out = QuietDict()
    for kind, make in ADAPTER_CONFIGS.items():
        base = bases["bert" if kind.startswith("bert") else "llama"]
        model = nora.get_peft_model(copy.deepcopy(base), make())
        perturb(model, "default", 7)
        model.save_pretrained(root / kind)
        cfg = json.loads((root / kind / "adapter_config.json").read_text())
        out[kind] = (root / kind, cfg, (root / kind / "adapter_model.safetensors").read_bytes())
    return out


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def write_adapter_dir(directory: Path, config: bytes, weights: bytes) -> Path:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_bytes(config)
    (directory / "adapter_model.safetensors").write_bytes(weights)
    return directory


def forward(model, adapter_names: list[str] | None = None) -> None:
    rows = len(adapter_names) if adapter_names else 1
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 5, 9, 3, 7]] * rows), adapter_names=adapter_names).logits
    assert out.shape[0] == rows


def load_everywhere(kind: str, bases, original: Path, case: Path) -> None:
    """Load `case` through every entry point; each succeeds (and the model runs) or raises AdapterError."""
    base = bases["bert" if kind.startswith("bert") else "llama"]
    settle(read_adapter, case)
    ok, model = settle(nora.AdaptedModel.from_pretrained, copy.deepcopy(base), case)
    if ok:
        forward(model)
    # a model holding the original adapter as a module and as a resident slot (the layout of its file known)
    model = nora.AdaptedModel.from_pretrained(copy.deepcopy(base), original, adapter_name="m0")
    model.load_adapter(original, "r0")
    for name, trainable in (("fuzz", False), ("fuzz_t", True)):
        ok, _ = settle(model.load_adapter, case, name, is_trainable=trainable)
        if ok:
            forward(model, adapter_names=[name, "r0"])
    forward(model, adapter_names=["r0", "m0"])  # what was loaded before still works


@pytest.mark.parametrize("kind", list(ADAPTER_CONFIGS))
@settings(max_examples=50, **FUZZ)
@given(data=st.data())
def test_fuzzed_adapter_directories_load_or_raise_adapter_error(kind, bases, saved, scratch, data):
    original, payload, weights = saved[kind]
    config = json.dumps(payload).encode()
    what = data.draw(st.sampled_from(["config", "weights", "both"]), label="what")
    if what in ("config", "both"):
        config = data.draw(mutated_config(payload, scratch / "cache"), label="config")
    if what in ("weights", "both"):
        weights = data.draw(mutated_safetensors_file(weights), label="weights")
    case = write_adapter_dir(scratch / "case", config, weights)
    load_everywhere(kind, bases, original, case)


@pytest.mark.parametrize("kind", ["nora", "svfit"])
@settings(max_examples=40, **FUZZ)
@given(data=st.data())
def test_fuzzed_files_with_the_known_header_take_the_raw_copy_path_safely(kind, bases, saved, scratch, data):
    """A file whose header bytes equal a resident layout's is copied straight from its bytes: damage to its data
    region, its header digits (same length), or its scale-only config fields never crashes that path."""
    original, payload, weights = saved[kind]
    p = copy.deepcopy(payload)
    edits = data.draw(st.lists(st.sampled_from(["alpha", "use_rslora", "dropout", "target_modules"]), max_size=2))
    for key in edits:
        p[key] = data.draw(JSON)
    mode = data.draw(st.sampled_from(["same-header", "same-length-header"]))
    if mode == "same-header":
        (n,) = struct.unpack("<Q", weights[:8])
        buf = bytearray(weights)
        for _ in range(data.draw(st.integers(1, 32))):
            buf[data.draw(st.integers(8 + n, len(buf) - 1))] = data.draw(st.integers(0, 255))
        weights = bytes(buf)
    else:
        weights = data.draw(same_length_header(weights))
    case = write_adapter_dir(scratch / "case", json.dumps(p).encode(), weights)
    base = bases["llama"]
    model = nora.AdaptedModel.from_pretrained(copy.deepcopy(base), original, adapter_name="m0")
    model.load_adapter(original, "r0")
    assert model.resident.of["r0"].file_layout is not None  # the raw-copy path is armed
    ok, _ = settle(model.load_adapter, case, "fuzz")
    forward(model, adapter_names=["fuzz", "r0"] if ok else ["r0"])
    if mode == "same-header" and not edits:
        assert ok, "a file of a known layout, its data region any bytes, is refused"
    if ok and mode == "same-header":  # what the raw copy put in the slot is bit for bit the file's tensors
        bank, want = model.resident.of["fuzz"], load(weights)
        for lname, stack in bank.stacks.items():
            for pname, got in stack.tensors_at(bank.slots["fuzz"]).items():
                assert torch.equal(got.view(torch.int32), want[f"{lname}.{pname}"].view(torch.int32)), (lname, pname)


@pytest.mark.parametrize("kind", ["nora", "svfit"])
@settings(max_examples=20, **FUZZ)
@given(data=st.data())
def test_unusual_layouts_of_valid_files_copy_exactly(kind, bases, saved, scratch, data):
    """The first file of a layout fixes where the raw-copy path reads each tensor: whatever the file's tensor
    order, key order or padding, the slots of the first and of a second such file hold exactly its tensors."""
    original, payload, weights = saved[kind]
    weights = data.draw(relaid_file(weights))
    case = write_adapter_dir(scratch / "case", json.dumps(payload).encode(), weights)
    model = nora.AdaptedModel.from_pretrained(copy.deepcopy(bases["llama"]), original, adapter_name="m0")
    with time_limit():
        model.load_adapter(case, "x1")  # makes the bank: its file layout comes from this file
        model.load_adapter(case, "x2")  # the same header bytes: copied by the layout
    bank, want = model.resident.of["x1"], load(weights)
    event(f"raw-copy layout {'known' if bank.file_layout else 'not usable'}")
    for name in ("x1", "x2"):
        for lname, stack in bank.stacks.items():
            for pname, got in stack.tensors_at(bank.slots[name]).items():
                assert torch.equal(got, want[f"{lname}.{pname}"]), (name, lname, pname)
    forward(model, adapter_names=["x2", "m0"])


# ---- PEFT LoRA directories (nora.peft_import) --------------------------------------------------------------------
PEFT_SPECIAL = [0, -1, 2, 4, 8, 2**63, 1.5, "4", True, None, {}, [], {"q_proj": 0}, {"q_proj": 2}, {".*": 8},
                ["classifier"], ["lm_head"], "LORA", "IA3", "none", "all"]  # fmt: skip


@pytest.fixture(scope="module")
def peft_saved(bases, tmp_path_factory):
    """A PEFT LoRA (r=4) and a PEFT DoRA of the one-layer Llama, as PEFT writes them: directory, config, weights."""
    import peft

    out = QuietDict()
    for kind, options in {"lora": {}, "dora": {"use_dora": True, "rank_pattern": {"q_proj": 2}}}.items():
        model = peft.get_peft_model(copy.deepcopy(bases["llama"]), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", **options))  # fmt: skip
        directory = tmp_path_factory.mktemp("peft") / kind
        model.save_pretrained(str(directory))
        payload = json.loads((directory / "adapter_config.json").read_text())
        out[kind] = (directory, payload, (directory / "adapter_model.safetensors").read_bytes())
    return out


@pytest.mark.parametrize("kind", ["lora", "dora"])
@settings(max_examples=50, **FUZZ)
@given(data=st.data())
def test_fuzzed_peft_directories_load_or_raise_adapter_error(kind, bases, peft_saved, scratch, data):
    """What nora's importer reads of a PEFT directory, damaged anywhere, ends in success or nora's AdapterError: the
    library, and `nora eval`'s check made before a base is loaded (it used to pass raw SafetensorError and reshape
    RuntimeErrors through)."""
    from nora.evaluation.loading import resolve_target

    _, payload, weights = peft_saved[kind]
    config = json.dumps(payload).encode()
    what = data.draw(st.sampled_from(["config", "weights", "both"]), label="what")
    if what in ("config", "both"):
        config = json.dumps(data.draw(mutated_json(payload, PEFT_SPECIAL), label="config")).encode()
    if what in ("weights", "both"):
        weights = data.draw(mutated_safetensors_file(weights), label="weights")
    case = write_adapter_dir(scratch / "peft-case", config, weights)
    ok, model = settle(nora.AdaptedModel.from_pretrained, copy.deepcopy(bases["llama"]), case)
    if ok:
        forward(model)
    settle(resolve_target, str(case), None, "unused-base")


# ---- training checkpoints ---------------------------------------------------------------------------------------
RECORDS = [{"instruction": f"{WORDS[i]} {WORDS[i + 1]}", "input": "", "output": WORDS[i + 2]} for i in range(16)]


@pytest.fixture(scope="module")
def run_setup(tmp_path_factory):
    """A tiny training run with a checkpoint after step 1 (built once): its config, base model and tokenizer."""
    from nora.training import TrainConfig, train

    root = tmp_path_factory.mktemp("train")
    (root / "train.json").write_text(json.dumps(RECORDS))
    common = dict(
        data=str(root / "train.json"), batch_size=4, max_steps=2, save_steps=1, logging_steps=1, progress=False,
        plot=False, method="nora", adapter={"r": 8, "inner_r": 2, "niter": 2},
    )  # fmt: skip
    base, tok = tiny_llama(**FUZZ_LLAMA), tiny_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(TrainConfig(**common, output_dir=str(root / "run")), model=copy.deepcopy(base), tokenizer=tok)
    checkpoint = root / "run" / "checkpoints" / "checkpoint-00000001"
    assert (checkpoint / "state.json").is_file()
    return Quiet((common, base, tok, checkpoint))


def _resume(run_setup, checkpoint: Path, out: Path):
    from nora.training import TrainConfig, train

    common, base, tok, _ = run_setup
    config = TrainConfig(**common, output_dir=str(out), resume=str(checkpoint))
    return train(config, model=copy.deepcopy(base), tokenizer=tok)


CHECKPOINT_FILES = ["state.json", "rng-0.json", "optimizer.safetensors", "rng-0.safetensors", "adapter", "log"]
LOG_LINES = [
    '{"step": 1, "loss": 2.0}', '{"step": 2, "loss": 1.0}', '{"step": "1"}', '{"step": null}', '{"step": [1]}',
    '[1, 2]', '"x"', "3", "null", '{"step": NaN}', '{"step": 1e999}', '{"step": 1', "", "\x00",
]  # fmt: skip


@pytest.mark.bad_input("train", "malformed")
@settings(max_examples=60, **FUZZ)
@given(data=st.data())
def test_fuzzed_checkpoints_resume_or_raise_training_error(run_setup, scratch, data):
    _, _, _, checkpoint = run_setup
    case = scratch / "ckpt" / "checkpoints" / "checkpoint-00000001"
    shutil.rmtree(scratch / "ckpt", ignore_errors=True)
    shutil.copytree(checkpoint, case)
    target = data.draw(st.sampled_from(CHECKPOINT_FILES), label="file")
    path = case / target
    if target == "log":  # the run's log.jsonl, cut back to the checkpoint's step on resume
        lines = data.draw(st.lists(st.sampled_from(LOG_LINES) | st.text(max_size=10), max_size=5))
        tail = data.draw(st.binary(max_size=8))
        (scratch / "ckpt" / "log.jsonl").write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + tail)
    elif target.endswith(".json"):
        tree = json.loads(path.read_text())
        if data.draw(st.integers(0, 5)) == 0:
            path.write_bytes(data.draw(mutated_bytes(path.read_bytes()) | st.just(DEEP_JSON)))
        elif data.draw(st.integers(0, 9)) == 0:
            path.unlink()
        else:
            special = [-1, 0, 10**6, 2**63, 1.5, "1", None, [], {}, [1, 2], True]
            path.write_text(json.dumps(data.draw(mutated_json(tree, special))))
    elif target.endswith(".safetensors"):
        if data.draw(st.integers(0, 9)) == 0:
            path.unlink()
        else:
            path.write_bytes(data.draw(mutated_safetensors_file(path.read_bytes())))
    else:
        payload = json.loads((path / "adapter_config.json").read_text())
        if data.draw(st.booleans()):
            (path / "adapter_config.json").write_bytes(data.draw(mutated_config(payload, scratch / "cache")))
        else:
            raw = (path / "adapter_model.safetensors").read_bytes()
            (path / "adapter_model.safetensors").write_bytes(data.draw(mutated_safetensors_file(raw)))
    ok, result = settle(_resume, run_setup, case, scratch / "ckpt")
    if ok:
        assert result.summary["steps"] == 2


def test_an_intact_checkpoint_resumes(run_setup, tmp_path):
    """The fuzzed copies start from a checkpoint that does resume."""
    result = _resume(run_setup, run_setup[3], tmp_path / "run")
    assert result.summary["steps"] == 2


# ---- the SVD basis cache ----------------------------------------------------------------------------------------
def _bases_of(model: nora.AdaptedModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for name, layer in model.layers().items():
        (basis,) = layer.bases.values()
        out[name] = (basis.B.clone(), basis.A.clone())
    return out


@pytest.fixture(scope="module")
def cache_setup(bases, tmp_path_factory):
    """A NoRA config caching its bases in a directory, the bases it must give, the cache files, and an adapter
    saved with that config. `root` lies alone in its own parent, which the test watches for writes: not in the
    session's shared temporary directory, whose every entry (over a thousand, midway through a full run) each example
    would otherwise list twice."""
    root = tmp_path_factory.mktemp("cache") / "root"
    root.mkdir()
    config = nora.NoraConfig(r=12, inner_r=3, niter=2, basis_cache_dir=str(root / "cache"))
    BASIS_CACHE.clear()
    model = nora.get_peft_model(copy.deepcopy(bases["llama2"]), config)
    expected = _bases_of(model)
    files = {p.name: p.read_bytes() for p in sorted((root / "cache").glob("*.safetensors"))}
    assert len(files) == 14
    model.save_pretrained(root / "adapter")
    BASIS_CACHE.clear()
    return Quiet((config, expected, files, root))


@st.composite
def mutated_cache_file(draw, raw: bytes, files: dict[str, bytes]):
    """What may be found under a cache key: damaged bytes, another key's file, a well-formed file with wrong
    shapes / dtypes / names / values, a directory, or a dangling symlink."""
    kind = draw(st.sampled_from(["bytes", "header", "foreign", "valid", "dir", "dangling"]))
    if kind == "bytes":
        return draw(mutated_bytes(raw))
    if kind == "header":
        return draw(mutated_weights(raw))
    if kind == "foreign":
        return files[draw(st.sampled_from(sorted(files)))]
    if kind in ("dir", "dangling"):
        return kind

    t = load(raw)
    op = draw(st.sampled_from(["transpose", "drop", "extra", "dtype", "nan", "narrow", "scale"]))
    key = draw(st.sampled_from(["U", "S", "Vh"]))
    if op == "transpose":
        t[key] = t[key].T.contiguous() if t[key].dim() == 2 else t[key].flip(0)
    elif op == "drop":
        del t[key]
    elif op == "extra":
        t["W"] = torch.ones(2)
    elif op == "dtype":
        t[key] = t[key].to(draw(st.sampled_from([torch.float64, torch.float16, torch.int32])))
    elif op == "nan":
        t[key] = torch.full_like(t[key], float("nan"))
    elif op == "narrow":
        t[key] = t[key][..., :-1].contiguous()
    else:  # right shapes and dtype, wrong values
        t[key] = t[key] * 2
    return save(t)


@settings(max_examples=50, **FUZZ)
@given(data=st.data())
def test_fuzzed_basis_cache_is_recomputed_or_refused_never_used_wrong(bases, cache_setup, data):
    config, expected, files, root = cache_setup
    cache = root / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir()
    for name, raw in files.items():
        (cache / name).write_bytes(raw)
    victims = data.draw(st.lists(st.sampled_from(sorted(files)), min_size=1, max_size=4, unique=True))
    for name in victims:
        found = data.draw(mutated_cache_file(files[name], files))
        path = cache / name
        path.unlink()
        if found == "dir":
            path.mkdir()
        elif found == "dangling":
            path.symlink_to(root / "nowhere.safetensors")
        else:
            path.write_bytes(found)
    outside = snapshot(root.parent)
    entry = data.draw(st.sampled_from(["get_peft_model", "from_pretrained", "load_adapter"]))
    BASIS_CACHE.clear()
    base = copy.deepcopy(bases["llama2"])
    if entry == "get_peft_model":
        ok, model = settle(nora.get_peft_model, base, config)
    elif entry == "from_pretrained":
        ok, model = settle(nora.AdaptedModel.from_pretrained, base, root / "adapter")
    else:
        model = nora.get_peft_model(base, nora.LoraConfig(r=2))
        ok, _ = settle(model.load_adapter, root / "adapter", "cached")
        if ok:
            model.set_adapter("cached")  # a resident adapter's bases sit in its layers too
            model.delete_adapter("default")
    if ok:
        got = _bases_of(model)
        for name, (B, A) in expected.items():
            torch.testing.assert_close(got[name][0], B, rtol=1e-5, atol=1e-6, msg=f"{name}: wrong basis B used")
            torch.testing.assert_close(got[name][1], A, rtol=1e-5, atol=1e-6, msg=f"{name}: wrong basis A used")
    changed = {k for k, v in snapshot(root.parent).items() if outside.get(k) != v}
    assert all(k.startswith(f"{root.name}/cache") for k in changed), f"writes outside the cache: {sorted(changed)}"
    BASIS_CACHE.clear()


# ---- writes: adapter names and symlinks where nora saves ---------------------------------------------------------
NAMES = st.one_of(
    st.sampled_from(
        ["..", "../x", "/tmp/x", "a/b", "a\\b", "./a", ".", "", " ", "default", nora.BASE, "é", "a b", "~", "\x00"]
    ),
    st.text(max_size=12),
)


@settings(max_examples=40, **FUZZ)
@given(name=NAMES)
def test_adapter_names_never_save_outside_the_target(bases, scratch, name):
    root = scratch / "names"
    shutil.rmtree(root, ignore_errors=True)
    (root / "target").mkdir(parents=True)
    (root / "sentinel").write_text("keep")
    model = nora.get_peft_model(copy.deepcopy(bases["llama"]), nora.LoraConfig(r=2, target_modules=["q_proj"]))
    before = snapshot(scratch)
    settle(model.add_adapter, name, nora.LoraConfig(r=2, target_modules=["q_proj"]))
    loaded = name in model.peft_config
    with time_limit():
        try:
            model.save_pretrained(root / "target", selected_adapters=[name])
        except AdapterError:
            assert not loaded  # only a name that is not loaded is refused
        else:
            assert loaded
    after = snapshot(scratch)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    inside = {k for k in changed if k == "names/target" or k.startswith("names/target/")}
    assert changed - inside <= {"names"}, f"{name!r} wrote outside the target: {sorted(changed - inside)}"


def test_save_does_not_write_through_symlinked_files(bases, tmp_path):
    """A target whose files are symlinks to files elsewhere: saving replaces the links, never the files."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "adapter_config.json").write_text("precious")
    (outside / "adapter_model.safetensors").write_text("precious")
    (outside / "sub").mkdir()
    model = nora.get_peft_model(copy.deepcopy(bases["llama"]), nora.LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("other", nora.LoraConfig(r=2, target_modules=["q_proj"]))
    for layout in ("flat", "with-subdir"):
        target = tmp_path / layout
        target.mkdir()
        if layout == "with-subdir":
            (target / "other").mkdir()  # makes the default adapter's save replace files in place
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            (target / f).symlink_to(outside / f)
        model.save_pretrained(target)
        assert (outside / "adapter_config.json").read_text() == "precious"
        assert (outside / "adapter_model.safetensors").read_text() == "precious"
        read_adapter(target)


# ---- the HTTP server --------------------------------------------------------------------------------------------
KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def http(saved, tmp_path_factory):
    """A server (real HTTP, an API key, an adapter root) and what lies around its adapter root."""
    from nora.serving import Engine, EngineConfig, ServerSettings, create_app

    top = tmp_path_factory.mktemp("serve")
    root, outside = top / "root", top / "outside"
    root.mkdir()
    outside.mkdir()
    shutil.copytree(saved["nora"][0], root / "a")
    shutil.copytree(saved["lora"][0], root / "c")
    shutil.copytree(saved["nora"][0], outside / "adapter")
    (outside / "sentinel.txt").write_text("outside the adapter root")
    (root / "escape").symlink_to(outside / "adapter")  # a directory link out of the root
    (root / "linked").mkdir()  # a directory inside whose files link out of the root
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (root / "linked" / f).symlink_to(outside / "adapter" / f)
    shutil.copytree(saved["nora"][0], root / "cache-out")  # its config writes a basis cache outside the root
    cfg = json.loads((root / "cache-out" / "adapter_config.json").read_text())
    cfg["basis_cache_dir"] = str(outside / "cache")
    (root / "cache-out" / "adapter_config.json").write_text(json.dumps(cfg))
    write_adapter_dir(root / "broken", b'{"method": "nora", "nora": {"layers": {"x": 3}}}', b"\0" * 16)
    served = load_model({"a": root / "a", "b": root / "c"}, **FUZZ_LLAMA)  # the model the adapters were saved from
    engine = Engine(served, tiny_tokenizer(), EngineConfig(8, 0.0))
    settings_ = ServerSettings(
        api_key=KEY, adapter_root=root, base_name="tiny", max_prompt_tokens=24, max_new_tokens=4,
        max_request_bytes=4000,
    )  # fmt: skip
    with serving(create_app(engine, settings_)) as url, httpx.Client(base_url=url, timeout=HANG_S) as client:
        yield Quiet((client, engine, root, outside))


MODELS = ["a", "b", "tiny", nora.BASE, "nope", "", "a/b", "../a"]
PROMPTS = st.one_of(
    st.lists(st.sampled_from(WORDS + [" ", "é", "\n", "<s>", "</s>", "日本", "\ud800"]), max_size=8).map("".join),
    st.lists(st.sampled_from(WORDS), max_size=4).map(" ".join),
    st.lists(st.integers(-2, 70) | st.sampled_from([2**31, 2**63, 2**64]), max_size=6),
    st.lists(st.text(max_size=5), max_size=3),
    JSON,
)


def mostly(edge, bad):
    """Values at the edge of what the server accepts, three times in four; values it must refuse, else."""
    edge = st.sampled_from(edge)
    return st.one_of(edge, edge, edge, st.sampled_from(bad))


SAMPLING = {
    "max_tokens": mostly([1, 2, 4, None], [0, -1, 5, 10**9, 2**63, 1.5, "2", True]),
    "max_completion_tokens": mostly([1, 4, None], [0, 2**64]),
    "temperature": mostly([0, 0.0, 5e-324, 1e-300, 1e-30, 1e-7, 0.5, 1, 2.0], [2.5, -1, None, "0", float("nan")]),
    "top_p": mostly([5e-324, 1e-300, 1e-9, 0.1, 0.5, 1.0], [0, -1, 1.5, None, float("inf")]),
    "seed": mostly([0, 1, -1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**30], [1.5, "1", []]),
    "stop": mostly([None, "a", ["a", "b"], "the", " ", ["\n"], ["cat", "the"], "é"], ["", [""], ["a"] * 5, [1], {}]),
    "stream": mostly([False, True], [None, "yes", 1]),
    "stream_options": mostly([None, {}, {"include_usage": True}], [{"include_usage": 2}, 5]),
    "user": mostly([None, "u", "é" * 50], [5]),
    "n": mostly([1, None], [2]),
    "echo": mostly([False], [True]),
    "logit_bias": mostly([{}, None], [{"1": 5}]),
}
MESSAGES = (
    st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["user", "assistant", "system", "", "tool", 5]),
                "content": st.one_of(
                    st.lists(st.sampled_from(WORDS + ["\udfff", "{{", "{%"]), max_size=4).map(" ".join),
                    st.none(),
                    st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image"]), "text": st.text()})),
                    JSON,
                ),
            },
            optional={"name": st.text(max_size=4), "tool_calls": JSON},
        ),
        max_size=3,
    )
    | JSON
)


@st.composite
def generation_body(draw, chat: bool):
    """A request that would generate, with some of its fields replaced by odd values, some added, some dropped."""
    text = "messages" if chat else "prompt"
    body = {"model": "a", text: [{"role": "user", "content": "the cat"}] if chat else "the cat", "max_tokens": 2}
    if draw(st.integers(0, 2)) == 0:
        body["model"] = draw(st.sampled_from(MODELS) | JSON)
    if draw(st.booleans()):
        body[text] = draw(MESSAGES if chat else PROMPTS)
    for key in draw(st.lists(st.sampled_from(sorted(SAMPLING)), max_size=3, unique=True)):
        body[key] = draw(SAMPLING[key])
    if draw(st.integers(0, 5)) == 0:
        body[draw(st.sampled_from(sorted(body)))] = draw(JSON)
    if draw(st.integers(0, 9)) == 0:
        body.pop(draw(st.sampled_from(sorted(body))))
    return body


ADAPTER_PATHS = [
    "a", "c", "escape", "linked", "cache-out", "broken", "missing", "..", "../outside/adapter", "a/..", "./a",
    "a/../../outside/adapter", "", "/", "/etc", "\x00", "a\x00", "~", "//a", "a/adapter_config.json",
]  # fmt: skip
ADAPTER_NAMES = ["new", "a", "b", "tiny", nora.BASE, "", "x.y", "..", "a/b", "/tmp/x", "é", " ", "new2"]


RAW_BODIES = [
    b"", b"{", b"[]", b"null", b'"x"', b"1e999", b"NaN", b"[" * 1990 + b"]" * 1990, b"{" * 3000,
    b'{"model": "a", "prompt": "\\ud800", "max_tokens": 1}', b'{"model": "a", "prompt": "x", "max_tokens": 1e999}',
    b'\xef\xbb\xbf{"model": "a", "prompt": "x", "max_tokens": 1}', b'{"model": "a", "prompt": "x"}\x00',
    b'{"model": "a", "messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 1}',
    b'{"model": "a", "prompt": "x", "max_tokens": 1, "max_tokens": 2}', b'{"model": "a", "prompt": [1, 2.5]}',
]  # fmt: skip


def as_json(body, headers: dict) -> dict:
    """Request kwargs sending `body` as JSON, NaN and Infinity included (Python's json reads them)."""
    return {"content": json.dumps(body).encode(), "headers": {**headers, "Content-Type": "application/json"}}


@st.composite
def http_request(draw, root: Path, outside: Path):
    """(method, url, request kwargs): generation and adapter requests with random bodies, raw bytes, and every
    kind of Authorization header."""
    endpoint = draw(st.sampled_from(["completions", "chat", "load", "unload", "models", "raw"]))
    headers = dict(AUTH)
    auth = draw(st.sampled_from(["ok"] * 15 + ["none", "wrong", "basic", "empty", "junk"]))
    if auth != "ok":
        headers["Authorization"] = {
            "none": "",
            "wrong": "Bearer nope",
            "basic": "Basic Zm9vOmJhcg==",
            "empty": "Bearer",
            "junk": draw(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=20)),
        }[auth]  # fmt: skip (HTTP header values carry no leading or trailing blanks)
    if endpoint in ("completions", "chat"):
        url = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
        return "POST", url, as_json(draw(generation_body(endpoint == "chat")), headers)
    if endpoint == "load":
        body = {
            "name": draw(st.just("new") | st.sampled_from(ADAPTER_NAMES) | JSON),
            "path": draw(
                st.sampled_from(["a", "c", "./a", str(root / "c")])
                | st.sampled_from(["escape", "linked", "cache-out", "broken"])
                | st.sampled_from(ADAPTER_PATHS + [str(outside / "adapter")])
                | JSON
            ),
        }
        if draw(st.integers(0, 5)) == 0:
            body = draw(mutated_json(body))
        return "POST", "/v1/adapters", as_json(body, headers)
    if endpoint == "unload":
        printable = st.text(st.characters(min_codepoint=32, exclude_characters="\x7f"), max_size=8)  # as httpx sends
        name = draw(st.sampled_from(ADAPTER_NAMES + ["%2e%2e", "a%2Fb", "x?y=1", "a#b"]) | printable)
        return "DELETE", f"/v1/adapters/{name}", {"headers": headers}
    if endpoint == "models":
        name = draw(st.sampled_from(["", "/a", "/tiny", "/nope", "/" + nora.BASE, "/a/b"]))
        return "GET", f"/v1/models{name}", {"headers": headers}
    url = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/adapters"]))
    content = draw(st.binary(max_size=200) | st.sampled_from(RAW_BODIES))
    ctype = draw(st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", None]))
    if ctype:
        headers["Content-Type"] = ctype
    return "POST", url, {"content": content, "headers": headers}


@pytest.mark.bad_input("serve", "malformed")
@settings(max_examples=200, **FUZZ)
@given(data=st.data())
def test_fuzzed_requests_get_2xx_or_4xx_never_5xx(http, data):
    client, engine, root, outside = http
    method, url, kwargs = data.draw(http_request(root, outside), label="request")
    before = snapshot(outside)
    reply = client.request(method, url, **kwargs)
    event(f"{method} {url.split('/')[2] if url.count('/') > 1 else url}: {reply.status_code}")
    assert reply.status_code < 500, reply.text
    if reply.headers.get("content-type", "").startswith("text/event-stream"):
        assert "server_error" not in reply.text, reply.text  # a generation failure inside a 200 stream
    if reply.status_code >= 400:
        error = reply.json()["error"]
        assert error["message"] and error["type"], reply.text
    elif method == "POST" and url == "/v1/adapters":
        body = json.loads(kwargs["content"])
        path = (root / body["path"]).resolve()
        assert path.is_relative_to(root.resolve()) and path.name not in ("linked", "cache-out"), body
        assert reply.status_code == 201
        engine.unload_adapter(body["name"], timeout=HANG_S)
    assert snapshot(outside) == before, "a request wrote outside the adapter root"
    for name, path in (("a", "a"), ("b", "c")):  # what the fuzz unloaded comes back, so later requests reach it
        if name not in {a.name for a in engine.adapters()}:
            engine.load_adapter(name, str(root / path), timeout=HANG_S)


@pytest.mark.bad_input("serve", "hostile")
@pytest.mark.parametrize("path", ["escape", "linked", "cache-out", "../outside/adapter", "OUTSIDE"])
def test_adapters_outside_the_root_are_refused(http, path):
    client, engine, root, outside = http
    path = str(outside / "adapter") if path == "OUTSIDE" else path
    before = snapshot(outside)
    reply = client.post("/v1/adapters", json={"name": "sneaky", "path": path}, headers=AUTH)
    assert reply.status_code == 403, reply.text
    assert "outside the adapter root" in reply.json()["error"]["message"]
    assert snapshot(outside) == before
    loaded = "sneaky" in {a.name for a in engine.adapters()}
    if loaded:  # (so that one failure does not fail the next case too)
        engine.unload_adapter("sneaky", timeout=HANG_S)
    assert not loaded


def test_the_server_still_serves_after_the_fuzz(http):
    client, *_ = http
    body = {"model": "a", "prompt": "the cat", "max_tokens": 3, "temperature": 0}
    reply = client.post("/v1/completions", json=body, headers=AUTH)
    assert reply.status_code == 200, reply.text
