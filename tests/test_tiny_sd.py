"""scripts/make_tiny_sd.py writes a diffusers folder that loads like the real weights."""

import subprocess
import sys
from pathlib import Path

import torch

from dladiff.diffusion.loading import encode_prompt, load_sd, token_positions
from dladiff.diffusion.tiny import sd21_base_architecture

ROOT = Path(__file__).resolve().parent.parent


def test_script_writes_a_loadable_stable_diffusion(tmp_path):
    out = tmp_path / "tiny"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_sd.py"), str(out)], check=True, capture_output=True)
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"):
        assert (out / part).exists(), part
    components = load_sd(str(out))
    assert components.vae_scale_factor == 8
    text = encode_prompt(components, "a photo of sks person", "cpu")
    assert text.shape == (1, 77, components.unet.config.cross_attention_dim)
    assert token_positions(components.tokenizer, "a photo of sks person", "sks") == [4]

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out)
    image = pipe("a photo of sks person", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3)


def test_sd21_base_architecture_is_shipped():
    arch = sd21_base_architecture()
    assert arch["unet"]["cross_attention_dim"] == 1024 and arch["unet"]["attention_head_dim"] == [5, 10, 20, 20]
    assert arch["vae"]["block_out_channels"] == [128, 256, 512, 512]
    assert arch["text_encoder"]["num_hidden_layers"] == 23
