"""Layer 1 (DSUR + ADFT) on the tiny random model: losses move the right way, bounds hold, resume is exact."""

import pytest
import torch
from conftest import perturbed_unet

from dladiff.config import load_config, with_overrides
from dladiff.data import model_batch, Portrait
from dladiff.diffusion.loading import load_sd, load_unet
from dladiff.layer1 import ADFTProtector, run_layer1
from dladiff.runtime import Interrupted, StopRequest

CPU = torch.device("cpu")


@pytest.fixture()
def cfg():
    return with_overrides(load_config("smoke"), layer1={"epochs": 3, "checkpoint_every": 1, "step_size": 0.01})


@pytest.fixture()
def images(real_photos):
    portraits = [Portrait(path=None, pixels=p, sha256=k) for k, p in real_photos.items()]
    return model_batch(portraits, 64)


def _protector(tiny_sd, cfg, images, static=None):
    components = load_sd(str(tiny_sd))
    static = static if static is not None else perturbed_unet(tiny_sd)
    return ADFTProtector(images, components, static, cfg, CPU)


def test_attention_loss_is_zero_for_identical_surrogates_and_images(tiny_sd, cfg, images):
    protector = _protector(tiny_sd, cfg, images, static=load_unet(tiny_sd))
    idx = torch.arange(len(images))
    loss = protector.attention_loss_on(idx, torch.zeros_like(images), protector._draw(len(idx)))
    assert loss.item() == pytest.approx(0.0, abs=1e-12)


def _loss_before_after(protector, loss_fn, step_fn, seed=123):
    """The loss on one fixed draw before and after one step (draws inside the step are its own)."""
    idx = torch.arange(protector.x.shape[0])
    protector.generator.manual_seed(seed)
    draw = protector._draw(len(idx))
    before = loss_fn(idx, protector.delta, draw).item()
    protector.generator.manual_seed(seed)
    step_fn()
    after = loss_fn(idx, protector.delta, draw).item()
    return before, after


def test_stage1_step_raises_attention_loss(tiny_sd, cfg, images):
    protector = _protector(tiny_sd, cfg, images)
    before, after = _loss_before_after(protector, protector.attention_loss_on, protector.stage1_step)
    assert after > before


def test_stage2_step_raises_denoising_loss(tiny_sd, cfg, images):
    protector = _protector(tiny_sd, cfg, images)
    before, after = _loss_before_after(protector, protector.denoising_loss_on, protector.stage2_step)
    assert after > before


def test_stage3_steps_lower_denoising_loss(tiny_sd, images):
    cfg = with_overrides(load_config("smoke"), layer1={"stage3_learning_rate": 1e-3})
    protector = _protector(tiny_sd, cfg, images)
    idx = torch.arange(len(images))
    draws = [protector._draw(len(idx)) for _ in range(4)]

    def mean_loss():
        with torch.no_grad():
            return sum(float(protector.denoising_loss_on(idx, protector.delta, d)) for d in draws) / len(draws)

    before = mean_loss()
    data = protector.perturbed_latent_set()
    for _ in range(5):
        protector.stage3_step(data)
    assert mean_loss() < before


def test_bound_and_clamp_hold_after_every_step(tiny_sd, cfg, images):
    protector = _protector(tiny_sd, cfg, images)
    eps = cfg.layer1.epsilon
    for step in [protector.stage1_step, protector.stage2_step] * 6:
        step()
        assert protector.delta.abs().max() <= eps + 1e-7
        x_adv = protector.x + protector.delta
        assert x_adv.min() >= -1 - 1e-7 and x_adv.max() <= 1 + 1e-7
    assert protector.delta.abs().max() == pytest.approx(eps, abs=1e-6)  # the budget is used


def test_resume_after_interruption_equals_uninterrupted_run(tiny_sd, cfg, images, tmp_path):
    static = lambda: perturbed_unet(tiny_sd)  # noqa: E731
    full = run_layer1(images, load_sd(str(tiny_sd)), static(), cfg, CPU, tmp_path / "a", "fp", quiet=True)
    stop = StopRequest()
    stop.request()  # as if Ctrl-C came during the first epoch
    with pytest.raises(Interrupted, match="--resume"):
        run_layer1(images, load_sd(str(tiny_sd)), static(), cfg, CPU, tmp_path / "b", "fp", quiet=True, stop=stop)
    assert (tmp_path / "b" / "layer1.ckpt").is_file()
    resumed = run_layer1(images, load_sd(str(tiny_sd)), static(), cfg, CPU, tmp_path / "b", "fp", resume=True, quiet=True)
    assert len(resumed.history) == cfg.layer1.epochs
    torch.testing.assert_close(resumed.delta, full.delta, atol=0, rtol=0)
    assert resumed.history == full.history


def test_ablations_skip_their_stages(tiny_sd, images):
    no_dsur = with_overrides(load_config("ablation_no_dsur"), model={"id": str(tiny_sd), "resolution": 64},
                             layer1={"epochs": 1})
    protector = ADFTProtector(images, load_sd(str(tiny_sd)), None, no_dsur, CPU)
    stats = protector.run_epoch()
    assert "attn" not in stats and {"denoise", "train"} <= set(stats)
    no_adft = with_overrides(load_config("smoke"), layer1={"adft": False, "stage3_steps": 0, "epochs": 1})
    protector = _protector(tiny_sd, no_adft, images)
    before = {k: v.clone() for k, v in protector.unet_d.state_dict().items()}
    stats = protector.run_epoch()
    assert "train" not in stats
    assert all(torch.equal(before[k], v) for k, v in protector.unet_d.state_dict().items())


def test_gradient_checkpointing_gives_the_same_perturbation(tiny_sd, cfg, images):
    deltas = []
    for checkpointing in (False, True):
        run_cfg = with_overrides(cfg, runtime={"gradient_checkpointing": checkpointing})
        protector = _protector(tiny_sd, run_cfg, images)
        for step in (protector.stage1_step, protector.stage2_step):
            step()
        protector.stage3_step(protector.perturbed_latent_set())
        protector.stage2_step()
        deltas.append(protector.delta)
    torch.testing.assert_close(deltas[0], deltas[1], atol=1e-6, rtol=0)
