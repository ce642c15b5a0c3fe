"""The IP-Adapter FaceID attack (paper §5.4, Table 4): zero-shot generation from one protected photo.

As the FaceID pipeline does, each protected photo is read by insightface ``buffalo_l`` (SCRFD detector,
``w600k_r50`` recognizer) and its L2-normalized embedding conditions SD-1.5 through diffusers' own
IP-Adapter support (``load_ip_adapter(..., image_encoder_folder=None)`` and ``ip_adapter_image_embeds``;
FaceID's LoRA is applied by diffusers when the checkpoint has one). Image k of a prompt is conditioned
on photo ``k % n`` (photos where no face is found cannot be used by the attacker) with seed ``seed + k``.

``builtin:tiny-faceid`` is a randomly initialized FaceID adapter sized for the tiny test model and the
configured encoder, built in memory: it proves the pipeline runs offline, nothing more.
"""

from __future__ import annotations

import numpy as np
import torch

from dladiff.evaluate.attack import AttackContext, AttackResult, run_zero_shot
from dladiff.evaluate.embedding import FaceEmbedder, unit
from dladiff.evaluate.generation import build_sd_pipeline, text_to_image_sampler
from dladiff.evaluate.weights import adapter_file
from dladiff.runtime import frozen_dtype

TINY_FACEID_ID = "builtin:tiny-faceid"
FACEID_TOKENS = 4


def reference_embeddings(ctx: AttackContext, embedder: FaceEmbedder) -> tuple[list[np.ndarray], list[str], list[str]]:
    """Normed embeddings of the photos with a face, their names, and the names without a face."""
    embeddings, used, no_face = [], [], []
    for photo in ctx.photos:
        embedding = embedder.embed(photo.pixels)
        if embedding is None:
            no_face.append(photo.name)
        else:
            embeddings.append(unit(embedding))
            used.append(photo.name)
    return embeddings, used, no_face


def tiny_faceid_state_dict(unet, embed_dim: int, seed: int = 0) -> dict:
    """A random FaceID checkpoint (original key layout) for ``unet`` and ``embed_dim``-d embeddings."""
    generator = torch.Generator("cpu").manual_seed(seed)
    cross = unet.config.cross_attention_dim

    def weight(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=generator) * 0.02

    image_proj = {
        "proj.0.weight": weight(2 * embed_dim, embed_dim), "proj.0.bias": torch.zeros(2 * embed_dim),
        "proj.2.weight": weight(FACEID_TOKENS * cross, 2 * embed_dim), "proj.2.bias": torch.zeros(FACEID_TOKENS * cross),
        "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross),
    }
    ip_adapter, key_id = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = unet.get_submodule(name[: -len(".processor")]).to_k.out_features
        ip_adapter[f"{key_id}.to_k_ip.weight"] = weight(hidden, cross)
        ip_adapter[f"{key_id}.to_v_ip.weight"] = weight(hidden, cross)
        key_id += 2
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def load_faceid_pipeline(ctx: AttackContext, embed_dim: int):
    """SD (``faceid.base_model``) with the FaceID adapter loaded by diffusers, scale set."""
    from dladiff.diffusion.loading import load_sd

    section, device = ctx.cfg.faceid, ctx.device
    if section.adapter == TINY_FACEID_ID:
        weights = None
    else:
        weights = adapter_file(section.adapter, section.weight_name, "IP-Adapter FaceID")
    components = load_sd(section.base_model, None, device)
    pipe = build_sd_pipeline(components, components.unet, components.text_encoder, ctx.cfg.generation.scheduler,
                             device, frozen_dtype(device, ctx.cfg.runtime.precision))
    if weights is None:
        pipe.load_ip_adapter(tiny_faceid_state_dict(components.unet, embed_dim), subfolder=None, weight_name="",
                             image_encoder_folder=None)
    else:
        pipe.load_ip_adapter(str(weights.parent), subfolder=None, weight_name=weights.name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(section.scale)
    pipe.to(device)
    return pipe


def id_embeds(embedding: np.ndarray, dtype: torch.dtype, device) -> torch.Tensor:
    """``ip_adapter_image_embeds`` entry ``(2, 1, 1, D)``: zeros (the unconditional embedding of FaceID and
    InstantID alike) then the face embedding ``(D,)`` (normed for FaceID, raw for InstantID)."""
    face = torch.from_numpy(np.asarray(embedding, dtype=np.float32)).reshape(1, 1, 1, -1)
    return torch.cat([torch.zeros_like(face), face]).to(device=device, dtype=dtype)


def run(ctx: AttackContext) -> AttackResult:
    """FaceID: every prompt sampled ``images_per_prompt`` times from the protected photos' embeddings."""
    section = ctx.cfg.faceid

    def sampler(pipe, prompt: str, embedding: np.ndarray):
        return text_to_image_sampler(pipe, prompt, section.negative_prompt, section.inference_steps,
                                     section.guidance_scale, section.resolution,
                                     ip_adapter_image_embeds=[id_embeds(embedding, pipe.unet.dtype, ctx.device)])

    return run_zero_shot("faceid", ctx, reference_embeddings, lambda refs: load_faceid_pipeline(ctx, len(refs[0])), sampler)
