"""Capture of UNet attention maps for the DSUR attention loss (paper Eq. 8).

Only the layers whose latent resolution is listed get a :class:`CapturingAttnProcessor`, which
computes softmax(QKᵀ/√d) explicitly and stores it; every other layer keeps diffusers'
``AttnProcessor2_0`` (fused scaled-dot-product attention). A 64² self-attention map is 4096×4096
per head: do not list the full latent resolution unless you mean it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^mid_block\.")


@dataclass
class AttentionStore:
    """Maps captured during the last forward pass, by layer name.

    ``cross[name]``: ``(B, heads, Q, K)`` (or ``(B, heads, Q, len(tokens))`` when restricted to
    some tokens); ``self_[name]``: ``(B, heads, Q, Q)``. Q = latent side², K = text tokens.
    """

    cross: dict[str, torch.Tensor] = field(default_factory=dict)
    self_: dict[str, torch.Tensor] = field(default_factory=dict)
    enabled: bool = True

    def clear(self) -> None:
        self.cross.clear()
        self.self_.clear()


class CapturingAttnProcessor:
    """Attention with explicit probabilities, stored in an :class:`AttentionStore`.

    Numerically the same computation as ``AttnProcessor2_0`` (tested), but not fused. While the
    store is disabled (passes that need no maps), it runs the fused processor instead.
    """

    def __init__(self, store: AttentionStore, name: str, tokens: list[int] | None = None):
        self.store = store
        self.name = name
        self.tokens = tokens
        self.fused = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if not self.store.enabled:
            return self.fused(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        is_cross = encoder_hidden_states is not None
        if attention_mask is not None:
            seq = (encoder_hidden_states if is_cross else hidden_states).shape[1]
            attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        probs = attn.get_attention_scores(query, key, attention_mask)
        self._store(probs.view(batch, attn.heads, probs.shape[1], probs.shape[2]), is_cross)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _store(self, probs: torch.Tensor, is_cross: bool) -> None:
        if is_cross:
            self.store.cross[self.name] = probs[..., self.tokens] if self.tokens is not None else probs
        else:
            self.store.self_[self.name] = probs


def layer_resolution(name: str, latent_side: int, num_blocks: int) -> int:
    """Latent side length at which the attention layer ``name`` runs.

    ``down_blocks.i`` runs at side / 2^i, the mid block at side / 2^(n-1), ``up_blocks.i`` at
    side / 2^(n-1-i), for a UNet of n resolution levels.
    """
    match = _BLOCK.match(name)
    if match is None:
        raise ValueError(f"not a UNet attention layer name: {name}")
    if match.group(1) is None:
        return latent_side >> (num_blocks - 1)
    index = int(match.group(2))
    level = index if match.group(1) == "down_blocks" else num_blocks - 1 - index
    return latent_side >> level


def install_capture(unet, store: AttentionStore, resolutions: tuple[int, ...], latent_side: int, tokens: list[int] | None = None) -> list[str]:
    """Put capturing processors on the attention layers at ``resolutions``, fused SDPA elsewhere.

    Returns the names of the captured layers; raises ``ValueError`` if none matches (a config
    listing resolutions the model does not have would otherwise silently compare nothing).
    """
    num_blocks = len(unet.config.block_out_channels)
    processors, captured = {}, []
    for name in unet.attn_processors:
        if layer_resolution(name, latent_side, num_blocks) in resolutions:
            is_cross = name.endswith("attn2.processor")
            processors[name] = CapturingAttnProcessor(store, name, tokens if is_cross else None)
            captured.append(name)
        else:
            processors[name] = AttnProcessor2_0()
    if not captured:
        available = sorted({layer_resolution(n, latent_side, num_blocks) for n in unet.attn_processors})
        raise ValueError(f"no attention layer at latent resolutions {list(resolutions)}; this model has {available}")
    unet.set_attn_processor(processors)
    return captured


def attention_loss(static: AttentionStore, dynamic: AttentionStore, cross_weight: float, self_weight: float) -> torch.Tensor:
    """L_attn (paper Eq. 8): Σ_layers w_c·mean((A_c^s − A_c^d)²) + w_s·mean((A_s^s − A_s^d)²).

    ``static`` holds θs's maps of the clean image (no grad), ``dynamic`` θd's maps of x + δ1,
    both from the same (t, ε) draw. The mean runs over batch, heads and map entries.
    """
    terms = []
    if cross_weight:
        terms += [cross_weight * F.mse_loss(dynamic.cross[k].float(), static.cross[k].float()) for k in static.cross]
    if self_weight:
        terms += [self_weight * F.mse_loss(dynamic.self_[k].float(), static.self_[k].float()) for k in static.self_]
    if not terms:
        raise ValueError("the attention loss has no terms: both weights are 0 or no map was captured")
    return torch.stack(terms).sum()
