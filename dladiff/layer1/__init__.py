"""Layer 1: Dual-Surrogate Models (DSUR) + Alternating Dynamic Fine-Tuning (ADFT), paper §4.1.

One ADFT epoch (Eq. 9), for images x ``(N, 3, R, R)`` in [-1, 1] and perturbation δ1, is declared in
:mod:`dladiff.methods.dladiff`; the parts it is made of each live in one module:

============================  ===========================================================================
:mod:`~dladiff.layer1.models`  what is read: VAE, scheduler, θd, θs (Eq. 7), clean latents, the photos
:mod:`~dladiff.layer1.state`   what is checkpointed: δ1, θd + AdamW, RNG, text states, epoch, history
:mod:`~dladiff.layer1.stages`  stage 1 L_attn (Eq. 8), stage 2 L_denoise (Eq. 3), the PGD step, stage 3
:mod:`~dladiff.layer1.phases`  the declaration language of a method (PGD / Train / Work phases)
:mod:`~dladiff.layer1.engine`  the loop over epochs, checkpoints, resume, Ctrl-C
============================  ===========================================================================

Every PGD step is δ1 ← Π(δ1 + α1·sign(∇δ1 L)) with Π clipping δ1 to [−η1, η1] and x + δ1 to [−1, 1].
``dsur: false`` gives stage 1's n1 steps to stage 2 (Anti-DreamBooth's ASPL at the same PGD budget),
``adft: false`` drops stage 3 (Table 5). A resumed run reaches the same result as an uninterrupted one.
"""

_EXPORTS = {
    "ADFTProtector": "engine", "Layer1Result": "engine", "run_fingerprint": "engine", "run_layer1": "engine",
    "run_protector": "engine", "CHECKPOINT": "state", "CHECKPOINT_KIND": "state", "PREVIOUS_CHECKPOINT": "state",
    "RunState": "state", "load_checkpoint": "state", "remove_checkpoints": "state", "save_checkpoint": "state",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """The engine's names, imported on first use: method modules import :mod:`dladiff.layer1.phases` without torch."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dladiff.layer1' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"dladiff.layer1.{_EXPORTS[name]}"), name)
