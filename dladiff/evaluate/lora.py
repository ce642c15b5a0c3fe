"""The LoRA attack (paper §5.3, Table 2): low-rank adapters on the UNet attention, base weights frozen.

The adapters are peft ``LoraConfig`` layers on ``to_q``, ``to_k``, ``to_v`` and ``to_out.0`` added with
diffusers' ``unet.add_adapter``; only their parameters go to the shared DreamBooth trainer.
"""

from __future__ import annotations

import torch

from dladiff.diffusion.loading import SDComponents
from dladiff.evaluate.attack import AttackContext, AttackResult
from dladiff.evaluate.dreambooth import run_finetune_attack

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def add_lora(unet: torch.nn.Module, rank: int, alpha: float, seed: int = 0) -> list[torch.nn.Parameter]:
    """Inject LoRA layers (rank ``rank``, scale ``alpha / rank``) and return their parameters only.

    The adapters' random initialization draws from ``seed`` (the global RNG is left as it was).
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS)))
    return [p for p in unet.parameters() if p.requires_grad]


def run(ctx: AttackContext) -> AttackResult:
    """LoRA: adapters trained on the protected photos, text encoder and UNet weights frozen."""
    section = ctx.cfg.lora

    def prepare(components: SDComponents):
        return add_lora(components.unet, section.rank, section.alpha, ctx.cfg.runtime.seed), False

    return run_finetune_attack("lora", ctx, prepare)
