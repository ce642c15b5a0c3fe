"""The command line end to end on the tiny model, and every bad-input case of issue 2."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dladiff.cli import EXIT_ERROR, EXIT_SKIPPED, app

runner = CliRunner()


@pytest.fixture()
def fast_config(tmp_path):
    path = tmp_path / "fast.yaml"
    path.write_text("inherit: smoke\nsurrogate:\n  steps: 2\nlayer1:\n  epochs: 1\n  checkpoint_every: 1\n")
    return str(path)


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_protect_smoke_end_to_end(photo_dir, tmp_path):
    before = {p.name: p.read_bytes() for p in photo_dir.iterdir()}
    out = tmp_path / "out"
    result = run("protect", photo_dir, "--out", out, "--config", "smoke", "--layers", "1", "--quiet")
    assert result.exit_code == 0, result.output
    assert {p.name: p.read_bytes() for p in photo_dir.iterdir()} == before  # inputs untouched
    report = json.loads((out / "report.json").read_text())
    assert [e["output"] for e in report["images"]] == ["astronaut.png", "grey.png", "group.png", "hanks.png"]
    for entry in report["images"]:
        saved = np.asarray(Image.open(out / entry["output"]).convert("RGB"))  # grey.png comes back greyscale (L)
        original = np.asarray(Image.open(photo_dir / entry["input"]).convert("RGB"))
        assert saved.shape == original.shape
        measured = np.abs(saved.astype(int) - original.astype(int)).max()
        assert measured == entry["linf_255"] <= 0.05 * 127.5
        assert 25 < entry["psnr_db"] < 60
    assert report["settings"]["layer1"]["epochs"] == 4 and report["layers"] == [1]
    assert len(report["layer1"]["history"]) == 4
    assert (out / "surrogate" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (out / ".dladiff-run").exists()  # finished runs leave no checkpoint behind
    page = (out / "report.html").read_text(encoding="utf-8")
    for entry in report["images"]:
        strip = Image.open(out / "preview" / entry["output"])
        panel = round(entry["width"] * min(1.0, 480 / entry["height"]))
        assert strip.width >= 3 * panel
        assert entry["input"] in page
    assert "Layer 2 was not run on this photo." in page and "http" not in page.split("<h2>Settings")[0]


def test_bad_file_is_skipped_and_exit_code_says_so(photo_dir, tmp_path, fast_config):
    (photo_dir / "notes.txt").write_text("not a photo")
    result = run("protect", photo_dir, "--out", tmp_path / "out", "--config", fast_config, "--layers", "1", "--quiet")
    assert result.exit_code == EXIT_SKIPPED
    assert "notes.txt" in result.output
    assert len(list((tmp_path / "out").glob("*.png"))) == 4
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["skipped"][0]["file"].endswith("notes.txt")


@pytest.mark.parametrize("case", ["empty", "missing", "same"])
def test_folder_errors_are_clear(tmp_path, case):
    photos = tmp_path / "photos"
    if case != "missing":
        photos.mkdir()
    out = photos if case == "same" else tmp_path / "out"
    result = run("protect", photos, "--out", out, "--config", "smoke", "--layers", "1")
    assert result.exit_code == EXIT_ERROR
    expected = {"empty": "empty", "missing": "no such folder", "same": "input folder"}[case]
    assert expected in result.output and "Traceback" not in result.output


def test_cuda_without_gpu_is_a_clear_error(photo_dir, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run("protect", photo_dir, "--out", tmp_path / "out", "--config", "smoke", "--layers", "1", "--device", "cuda")
    assert result.exit_code == EXIT_ERROR and "no usable CUDA GPU" in result.output


def test_missing_model_names_it_and_the_smoke_config(photo_dir, tmp_path):
    result = run("protect", photo_dir, "--out", tmp_path / "out", "--layers", "1", "--device", "cpu",
                 "--model", "nobody/no-such-model")
    assert result.exit_code == EXIT_ERROR
    assert "nobody/no-such-model" in result.output and "--config smoke" in result.output


def test_earlier_run_needs_resume(photo_dir, tmp_path, fast_config):
    out = tmp_path / "out"
    (out / ".dladiff-run").mkdir(parents=True)
    (out / ".dladiff-run" / "layer1.ckpt").write_bytes(b"x")
    result = run("protect", photo_dir, "--out", out, "--config", fast_config, "--layers", "1")
    assert result.exit_code == EXIT_ERROR and "--resume" in result.output


def test_finetune_surrogate_writes_diffusers_layout_and_record(photo_dir, tmp_path, fast_config):
    out = tmp_path / "sur"
    result = run("finetune-surrogate", photo_dir, "--out", out, "--config", fast_config, "--quiet")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "surrogate.json").read_text())
    assert record["surrogate"]["steps"] == 2 and record["seed"] == 0 and len(record["images"]) == 4
    assert (out / "unet" / "config.json").is_file()
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    protect = run("protect", photo_dir, "--out", tmp_path / "out", "--config", fast_config, "--layers", "1",
                  "--surrogate", out, "--quiet")
    assert protect.exit_code == 0, protect.output
    assert not (tmp_path / "out" / "surrogate").exists()


def test_bad_config_is_a_clear_error(photo_dir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("layer1:\n  epochs: many\n  colour: red\n")
    result = run("protect", photo_dir, "--out", tmp_path / "out", "--config", bad)
    assert result.exit_code == EXIT_ERROR and "bad.yaml" in result.output and "colour" in result.output


def test_help_explains_commands():
    result = run("--help")
    assert result.exit_code == 0 and "protect" in result.output and "finetune-surrogate" in result.output
    result = run("protect", "--help")
    assert "--resume" in result.output and "--layers" in result.output


def test_protect_resume_reaches_the_uninterrupted_result(photo_dir, tmp_path):
    """A run stopped by Ctrl-C (first press: finish the epoch, checkpoint) and resumed saves the same PNGs."""
    from dladiff.config import load_config, with_overrides
    from dladiff.protect import protect_folder
    from dladiff.runtime import Interrupted, StopRequest

    cfg = with_overrides(load_config("smoke"), surrogate={"steps": 2}, layer1={"epochs": 3, "checkpoint_every": 2})
    protect_folder(photo_dir, tmp_path / "full", cfg, layers=(1,), quiet=True)
    stop = StopRequest()
    stop.request()
    with pytest.raises(Interrupted):
        protect_folder(photo_dir, tmp_path / "resumed", cfg, layers=(1,), quiet=True, stop=stop)
    assert (tmp_path / "resumed" / ".dladiff-run" / "layer1.ckpt").is_file()
    protect_folder(photo_dir, tmp_path / "resumed", cfg, layers=(1,), resume=True, quiet=True)
    for png in sorted((tmp_path / "full").glob("*.png")):
        assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(tmp_path / "resumed" / png.name)))


def test_encoder_list_parsing():
    from dladiff.cli import _parse_encoders

    assert _parse_encoders("dlib=0.5,arcface-r50") == {"dlib": 0.5, "arcface-r50": 1.0}
    assert _parse_encoders("onnx:/m/a=b/rec.json=2,dlib") == {"onnx:/m/a=b/rec.json": 2.0, "dlib": 1.0}
    assert _parse_encoders("onnx:/m/a=b/rec.json") == {"onnx:/m/a=b/rec.json": 1.0}
    assert _parse_encoders(None) is None
