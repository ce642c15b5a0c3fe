"""Files in and out (issue 10, items 5 and 9): what is passed over is named, writes keep names, modes and strict JSON,
and bad options or configs give one clear message."""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dladiff.cli import EXIT_ERROR, _parse_encoders, app
from dladiff.config import MAX_SEED, load_config, with_overrides
from dladiff.data import Portrait, load_folder, save_json, save_png
from dladiff.errors import ConfigError, DladiffError

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def one_photo(tmp_path, real_photos):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(real_photos["hanks"]).save(folder / "good.png")
    return folder


def test_hidden_photos_and_dangling_links_are_named_as_skipped(one_photo):
    Image.open(one_photo / "good.png").save(one_photo / "..png", format="PNG")
    Image.open(one_photo / "good.png").save(one_photo / ".x.png")
    (one_photo / ".DS_Store").write_bytes(b"\0\1")
    os.symlink(one_photo / "gone.jpg", one_photo / "link.jpg")
    portraits, skipped = load_folder(one_photo)
    assert [p.name for p in portraits] == ["good.png"]
    reasons = {s.path.name: s.reason for s in skipped}
    assert set(reasons) == {"..png", ".x.png", "link.jpg"}  # .DS_Store is not a photo: ignored
    assert "hidden" in reasons[".x.png"] and "hidden" in reasons["..png"] and "dangling" in reasons["link.jpg"]


def test_first_frame_of_an_animation_is_used_with_a_warning(tmp_path, caplog):
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue", "green")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    Image.new("RGB", (32, 32), "red").save(tmp_path / "still.gif")
    with caplog.at_level(logging.WARNING, logger="dladiff"):
        portraits, _ = load_folder(tmp_path)
    assert len(portraits) == 2
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "anim.gif" in warnings[0] and "3 frames" in warnings[0]


def test_a_254_byte_name_can_be_written(tmp_path, real_photos):
    name = "p" * 250 + ".png"
    save_png(real_photos["hanks"], tmp_path / name)
    assert np.array_equal(np.asarray(Image.open(tmp_path / name)), real_photos["hanks"])
    assert [p.name for p in tmp_path.iterdir()] == [name]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_respect_the_umask(tmp_path, real_photos, umask):
    old = os.umask(umask)
    try:
        save_png(real_photos["hanks"], tmp_path / "x.png")
        save_json({"a": 1}, tmp_path / "x.json")
    finally:
        os.umask(old)
    for path in (tmp_path / "x.png", tmp_path / "x.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_json_is_strict_non_finite_numbers_become_null(tmp_path):
    save_json({"psnr": float("inf"), "loss": [float("nan"), np.float64(-np.inf), 1.5], "n": np.int64(3)}, tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda name: pytest.fail(f"{name} in strict JSON"))
    assert data == {"psnr": None, "loss": [None, None, 1.5], "n": 3}


@pytest.mark.parametrize("text", ["dlib=0", "dlib=inf", "dlib=-1", "dlib=nan", "dlib=1,arcface-r50=0"])
def test_encoder_weights_must_be_finite_and_positive(text):
    with pytest.raises(DladiffError, match="finite number > 0"):
        _parse_encoders(text)


@pytest.mark.parametrize("weight", [0.0, float("inf"), float("nan"), -2.0])
def test_config_encoder_weights_must_be_finite_and_positive(weight):
    with pytest.raises(ConfigError, match="finite numbers > 0"):
        with_overrides(load_config(), layer2={"encoders": {"dlib": weight}})


def test_zero_weight_on_the_command_line_is_one_clear_message(one_photo, tmp_path):
    result = run("protect", one_photo, "--out", tmp_path / "out", "--layers", "2", "--encoders", "dlib=0")
    assert result.exit_code == EXIT_ERROR and "dlib=0" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1, 2**70])
def test_seed_out_of_range_is_one_clear_message(one_photo, tmp_path, seed):
    result = run("protect", one_photo, "--out", tmp_path / "out", "--layers", "2", "--seed", seed)
    assert result.exit_code == EXIT_ERROR and "runtime.seed" in result.output and "Traceback" not in result.output
    assert with_overrides(load_config(), runtime={"seed": MAX_SEED}).runtime.seed == MAX_SEED


def test_config_that_is_not_utf8_is_one_clear_message(one_photo, tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("# réglages\nlayer2:\n  steps: 2\n".encode("latin-1"))
    result = run("protect", one_photo, "--out", tmp_path / "out", "--layers", "2", "--config", bad)
    assert result.exit_code == EXIT_ERROR and "latin1.yaml" in result.output and "UTF-8" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", ["protect", "finetune-surrogate", "evaluate"])
def test_out_naming_a_file_is_one_clear_message(one_photo, tmp_path, command):
    target = tmp_path / "out.txt"
    target.write_text("keep me")
    extra = {"protect": ["--layers", "2"], "finetune-surrogate": ["--config", "smoke"],
             "evaluate": ["--clean", one_photo, "--config", "smoke"]}[command]
    result = run(command, one_photo, "--out", target, *extra)
    assert result.exit_code == EXIT_ERROR and "is a file" in result.output and "Traceback" not in result.output
    assert target.read_text() == "keep me"


def test_evaluate_names_photos_it_cannot_pair(caplog):
    from dladiff.evaluate.scoring import clean_pairs

    def portrait(name, size=16):
        return Portrait(Path(name), np.zeros((size, size, 3), np.uint8), "0" * 64)

    protected = [portrait("out/a.png"), portrait("out/b.png"), portrait("out/c.png", 8)]
    clean = [portrait("clean/a.jpg"), portrait("clean/c.jpg"), portrait("clean/d.jpg")]
    with caplog.at_level(logging.WARNING, logger="dladiff"):
        pairs = clean_pairs(protected, clean)
    assert len(pairs) == 1
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "1 pair(s) only" in message
    assert "out/b.png (no clean original" in message and "out/c.png (8x8" in message and "clean/d.jpg (clean original" in message


def test_trained_surrogate_folder_respects_the_umask(tmp_path):
    from dladiff.surrogate import _write_surrogate

    class Saver:
        def save_pretrained(self, folder, safe_serialization):
            (Path(folder) / "config.json").write_text("{}")

    old = os.umask(0o022)
    try:
        _write_surrogate(Saver(), {"seed": 0}, tmp_path / "surrogate")
    finally:
        os.umask(old)
    assert (tmp_path / "surrogate" / "unet").stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in (tmp_path / "surrogate").iterdir()) == ["surrogate.json", "unet"]
