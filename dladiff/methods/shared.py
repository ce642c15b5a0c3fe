"""What several comparison methods read: the cross-attention map averaged over layers and heads."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from dladiff.diffusion.attention import AttentionStore


def mean_cross_maps(store: AttentionStore) -> torch.Tensor:
    """Cross-attention maps averaged over captured layers and heads: ``(B, Q, K)`` (one resolution)."""
    import torch

    maps = [m.float().mean(dim=1) for m in store.cross.values()]
    if not maps:
        raise ValueError("no cross-attention map was captured")
    return torch.stack(maps).mean(dim=0)
