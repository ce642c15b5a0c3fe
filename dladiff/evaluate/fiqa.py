"""Efficient-FIQA (paper §5.2, Table 1 "FIQA"): face image quality of generated images, when present.

The student model of github.com/sunwei925/Efficient-FIQA: timm's ``edgenext_xx_small`` (head removed)
-> global average pool -> Linear(168, 128) -> Linear(128, 1). Input: shorter side resized to 352,
centre crop 352 x 352, ImageNet mean/std. Higher = better quality. Needs ``timm`` and the checkpoint
``EdgeNeXt_XXS_checkpoint.pt``; without either, :class:`ModelUnavailableError` says what to install.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dladiff.errors import ModelUnavailableError
from dladiff.evaluate.metrics import FIQA_CHECKPOINT_URL, check_image, fiqa_available

FIQA_INPUT = 352
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FiqaNet(torch.nn.Module):
    """``FIQA_EdgeNeXt_XXS`` with the same parameter names as the released checkpoint."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.feature_extraction = backbone
        self.avg_pool = torch.nn.AdaptiveAvgPool2d((1, 1))
        self.quality = torch.nn.Sequential(torch.nn.Linear(168, 128), torch.nn.Linear(128, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quality(torch.flatten(self.avg_pool(self.feature_extraction(x)), 1))


def fiqa_input(image: np.ndarray) -> torch.Tensor:
    """``(3, 352, 352)`` normalized tensor: shorter side to 352 (bilinear), centre crop."""
    from PIL import Image

    pil = Image.fromarray(check_image(image))
    scale = FIQA_INPUT / min(pil.size)
    pil = pil.resize((max(FIQA_INPUT, round(pil.width * scale)), max(FIQA_INPUT, round(pil.height * scale))), Image.BILINEAR)
    left, top = (pil.width - FIQA_INPUT) // 2, (pil.height - FIQA_INPUT) // 2
    pil = pil.crop((left, top, left + FIQA_INPUT, top + FIQA_INPUT))
    x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


class FiqaScorer:
    """Callable: list of uint8 RGB images -> list of quality scores (higher = better)."""

    def __init__(self, weights: str | Path, device: str = "cpu", batch_size: int = 16):
        path = Path(weights).expanduser()
        if not fiqa_available(path):
            raise ModelUnavailableError(f"FIQA checkpoint {path} not found or not Efficient-FIQA's: fetch {FIQA_CHECKPOINT_URL} to that path")
        try:
            import timm
        except ImportError:
            raise ModelUnavailableError("FIQA needs timm (pip install timm) for its EdgeNeXt-XXS backbone") from None
        backbone = timm.create_model("edgenext_xx_small", pretrained=False)
        backbone.head = torch.nn.Identity()
        self.model = FiqaNet(backbone)
        self.model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.model.eval().to(device)
        self.device, self.batch_size = device, batch_size

    def __call__(self, images: Sequence[np.ndarray]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([fiqa_input(im) for im in images[start : start + self.batch_size]]).to(self.device)
            with torch.no_grad():
                scores.extend(float(s) for s in self.model(batch).flatten().cpu())
        return scores
