"""The InstantID attack (paper §5.4, Table 4): SDXL + IdentityNet (a ControlNet) + an IP-Adapter.

InstantID reads a protected photo with insightface ``antelopev2`` (SCRFD keypoints, ``glintr100`` raw
embedding). The embedding enters in two places: (1) the IP-Adapter image projection (a Resampler, the
IP-Adapter-Plus layout, loaded by diffusers' own ``load_ip_adapter``) whose 16 tokens feed the UNet's
decoupled cross-attention, and (2) as the *context* of the IdentityNet, a ControlNet conditioned on an
image of the five keypoints (:func:`draw_kps`). Diffusers' SDXL ControlNet pipeline gives the ControlNet
the text states instead, so :class:`IdentityNet` substitutes the face tokens; everything else is the
stock ``StableDiffusionXLControlNetPipeline``.

Needed files (``instantid.adapter``: a local folder or the hub id ``InstantX/InstantID`` in the cache):
``ip-adapter.bin`` and ``ControlNetModel/{config.json, diffusion_pytorch_model.safetensors}``; the SDXL base
model (``instantid.base_model``); the antelopev2 pack under ``metrics.model_root``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import ControlNetModel

from dladiff.evaluate.attack import AttackContext, AttackResult, run_zero_shot
from dladiff.evaluate.embedding import FaceEmbedder
from dladiff.evaluate.faceid import id_embeds
from dladiff.evaluate.generation import make_scheduler, text_to_image_sampler
from dladiff.evaluate.weights import adapter_file, adapter_folder, local_model_folder
from dladiff.runtime import frozen_dtype

KPS_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
KPS_LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))


class IdentityNet(ControlNetModel):
    """InstantID's ControlNet: its cross-attention context is the face tokens, not the prompt.

    Set :attr:`face_tokens` ``(B0, T, D)`` before sampling (unconditional rows first, as the pipeline
    batches); each call repeats them to the batch of the latents.
    """

    face_tokens: torch.Tensor | None = None

    def forward(self, sample, timestep, encoder_hidden_states=None, *args, **kwargs):
        if self.face_tokens is None:
            raise RuntimeError("IdentityNet.face_tokens must be set before sampling")
        tokens = self.face_tokens.to(device=sample.device, dtype=sample.dtype)
        tokens = tokens.repeat_interleave(sample.shape[0] // tokens.shape[0], dim=0)
        return super().forward(sample, timestep, tokens, *args, **kwargs)


def draw_kps(width: int, height: int, kps: np.ndarray) -> np.ndarray:
    """InstantID's condition image ``(H, W, 3) uint8``: limbs eye/eye/mouth/mouth -> nose, then the points."""
    import cv2

    kps = np.asarray(kps, dtype=np.float64).reshape(5, 2)
    canvas = np.zeros((height, width, 3), dtype=np.float64)
    for a, b in KPS_LIMBS:
        x, y = kps[[a, b], 0], kps[[a, b], 1]
        length = float(np.hypot(x[0] - x[1], y[0] - y[1]))
        angle = math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))
        polygon = cv2.ellipse2Poly((int(x.mean()), int(y.mean())), (int(length / 2), 4), int(angle), 0, 360, 1)
        canvas = cv2.fillConvexPoly(canvas.copy(), polygon, KPS_COLORS[a])
    canvas = (canvas * 0.6).astype(np.uint8)
    for point, color in zip(kps, KPS_COLORS):
        canvas = cv2.circle(canvas.copy(), (int(point[0]), int(point[1])), 10, color, -1)
    return canvas


def square_crop(pixels: np.ndarray, kps: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre square crop resized to ``size``²; keypoints mapped into it."""
    from PIL import Image

    h, w = pixels.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(pixels[top : top + side, left : left + side]).resize((size, size), Image.BICUBIC)
    scale = size / side
    return np.asarray(crop), (np.asarray(kps, dtype=np.float64) - [left, top]) * scale


def load_instantid_pipeline(ctx: AttackContext):
    """SDXL + IdentityNet + InstantID's IP-Adapter (diffusers' loader), scales from the config."""
    from diffusers import StableDiffusionXLControlNetPipeline

    section, device = ctx.cfg.instantid, ctx.device
    dtype = frozen_dtype(device, ctx.cfg.runtime.precision)
    weights = adapter_file(section.adapter, section.weight_name, "InstantID")
    controlnet_dir = adapter_folder(section.adapter, section.controlnet_folder, "InstantID IdentityNet")
    base = local_model_folder(section.base_model, "InstantID base model (SDXL)")
    controlnet = IdentityNet.from_pretrained(controlnet_dir, torch_dtype=dtype)
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(base, controlnet=controlnet, torch_dtype=dtype)
    scheduler = make_scheduler(ctx.cfg.generation.scheduler, pipe.scheduler.config)
    if scheduler is not None:
        pipe.scheduler = scheduler
    pipe.load_ip_adapter(str(weights.parent), subfolder=None, weight_name=weights.name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(section.ip_adapter_scale)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def face_tokens(unet, embeds: torch.Tensor) -> torch.Tensor:
    """IdentityNet context: the IP-Adapter projection of ``embeds`` (B, 1, 1, D) -> (B, T, C)."""
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    with torch.no_grad():
        return projection(embeds[:, 0])


def references(ctx: AttackContext, embedder: FaceEmbedder) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[str], list[str]]:
    """(raw embedding, keypoint image) of each photo with a face, their names, and those without."""
    refs, used, no_face = [], [], []
    size = ctx.cfg.instantid.resolution
    for photo in ctx.photos:
        face = embedder.largest_face(photo.pixels)
        if face is None:
            no_face.append(photo.name)
            continue
        _, kps = square_crop(photo.pixels, face.landmarks, size)
        refs.append((embedder.embed_face(photo.pixels, face), draw_kps(size, size, kps)))
        used.append(photo.name)
    return refs, used, no_face


def run(ctx: AttackContext) -> AttackResult:
    """InstantID: every prompt sampled ``images_per_prompt`` times from the protected photos."""
    from PIL import Image

    section = ctx.cfg.instantid

    def sampler(pipe, prompt: str, ref: tuple[np.ndarray, np.ndarray]):
        embedding, kps_image = ref
        embeds = id_embeds(embedding, pipe.unet.dtype, ctx.device)
        embeds = embeds if section.guidance_scale > 1.0 else embeds[1:]
        pipe.controlnet.face_tokens = face_tokens(pipe.unet, embeds)
        return text_to_image_sampler(pipe, prompt, section.negative_prompt, section.inference_steps,
                                     section.guidance_scale, section.resolution, image=Image.fromarray(kps_image),
                                     controlnet_conditioning_scale=section.controlnet_scale,
                                     ip_adapter_image_embeds=[embeds])

    return run_zero_shot("instantid", ctx, references, lambda refs: load_instantid_pipeline(ctx), sampler)
