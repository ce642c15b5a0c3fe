"""protect --dataset on the tiny SD: which methods train the static surrogate, on which photos, and how often SD loads."""

from __future__ import annotations

import json

import pytest
from PIL import Image

import dladiff.diffusion.loading as loading
import dladiff.surrogate as surrogate
from dladiff.config import load_config, with_overrides
from dladiff.dataset import ProcessShare, protect_dataset


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every test of this file runs torch on one thread (conftest.one_torch_thread)."""


@pytest.fixture()
def anti_dreambooth_root(tmp_path, real_photos):
    """One identity in the Anti-DreamBooth layout; set_A and set_B photos have different names."""
    root = tmp_path / "data"
    face = real_photos["astronaut"][:256, 100:356]
    for sub, names in (("set_A", ("a1", "a2")), ("set_B", ("b1",)), ("set_C", ("c1",))):
        (root / "ann" / sub).mkdir(parents=True)
        for i, name in enumerate(names):
            Image.fromarray(face if i == 0 else face[:, ::-1].copy()).save(root / "ann" / sub / f"{name}.png")
    return root


@pytest.fixture()
def counted(monkeypatch):
    """Counts SD loads, static-surrogate trainings (with the photos they got) and their DreamBooth steps."""
    counts = {"load_sd": 0, "surrogates": [], "surrogate_steps": 0}
    real_load, real_finetune = loading.load_sd, surrogate.finetune_surrogate

    def load_sd(*args, **kwargs):
        counts["load_sd"] += 1
        return real_load(*args, **kwargs)

    def finetune(portraits, *args, **kwargs):
        counts["surrogates"].append(sorted(p.name for p in portraits))
        return real_finetune(portraits, *args, **kwargs)

    class CountingTrainer(surrogate.DreamBoothTrainer):
        def step(self, *args, **kwargs):
            counts["surrogate_steps"] += 1
            return super().step(*args, **kwargs)

    monkeypatch.setattr(loading, "load_sd", load_sd)
    monkeypatch.setattr(surrogate, "finetune_surrogate", finetune)
    monkeypatch.setattr(surrogate, "DreamBoothTrainer", CountingTrainer)
    return counts


def _cfg(tiny_sd, method: str, **layer1):
    return with_overrides(load_config("smoke"), model={"id": str(tiny_sd)}, surrogate={"steps": 2},
                          runtime={"device": "cpu"},
                          layer1={"epochs": 1, "stage1_steps": 1, "stage2_steps": 1, "stage3_steps": 1,
                                  "checkpoint_every": 1, **layer1},
                          method={"name": method, "anti_diffusion": {"prompt_steps": 1}})


@pytest.mark.parametrize("method", ["aspl", "mist", "anti-diffusion", "disdiff"])
def test_methods_without_static_surrogate_train_none(method, tiny_sd, anti_dreambooth_root, counted, tmp_path):
    outcome = protect_dataset(anti_dreambooth_root, tmp_path / "out", _cfg(tiny_sd, method), layers=(1,),
                              quiet=True, share=ProcessShare(0, 1, "cpu"))
    assert outcome.protected == ["ann"] and not outcome.failed
    assert counted["surrogates"] == [] and counted["surrogate_steps"] == 0
    assert counted["load_sd"] == 1
    assert not (tmp_path / "out" / "ann" / "surrogate").exists()


@pytest.mark.parametrize("method, dsur", [("fsmg", False), ("fsmg", True), ("dladiff", True)])
def test_static_surrogate_trains_on_set_a_once(method, dsur, tiny_sd, anti_dreambooth_root, counted, tmp_path):
    cfg = _cfg(tiny_sd, method, dsur=dsur)
    outcome = protect_dataset(anti_dreambooth_root, tmp_path / "out", cfg, layers=(1,), quiet=True,
                              share=ProcessShare(0, 1, "cpu"))
    assert outcome.protected == ["ann"] and not outcome.failed
    assert counted["surrogates"] == [["a1.png", "a2.png"]]
    assert counted["surrogate_steps"] == cfg.surrogate.steps
    assert counted["load_sd"] == 1
    record = json.loads((tmp_path / "out" / "ann" / "surrogate" / "surrogate.json").read_text())
    assert sorted(record["images"]) == ["a1.png", "a2.png"]
    report = json.loads((tmp_path / "out" / "ann" / "report.json").read_text())
    assert [e["input"] for e in report["images"]] == ["b1.png"]
