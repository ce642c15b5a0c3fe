"""A method is one module + one YAML: a toy method registered here goes through the config loader and a run."""

import subprocess
import sys

from dataclasses import dataclass

import pytest
import torch

from dladiff.config import config_to_dict, load_config
from dladiff.data import Portrait, model_batch
from dladiff.diffusion.loading import load_sd
from dladiff.errors import ConfigError
from dladiff.layer1.phases import PGD, Method
from dladiff.layer1.stages import denoising_loss
from dladiff.methods import method_fingerprint, run_method
from dladiff.methods.registry import methods, register, unregister


@dataclass(frozen=True)
class ToySettings:
    """The toy's one setting: the weight of θd's denoising loss."""

    weight: float = 1.0  # unitless

    def checks(self):
        return [(self.weight > 0, "method.toy_method.weight must be > 0")]


class ToyMethod(Method):
    """weight·L_denoise(θd; x + δ), n1 + n2 PGD steps per epoch, no training."""

    name = "toy-method"
    Settings = ToySettings

    def epoch(self, state):
        return [PGD("toy", lambda models, st, chunk: self.settings.weight * denoising_loss(models, st, chunk), self.pgd_budget)]


@pytest.fixture()
def toy():
    register(ToyMethod)
    yield ToyMethod
    unregister(ToyMethod.name)


def test_a_registered_method_is_configured_and_run(toy, tiny_sd, tmp_path, real_photos):
    path = tmp_path / "method_toy.yaml"
    path.write_text(f"inherit: smoke\nmodel:\n  id: {tiny_sd}\nlayer1:\n  epochs: 1\n  checkpoint_every: 1\n"
                    "method:\n  name: toy-method\n  toy_method:\n    weight: 2.0\n")
    cfg = load_config(path)
    assert cfg.method.name == "toy-method" and cfg.method.settings["toy_method"] == ToySettings(2.0)
    assert config_to_dict(cfg.method)["toy_method"] == {"weight": 2.0}
    images = model_batch([Portrait(path=None, pixels=real_photos["astronaut"], sha256="a")], 64)
    result = run_method("toy-method", images, load_sd(str(tiny_sd)), None, cfg, torch.device("cpu"), tmp_path / "run", "fp",
                        quiet=True)
    assert [sorted(h) for h in result.history] == [["epoch", "toy"]]
    assert 0 < result.delta.abs().max() <= cfg.layer1.epsilon + 1e-6
    assert method_fingerprint("fp", "toy-method", cfg) != method_fingerprint("fp", "aspl", cfg)


def test_the_settings_of_a_registered_method_are_validated(toy, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("method:\n  name: toy-method\n  toy_method:\n    weight: -1.0\n")
    with pytest.raises(ConfigError, match="toy_method.weight must be > 0"):
        load_config(path)
    path.write_text("method:\n  toy_method:\n    wieght: 1.0\n")
    with pytest.raises(ConfigError, match=r"method.toy_method.*wieght"):
        load_config(path)


def test_unknown_method_names_and_keys_are_clear_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("method:\n  name: glaze\n")
    with pytest.raises(ConfigError, match=r"method.name: 'glaze' is not one of 'dladiff', 'aspl'"):
        load_config(path)
    path.write_text("method:\n  glaze: {}\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) glaze; allowed: name, mist, anti_diffusion, disdiff"):
        load_config(path)


def test_builtin_methods_are_listed_in_order_whichever_module_is_imported_first():
    assert list(methods())[:6] == ["dladiff", "aspl", "fsmg", "mist", "anti-diffusion", "disdiff"]
    code = ("import dladiff.methods.disdiff; from dladiff.methods.registry import methods, settings_classes; "
            "print(*methods(), *settings_classes())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["dladiff", "aspl", "fsmg", "mist", "anti-diffusion", "disdiff", "mist", "anti_diffusion", "disdiff"]


def test_loading_a_config_imports_neither_torch_nor_diffusers():
    """The registry reads every method's settings without the engine (commands like verify need no torch)."""
    code = ("import sys; from dladiff.config import load_config; cfg = load_config('method_disdiff'); "
            "print(cfg.method.name, 'torch' in sys.modules, 'diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["disdiff", "False", "False"]
