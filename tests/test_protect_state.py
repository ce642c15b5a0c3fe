"""protect's layer-1 files in OUT/.dladiff-run: never unpickled, damaged ones replaced, FSMG frees the base UNet."""

import gc
import logging
import weakref

import torch
from test_state_io import write_crafted_pickle

from dladiff.config import load_config, with_overrides
from dladiff.layer1 import CHECKPOINT
from dladiff.protect import LAYER1_RESULT, RUN_DIR, protect_folder
from dladiff.state_io import save_state


def fast(method: str):
    return with_overrides(load_config("smoke"), method={"name": method}, surrogate={"steps": 2},
                          layer1={"epochs": 1, "stage1_steps": 1, "stage2_steps": 1, "stage3_steps": 1,
                                  "checkpoint_every": 1})


def test_planted_and_damaged_layer1_files_are_refused_not_run(photo_dir, tmp_path, caplog):
    """A crafted pickle at the checkpoint and at the old result name, a truncated result: nothing runs, layer 1 redoes it."""
    out, marker = tmp_path / "out", tmp_path / "pwned"
    run_dir = out / RUN_DIR
    for name in (CHECKPOINT, "layer1_result.pt"):
        write_crafted_pickle(run_dir / name, marker)
    save_state({"fingerprint": "x", "delta": torch.zeros(4, 3, 64, 64), "history": []}, run_dir / LAYER1_RESULT,
               "layer-1 result")
    (run_dir / LAYER1_RESULT).write_bytes((run_dir / LAYER1_RESULT).read_bytes()[:-1000])
    with caplog.at_level(logging.WARNING, logger="dladiff"):
        outcome = protect_folder(photo_dir, out, fast("aspl"), layers=(1,), resume=True, quiet=True)
    assert not marker.exists()
    assert str(run_dir / LAYER1_RESULT) in caplog.text and "layer 1 runs again" in caplog.text
    assert str(run_dir / CHECKPOINT) in caplog.text
    assert len(outcome.report["images"]) == 4 and not outcome.failed
    assert len(outcome.report["layer1"]["history"]) == 1


def test_fsmg_does_not_keep_the_pretrained_unet(photo_dir, tmp_path, monkeypatch):
    """FSMG attacks θs only: the base UNet that load_sd returned is freed before the attack runs."""
    import dladiff.diffusion.loading as loading
    from dladiff.layer1 import ADFTProtector

    loaded, alive = [], []
    real_load_sd, real_run_epoch = loading.load_sd, ADFTProtector.run_epoch

    def load_sd(*args, **kwargs):
        components = real_load_sd(*args, **kwargs)
        loaded.append(weakref.ref(components.unet))
        return components

    def run_epoch(self, bar=None):
        gc.collect()
        alive.append(loaded[-1]() is not None)
        return real_run_epoch(self, bar)

    monkeypatch.setattr(loading, "load_sd", load_sd)
    monkeypatch.setattr(ADFTProtector, "run_epoch", run_epoch)
    outcome = protect_folder(photo_dir, tmp_path / "out", fast("fsmg"), layers=(1,), quiet=True)
    assert alive == [False]
    assert outcome.report["layer1"]["method"] == "fsmg" and len(outcome.report["images"]) == 4
