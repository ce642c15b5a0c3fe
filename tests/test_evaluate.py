"""dladiff evaluate: the attacker pipeline end to end on the tiny model, caching, layouts and sharding."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dladiff.data import save_png
from dladiff.errors import ConfigError, InputError
from dladiff import layout
from dladiff.evaluate.config import (ATTACKS, builtin_evaluate_names, load_evaluate_config,
                                     with_evaluate_overrides)
from dladiff.dataset import ProcessShare
from dladiff.evaluate import metrics
from dladiff.evaluate.report import CSV_COLUMNS, POOLED, write_comparison

# FID of a handful of images has singular covariances (metrics.fid handles them; scipy still warns).
pytestmark = pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every test of this file runs torch on one thread (conftest.one_torch_thread)."""


def noisy(pixels: np.ndarray, seed: int, amplitude: int = 3) -> np.ndarray:
    """A stand-in for a protected photo: small bounded noise added."""
    noise = np.random.default_rng(seed).integers(-amplitude, amplitude + 1, pixels.shape)
    return np.clip(pixels.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def write_identity(folder: Path, photos: dict[str, np.ndarray], protect: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, pixels) in enumerate(photos.items()):
        save_png(noisy(pixels, i) if protect else pixels, folder / f"{name}.png")
    return folder


@pytest.fixture()
def identity_photos(real_photos) -> dict[str, np.ndarray]:
    astronaut = real_photos["astronaut"]
    return {"astronaut": astronaut, "mirrored": np.ascontiguousarray(astronaut[:, ::-1])}


@pytest.fixture()
def clean_and_protected(tmp_path, identity_photos) -> tuple[Path, Path]:
    clean = write_identity(tmp_path / "clean" / "alice", identity_photos, protect=False)
    protected = write_identity(tmp_path / "protected" / "alice", identity_photos, protect=True)
    return clean, protected


def histogram_features(images) -> np.ndarray:
    """A cheap stand-in for Inception features (FID plumbing only)."""
    return np.stack([np.histogram(im, bins=16, range=(0, 256))[0] / im.size for im in images])


@pytest.fixture()
def smoke_cfg(tiny_sd):
    return load_evaluate_config("smoke")


@pytest.fixture()
def scorers(smoke_cfg):
    from dladiff.evaluate.scoring import load_scorers

    pytest.importorskip("dlib")
    loaded = load_scorers(smoke_cfg)
    loaded.fid = histogram_features
    loaded.unavailable.pop("fid", None)
    return loaded


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# End to end ---------------------------------------------------------------------------------


def test_evaluate_end_to_end_then_rerun_skips_work(tmp_path, clean_and_protected, smoke_cfg, scorers):
    from dladiff.evaluate.run import evaluate

    clean, protected = clean_and_protected
    out = tmp_path / "eval"
    outcome = evaluate(protected, clean, out, smoke_cfg, quiet=True, scorers=scorers)

    for name in ("results.json", "results.csv", "results.md", "alice/contact_sheet.png", "alice/metrics.json"):
        assert (out / name).is_file(), name
    rows = read_csv(out / "results.csv")
    assert tuple(rows[0]) == CSV_COLUMNS
    prompts = {"dreambooth": smoke_cfg.generation.prompts, "lora": smoke_cfg.generation.prompts,
               "faceid": smoke_cfg.faceid.prompts}
    for identity in ("alice", POOLED):
        for attack, attack_prompts in prompts.items():
            for prompt in attack_prompts:
                match = [r for r in rows if (r["identity"], r["attack"], r["prompt"]) == (identity, attack, prompt)]
                assert len(match) == 1, (identity, attack, prompt)
                assert int(match[0]["images"]) == smoke_cfg.generation.images_per_prompt
                assert 0.0 <= float(match[0]["fdr"]) <= 1.0
                assert float(match[0]["fid"]) >= 0.0
    photos_row = next(r for r in rows if r["identity"] == "alice" and r["attack"] == "photos")
    assert 35.0 < float(photos_row["psnr"]) < 60.0 and 0.8 < float(photos_row["ssim"]) < 1.0
    assert float(photos_row["ism_pro"]) > 0.95  # dlib still sees the same person through small noise
    faceid_row = next(r for r in rows if r["identity"] == "alice" and r["attack"] == "faceid")
    assert float(faceid_row["ism_pro"]) > 0.95
    pooled = next(r for r in rows if r["identity"] == POOLED and r["attack"] == "dreambooth")
    assert pooled["fid_per_identity"] != ""

    results = json.loads((out / "results.json").read_text())
    assert results["identities"] == ["alice"] and results["missing_identities"] == []
    assert (results["dataset"], results["method"]) == ("", "alice")
    assert results["unavailable"]["nsfw_rate"] == "disabled in the config"
    markdown = (out / "results.md").read_text()
    for heading in ("Table 1 layout", "Table 2 layout", "Table 3 layout", "Table 4 layout", "Table 9 layout", "Table 10 layout"):
        assert heading in markdown
    assert outcome.evaluated == ["alice"]

    assert len(list(out.glob("_class_images/*/class_*.png"))) == smoke_cfg.dreambooth.num_class_images

    generated = sorted((out / "alice").glob("*/*/[0-9]*.png"))
    assert len(generated) == sum(len(p) for p in prompts.values()) * smoke_cfg.generation.images_per_prompt
    stamps = {p: p.stat().st_mtime_ns for p in generated + [out / "alice" / "metrics.json"]}
    evaluate(protected, clean, out, smoke_cfg, quiet=True, scorers=scorers)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    from dladiff.evaluate.mos import discover_images  # `dladiff rate` finds exactly the fine-tuning attacks' images

    found = discover_images(out, ["dreambooth", "lora"])
    assert sorted(out / i["file"] for i in found) == [p for p in generated if p.parts[-3] in ("dreambooth", "lora")]
    assert {(i["method"], i["identity"]) for i in found} == {("alice", "alice")}


def test_changed_settings_redo_only_that_attack(tmp_path, clean_and_protected, smoke_cfg, scorers):
    from dladiff.evaluate.run import evaluate

    clean, protected = clean_and_protected
    out = tmp_path / "eval"
    cfg = with_evaluate_overrides(smoke_cfg, attacks=["dreambooth", "lora"])
    evaluate(protected, clean, out, cfg, quiet=True, scorers=scorers)
    dreambooth = sorted((out / "alice" / "dreambooth").rglob("0000.png"))
    before = {p: p.stat().st_mtime_ns for p in dreambooth}
    evaluate(protected, clean, out, with_evaluate_overrides(cfg, lora={"rank": 2}), quiet=True, scorers=scorers)
    assert {p: p.stat().st_mtime_ns for p in dreambooth} == before
    record = json.loads((out / "alice" / "lora" / "attack.json").read_text())
    assert record["settings"]["section"]["rank"] == 2

    (out / "alice" / "dreambooth" / "done.json").unlink()  # as if killed while generating
    lora = sorted((out / "alice" / "lora").rglob("0000.png"))
    lora_stamps = {p: p.stat().st_mtime_ns for p in lora}
    evaluate(protected, clean, out, with_evaluate_overrides(cfg, lora={"rank": 2}), quiet=True, scorers=scorers)
    assert (out / "alice" / "dreambooth" / "done.json").is_file()
    assert {p: p.stat().st_mtime_ns for p in lora} == lora_stamps


def test_dataset_mode_shards_and_merges(tmp_path, identity_photos, smoke_cfg, scorers):
    from dladiff.evaluate.run import evaluate

    names = ["ann", "bob", "cid"]
    for name in names:
        write_identity(tmp_path / "data" / name / "set_B", identity_photos, protect=False)
        write_identity(tmp_path / "data" / name / "set_C", {"ref": identity_photos["astronaut"]}, protect=False)
        write_identity(tmp_path / "prot" / name, identity_photos, protect=True)
    cfg = with_evaluate_overrides(smoke_cfg, attacks=["lora"], generation={"prompts": ["a photo of sks person"]})
    out = tmp_path / "eval"
    first = evaluate(tmp_path / "prot", tmp_path / "data", out, cfg, dataset=True, quiet=True,
                     scorers=scorers, share=ProcessShare(0, 2, "cpu"))
    assert first.evaluated == ["ann", "cid"]
    assert json.loads((out / "results.json").read_text())["missing_identities"] == ["bob"]
    second = evaluate(tmp_path / "prot", tmp_path / "data", out, cfg, dataset=True, quiet=True,
                      scorers=scorers, share=ProcessShare(1, 2, "cpu"))
    assert second.evaluated == ["bob"]
    results = json.loads((out / "results.json").read_text())
    assert results["identities"] == names and results["missing_identities"] == []
    assert results["dataset"] == "data" and results["method"] == "prot"
    record = json.loads((out / "ann" / "metrics.json").read_text())
    assert record["folders"]["clean"].endswith("set_B") and record["folders"]["references"].endswith("set_C")
    pooled = [r for r in results["rows"] if r["identity"] == POOLED and r["attack"] == "lora"]
    assert len(pooled) == 1 and pooled[0]["images"] == 3 * cfg.generation.images_per_prompt
    clean_images = [im for _ in names for im in identity_photos.values()]
    generated = [np.asarray(Image.open(p).convert("RGB")) for n in names for p in sorted((out / n / "lora").rglob("*.png"))]
    assert len(generated) == pooled[0]["images"]
    expected = metrics.fid(histogram_features(clean_images), histogram_features(generated))
    assert pooled[0]["fid"] == pytest.approx(expected, rel=1e-6)
    assert pooled[0]["fid"] != pytest.approx(pooled[0]["fid_per_identity"], rel=1e-3)  # pooled, not averaged

    table = write_comparison([out, out], tmp_path / "tables.md")
    assert table.count("| data | prot | a photo of sks person |") == 2


# Attacks ------------------------------------------------------------------------------------


def test_dreambooth_trains_unet_and_text_encoder(tmp_path, tiny_sd, identity_photos, smoke_cfg):
    from dladiff.data import load_folder
    from dladiff.diffusion.loading import load_sd
    from dladiff.evaluate.attack import AttackContext
    from dladiff.evaluate.dreambooth import finetune, unet_and_text_encoder

    photos, _ = load_folder(write_identity(tmp_path / "photos", identity_photos, protect=True))
    cfg = with_evaluate_overrides(smoke_cfg, dreambooth={"steps": 1, "learning_rate": 1e-3})
    ctx = AttackContext("alice", photos, tmp_path / "db", tmp_path, cfg, torch.device("cpu"), quiet=True)
    components = load_sd(str(tiny_sd))
    modules = (components.unet, components.text_encoder)
    before = [[p.detach().clone() for p in m.parameters()] for m in modules]
    parameters = unet_and_text_encoder(components, train_text_encoder=True, gradient_checkpointing=False)
    loss = finetune(components, cfg.dreambooth, ctx, parameters, True, None, "test")
    assert np.isfinite(loss)
    for module, old in zip(modules, before):
        assert any(not torch.equal(a, b) for a, b in zip(old, module.parameters()))


def test_lora_trains_only_the_adapter(tiny_sd):
    from dladiff.diffusion.loading import load_sd
    from dladiff.evaluate.lora import LORA_TARGETS, add_lora

    unet = load_sd(str(tiny_sd)).unet
    frozen = {n: p.detach().clone() for n, p in unet.named_parameters()}
    params = add_lora(unet, rank=2, alpha=2.0)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(params) == len(trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} <= {t.split(".")[0] for t in LORA_TARGETS} | {"0"}
    assert all(not p.requires_grad for n, p in unet.named_parameters() if n in frozen)


def test_faceid_embedding_conditions_the_tiny_pipeline(tmp_path, clean_and_protected, smoke_cfg):
    from dladiff.data import load_folder
    from dladiff.evaluate.attack import AttackContext
    from dladiff.evaluate.faceid import id_embeds, load_faceid_pipeline

    photos, _ = load_folder(clean_and_protected[1])
    ctx = AttackContext("alice", photos, tmp_path / "faceid", tmp_path, smoke_cfg, torch.device("cpu"), quiet=True)
    pipe = load_faceid_pipeline(ctx, embed_dim=128)
    assert any("IPAdapter" in type(p).__name__ for p in pipe.unet.attn_processors.values())

    def draw(embedding):
        out = pipe("a photo of a person", num_inference_steps=2, height=64, width=64, output_type="np",
                   generator=torch.Generator().manual_seed(0), ip_adapter_image_embeds=[id_embeds(embedding, torch.float32, "cpu")])
        return out.images[0]

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(128), rng.standard_normal(128)
    assert np.allclose(draw(a), draw(a)) and not np.allclose(draw(a), draw(b))


@pytest.mark.parametrize("attack", ["faceid", "instantid"])
def test_zero_shot_attacks_skip_with_a_reason_without_weights(tmp_path, clean_and_protected, smoke_cfg, attack):
    from dladiff.data import load_folder
    from dladiff.evaluate.attack import AttackContext
    from dladiff.evaluate.run import run_attack

    cfg = with_evaluate_overrides(smoke_cfg, **{attack: {"adapter": str(tmp_path / "no-such-adapter")}})
    photos, _ = load_folder(clean_and_protected[1])
    ctx = AttackContext("alice", photos, tmp_path / attack, tmp_path, cfg, torch.device("cpu"), quiet=True)
    result = run_attack(attack, ctx)
    assert result.status == "skipped" and "no-such-adapter" in result.reason and not result.prompts
    assert not (tmp_path / attack).exists()


def test_identitynet_reads_face_tokens_instead_of_the_prompt(tiny_sd):
    from diffusers import ControlNetModel

    from dladiff.diffusion.loading import load_sd
    from dladiff.evaluate.instantid import IdentityNet

    unet = load_sd(str(tiny_sd)).unet
    plain = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8))
    net = IdentityNet.from_config(plain.config)
    net.load_state_dict(plain.state_dict())
    sample, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 64, 64)
    tokens = torch.randn(2, 3, unet.config.cross_attention_dim)
    net.face_tokens = tokens
    ours = net(sample, 10, encoder_hidden_states=torch.randn(2, 77, 32), controlnet_cond=cond, return_dict=False)
    reference = plain(sample, 10, encoder_hidden_states=tokens, controlnet_cond=cond, return_dict=False)
    assert torch.allclose(ours[1], reference[1])
    net.face_tokens = tokens[:1]
    doubled = net(sample[:1].repeat(2, 1, 1, 1), 10, encoder_hidden_states=None, controlnet_cond=cond, return_dict=False)
    assert torch.allclose(doubled[1][0], doubled[1][1])


