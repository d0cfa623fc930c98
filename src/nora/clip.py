"""CLIP as a zero-shot image classifier (the protocol of CLIP-LoRA and of the NoRA authors' CLIP code): each class
is a prompt ("a photo of a {}."), the logits are CLIP's scaled cosine similarities between the image and every
class prompt. Both encoders are adaptable (e.g. q/k/v of every attention block); while the text side holds no
adapter its class embeddings are computed once and cached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import AdapterError
from .layers import AdapterLayer

DEFAULT_TEMPLATE = "a photo of a {}."


def is_clip(model: str | Path) -> bool:
    """Whether the checkpoint at `model` (a local directory) is a CLIP model."""
    config = Path(model, "config.json")
    if not config.is_file():
        return False
    import json

    return json.loads(config.read_text()).get("model_type") == "clip"


class ClipClassifier(nn.Module):
    """`clip` (a transformers CLIPModel) classifying images among `labels` by their prompts."""

    def __init__(self, clip: nn.Module, tokenizer: Any, labels: list[str], template: str = DEFAULT_TEMPLATE) -> None:
        super().__init__()
        if "{}" not in template:
            raise AdapterError(f"class prompt template {template!r} has no {{}} for the class name.")
        self.clip = clip
        self.labels = list(labels)
        self.template = template
        prompts = [template.format(label.replace("_", " ")) for label in self.labels]
        tokens = tokenizer(prompts, padding=True, return_tensors="pt")
        self.register_buffer("prompt_ids", tokens["input_ids"], persistent=False)
        self.register_buffer("prompt_mask", tokens["attention_mask"], persistent=False)
        self._cached: torch.Tensor | None = None

    @classmethod
    def from_pretrained(
        cls, name: str, labels: list[str], template: str = DEFAULT_TEMPLATE, **kwargs
    ) -> ClipClassifier:
        from transformers import AutoTokenizer, CLIPModel

        return cls(CLIPModel.from_pretrained(name, **kwargs), AutoTokenizer.from_pretrained(name), labels, template)

    @property
    def config(self):
        return self.clip.config

    def _text_adapted(self) -> bool:
        text = (self.clip.text_model, self.clip.text_projection)
        return any(isinstance(m, AdapterLayer) for part in text for m in part.modules()) or any(
            p.requires_grad for part in text for p in part.parameters()
        )

    def class_embeddings(self) -> torch.Tensor:
        """The prompts' normalised text embeddings (classes × dim); cached while the text side is not adapted."""
        frozen = not self._text_adapted()
        if frozen and self._cached is not None:
            return self._cached
        features = self.clip.get_text_features(input_ids=self.prompt_ids, attention_mask=self.prompt_mask)
        features = getattr(features, "pooler_output", features)
        features = features / features.norm(dim=-1, keepdim=True)
        if frozen:
            self._cached = features.detach()
        return features

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        image = self.clip.get_image_features(pixel_values=pixel_values)
        image = getattr(image, "pooler_output", image)
        image = image / image.norm(dim=-1, keepdim=True)
        return self.clip.logit_scale.exp() * image @ self.class_embeddings().to(image.dtype).T
