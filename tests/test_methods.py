"""Comparison methods on the tiny random model: each runs end to end within the bound, shares the engine."""

import pytest
import torch
from conftest import perturbed_unet

from dladiff.config import load_config, with_overrides
from dladiff.data import Portrait, model_batch
from dladiff.diffusion.attention import AttentionStore
from dladiff.diffusion.loading import load_sd
from dladiff.errors import DladiffError
from dladiff.layer1 import ADFTProtector, run_layer1, run_protector
from dladiff.layer1.models import Chunk
from dladiff.layer1.phases import PGD
from dladiff.methods import method_class, method_fingerprint, methods, needs_static_surrogate, run_method
from dladiff.methods.anti_diffusion import semantic_disturbance
from dladiff.methods.disdiff import erasure_energy, merit_step_sizes
from dladiff.methods.mist import target_pattern
from dladiff.runtime import Interrupted, StopRequest

CPU = torch.device("cpu")
FAST = {"anti_diffusion": {"prompt_steps": 2}}
BUILTIN = ["dladiff", "aspl", "fsmg", "mist", "anti-diffusion", "disdiff"]


@pytest.fixture(scope="module")
def cfg(tiny_sd):
    """2 epochs of 1 + 1 PGD steps and 1 training step; 4 steps of 0.01 exceed η = 0.02, so Π is active."""
    return with_overrides(load_config("smoke"), model={"id": str(tiny_sd)},
                          layer1={"epochs": 2, "stage1_steps": 1, "stage2_steps": 1, "stage3_steps": 1,
                                  "epsilon": 0.02, "step_size": 0.01, "checkpoint_every": 1})


@pytest.fixture(scope="module")
def images(real_photos):
    portraits = [Portrait(path=None, pixels=real_photos[k], sha256=k) for k in ("astronaut", "hanks")]
    return model_batch(portraits, 64)


def _protector(name, tiny_sd, cfg, images, method=None, **sections):
    cfg = with_overrides(cfg, method={"name": name, **(method or {})}, **sections)
    return ADFTProtector(images, load_sd(str(tiny_sd)), perturbed_unet(tiny_sd), cfg, CPU, method_class(name)(cfg))


def _assert_within_bound(delta, x, eps):
    assert delta.abs().max() <= eps + 1e-6
    assert (x + delta).min() >= -1 - 1e-6 and (x + delta).max() <= 1 + 1e-6


@pytest.mark.parametrize("name", BUILTIN)
def test_method_runs_end_to_end_within_the_bound(name, tiny_sd, cfg, images, tmp_path):
    result = run_method(name, images, load_sd(str(tiny_sd)), perturbed_unet(tiny_sd), cfg, CPU, tmp_path, "fp", quiet=True)
    assert [h["epoch"] for h in result.history] == [1, 2]
    _assert_within_bound(result.delta, images, cfg.layer1.epsilon)
    assert result.delta.abs().max() > 0.5 * cfg.layer1.epsilon
    assert (tmp_path / "layer1.ckpt").is_file()


def test_aspl_equals_the_engine_without_stage_1(tiny_sd, cfg, images, tmp_path):
    ours = run_method("aspl", images, load_sd(str(tiny_sd)), perturbed_unet(tiny_sd), cfg, CPU, tmp_path / "m", "fp", quiet=True)
    engine_cfg = with_overrides(cfg, layer1={"dsur": False, "stage1_steps": 0, "stage2_steps": 2})
    engine = run_layer1(images, load_sd(str(tiny_sd)), perturbed_unet(tiny_sd), engine_cfg, CPU, tmp_path / "e", "fp", quiet=True)
    torch.testing.assert_close(ours.delta, engine.delta, atol=0, rtol=0)
    assert ours.history == engine.history


def test_dladiff_runs_three_stages_and_reads_the_static_surrogate(tiny_sd, cfg, images, tmp_path):
    """Stage 1 compares with θs: another θs gives another δ1; ASPL (no stage 1) gives another δ1 too."""
    ours = run_method("dladiff", images, load_sd(str(tiny_sd)), perturbed_unet(tiny_sd), cfg, CPU, tmp_path / "a", "fp", quiet=True)
    assert [sorted(k for k in h if k != "epoch") for h in ours.history] == [["attn", "denoise", "train"]] * 2
    assert all(h["attn"] > 0 for h in ours.history)
    other = run_method("dladiff", images, load_sd(str(tiny_sd)), perturbed_unet(tiny_sd, seed=2), cfg, CPU, tmp_path / "b", "fp", quiet=True)
    assert not torch.equal(ours.delta, other.delta)
    aspl = run_method("aspl", images, load_sd(str(tiny_sd)), perturbed_unet(tiny_sd), cfg, CPU, tmp_path / "c", "fp", quiet=True)
    assert not torch.equal(ours.delta, aspl.delta)


