"""Image data (`nora train --task image-cls`, `nora eval` of an image classifier): an image-folder tree
(`<split>/<class>/*.jpg`) or a CSV/JSONL of `path` + `label`; `--shots K` draws K seeded images per class (the
few-shot protocol); preprocessing by the model's own image processor, or by stated transforms (resize, centre
crop, ImageNet mean/std) where it has none.

Every image is decoded and preprocessed once, when the run starts; an unreadable image, one over --max-image-pixels,
an empty class folder or a class with fewer images than --shots stops the run naming it, before the model loads.
"""

from __future__ import annotations

import inspect
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .datafiles import Row, read_rows
from .errors import AdapterError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRANSFORMS_FILE = "nora_image_transforms.json"


def images_in(folder: Path) -> list[Path]:
    """The images directly in `folder` (by suffix), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def open_rgb(path: str | Path, max_pixels: int | None = None) -> Any:
    """The image at `path` decoded as 8-bit RGB (`to_rgb`). An unreadable file, or one of more than `max_pixels`
    pixels (None: Pillow's MAX_IMAGE_PIXELS, its guard against decompression bombs), is an error naming it. The
    size is checked from the header, before anything is decoded, and Pillow's process-wide limit is only read:
    other threads opening images meanwhile keep their guard."""
    from PIL import Image, UnidentifiedImageError

    limit = max_pixels or Image.MAX_IMAGE_PIXELS
    try:
        with open(path, "rb") as fp:
            image = _identify(fp, path)
            width, height = image.size
            if limit is not None and width * height > limit:
                raise _bomb(path, width, height, limit)
            return to_rgb(image)
    except AdapterError:
        raise
    except Image.DecompressionBombError as e:  # a frame or tile inside the file (GIF, TIFF) over Pillow's own limit
        raise AdapterError(f"{path}: {e} Shrink the image, or remove it.") from None
    except (OSError, UnidentifiedImageError, ValueError) as e:  # (ValueError: e.g. a text chunk too large)
        raise AdapterError(f"{path}: not a readable image ({e}); replace or remove it.") from None


def _identify(fp: Any, path: str | Path) -> Any:
    """The image in the open file `fp`, its header read but nothing decoded: `PIL.Image.open` without its
    decompression-bomb check, which reads a limit every thread shares (`open_rgb` checks its own)."""
    import struct

    from PIL import Image, UnidentifiedImageError

    Image.init()  # every format plugin registered (once)
    prefix = fp.read(16)
    for name in Image.ID:
        factory, accept = Image.OPEN[name]
        matched = accept(prefix) if accept else True
        if not matched or isinstance(matched, str):  # (a str: a reason it is not this format)
            continue
        fp.seek(0)
        try:
            return factory(fp, str(path))
        except (SyntaxError, IndexError, TypeError, struct.error):  # not this format after all (as Image.open)
            continue
    raise UnidentifiedImageError(f"cannot identify image file {str(path)!r}")


def _bomb(path: str | Path, width: int, height: int, limit: int) -> AdapterError:
    return AdapterError(
        f"{path}: {width}×{height} = {width * height:,} pixels, over the limit of {limit:,} (Pillow's guard "
        "against decompression bombs: a small file that decodes to a huge image). If the image is genuine, raise "
        f"the limit with --max-image-pixels {width * height} (max_image_pixels), or shrink the image."
    )


def to_rgb(image: Any) -> Any:
    """`image` as 8-bit RGB, its levels scaled rather than clipped: 16-bit greyscale ("I;16", "I") divided by 257
    so 65535 is white (Pillow's convert("RGB") clips everything above 255 to white); palette images through their
    palette; transparency composited onto white (as transformers' image processors do)."""
    from PIL import Image

    if image.mode == "I" or image.mode.startswith("I;16"):
        levels = np.asarray(image, dtype=np.float64) / 257
        image = Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8))
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def image_rows(source: str) -> list[Row]:
    """Rows of `path` and `label`: from a folder of class folders (the label is the folder's name), or from a
    CSV/JSONL/JSON file whose relative paths are read from the file's folder."""
    path = Path(source).expanduser()
    if path.is_dir():
        classes = sorted(p for p in path.iterdir() if p.is_dir())
        if not classes:
            raise AdapterError(
                f"image folder {path} holds no class folders; lay it out as {path}/<class>/<image>.jpg, or give a "
                "CSV/JSONL with path and label columns."
            )
        rows = []
        for folder in classes:
            images = images_in(folder)
            if not images:
                raise AdapterError(
                    f"class folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); add some or remove it."
                )
            rows += [Row({"path": str(p), "label": folder.name}, str(p)) for p in images]
        return rows
    if not path.is_file():
        raise AdapterError(f"image data {source} does not exist; give an image folder or a CSV/JSONL file.")
    rows = read_rows(path)
    for row in rows:
        for column in ("path", "label"):
            if row.get(column) in (None, ""):
                raise AdapterError(f"{row.where}: no {column!r}; each row needs the image path and its label.")
        image = Path(str(row["path"])).expanduser()
        row["path"] = str(image if image.is_absolute() else path.parent / image)
        row["label"] = str(row["label"]).strip()
    return rows


def draw_shots(rows: list[Row], shots: int, seed: int, source: str) -> list[Row]:
    """`shots` images of each class, drawn with `seed` (the same draw for every method), in class order."""
    by_class: dict[str, list[Row]] = {}
    for row in rows:
        by_class.setdefault(row["label"], []).append(row)
    short = {label: len(images) for label, images in by_class.items() if len(images) < shots}
    if short:
        label, count = next(iter(short.items()))
        raise AdapterError(
            f"{source}: class {label!r} has {count} image(s), fewer than --shots {shots} ({len(short)} such "
            "class(es)); lower --shots or add images."
        )
    rnd = random.Random(seed)
    return [row for label in sorted(by_class) for row in rnd.sample(by_class[label], shots)]


@dataclass
class StatedTransforms:
    """Resize the shorter side to `size`, centre-crop `size` × `size`, scale to [0, 1], normalise: for models
    without an image processor of their own. Saved beside the adapter so evaluation preprocesses alike."""

    size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __call__(self, images: list[Any], return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        from PIL import Image

        out = []
        for image in images:
            w, h = image.size
            scale = self.size / min(w, h)
            image = image.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))), Image.BICUBIC)
            w, h = image.size
            left, top = (w - self.size) // 2, (h - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
            t = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(self.size, self.size, 3)
            t = t.permute(2, 0, 1).float() / 255.0
            out.append((t - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None])
        return {"pixel_values": torch.stack(out)}

    def save_pretrained(self, directory: str | Path) -> None:
        Path(directory, TRANSFORMS_FILE).write_text(json.dumps({"size": self.size, "mean": self.mean, "std": self.std}))


