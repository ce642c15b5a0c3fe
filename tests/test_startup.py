"""Start-up: heavy libraries imported only where used, models loaded once, and nothing loaded before it is needed."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dladiff.config import load_config
from dladiff.faces import detect
from dladiff.faces.detect import LoadOnce, frontal_face_detector, load_shape_predictor
from dladiff.faces.model_packs import dlib_model_path
from dladiff.faces.verdicts import DlibJudge, LazyJudge, SFaceJudge, native_judge

HEAVY = ("torch", "diffusers", "transformers", "insightface", "onnx2torch", "onnx", "torchvision", "torch_fidelity",
         "skimage", "scipy", "peft", "dlib", "cv2")


def imported_after(code: str) -> set[str]:
    """Top-level module names present in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    script = f"{code}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def test_the_cli_module_imports_no_heavy_library():
    assert imported_after("import dladiff.cli") & set(HEAVY) == set()


def test_loading_sface_imports_neither_onnx2torch_nor_torchvision():
    loaded = imported_after("from dladiff.faces.encoders import load_encoder\nload_encoder('sface', '/nonexistent')")
    assert "torch" in loaded and "onnx" in loaded  # it did load, through the ONNX file
    assert not loaded & {"onnx2torch", "torchvision", "diffusers", "transformers"}


def test_native_sface_graph_matches_the_onnx2torch_conversion(real_photos):
    from onnx2torch import convert

    from dladiff.faces.onnx_convert import NativeGraph, load_onnx_model, make_batch_dynamic, onnx_to_torch
    from dladiff.faces.opencv_zoo import float_sface_path

    native = onnx_to_torch(float_sface_path())
    assert isinstance(native, NativeGraph)
    model = load_onnx_model(float_sface_path())
    make_batch_dynamic(model)
    reference = convert(model).eval()
    photo = torch.from_numpy(np.ascontiguousarray(real_photos["t1"][:112, :224])).float().permute(2, 0, 1)
    x = torch.stack([photo[:, :, :112], photo[:, :, 112:]]).requires_grad_(True)
    ours = native(x)
    ours.sum().backward()
    ours_grad, x.grad = x.grad.clone(), None
    theirs = reference(x)
    theirs.sum().backward()
    assert ours.shape == (2, 128)
    assert sum(op == "BatchNormalization" for op, *_ in native.nodes) == 2  # the 27 after a Conv are folded
    assert torch.allclose(ours, theirs, atol=1e-5)  # folding changes float32 rounding only
    assert torch.nn.functional.cosine_similarity(ours_grad.flatten(), x.grad.flatten(), dim=0) > 0.9999


def test_batch_norm_folded_into_its_convolution_gives_the_same_outputs():
    from dladiff.faces.onnx_convert import fold_batch_norms

    rng = np.random.default_rng(0)
    constants = {"w": rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32),
                 "g": rng.uniform(0.5, 2, 4).astype(np.float32), "beta": rng.normal(size=4).astype(np.float32),
                 "mu": rng.normal(size=4).astype(np.float32), "var": rng.uniform(0.1, 2, 4).astype(np.float32)}
    conv = ("Conv", ["x", "w", "b"], "c", {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1})
    norm = ("BatchNormalization", ["c", "g", "beta", "mu", "var"], "y", {"eps": 1e-5})
    folded = fold_batch_norms([conv, norm], constants, "y")
    assert [(op, output) for op, _, output, _ in folded] == [("Conv", "y")]
    x = torch.randn(2, 3, 8, 8)
    t = {k: torch.from_numpy(v) for k, v in constants.items()}
    expected = F.batch_norm(F.conv2d(x, t["w"], t["b"], padding=1), t["mu"], t["var"], t["g"], t["beta"], False, 0.0, 1e-5)
    _, inputs, _, settings = folded[0]
    ours = F.conv2d(x, t[inputs[1]], t[inputs[2]], **settings)
    assert torch.allclose(ours, expected, atol=1e-5)
    shared = fold_batch_norms([conv, norm, ("Relu", ["c"], "r", {})], dict(constants), "y")
    assert [op for op, *_ in shared] == ["Conv", "BatchNormalization", "Relu"]  # the conv's output has another reader


def test_frozen_prelu_gives_aten_prelu_values_and_input_gradients_exactly():
    from dladiff.faces.onnx_convert import _prelu

    for shape, channels in (((2, 8, 5, 5), 8), ((2, 8, 5, 5), 1), ((3, 16), 16)):
        x = torch.randn(*shape)
        x.view(-1)[::7] = 0.0  # at 0 the derivative is the slope, as in ATen
        x.requires_grad_(True)
        slope = torch.rand(channels) - 0.25
        ours = _prelu(x, slope)
        upstream = torch.randn_like(ours)
        (ours_grad,) = torch.autograd.grad(ours, x, upstream)
        theirs = F.prelu(x, slope)
        (theirs_grad,) = torch.autograd.grad(theirs, x, upstream)
        assert ours.grad_fn.name() != theirs.grad_fn.name()  # our backward ran
        assert torch.equal(ours, theirs) and torch.equal(ours_grad, theirs_grad)


def test_graphs_with_other_operators_still_go_through_onnx2torch(tmp_path):
    from test_encoders import export, tiny_iresnet

    from dladiff.faces.onnx_convert import NativeGraph, onnx_to_torch

    plain = export(tiny_iresnet(0), tmp_path / "plain.onnx", dynamic_batch=True)
    reshaped = export(tiny_iresnet(0, reshape_flatten=True), tmp_path / "reshaped.onnx", dynamic_batch=False)
    assert isinstance(onnx_to_torch(plain), NativeGraph)  # Conv, BatchNorm, PRelu, Add, Flatten, Gemm
    assert not isinstance(onnx_to_torch(reshaped), NativeGraph)  # Reshape: onnx2torch


