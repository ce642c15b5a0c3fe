"""What several comparison methods read: θd's cross-attention maps at the coarsest captured resolution."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from dladiff.diffusion.attention import AttentionStore


def capture_coarsest_maps(models, resolutions: tuple[int, ...]) -> AttentionStore:
    """A store that θd's attention layers at the coarsest of ``resolutions`` record into (while opened)."""
    from dladiff.diffusion.attention import install_capture
    from dladiff.layer1.models import disabled_store

    store = disabled_store()
    install_capture(models.dynamic, store, (min(resolutions),), models.latent_side)
    return store


def mean_cross_maps(store: AttentionStore) -> torch.Tensor:
    """Cross-attention maps averaged over captured layers and heads: ``(B, Q, K)`` (one resolution)."""
    import torch

    maps = [m.float().mean(dim=1) for m in store.cross.values()]
    if not maps:
        raise ValueError("no cross-attention map was captured")
    return torch.stack(maps).mean(dim=0)