def load_image_processor(model: str | None, image_size: int | None) -> Any:
    """The model's own image processor; else, with --image-size, the stated transforms; else an error saying so."""
    if model is not None and Path(model, TRANSFORMS_FILE).is_file():
        values = json.loads(Path(model, TRANSFORMS_FILE).read_text())
        return StatedTransforms(int(values["size"]), tuple(values["mean"]), tuple(values["std"]))
    if image_size is not None:
        return StatedTransforms(image_size)
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise AdapterError(
            f"{model} has no image processor ({str(e)[:160]}); give --image-size N to preprocess with stated "
            "transforms (resize and centre-crop to N, ImageNet mean/std)."
        ) from None


def encode_images(
    rows: list[Row], processor: Any, labels: list[str], source: str, max_pixels: int | None = None
) -> list[dict[str, Any]]:
    """Each row's image decoded (RGB, at most `max_pixels`: `open_rgb`) and preprocessed, with its class id in
    `labels`."""
    ids = {label: i for i, label in enumerate(labels)}
    examples = []
    for row in rows:
        if row["label"] not in ids:
            raise AdapterError(
                f"{row.where}: label {row['label']!r} is outside the label set {labels}; fix the data or pass the "
                "full set with --labels."
            )
        pixels = processor([open_rgb(row["path"], max_pixels)], return_tensors="pt")["pixel_values"][0]
        examples.append({"pixel_values": pixels, "label": ids[row["label"]]})
    if not examples:
        raise AdapterError(f"{source}: no images to train or evaluate on.")
    return examples


def image_logits(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    """A classifier's logits for a batch of images: transformers image models take `pixel_values=` and return an
    output with `.logits`; any other torch image model takes the images as its input and returns the logits."""
    inner = getattr(model, "module", model)  # under DDP
    inner = getattr(inner, "model", inner)  # inside an AdaptedModel
    keyword = "pixel_values" in inspect.signature(inner.forward).parameters
    output = model(pixel_values=pixels) if keyword else model(pixels)
    return output.logits if hasattr(output, "logits") else output