def test_load_once_builds_once_under_concurrent_calls():
    calls = []

    def slow(key):
        calls.append(key)
        time.sleep(0.2)
        return object()

    once = LoadOnce(slow)
    results = []
    threads = [threading.Thread(target=lambda: results.append(once("a"))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == ["a"] and len({id(r) for r in results}) == 1
    assert once("b") is not results[0] and calls == ["a", "b"]


def test_a_failed_load_is_not_cached():
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("first try fails")
        return "model"

    once = LoadOnce(flaky)
    with pytest.raises(OSError):
        once()
    assert once() == "model" and len(attempts) == 2


def test_one_hog_detector_and_one_predictor_per_file_for_every_user():
    from dladiff.faces.landmarks import DlibSource

    sixty_eight = DlibSource(68)
    assert frontal_face_detector() is detect.DlibDetector()._detector  # the judge's passes go through hog_boxes
    path = dlib_model_path("shape_predictor_68_face_landmarks.dat")
    assert load_shape_predictor(path) is load_shape_predictor(str(path)) is sixty_eight.predictor
    assert detect.DlibDetector()._predictor is sixty_eight.predictor  # the same file by another path spelling


def test_native_judges_are_built_on_first_use_and_judge_like_the_eager_ones(real_photos):
    judge = native_judge("dlib", "/nonexistent")
    assert isinstance(judge, LazyJudge) and not judge.built
    assert (judge.name, judge.threshold, judge.threshold_kind) == ("dlib", 0.6, "euclidean")
    photo = real_photos["astronaut"]
    lazy_faces, eager_faces = judge.faces(photo), DlibJudge().faces(photo)
    assert judge.built and len(lazy_faces) == len(eager_faces) >= 1
    for a, b in zip(lazy_faces, eager_faces):
        assert np.array_equal(a.bbox, b.bbox) and np.allclose(a.descriptor, b.descriptor)
    sface = native_judge("sface", "/nonexistent")
    assert isinstance(sface, LazyJudge) and not sface.built
    assert (sface.threshold, sface.threshold_kind) == (SFaceJudge().threshold, "cosine")


def test_prepare_layer2_builds_no_native_judge(monkeypatch):
    from dladiff.layer2 import prepare_layer2

    built = []
    for cls in (DlibJudge, SFaceJudge):
        original = cls.__init__
        def counted(self, *args, _original=original, **kwargs):
            built.append(type(self))
            _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", counted)
    cfg = load_config()
    models = prepare_layer2(cfg.layer2)
    assert set(models.judges) == {"sface", "dlib"}
    assert built == [] and not any(judge.built for judge in models.judges.values())


def test_amplified_difference_integer_gain_equals_the_float_formula():
    from dladiff.preview import amplified_difference

    rng = np.random.default_rng(0)
    clean = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    protected = np.clip(clean.astype(int) + rng.integers(-40, 41, clean.shape), 0, 255).astype(np.uint8)
    protected[0, 0], clean[0, 0] = 255, 0  # the extremes
    for gain in (10.0, 1, 100, -3.0, 2.5):
        diff = protected.astype(np.int16) - clean.astype(np.int16)
        expected = np.clip(128.0 + gain * diff, 0, 255).astype(np.uint8)
        assert np.array_equal(amplified_difference(clean, protected, gain), expected)


def test_report_thumbnails_decode_to_the_scaled_strip(real_photos):
    import base64
    import io

    from PIL import Image

    from dladiff.report_html import THUMB_WIDTH, png_data_uri

    photo = np.ascontiguousarray(np.concatenate([real_photos["astronaut"]] * 3, axis=1))
    uri = png_data_uri(photo)
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))
    expected = np.asarray(Image.fromarray(photo).resize((THUMB_WIDTH, round(512 * THUMB_WIDTH / photo.shape[1])),
                                                        Image.Resampling.BOX))
    assert uri.startswith("data:image/png;base64,") and np.array_equal(decoded, expected)


def test_the_dlib_landmark_sources_and_the_dlib_judge_share_one_hog_pass_per_photo(monkeypatch, real_photos):
    import dlib

    from dladiff.faces.landmarks import DlibSource

    photo = np.ascontiguousarray(real_photos["astronaut"])
    expected = [(r.left(), r.top(), r.right(), r.bottom()) for r in dlib.get_frontal_face_detector()(photo, 1)]
    sources = [DlibSource(68), DlibSource(5)]
    calls = []
    hog = frontal_face_detector()
    monkeypatch.setattr(detect, "frontal_face_detector", lambda: lambda image, up: calls.append(up) or hog(image, up))
    detect._HOG_CACHE.clear()
    found = [source.faces(photo) for source in sources]
    assert calls == [1] and len(found[0]) == len(found[1]) == len(expected) >= 1
    for faces in found:
        assert [tuple(int(v) for v in f.face.bbox) for f in faces] == [(l, t, r + 1, b + 1) for l, t, r, b in expected]
    changed = photo.copy()
    changed[:64] = 0
    sources[0].faces(changed)
    assert calls == [1, 1]  # another image: a new pass
    judged = DlibJudge().faces(photo)  # the first photo is still remembered
    assert calls == [1, 1] and [tuple(f.bbox) for f in judged] == [(l, t, r + 1, b + 1) for l, t, r, b in expected]