def test_resume_restores_method_state(tiny_sd, cfg, images, tmp_path):
    """Anti-Diffusion's tuned prompt is part of the checkpoint: resumed = uninterrupted."""
    def run(out, resume=False, stop=None):
        protector = _protector("anti-diffusion", tiny_sd, cfg, images, FAST)
        return run_protector(protector, cfg, out, "fp", resume=resume, quiet=True, stop=stop)

    full = run(tmp_path / "a")
    stop = StopRequest()
    stop.request()
    with pytest.raises(Interrupted, match="--resume"):
        run(tmp_path / "b", stop=stop)
    resumed = run(tmp_path / "b", resume=True)
    torch.testing.assert_close(resumed.delta, full.delta, atol=0, rtol=0)
    assert resumed.history == full.history


def _fixed_chunk(protector, seed):
    protector.state.generator.manual_seed(seed)
    idx = torch.arange(protector.x.shape[0])
    return Chunk(idx, protector.x, protector.delta.clone(), protector.models.draw(len(idx), protector.state.generator))


def _loss_before_after(protector, phase: PGD, seed=123):
    """The loss on one fixed draw before and after one step of ``phase`` that uses the same draw."""
    chunk = _fixed_chunk(protector, seed)
    before = float(phase.loss(protector.models, protector.state, chunk).detach())
    protector.state.generator.manual_seed(seed)
    protector.pgd(phase)
    chunk.delta = protector.delta.clone()
    return before, float(phase.loss(protector.models, protector.state, chunk).detach())


@pytest.mark.parametrize("name, key", [("mist", "fused"), ("anti-diffusion", "sdl"), ("disdiff", "cae"), ("fsmg", "denoise")])
def test_method_pgd_step_raises_its_loss(name, key, tiny_sd, cfg, images):
    protector = _protector(name, tiny_sd, cfg, images, FAST)
    (phase,) = [p for p in protector.method.epoch(protector.state) if isinstance(p, PGD)]
    assert phase.key == key
    before, after = _loss_before_after(protector, phase)
    assert after > before


@pytest.mark.parametrize("name", ["mist", "anti-diffusion", "disdiff", "aspl", "fsmg"])
def test_comparison_methods_spend_n1_plus_n2_pgd_steps_whatever_the_stage_split(name, tiny_sd, cfg, images):
    """Their PGD phase is not stage 2: n1 = 2, n2 = 0 still gives 2 PGD steps per epoch."""
    protector = _protector(name, tiny_sd, cfg, images, FAST, layer1={"stage1_steps": 2, "stage2_steps": 0})
    pgd = [p for p in protector.method.epoch(protector.state) if isinstance(p, PGD)]
    assert [p.steps for p in pgd] == [2]


def test_fsmg_attacks_the_static_surrogate_and_has_no_dynamic_one(tiny_sd, cfg, images):
    protector = _protector("fsmg", tiny_sd, cfg, images)
    assert protector.unet_d is None and protector.trainer is None and protector.static_unet is not None


def test_dsur_off_gives_stage_1_steps_to_stage_2(tiny_sd, cfg, images, tmp_path):
    """layer1.dsur: false keeps the PGD budget: n1 + n2 steps on the denoising loss (= ASPL), not n2 alone."""
    no_dsur = with_overrides(cfg, layer1={"dsur": False, "stage1_steps": 1, "stage2_steps": 1})
    protector = ADFTProtector(images, load_sd(str(tiny_sd)), None, no_dsur, CPU)
    assert [(p.key, p.steps) for p in protector.method.epoch(protector.state) if isinstance(p, PGD)] == [("attn", 0), ("denoise", 2)]
    assert protector.steps_per_epoch() == 2 + 1
    ours = run_layer1(images, load_sd(str(tiny_sd)), None, no_dsur, CPU, tmp_path / "d", "fp", quiet=True)
    aspl = run_method("aspl", images, load_sd(str(tiny_sd)), None, cfg, CPU, tmp_path / "a", "fp", quiet=True)
    torch.testing.assert_close(ours.delta, aspl.delta, atol=0, rtol=0)


def test_prompt_tuning_lowers_the_denoising_loss_of_clean_images(tiny_sd, cfg, images):
    from dladiff.layer1.stages import denoising_loss

    protector = _protector("anti-diffusion", tiny_sd, cfg, images, {"anti_diffusion": {"prompt_steps": 5, "prompt_learning_rate": 1e-2}})
    chunks = [_fixed_chunk(protector, seed) for seed in range(3)]

    def mean_loss():
        with torch.no_grad():
            return sum(float(denoising_loss(protector.models, protector.state, c)) for c in chunks) / len(chunks)

    before = mean_loss()
    protector.method.tune_prompt(protector.models, protector.state, protector.batch, protector.models.clean)
    assert mean_loss() < before


def test_eot_changes_the_gradient_path_and_keeps_the_bound(tiny_sd, cfg, images):
    plain = _protector("aspl", tiny_sd, cfg, images)
    eot = _protector("aspl", tiny_sd, cfg, images, eot={"enabled": True, "probability": 1.0, "layers": [1, 2]})
    plain.run_epoch()
    eot.run_epoch()
    _assert_within_bound(eot.delta, images, cfg.layer1.epsilon)
    assert not torch.equal(plain.delta, eot.delta)


