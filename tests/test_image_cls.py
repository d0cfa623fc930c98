"""`--task image-cls` on real CIFAR-10 images (../shared/data/vision/cifar10) with a ViT built from a config:
few-shot draws, training, top-1/top-5, the saved adapter reloading to identical logits; bad image data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import efficientnet_lite0, shared_path

from nora.errors import AdapterError
from nora.imagefiles import draw_shots, image_rows
from nora.training import TrainConfig, train


def _vit(directory: Path, num_labels: int) -> Path:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=num_labels)  # fmt: skip
    ViTForImageClassification(config).save_pretrained(directory)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def _subset(tmp_path: Path, classes: list[str], per_class: int) -> Path:
    """A few real CIFAR-10 training images per class, as an image folder."""
    source = shared_path("data", "vision", "cifar10", "train")
    out = tmp_path / "images"
    for name in classes:
        (out / name).mkdir(parents=True)
        for image in sorted((source / name).glob("*.jpg"))[:per_class]:
            shutil.copy(image, out / name / image.name)
    return out


def _config(tmp_path: Path, data: Path, **overrides) -> TrainConfig:
    values = dict(
        model=str(_vit(tmp_path / "vit", 10)), task="image-cls", data=str(data), eval_data=str(data), method="nora",
        adapter={"r": 16, "inner_r": 4}, max_steps=60, batch_size=8, learning_rate=2e-2,
        output_dir=str(tmp_path / "run"), progress=False, plot=False, logging_steps=10,
    )  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def test_image_cls_trains_a_vit_on_cifar_and_reloads_to_identical_logits(tmp_path):
    import nora

    data = _subset(tmp_path, ["airplane", "cat", "frog"], 8)
    result = train(_config(tmp_path, data))
    s = result.summary
    assert s["labels"] == ["airplane", "cat", "frog"] and s["examples"] == 24
    assert s["eval_loss"] < 0.7 * s["initial_eval_loss"], s
    assert s["eval_acc"] > s["initial_eval_acc"] and "eval_top5_acc" not in s  # top-5 only with ≥ 10 classes
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["nora"]["head"] == {"task": "image-cls", "labels": ["airplane", "cat", "frog"]}
    assert (result.adapter_dir / "preprocessor_config.json").is_file()

    from transformers import ViTForImageClassification

    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result.model.eval()
    expected = result.model(pixel_values=pixels).logits
    base = ViTForImageClassification.from_pretrained(tmp_path / "vit", num_labels=3, ignore_mismatched_sizes=True)
    loaded = nora.AdaptedModel.from_pretrained(base, result.adapter_dir).eval()
    assert torch.equal(loaded(pixel_values=pixels).logits, expected)

    from typer.testing import CliRunner

    from nora.cli import app

    out = tmp_path / "eval.json"
    cli = CliRunner().invoke(
        app, ["eval", str(result.adapter_dir), "--tasks", str(data), "-o", str(out), "--no-progress"]
    )
    assert cli.exit_code == 0, cli.output
    scores = json.loads(out.read_text())["results"]["image-classification"]["tasks"]["images"]
    assert scores["n"] == 24 and abs(scores["acc"] - s["eval_acc"]) < 1e-9  # nora eval scores as the run did


def test_shots_draw_k_seeded_images_per_class_and_top5_with_ten_classes(tmp_path):
    source = shared_path("data", "vision", "cifar10", "train")
    rows = image_rows(str(source))
    first, again, other = (draw_shots(rows, 4, seed, str(source)) for seed in (0, 0, 1))
    assert len(first) == 40 and [r["path"] for r in first] == [r["path"] for r in again]
    assert [r["path"] for r in first] != [r["path"] for r in other]
    assert all(sum(r["label"] == c for r in first) == 4 for c in {r["label"] for r in rows})
    s = train(_config(tmp_path, source, shots=2, max_steps=2, eval_data=str(_subset(tmp_path, sorted(
        p.name for p in source.iterdir()), 2)))).summary  # fmt: skip
    assert s["examples"] == 20 and 0 <= s["eval_acc"] <= s["eval_top5_acc"] <= 1


def test_bad_image_data_is_refused_naming_the_problem(tmp_path):
    data = _subset(tmp_path, ["cat", "dog"], 3)
    with pytest.raises(AdapterError, match=r"class 'cat' has 3 image\(s\), fewer than --shots 5"):
        train(_config(tmp_path, data, shots=5))
    (data / "empty").mkdir()
    with pytest.raises(AdapterError, match="class folder .*empty holds no images"):
        image_rows(str(data))
    (data / "empty").rmdir()
    (data / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(AdapterError, match=r"broken.jpg: not a readable image"):
        train(_config(tmp_path, data))
    (data / "dog" / "broken.jpg").unlink()
    bare = tmp_path / "bare"
    _vit(bare, 2)
    (bare / "preprocessor_config.json").unlink()
    with pytest.raises(AdapterError, match="has no image processor.*--image-size"):
        train(_config(tmp_path, data, model=str(bare)))
    with pytest.raises(AdapterError, match="shots is an option of --task image-cls"):
        TrainConfig(model="m", data="d", task="seq-cls", shots=4)


def test_efficientnet_lite0_real_weights_improve_over_their_head_only_start(tmp_path):
    """Any torch image model through the Python API: the ImageNet-pretrained EfficientNet-Lite0 with a new 3-class
    head, NoRA on its convolutions, the stated transforms; better than its start after ten steps on real images."""
    import copy

    import nora
    from nora.imagefiles import StatedTransforms

    net = efficientnet_lite0(3)  # a new head for the new label set
    data = _subset(tmp_path, ["airplane", "frog", "truck"], 8)
    config = TrainConfig(task="image-cls", data=str(data), eval_data=str(data), method="nora", max_steps=10,
                         adapter={"r": 16, "inner_r": 4, "target_modules": "all-conv"}, batch_size=8,
                         learning_rate=5e-3, output_dir=str(tmp_path / "run"), progress=False, plot=False)  # fmt: skip
    result = train(config, model=copy.deepcopy(net), tokenizer=StatedTransforms(128))
    s = result.summary
    assert s["eval_acc"] > s["initial_eval_acc"] and s["eval_loss"] < s["initial_eval_loss"], s
    assert s["head_params"] == 1280 * 3 + 3 and s["trainable_params"] > s["head_params"]
    pixels = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    result.model.eval()
    loaded = nora.AdaptedModel.from_pretrained(copy.deepcopy(net), result.adapter_dir).eval()
    assert torch.equal(loaded(pixels), result.model(pixels))


def _clip(directory: Path, classes: list[str]) -> Path:
    """A CLIP model built from a config, with a word-level tokenizer made here and CLIP's image processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "a", "photo", "of", ".", *classes]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                        bos_token="[BOS]", eos_token="[EOS]")  # fmt: skip
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def test_clip_few_shot_classifier_adapts_both_encoders_and_nora_eval_reads_it_back(tmp_path):
    from typer.testing import CliRunner

    import nora
    from nora.cli import app
    from nora.clip import ClipClassifier

    classes = ["airplane", "cat", "frog"]
    data = _subset(tmp_path, classes, 8)
    model = _clip(tmp_path / "clip", classes)
    result = train(_config(tmp_path, data, model=str(model), shots=4, max_steps=40, adapter={"r": 8, "inner_r": 2}))
    s = result.summary
    assert s["examples"] == 12 and s["eval_loss"] < 0.9 * s["initial_eval_loss"], s  # a CLIP from a config: slow
    layers = list(result.model.layers())
    assert any("text_model" in n for n in layers) and any("vision_model" in n for n in layers)
    assert all(n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj") for n in layers)  # CLIP-LoRA's targets
    head = json.loads((result.adapter_dir / "adapter_config.json").read_text())["nora"]["head"]
    assert head == {"task": "image-cls", "labels": classes, "template": "a photo of a {}."}

    out = tmp_path / "eval.json"
    cli = CliRunner().invoke(
        app, ["eval", str(result.adapter_dir), "--tasks", str(data), "-o", str(out), "--no-progress"]
    )
    assert cli.exit_code == 0, cli.output
    scores = json.loads(out.read_text())["results"]["image-classification"]["tasks"]["images"]
    assert abs(scores["acc"] - s["eval_acc"]) < 1e-9

    # a frozen text side: the class embeddings are computed once and cached
    vision_only = nora.get_peft_model(
        ClipClassifier.from_pretrained(str(model), classes),
        nora.LoraConfig(r=2, target_modules=r".*vision_model.*q_proj"),
    )
    pixels = torch.randn(2, 3, 32, 32)
    vision_only(pixels)
    cached = vision_only.model._cached
    assert cached is not None and vision_only.model.class_embeddings() is cached
    text_too = nora.get_peft_model(ClipClassifier.from_pretrained(str(model), classes), nora.LoraConfig(r=2))
    text_too(pixels)
    assert text_too.model._cached is None  # adapted text side: recomputed, with gradients, every forward
