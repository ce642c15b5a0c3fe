"""Layer 1 (DSUR + ADFT) on the tiny random model: losses move the right way, bounds hold, resume is exact."""

import logging

import pytest
import torch
from conftest import perturbed_unet
from test_state_io import write_crafted_pickle

from dladiff.config import load_config, with_overrides
from dladiff.data import model_batch, Portrait
from dladiff.diffusion.loading import load_sd, load_unet
from dladiff.errors import DladiffError
from dladiff.layer1 import CHECKPOINT, PREVIOUS_CHECKPOINT, ADFTProtector, load_checkpoint, run_layer1, save_checkpoint
from dladiff.layer1.models import Chunk
from dladiff.layer1.stages import attention_loss, denoising_loss
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
    loss = attention_loss(protector.models, protector.state, _chunk(protector))
    assert loss.item() == pytest.approx(0.0, abs=1e-12)


def _chunk(protector, delta=None):
    """All images as one chunk with a fresh draw (of the run's generator)."""
    idx = torch.arange(protector.x.shape[0])
    delta = protector.delta.clone() if delta is None else delta
    return Chunk(idx, protector.x, delta, protector.models.draw(len(idx), protector.state.generator))


def _loss_before_after(protector, loss_fn, step_fn, seed=123):
    """The loss on one fixed draw before and after one step (draws inside the step are its own)."""
    protector.state.generator.manual_seed(seed)
    chunk = _chunk(protector)
    before = loss_fn(protector.models, protector.state, chunk).item()
    protector.state.generator.manual_seed(seed)
    step_fn()
    chunk.delta = protector.delta.clone()
    after = loss_fn(protector.models, protector.state, chunk).item()
    return before, after


def test_stage1_step_raises_attention_loss(tiny_sd, cfg, images):
    protector = _protector(tiny_sd, cfg, images)
    before, after = _loss_before_after(protector, attention_loss, protector.stage1_step)
    assert after > before


def test_stage2_step_raises_denoising_loss(tiny_sd, cfg, images):
    protector = _protector(tiny_sd, cfg, images)
    before, after = _loss_before_after(protector, denoising_loss, protector.stage2_step)
    assert after > before


def test_stage3_steps_lower_denoising_loss(tiny_sd, images):
    cfg = with_overrides(load_config("smoke"), layer1={"stage3_learning_rate": 1e-3})
    protector = _protector(tiny_sd, cfg, images)
    chunks = [_chunk(protector) for _ in range(4)]

    def mean_loss():
        with torch.no_grad():
            return sum(float(denoising_loss(protector.models, protector.state, c)) for c in chunks) / len(chunks)

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


def test_pgd_steps_do_not_track_weight_gradients(tiny_sd, cfg, images):
    """During stage-1/2 PGD no θd weight requires grad (no activations kept for them); stage 3 trains them."""
    protector = _protector(tiny_sd, cfg, images)
    seen = []
    hook = protector.unet_d.register_forward_pre_hook(
        lambda module, args: seen.append(any(p.requires_grad for p in module.parameters())))
    protector.stage1_step()
    protector.stage2_step()
    assert seen and not any(seen)
    assert all(p.grad is None for p in protector.unet_d.parameters())
    assert all(p.requires_grad for p in protector.trainer.params)
    seen.clear()
    protector.stage3_step(protector.perturbed_latent_set())
    hook.remove()
    assert seen == [True]


def test_damaged_checkpoint_resumes_from_the_one_before(tiny_sd, cfg, images, tmp_path, caplog):
    """A truncated newest checkpoint: resume from ``layer1.ckpt.prev`` with a warning, same result; both bad: restart."""
    static = lambda: perturbed_unet(tiny_sd)  # noqa: E731
    run_dir = tmp_path / "run"
    full = run_layer1(images, load_sd(str(tiny_sd)), static(), cfg, CPU, run_dir, "fp", quiet=True)
    newest, previous = run_dir / CHECKPOINT, run_dir / PREVIOUS_CHECKPOINT
    assert newest.is_file() and previous.is_file()
    newest.write_bytes(newest.read_bytes()[:-100])
    with caplog.at_level(logging.INFO, logger="dladiff"):
        resumed = run_layer1(images, load_sd(str(tiny_sd)), static(), cfg, CPU, run_dir, "fp", resume=True, quiet=True)
    assert str(newest) in caplog.text and "checkpoint before the damaged one" in caplog.text
    assert f"at epoch {cfg.layer1.epochs - 1}/" in caplog.text
    torch.testing.assert_close(resumed.delta, full.delta, atol=0, rtol=0)
    assert resumed.history == full.history
    for path in (newest, previous):
        path.write_bytes(b"\0" * 64)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dladiff"):
        restarted = run_layer1(images, load_sd(str(tiny_sd)), static(), cfg, CPU, run_dir, "fp", resume=True, quiet=True)
    assert "starts again from the first epoch" in caplog.text
    torch.testing.assert_close(restarted.delta, full.delta, atol=0, rtol=0)


def test_crafted_checkpoint_is_not_unpickled(tiny_sd, cfg, images, tmp_path, caplog):
    """A pickle planted as the checkpoint (and its fallback) never runs; it is reported and layer 1 starts afresh."""
    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
        write_crafted_pickle(run_dir / name, marker)
    one_epoch = with_overrides(cfg, layer1={"epochs": 1})
    with caplog.at_level(logging.WARNING, logger="dladiff"):
        result = run_layer1(images, load_sd(str(tiny_sd)), perturbed_unet(tiny_sd), one_epoch, CPU, run_dir, "fp",
                            resume=True, quiet=True)
    assert not marker.exists()
    assert str(run_dir / CHECKPOINT) in caplog.text and "not a readable dladiff" in caplog.text
    assert len(result.history) == 1


def test_checkpoint_of_another_run_is_a_clear_error(tiny_sd, cfg, images, tmp_path):
    protector = _protector(tiny_sd, cfg, images)
    save_checkpoint(protector.state.checkpoint("other"), tmp_path)
    with pytest.raises(DladiffError, match="other photos"):
        load_checkpoint(tmp_path, "fp")


def test_run_state_checkpoint_round_trip_continues_exactly(tiny_sd, cfg, images, tmp_path):
    """RunState.checkpoint → file → restore into a fresh run: the next epoch gives the same δ1 bit for bit."""
    first = _protector(tiny_sd, cfg, images)
    first.run_epoch()
    save_checkpoint(first.state.checkpoint("fp"), tmp_path)
    saved = load_checkpoint(tmp_path, "fp")
    assert {"delta", "generator", "text", "epoch", "history", "unet_d", "optimizer"} <= set(saved)
    second = _protector(tiny_sd, cfg, images)
    second.state.restore(saved)
    first.run_epoch()
    second.run_epoch()
    torch.testing.assert_close(second.delta, first.delta, atol=0, rtol=0)
    assert second.history == first.history and second.epoch == 2
