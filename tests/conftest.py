"""Shared fixtures: a tiny random Stable Diffusion and real face photos from installed packages."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dladiff.diffusion.tiny as tiny


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Built-in models go to a per-session folder, never to the user's cache; the hub is offline."""
    cache = tmp_path_factory.mktemp("dladiff-cache")
    old = {k: os.environ.get(k) for k in ("DLADIFF_CACHE", "HF_HUB_OFFLINE")}
    os.environ["DLADIFF_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield cache
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_sd(_isolated_cache) -> Path:
    """Folder of the tiny random SD, in diffusers layout (built once per session)."""
    return tiny.ensure_tiny_sd()


@pytest.fixture()
def one_torch_thread():
    """Torch on one thread for the test: tiny models gain nothing from threads, and on a loaded 2-core
    machine threads stall each other."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def perturbed_unet(folder: Path, scale: float = 0.05, seed: int = 1):
    """The tiny UNet plus noise: a static surrogate that differs from the dynamic one (stands in for
    a DreamBooth-tuned UNet)."""
    import torch

    from dladiff.diffusion.loading import load_unet

    unet = load_unet(folder)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.std() if p.numel() > 1 else 1))
    return unet


def insightface_images_dir() -> Path:
    """The real face photos shipped in insightface's wheel (t1.jpg, Tom_Hanks_54745.png)."""
    import insightface

    return Path(insightface.__file__).parent / "data" / "images"


INSIGHTFACE_MODEL_ROOT = Path("~/.insightface/models").expanduser()
"""Where insightface packs live on a user's machine (absent here: tests using them skip)."""


def insightface_image(name: str) -> np.ndarray:
    return np.asarray(Image.open(insightface_images_dir() / name).convert("RGB"))


@pytest.fixture(scope="session")
def real_photos() -> dict[str, np.ndarray]:
    """Real portraits shipped inside installed packages (never copied into the repository)."""
    from skimage import data

    return {
        "astronaut": data.astronaut(),
        "t1": insightface_image("t1.jpg"),
        "hanks": insightface_image("Tom_Hanks_54745.png"),
    }


@pytest.fixture()
def photo_dir(tmp_path, real_photos) -> Path:
    """A folder of 4 photos in different formats and sizes."""
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(real_photos["astronaut"]).save(folder / "astronaut.jpg", quality=95)
    Image.fromarray(real_photos["t1"]).save(folder / "group.png")
    Image.fromarray(real_photos["hanks"]).save(folder / "hanks.webp", lossless=True)
    Image.fromarray(real_photos["astronaut"][40:300, 120:380]).convert("L").save(folder / "grey.png")
    return folder