def test_instantid_resampler_checkpoint_loads_through_diffusers(tiny_sd):
    """InstantID's ip-adapter.bin uses IP-Adapter-Plus keys; diffusers turns them into the face tokens."""
    from dladiff.diffusion.loading import load_sd
    from dladiff.evaluate.faceid import id_embeds
    from dladiff.evaluate.instantid import face_tokens

    unet = load_sd(str(tiny_sd)).unet
    cross, dim, embed_dim, queries = unet.config.cross_attention_dim, 64, 128, 4
    g = torch.Generator().manual_seed(0)
    image_proj = {"latents": torch.randn(1, queries, dim, generator=g), "proj_in.weight": torch.randn(dim, embed_dim, generator=g) * 0.02,
                  "proj_in.bias": torch.zeros(dim), "proj_out.weight": torch.randn(cross, dim, generator=g) * 0.02,
                  "proj_out.bias": torch.zeros(cross), "norm_out.weight": torch.ones(cross), "norm_out.bias": torch.zeros(cross)}
    for i in range(4):  # InstantID's Resampler has depth 4, diffusers' default
        image_proj.update({f"layers.{i}.0.norm1.weight": torch.ones(dim), f"layers.{i}.0.norm1.bias": torch.zeros(dim),
                           f"layers.{i}.0.norm2.weight": torch.ones(dim), f"layers.{i}.0.norm2.bias": torch.zeros(dim),
                           f"layers.{i}.0.to_q.weight": torch.randn(64, dim, generator=g) * 0.02,
                           f"layers.{i}.0.to_kv.weight": torch.randn(128, dim, generator=g) * 0.02,
                           f"layers.{i}.0.to_out.weight": torch.randn(dim, 64, generator=g) * 0.02,
                           f"layers.{i}.1.0.weight": torch.ones(dim), f"layers.{i}.1.0.bias": torch.zeros(dim),
                           f"layers.{i}.1.1.weight": torch.randn(4 * dim, dim, generator=g) * 0.02,
                           f"layers.{i}.1.3.weight": torch.randn(dim, 4 * dim, generator=g) * 0.02})
    ip_adapter, key = {}, 1
    for name in unet.attn_processors:
        if not name.endswith("attn1.processor"):
            hidden = unet.get_submodule(name[: -len(".processor")]).to_k.out_features
            ip_adapter[f"{key}.to_k_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.02
            ip_adapter[f"{key}.to_v_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.02
            key += 2
    unet._load_ip_adapter_weights([{"image_proj": image_proj, "ip_adapter": ip_adapter}], low_cpu_mem_usage=False)
    tokens = face_tokens(unet, id_embeds(np.ones(embed_dim), torch.float32, "cpu"))
    assert tokens.shape == (2, queries, cross) and not torch.allclose(tokens[0], tokens[1])


def test_draw_kps_marks_the_five_points():
    from dladiff.evaluate.instantid import KPS_COLORS, draw_kps, square_crop

    kps = np.array([[20.0, 30.0], [44.0, 30.0], [32.0, 42.0], [24.0, 52.0], [40.0, 52.0]])
    image = draw_kps(64, 64, kps)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert tuple(image[30, 20]) == KPS_COLORS[0] and tuple(image[52, 40]) == KPS_COLORS[4]
    crop, moved = square_crop(np.zeros((100, 200, 3), np.uint8), np.array([[100.0, 50.0]] * 5), 50)
    assert crop.shape == (50, 50, 3) and np.allclose(moved[0], [25.0, 25.0])


# Layouts, sharding, dataset protection, config ----------------------------------------------


def test_layout_detection(tmp_path, identity_photos):
    single = write_identity(tmp_path / "single", identity_photos, protect=False)
    assert layout.detect_layout(single) == "identity"
    for name in ("x", "y"):
        write_identity(tmp_path / "plain" / name, identity_photos, protect=False)
    (tmp_path / "plain" / "empty").mkdir()
    assert layout.detect_layout(tmp_path / "plain") == "plain"
    assert layout.identity_names(tmp_path / "plain") == ["x", "y"]
    anti = tmp_path / "anti" / "person1"
    for sub in ("set_A", "set_B", "set_C"):
        write_identity(anti / sub, identity_photos, protect=False)
    assert layout.detect_layout(tmp_path / "anti") == "anti-dreambooth"
    assert layout.photos_folder(anti).name == "set_B" and layout.reference_folder(anti).name == "set_C"
    assert layout.surrogate_folder(anti).name == "set_A" and layout.surrogate_folder(single) is None
    (single / "report.json").write_text("{}")
    assert [p.name for p in layout.image_files(single)] == ["astronaut.png", "mirrored.png"]
    identities = layout.dataset_identities(tmp_path / "anti", tmp_path / "anti")
    assert [(i.name, i.photos.name, i.references.name) for i in identities] == [("person1", "set_B", "set_C")]
    with pytest.raises(InputError):
        layout.detect_layout(tmp_path / "plain" / "empty")
    with pytest.raises(InputError):
        layout.dataset_identities(tmp_path / "plain", tmp_path / "anti")


def test_shard_assigns_identity_i_to_process_i_mod_n():
    items = [f"id{i}" for i in range(7)]
    shares = [layout.shard(items, k, 3) for k in range(3)]
    assert shares == [["id0", "id3", "id6"], ["id1", "id4"], ["id2", "id5"]]
    assert sorted(sum(shares, [])) == sorted(items)
    assert layout.shard(items, 0, 1) == items
    with pytest.raises(ValueError):
        layout.shard(items, 3, 3)


def test_protect_dataset_skips_done_identities_and_uses_set_a(tmp_path, identity_photos, monkeypatch):
    import dladiff.dataset as dataset
    import dladiff.protect
    from dladiff.config import load_config

    for name in ("ann", "bob", "cid", "dan"):
        for sub in ("set_A", "set_B", "set_C"):
            write_identity(tmp_path / "data" / name / sub, identity_photos, protect=False)
    out = tmp_path / "out"
    (out / "bob").mkdir(parents=True)
    (out / "bob" / "report.json").write_text("{}")
    calls = []

    def fake_protect(photos, out_dir, cfg, layers, surrogate, resume, quiet, stop, overwrite, components):
        calls.append((photos.parent.name, photos.name, surrogate, resume))
        (out_dir / "report.json").parent.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.json").write_text("{}")
        return SimpleNamespace(report={"no_face": None})

    monkeypatch.setattr(dladiff.protect, "protect_folder", fake_protect)
    monkeypatch.setattr(dataset, "train_set_a_surrogate", lambda identity_dir, out_dir, cfg, components, quiet: Path(f"/s/{identity_dir.name}"))
    monkeypatch.setattr("dladiff.diffusion.loading.load_sd", lambda *args: "SD")
    cfg = load_config("smoke")
    first = dataset.protect_dataset(tmp_path / "data", out, cfg, quiet=True, share=ProcessShare(0, 2, "cpu"))
    assert first.protected == ["ann", "cid"] and first.already_done == []
    second = dataset.protect_dataset(tmp_path / "data", out, cfg, quiet=True, share=ProcessShare(1, 2, "cpu"))
    assert second.protected == ["dan"] and second.already_done == ["bob"]
    assert calls[0] == ("ann", "set_B", Path("/s/ann"), True)
    again = dataset.protect_dataset(tmp_path / "data", out, cfg, quiet=True, share=ProcessShare(0, 1, "cpu"))
    assert again.protected == [] and again.already_done == ["ann", "bob", "cid", "dan"]


def test_evaluate_configs_load_and_validate(tmp_path):
    assert {"default", "smoke", "transfer_sd15"} <= set(builtin_evaluate_names())
    default = load_evaluate_config()
    assert default.attacks == ATTACKS
    assert (default.dreambooth.steps, default.dreambooth.batch_size) == (400, 4)
    assert default.generation.prompts == ("a photo of sks person", "a dslr portrait of sks person")
    assert default.generation.images_per_prompt == 20 and default.dreambooth.instance_prompt == "a photo of sks person"
    assert load_evaluate_config("transfer_sd15").model.id != default.model.id
    bad = tmp_path / "bad.yaml"
    bad.write_text("inherit: smoke.yaml\ndreambooth:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*dreambooth.*stepz"):
        load_evaluate_config(bad)
    bad.write_text("attacks: [dreambooth, textual-inversion]\n")
    with pytest.raises(ConfigError, match="textual-inversion"):
        load_evaluate_config(bad)
    bad.write_text("generation:\n  images_per_prompt: many\n")
    with pytest.raises(ConfigError, match="images_per_prompt"):
        load_evaluate_config(bad)


def test_fiqa_scores_with_a_checkpoint_of_the_released_layout(tmp_path):
    timm = pytest.importorskip("timm", reason="FIQA's EdgeNeXt backbone comes from timm, which is not installed")
    from dladiff.evaluate.fiqa import FiqaNet, FiqaScorer

    backbone = timm.create_model("edgenext_xx_small", pretrained=False)
    backbone.head = torch.nn.Identity()
    path = tmp_path / "EdgeNeXt_XXS_checkpoint.pt"
    torch.save(FiqaNet(backbone).state_dict(), path)
    scores = FiqaScorer(path)([np.zeros((64, 80, 3), np.uint8), np.full((400, 300, 3), 200, np.uint8)])
    assert len(scores) == 2 and all(np.isfinite(scores))


def test_fiqa_without_checkpoint_is_unavailable(tmp_path):
    from dladiff.errors import ModelUnavailableError
    from dladiff.evaluate.fiqa import FiqaScorer

    with pytest.raises(ModelUnavailableError, match="EdgeNeXt_XXS_checkpoint.pt"):
        FiqaScorer(tmp_path / "EdgeNeXt_XXS_checkpoint.pt")


def test_cli_overrides_of_the_evaluation_config():
    from dladiff.evaluate.config import evaluate_config_for_cli

    cfg = evaluate_config_for_cli("smoke", attacks="lora, dreambooth", model="some/model", device="cpu", seed=3)
    assert cfg.attacks == ("lora", "dreambooth") and cfg.model.id == "some/model"
    assert (cfg.runtime.device, cfg.runtime.seed) == ("cpu", 3)
    with pytest.raises(ConfigError, match="--attacks"):
        evaluate_config_for_cli("smoke", attacks="dreambooth,photomaker")


def test_purify_evaluates_each_transform_and_compares(tmp_path, clean_and_protected, smoke_cfg, scorers):
    from dladiff.evaluate.purified import evaluate_purified, photo_files

    clean, protected = clean_and_protected
    (protected / "surrogate").mkdir()
    save_png(np.zeros((8, 8, 3), np.uint8), protected / "surrogate" / "not_a_photo.png")
    cfg = with_evaluate_overrides(smoke_cfg, attacks=("lora",))
    out = tmp_path / "eval"
    outcomes = evaluate_purified(protected, clean, out, cfg, method="noisy", quiet=True,
                                 purify="jpeg:75,resize:0.5+jpeg:75", scorers=scorers)
    assert [o.out_dir.name for o in outcomes] == ["none", "jpeg-75", "resize-0.5+jpeg-75"]
    purified = photo_files(out / "purified" / "jpeg-75")
    assert [p.name for p in purified] == ["astronaut.png", "mirrored.png"]  # surrogate folder left out
    table = (out / "results_purify.md").read_text()
    assert "noisy | jpeg:75" in table and "noisy | resize:0.5+jpeg:75" in table
    psnr = {o.out_dir.name: next(r for r in read_csv(o.out_dir / "results.csv") if r["attack"] == "photos")["psnr"]
            for o in outcomes}
    assert float(psnr["jpeg-75"]) < float(psnr["none"])  # the re-encode moves the photos further from the clean ones
