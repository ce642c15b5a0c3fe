"""The output folder (issue 10): foreign files are not replaced, one run at a time, layer 2 and datasets honour Ctrl-C."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import dladiff.layer2.photos
from dladiff.cli import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_NO_FACE, app
from dladiff.config import load_config, with_overrides
from dladiff.errors import DladiffError
from dladiff.outdir import MANIFEST, output_lock
from dladiff.protect import RUN_DIR, protect_folder
from dladiff.runtime import Interrupted, StopRequest

runner = CliRunner()
LAYER2 = ["--layers", "2", "--encoders", "dlib", "--detector", "dlib", "--quiet"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def fast_layer2(tmp_path):
    path = tmp_path / "fast2.yaml"
    path.write_text("layer2:\n  steps: 2\n  detect_retries: 0\n")
    return path


@pytest.fixture()
def two_faces(tmp_path, real_photos):
    """Two small portraits dlib finds a face in."""
    folder = tmp_path / "faces"
    folder.mkdir()
    astronaut = real_photos["astronaut"]
    Image.fromarray(astronaut[::2, ::2].copy()).save(folder / "a.png")
    Image.fromarray(astronaut[::2, ::-2].copy()).save(folder / "b.png")
    return folder


def layer2_cfg():
    return with_overrides(load_config(), layer2={"encoders": {"dlib": 1.0}, "detector": "dlib", "steps": 2, "detect_retries": 0})


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_foreign_files_are_refused_unless_overwrite(two_faces, tmp_path, fast_layer2):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"my own selfie")
    (out / "report.json").write_text("my notes")
    result = run("protect", two_faces, "--out", out, "--config", fast_layer2, *LAYER2)
    assert result.exit_code == EXIT_ERROR and "Traceback" not in result.output
    assert "a.png" in result.output and "report.json" in result.output and "--overwrite" in result.output
    assert (out / "a.png").read_bytes() == b"my own selfie" and (out / "report.json").read_text() == "my notes"
    assert not (out / "b.png").exists()

    result = run("protect", two_faces, "--out", out, "--config", fast_layer2, *LAYER2, "--overwrite")
    assert result.exit_code == 0, result.output
    assert pixels(out / "a.png").shape == (256, 256, 3)
    assert set(json.loads((out / MANIFEST).read_text())["files"]) == {"a.png", "b.png", "report.json", "report.html",
                                                                      "preview/a.png", "preview/b.png"}


def test_earlier_outputs_are_replaced_but_not_once_edited(two_faces, tmp_path, fast_layer2):
    out = tmp_path / "out"
    assert run("protect", two_faces, "--out", out, "--config", fast_layer2, *LAYER2).exit_code == 0
    again = run("protect", two_faces, "--out", out, "--config", fast_layer2, *LAYER2)
    assert again.exit_code == 0, again.output  # the manifest lists them: outputs of an earlier run
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(out / "b.png")  # the user edits one output
    edited = run("protect", two_faces, "--out", out, "--config", fast_layer2, *LAYER2)
    assert edited.exit_code == EXIT_ERROR and "holds b.png, which" in edited.output
    assert pixels(out / "b.png").shape == (8, 8, 3)


def test_second_lock_on_one_folder_is_a_clear_error(tmp_path):
    run_dir = tmp_path / "out" / RUN_DIR
    with output_lock(run_dir):
        with pytest.raises(DladiffError, match=rf"another dladiff run \(pid {os.getpid()}\)"):
            with output_lock(run_dir):
                pass
    with output_lock(run_dir):  # released: the next run takes it
        pass
    assert not run_dir.exists()  # a run folder holding only the lock is removed


def test_lock_of_a_killed_process_does_not_block(tmp_path):
    run_dir = tmp_path / "out" / RUN_DIR
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom dladiff.outdir import output_lock\n"
                               f"with output_lock({str(run_dir)!r}):\n    print('held', flush=True)\n    time.sleep(60)\n"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DladiffError, match=rf"pid {holder.pid}"):
            with output_lock(run_dir):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run_dir / "lock").is_file()  # left behind by the killed run
    with output_lock(run_dir):
        pass


def test_second_run_into_the_same_folder_is_refused(two_faces, tmp_path, fast_layer2):
    out = tmp_path / "out"
    with output_lock(out / RUN_DIR):
        result = run("protect", two_faces, "--out", out, "--config", fast_layer2, *LAYER2)
    assert result.exit_code == EXIT_ERROR and "another dladiff run" in result.output
    assert not (out / "a.png").exists()


def _counting_protect_image(monkeypatch, after=None):
    """Wrap layer2.protect_image; ``after(call_number)`` runs after each call. Returns the call log."""
    calls = []
    real = dladiff.layer2.photos.protect_image

    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        if after is not None:
            after(len(calls))
        return result

    monkeypatch.setattr(dladiff.layer2.photos, "protect_image", wrapped)
    return calls


def test_layer2_stop_finishes_the_photo_and_resume_redoes_none(two_faces, tmp_path, monkeypatch):
    cfg = layer2_cfg()
    protect_folder(two_faces, tmp_path / "full", cfg, layers=(2,), quiet=True)
    stop = StopRequest()
    calls = _counting_protect_image(monkeypatch, after=lambda n: stop.request())  # Ctrl-C during photo 1
    with pytest.raises(Interrupted, match="--resume"):
        protect_folder(two_faces, tmp_path / "resumed", cfg, layers=(2,), quiet=True, stop=stop)
    assert len(calls) == 1 and not (tmp_path / "resumed" / "a.png").exists()
    stored = sorted(p.suffix for p in (tmp_path / "resumed" / RUN_DIR / "layer2").iterdir())
    assert stored == [".json", ".png"]
    with pytest.raises(DladiffError, match="--resume"):
        protect_folder(two_faces, tmp_path / "resumed", cfg, layers=(2,), quiet=True)
    outcome = protect_folder(two_faces, tmp_path / "resumed", cfg, layers=(2,), resume=True, quiet=True)
    assert len(calls) == 2  # photo 1 came from its checkpoint
    for name in ("a.png", "b.png"):
        assert np.array_equal(pixels(tmp_path / "full" / name), pixels(tmp_path / "resumed" / name))
    full = json.loads((tmp_path / "full" / "report.json").read_text())
    assert [e["layer2"] for e in full["images"]] == [e["layer2"] for e in outcome.report["images"]]
    assert not (tmp_path / "resumed" / RUN_DIR).exists()


def test_double_ctrl_c_in_layer2_keeps_finished_photos(two_faces, tmp_path, monkeypatch, fast_layer2):
    cfg = layer2_cfg()

    def second_press(n):
        if n == 2:
            raise KeyboardInterrupt

    calls = _counting_protect_image(monkeypatch, after=second_press)
    result = run("protect", two_faces, "--out", tmp_path / "out", "--config", fast_layer2, *LAYER2)
    assert result.exit_code == EXIT_INTERRUPTED and "--resume" in result.output
    monkeypatch.undo()
    calls = _counting_protect_image(monkeypatch)
    protect_folder(two_faces, tmp_path / "out", cfg, layers=(2,), resume=True, quiet=True)
    assert len(calls) == 1  # only the photo the second Ctrl-C cut short is redone


def test_changed_settings_do_not_reuse_layer2_checkpoints(two_faces, tmp_path, monkeypatch):
    cfg = layer2_cfg()
    stop = StopRequest()
    _counting_protect_image(monkeypatch, after=lambda n: stop.request())
    with pytest.raises(Interrupted):
        protect_folder(two_faces, tmp_path / "out", cfg, layers=(2,), quiet=True, stop=stop)
    monkeypatch.undo()
    calls = _counting_protect_image(monkeypatch)
    protect_folder(two_faces, tmp_path / "out", with_overrides(cfg, layer2={"steps": 1}), layers=(2,), resume=True, quiet=True)
    assert len(calls) == 2


def test_photo_without_face_is_named_reported_and_exit_4(two_faces, tmp_path, fast_layer2):
    Image.fromarray(np.full((64, 80, 3), 128, np.uint8)).save(two_faces / "wall.png")
    out = tmp_path / "out"
    result = run("protect", two_faces, "--out", out, "--config", fast_layer2, *LAYER2, "--device", "cuda")
    assert result.exit_code == EXIT_NO_FACE, result.output
    assert "no face in 1 photo(s)" in result.output and "wall.png" in result.output
    assert "layer 2 runs on the CPU" in result.output  # --device cuda with --layers 2 is not silent
    text = (out / "report.json").read_text()
    report = json.loads(text, parse_constant=lambda name: pytest.fail(f"report.json holds {name}"))
    assert report["no_face"] == ["wall.png"]
    faces = {e["input"]: e["faces"] for e in report["images"]}
    assert faces == {"a.png": 1, "b.png": 1, "wall.png": 0}
    wall = next(e for e in report["images"] if e["input"] == "wall.png")
    assert wall["psnr_db"] is None and wall["linf_255"] == 0  # identical: infinite PSNR is written as null


def test_dataset_mode_honours_ctrl_c_between_identities(tmp_path, monkeypatch, two_faces):
    import dladiff.dataset as dataset
    import dladiff.protect
    from types import SimpleNamespace

    for name in ("ann", "bob", "cid"):
        (tmp_path / "data" / name).mkdir(parents=True)
        Image.open(two_faces / "a.png").save(tmp_path / "data" / name / "a.png")
    stop = StopRequest()
    seen = []

    def fake_protect(photos, out_dir, cfg, layers, surrogate, resume, quiet, stop, overwrite, components):
        seen.append((photos.name, stop))
        out_dir.mkdir(parents=True)
        (out_dir / "report.json").write_text("{}")
        if len(seen) == 1:
            stop.request()  # Ctrl-C while the first identity runs
        return SimpleNamespace(report={"no_face": ["a.png"]})

    monkeypatch.setattr(dladiff.protect, "protect_folder", fake_protect)
    share = dataset.ProcessShare(0, 1, "cpu")
    with pytest.raises(Interrupted, match="1/3 identities"):
        dataset.protect_dataset(tmp_path / "data", tmp_path / "out", load_config("smoke"), (2,), True, share, stop)
    assert seen == [("ann", stop)]  # the stop request reaches the identity's own run
    outcome = dataset.protect_dataset(tmp_path / "data", tmp_path / "out", load_config("smoke"), (2,), True, share)
    assert outcome.already_done == ["ann"] and outcome.protected == ["bob", "cid"]
    assert outcome.no_face == {"bob": ["a.png"], "cid": ["a.png"]}


def test_cli_turns_a_stop_into_exit_130(monkeypatch, two_faces, tmp_path):
    import dladiff.protect

    def stopped(*args, **kwargs):
        raise Interrupted("stopped after layer 2 finished 1/2 photo(s); rerun the same command with --resume to continue")

    monkeypatch.setattr(dladiff.protect, "protect_folder", stopped)
    result = run("protect", two_faces, "--out", tmp_path / "out", *LAYER2)
    assert result.exit_code == EXIT_INTERRUPTED and "--resume" in result.output and "Traceback" not in result.output


def test_damaged_layer2_checkpoint_is_redone_not_trusted(tmp_path):
    from dladiff.layer2_resume import Layer2Checkpoints

    store = Layer2Checkpoints(tmp_path)
    photo = np.arange(12 * 10 * 3, dtype=np.uint8).reshape(12, 10, 3)
    store.save("k", photo, {"faces": [], "no_face": True})
    loaded, report = store.load("k", photo.shape)
    assert np.array_equal(loaded, photo) and report == {"faces": [], "no_face": True}
    assert store.load("k", (10, 12, 3)) is None  # another photo's size
    Image.fromarray(photo[::-1].copy()).save(store.folder / "k.png")  # replaced behind the record's back
    assert store.load("k", photo.shape) is None
    (store.folder / "k.json").write_text("[1, 2]")
    assert store.load("k", photo.shape) is None