def test_eot_for_layer_2_only_leaves_layer_1_unchanged(tiny_sd, cfg, images):
    plain = _protector("aspl", tiny_sd, cfg, images)
    layer2_only = _protector("aspl", tiny_sd, cfg, images, eot={"enabled": True, "probability": 1.0, "layers": [2]})
    plain.run_epoch()
    layer2_only.run_epoch()
    torch.testing.assert_close(plain.delta, layer2_only.delta, atol=0, rtol=0)


def test_static_surrogate_needs(cfg):
    assert needs_static_surrogate("dladiff", cfg) and needs_static_surrogate("fsmg", cfg)
    assert not needs_static_surrogate("dladiff", load_config("ablation_no_dsur"))
    assert not any(needs_static_surrogate(n, cfg) for n in ("aspl", "mist", "anti-diffusion", "disdiff"))


def test_unknown_method_and_missing_surrogate_are_clear_errors(tiny_sd, cfg, images):
    with pytest.raises(DladiffError, match="unknown method 'glaze'.*aspl"):
        method_class("glaze")
    with pytest.raises(DladiffError, match="static surrogate"):
        ADFTProtector(images, load_sd(str(tiny_sd)), None, cfg, CPU, method_class("fsmg")(cfg))


def test_checkpoints_of_different_methods_never_match(cfg):
    prints = {method_fingerprint("fp", name, cfg) for name in methods()}
    assert len(prints) == len(methods()) >= len(BUILTIN)


def test_mist_target_is_a_high_contrast_periodic_texture():
    pattern = target_pattern(64, 16)
    assert pattern.shape == (1, 3, 64, 64) and set(pattern.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(pattern[..., :16], pattern[..., 16:32])
    torch.testing.assert_close(pattern[..., :8, :], -pattern[..., 8:16, :])
    assert abs(float(pattern.mean())) < 1e-6


def test_merit_schedule_is_full_at_t0_and_zero_at_the_last_timestep():
    sizes = merit_step_sizes(torch.tensor([0, 500, 999]), 1000, 0.01).flatten()
    torch.testing.assert_close(sizes, torch.tensor([0.01, 0.005, 0.0]), atol=1e-5, rtol=0)


def _store_with(cross: torch.Tensor) -> AttentionStore:
    store = AttentionStore()
    store.cross["down_blocks.1.attn2"] = cross
    return store


def test_erasure_energy_is_zero_when_the_trigger_takes_all_attention():
    words, trigger = [1, 2, 3, 4, 5], [4]
    focused = torch.zeros(2, 1, 16, 77)
    focused[..., 4] = 1.0
    assert float(erasure_energy(_store_with(focused), words, trigger, 100.0)) == pytest.approx(0.0, abs=1e-6)
    uniform = torch.full((2, 1, 16, 77), 1 / 77)
    assert float(erasure_energy(_store_with(uniform), words, trigger, 100.0)) == pytest.approx((1 - 1 / 5) ** 2, abs=1e-6)


def test_semantic_disturbance_grows_with_attention_mass():
    low, high = torch.full((1, 2, 16, 77), 1e-4), torch.full((1, 2, 16, 77), 0.5)
    assert float(semantic_disturbance(_store_with(low), 100.0)) == pytest.approx(1e-4, rel=1e-3)
    assert float(semantic_disturbance(_store_with(high), 100.0)) == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["dladiff", "disdiff", "anti-diffusion"])
def test_attention_methods_work_with_gradient_checkpointing(name, tiny_sd, cfg, images):
    """Maps stay captured through backward, so checkpoint recomputation matches the forward pass."""
    deltas = []
    for checkpointing in (False, True):
        run_cfg = with_overrides(cfg, runtime={"gradient_checkpointing": checkpointing})
        protector = _protector(name, tiny_sd, run_cfg, images, FAST)
        protector.run_epoch()
        deltas.append(protector.delta)
    torch.testing.assert_close(deltas[0], deltas[1], atol=1e-5, rtol=0)


def test_prompt_tuning_tracks_no_weight_gradients(tiny_sd, cfg, images):
    """Anti-Diffusion's prompt tuning differentiates w.r.t. e only: θd's weights are frozen meanwhile."""
    protector = _protector("anti-diffusion", tiny_sd, cfg, images, FAST)
    seen = []
    hook = protector.unet_d.register_forward_pre_hook(
        lambda module, args: seen.append(any(p.requires_grad for p in module.parameters())))
    text = protector.state.text.clone()
    protector.method.tune_prompt(protector.models, protector.state, protector.batch, protector.models.clean)
    hook.remove()
    assert seen and not any(seen)
    assert not torch.equal(protector.state.text, text)
    assert all(p.requires_grad for p in protector.trainer.params) and all(p.grad is None for p in protector.trainer.params)
