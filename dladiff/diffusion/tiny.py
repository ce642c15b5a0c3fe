"""Randomly initialized Stable Diffusion models in diffusers layout, built without any download.

``build_tiny_sd`` writes a miniature SD (64x64 pixels, 8x8 latents, a CLIP text encoder of two
layers and a tokenizer whose small vocabulary we write ourselves) that loads through the same
``from_pretrained`` path as the real weights: the offline smoke config and the tests use it.
``build_random_sd`` instantiates the real SD-2.1-base architecture (configs shipped in
``sd21_base.json``) with random weights, so that GPU cost can be measured without the weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch

TINY_SD_ID = "builtin:tiny-sd"
TINY_SD_VERSION = 1

TINY_WORDS = (
    "a", "an", "the", "photo", "of", "sks", "person", "dslr", "portrait", "face", "man", "woman",
    "picture", "close", "up", "high", "quality", "in", "with", "and",
)

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=(2, 4),
    norm_num_groups=8,
    use_linear_projection=True,
)

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
)

TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=32,
    hidden_act="quick_gelu",
)

SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def _byte_alphabet() -> list[str]:
    """The 256 printable characters CLIP's byte-level BPE uses for bytes (GPT-2 ``bytes_to_unicode``)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_tokenizer(folder: Path) -> int:
    """Write ``vocab.json``/``merges.txt`` of a small CLIP BPE vocabulary; returns its size.

    The vocabulary holds every byte symbol (alone and word-final), the words of ``TINY_WORDS``
    built by left-to-right merges, and CLIP's start/end tokens, so any text tokenizes.
    """
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for symbol in alphabet + [s + "</w>" for s in alphabet]:
        vocab.setdefault(symbol, len(vocab))
    merges: list[str] = []
    for word in TINY_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merge = f"{left} {right}"
            if merge not in merges:
                merges.append(merge)
            left = left + right
            vocab.setdefault(left, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return len(vocab)


def _save_pipeline(out_dir: Path, unet, vae, text_encoder, tokenizer_dir: Path) -> None:
    """Write the components in diffusers layout (safetensors) with a ``model_index.json``."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    unet.save_pretrained(out_dir / "unet", safe_serialization=True)
    vae.save_pretrained(out_dir / "vae", safe_serialization=True)
    text_encoder.save_pretrained(out_dir / "text_encoder", safe_serialization=True)
    tokenizer = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(out_dir / "tokenizer")
    DDPMScheduler(**SCHEDULER).save_pretrained(out_dir / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def _build_into(out_dir: Path, unet_cfg: dict, vae_cfg: dict, text_cfg: dict, seed: int) -> Path:
    """Instantiate random models from configs and write them atomically to ``out_dir``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        vocab_size = write_tiny_tokenizer(tmp / "_tokenizer_src")
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text_cfg = {**text_cfg, "vocab_size": vocab_size, "bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1}
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
        _save_pipeline(tmp, unet, vae, text_encoder, tmp / "_tokenizer_src")
        shutil.rmtree(tmp / "_tokenizer_src")
        (tmp / "dladiff_random_model.json").write_text(json.dumps({"seed": seed, "version": TINY_SD_VERSION}), encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def build_tiny_sd(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a miniature random Stable Diffusion (64x64 pixels) to ``out_dir``; returns the path."""
    return _build_into(Path(out_dir), TINY_UNET, TINY_VAE, TINY_TEXT, seed)


def sd21_base_architecture() -> dict:
    """The SD-2.1-base UNet, VAE and text-encoder configs shipped with the package."""
    text = resources.files("dladiff.diffusion").joinpath("sd21_base.json").read_text(encoding="utf-8")
    return json.loads(text)


def build_random_sd(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the SD-2.1-base architecture with random weights (about 5 GB) to ``out_dir``."""
    arch = sd21_base_architecture()
    return _build_into(Path(out_dir), arch["unet"], arch["vae"], arch["text_encoder"], seed)


def cache_dir() -> Path:
    """Where built-in models are cached: ``$DLADIFF_CACHE`` or ``~/.cache/dladiff``."""
    return Path(os.environ.get("DLADIFF_CACHE", Path.home() / ".cache" / "dladiff")).expanduser()


def ensure_tiny_sd() -> Path:
    """The cached tiny SD folder, built on first use."""
    folder = cache_dir() / f"tiny-sd-v{TINY_SD_VERSION}"
    if not (folder / "model_index.json").is_file():
        build_tiny_sd(folder)
    return folder
