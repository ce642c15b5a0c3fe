"""Loading Stable Diffusion components from a hub id, a local diffusers folder or a built-in model."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from dladiff.diffusion.tiny import TINY_SD_ID, ensure_tiny_sd
from dladiff.errors import ModelUnavailableError

log = logging.getLogger("dladiff")

SD_FOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SD_FILE_PATTERNS = ["model_index.json", "tokenizer/*", "scheduler/*",
                    *(f"{part}/{name}" for part in ("unet", "vae", "text_encoder") for name in ("config.json", "*.safetensors"))]
"""What protection and fine-tuning read of a hub model: no safety checker (1.2 GB in SD-1.5)."""
SD_REQUIRED_FILES = ("model_index.json", "unet/config.json")
SAFETY_CHECKER_PATTERNS = ["safety_checker/config.json", "safety_checker/*.safetensors", "feature_extractor/*"]
"""The SD safety checker of a pipeline (NSFW rate): its weights and the CLIP image processor it reads."""
SAFETY_CHECKER_FILES = ("safety_checker/config.json", "feature_extractor/preprocessor_config.json")


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion model that protection and fine-tuning use."""

    folder: Path
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def _unavailable(model_id: str, reason: str) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"cannot load the model '{model_id}': {reason}. If this machine is offline, download it where you have "
        f"internet (e.g. `huggingface-cli download {model_id}`) and pass the folder with --model PATH; to try the "
        f"pipeline without any weights, use --config smoke (a tiny random model, proves nothing about protection)."
    )


def resolve_model_folder(model_id: str, revision: str | None = None, patterns: list[str] | None = None,
                         required: tuple[str, ...] = SD_REQUIRED_FILES) -> Path:
    """Local folder of ``model_id``: itself if it is a folder, the built-in tiny model, or the hub cache.

    Hub ids are taken from the local cache when it holds the ``required`` files and downloaded otherwise
    (``patterns``, default :data:`SD_FILE_PATTERNS`: safetensors only). A download that ends without the
    ``required`` files still returns the folder; its reader names what is missing.
    """
    if model_id == TINY_SD_ID:
        return ensure_tiny_sd()
    path = Path(model_id).expanduser()
    if path.exists():
        missing = [f for f in SD_FOLDERS if not (path / f).is_dir()]
        if missing:
            raise _unavailable(model_id, f"the folder lacks {', '.join(missing)} (not a diffusers Stable Diffusion layout)")
        return path
    from huggingface_hub import snapshot_download

    patterns = list(patterns or SD_FILE_PATTERNS)
    try:
        cached = Path(snapshot_download(model_id, revision=revision, allow_patterns=patterns, local_files_only=True))
        if all((cached / f).is_file() for f in required):
            return cached
    except Exception:
        pass
    log.info("model %s (%s) is not in the local cache; downloading it", model_id, ", ".join(patterns))
    try:
        return Path(snapshot_download(model_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:
        raise _unavailable(model_id, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'download failed'}") from None


def load_sd(model_id: str, revision: str | None = None, device: torch.device | str = "cpu") -> SDComponents:
    """Load tokenizer, text encoder, VAE, UNet (fp32, eval, frozen) and the DDPM training scheduler."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from dladiff.runtime import quiet_libraries

    quiet_libraries()
    folder = resolve_model_folder(model_id, revision)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    except (OSError, ValueError, KeyError) as exc:
        raise _unavailable(model_id, f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False).eval().to(device)
    return SDComponents(folder, tokenizer, text_encoder, vae, unet, scheduler)


def load_unet(folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load a UNet saved in diffusers layout (``folder/unet`` or ``folder`` itself), frozen, in eval mode."""
    from diffusers import UNet2DConditionModel

    from dladiff.runtime import quiet_libraries

    quiet_libraries()
    folder = Path(folder)
    sub = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    if not (sub / "config.json").is_file():
        raise ModelUnavailableError(f"{folder}: no UNet here (expected {folder}/unet/config.json); run `dladiff finetune-surrogate` first")
    unet = UNet2DConditionModel.from_pretrained(sub, torch_dtype=dtype)
    return unet.requires_grad_(False).eval().to(device)


def encode_prompt(components: SDComponents, prompt: str, device: torch.device | str) -> torch.Tensor:
    """Text-encoder hidden states ``(1, 77, D)`` of ``prompt`` (computed once: the encoder stays frozen)."""
    tok = components.tokenizer(prompt, padding="max_length", max_length=components.tokenizer.model_max_length, truncation=True, return_tensors="pt")
    encoder_device = next(components.text_encoder.parameters()).device
    with torch.no_grad():
        return components.text_encoder(tok.input_ids.to(encoder_device))[0].float().to(device)


def token_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions of ``word``'s tokens in the padded tokenization of ``prompt`` (start token = 0)."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    word_ids = tokenizer(word, add_special_tokens=False).input_ids
    for start in range(len(ids) - len(word_ids) + 1):
        if ids[start : start + len(word_ids)] == word_ids:
            return list(range(start, start + len(word_ids)))
    raise ValueError(f"the trigger word '{word}' does not occur in the prompt '{prompt}'")
