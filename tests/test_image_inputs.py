"""Images read correctly or refused: 16-bit and palette images scaled right, Pillow's decompression-bomb guard as
nora's error (with --max-image-pixels to raise it), a one-class classification set refused, and a --class-data
folder that does not exist refused unless --generate-class-images asks for it."""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_bad_input import refused
from test_image_cls import _vit

from nora.errors import AdapterError
from nora.imagefiles import StatedTransforms, encode_images, open_rgb


def noise_image(seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def image_folder(root: Path, classes: list[str], per_class: int = 4) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            noise_image(10 * c + i).save(root / name / f"{i}.png")
    return root


def header_only_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width × height 1-bit pixels, in a few dozen bytes: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> Path:
    return _vit(tmp_path_factory.mktemp("vit") / "vit", 10)


def image_cls_args(model: Path, data: Path, out: Path, *extra: object) -> list[object]:
    return ["train", "--model", model, "--task", "image-cls", "--data", data, "-o", out, "--max-steps", 1,
            "--batch-size", 4, "--rank", 4, "--no-progress", "--no-plot", *extra]  # fmt: skip


# ---- levels ---------------------------------------------------------------------------------------------------------
@pytest.mark.bad_input("train", "malformed")
def test_a_16_bit_png_is_scaled_not_saturated(tmp_path):
    levels = np.arange(256, dtype=np.uint16).reshape(16, 16)
    Image.fromarray(levels * 257).save(tmp_path / "deep.png")  # 16-bit greyscale: 0..65535
    Image.fromarray(levels.astype(np.uint8)).save(tmp_path / "plain.png")  # the same picture in 8 bits
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    read = np.asarray(open_rgb(tmp_path / "deep.png"))
    assert read.shape == (16, 16, 3) and (read == 255).mean() < 0.01  # convert("RGB") made 99.6 % of it white
    np.testing.assert_array_equal(read, np.asarray(open_rgb(tmp_path / "plain.png")))
    rows = [{"path": str(tmp_path / name), "label": "a"} for name in ("deep.png", "plain.png")]
    deep, plain = encode_images(rows, StatedTransforms(16), ["a"], "test")  # what image-cls trains on
    torch.testing.assert_close(deep["pixel_values"], plain["pixel_values"], rtol=0, atol=0)


@pytest.mark.bad_input("train", "malformed")
def test_palette_images_go_through_their_palette_and_transparency_onto_white(tmp_path):
    picture = noise_image(0, 16).quantize(colors=16)  # mode P
    picture.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(np.asarray(open_rgb(tmp_path / "palette.png")), np.asarray(picture.convert("RGB")))
    index = picture.getpixel((0, 0))
    picture.save(tmp_path / "transparent.png", transparency=index)  # one palette entry is see-through
    read = np.asarray(open_rgb(tmp_path / "transparent.png"))
    see_through = np.asarray(picture) == index
    assert see_through.any() and (read[see_through] == 255).all()  # white, as transformers' processors composite
    np.testing.assert_array_equal(read[~see_through], np.asarray(picture.convert("RGB"))[~see_through])


# ---- size -----------------------------------------------------------------------------------------------------------
@pytest.mark.bad_input("train", "too large")
def test_a_decompression_bomb_is_refused_naming_the_file_and_the_limit(vit_dir, tmp_path):
    data = image_folder(tmp_path / "images", ["cat", "dog"])
    bomb = header_only_png(data / "cat" / "bomb.png", 20_000, 20_000)
    assert bomb.stat().st_size < 200
    start = time.perf_counter()
    refused(image_cls_args(vit_dir, data, tmp_path / "run"), rf"{bomb}: 20000×20000 = 400,000,000 pixels",
            r"over the limit of 89,478,485 \(Pillow's guard against decompression bombs",
            r"raise the limit with --max-image-pixels 400000000")  # fmt: skip
    assert time.perf_counter() - start < 30  # nothing was decoded
    bomb.unlink()
    refused(image_cls_args(vit_dir, data, tmp_path / "run", "--max-image-pixels", 1000),
            r"cat/0.png: 32×32 = 1,024 pixels, over the limit of 1,000")  # fmt: skip
    assert open_rgb(data / "cat" / "0.png", max_pixels=1024).size == (32, 32)  # a raised limit lets it through
    with pytest.raises(AdapterError, match="limit of 1,023"):
        open_rgb(data / "cat" / "0.png", max_pixels=1023)


# ---- classes --------------------------------------------------------------------------------------------------------
@pytest.mark.bad_input("train", "malformed")
def test_a_classification_set_of_one_class_is_refused(vit_dir, tmp_path):
    one = image_folder(tmp_path / "images", ["cat"])
    refused(image_cls_args(vit_dir, one, tmp_path / "run"), r"holds 1 class\(es\) \['cat'\]: a classifier needs at "
            "least two", "one sub-folder per class")  # fmt: skip
    assert not (tmp_path / "run").exists()
    texts = tmp_path / "texts.csv"
    texts.write_text("text,label\n" + "".join(f"Add {i} and two.,pos\n" for i in range(8)))
    from conftest import char_tokenizer, tiny_bert

    bert = tmp_path / "bert"
    char_tokenizer(bert)
    tiny_bert(vocab_size=120).save_pretrained(bert)
    refused(["train", "--model", bert, "--task", "seq-cls", "--data", texts, "-o", tmp_path / "run", "--no-plot"],
            r"holds 1 class\(es\) \['pos'\]: a classifier needs at least two")  # fmt: skip


# ---- DreamBooth's class images --------------------------------------------------------------------------------------
@pytest.mark.bad_input("train", "missing")
def test_class_data_that_does_not_exist_is_refused_unless_generation_is_asked(tmp_path):
    pytest.importorskip("diffusers", reason="diffusers is in the dev extra; install it to test DreamBooth")
    from test_dreambooth import PROMPT, tiny_pipeline

    pipe = tiny_pipeline(tmp_path / "pipe")
    dogs = tmp_path / "dogs"
    dogs.mkdir()
    for i in range(2):
        noise_image(i, 16).save(dogs / f"{i}.png")
    missing = tmp_path / "class-images"  # e.g. a typo of an existing folder
    run = ["train", "--model", pipe, "--task", "dreambooth", "--data", dogs, "--instance-prompt", PROMPT,
           "--class-data", missing, "--class-prompt", "a photo of a dog", "--num-class-images", 2, "--max-steps", 1,
           "--batch-size", 4, "--rank", 4, "--no-progress", "--no-plot", "-o", tmp_path / "run"]  # fmt: skip
    refused(run, rf"--class-data {missing}: no such directory", "--generate-class-images to have the base pipeline "
            "sample 2 images of 'a photo of a dog' into it")  # fmt: skip
    assert not missing.exists() and not (tmp_path / "run").exists()
    refused(["train", "--model", pipe, "--task", "dreambooth", "--data", dogs, "--instance-prompt", PROMPT,
             "--generate-class-images"], "--generate-class-images samples .* give --class-data DIR")  # fmt: skip
    from typer.testing import CliRunner

    from nora.cli import app

    result = CliRunner().invoke(app, [str(a) for a in [*run, "--generate-class-images"]])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in missing.iterdir()) == ["class-00000.png", "class-00001.png"]
