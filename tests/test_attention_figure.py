"""`dladiff attention-maps` (paper Fig. 7) on the tiny model and real faces: the figure is drawn, from real maps."""

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import perturbed_unet
from dladiff import attention_figure as af
from dladiff.cli import app

runner = CliRunner()


@pytest.fixture()
def inputs(tmp_path, tiny_sd, real_photos):
    """Clean faces, protected stand-ins (noise of ±8/255, named like protect's outputs) and a static surrogate."""
    photos, protected = tmp_path / "photos", tmp_path / "protected"
    photos.mkdir()
    protected.mkdir()
    rng = np.random.default_rng(0)
    for name in ("hanks", "astronaut"):
        pixels = real_photos[name]
        Image.fromarray(pixels).save(photos / f"{name}.jpg", quality=95)
        noisy = np.clip(pixels.astype(int) + rng.integers(-8, 9, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(protected / f"{name}.png")
    surrogate = tmp_path / "surrogate"
    perturbed_unet(tiny_sd, scale=0.3).save_pretrained(surrogate / "unet")
    return photos, protected, surrogate


def test_attention_maps_cli_draws_the_labelled_grid(inputs, tmp_path):
    photos, protected, surrogate = inputs
    out = tmp_path / "fig" / "attention.png"
    result = runner.invoke(app, ["attention-maps", str(photos), "--surrogate", str(surrogate), "--protected", str(protected),
                                 "--out", str(out), "--config", "smoke", "--device", "cpu", "--max-photos", "2"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "8 row(s) x 7 layer(s)" in result.output  # 2 photos x (clean, protected) x (pretrained, surrogate)
    figure = np.asarray(Image.open(out).convert("RGB"))
    columns = 7 + 2  # the photo, 7 cross-attention layers of the tiny UNet at latent sides 4 and 8, their mean
    assert figure.shape == (2 * af.HEADER + 8 * (af.TILE + af.PAD) + 2 * af.HEADER, af.LABEL_WIDTH + columns * (af.TILE + af.PAD), 3)

    def tile(row, column):
        y, x = 2 * af.HEADER + row * (af.TILE + af.PAD), af.LABEL_WIDTH + column * (af.TILE + af.PAD)
        return figure[y : y + af.TILE, x : x + af.TILE].astype(int)

    assert np.abs(tile(0, 1) - tile(1, 1)).mean() > 5  # pretrained vs surrogate UNet: different maps
    assert tile(0, 1).std() > 10 and tile(0, 0).std() > 10  # neither the map nor the photo is blank
    assert figure[: af.HEADER, : af.LABEL_WIDTH].min() < 100  # the title is written


def test_maps_are_token_attention_of_each_unet(inputs, tiny_sd):
    from dladiff.config import load_config
    from dladiff.diffusion.loading import load_sd, load_unet

    photos, protected, surrogate = inputs
    cfg = load_config("smoke")
    components = load_sd(str(tiny_sd))
    versions = af.photo_versions(photos, protected, 1)
    assert [(p, v) for p, v, _ in versions] == [("astronaut.jpg", "clean"), ("astronaut.jpg", "protected")]
    settings = af.FigureSettings("a photo of sks person", "sks", 200, 0)
    rows, layers = af.compute_rows(components, {"pretrained": components.unet, "surrogate": load_unet(surrogate)}, versions, cfg, settings, "cpu")
    assert [(r.version, r.unet) for r in rows] == [("clean", "pretrained"), ("clean", "surrogate"), ("protected", "pretrained"), ("protected", "surrogate")]
    assert layers[0].startswith("down_blocks") and layers[-1].startswith("up_blocks") and len(layers) == 7
    for row in rows:
        for name in layers:
            values = row.maps[name]
            assert values.shape[0] == values.shape[1] in (4, 8)
            assert 0 < values.min() and values.max() < 1  # one token's share of a softmax over the prompt's tokens
    assert not np.allclose(rows[0].maps[layers[0]], rows[1].maps[layers[0]])  # the weights matter
    assert not np.allclose(rows[0].maps[layers[0]], rows[2].maps[layers[0]])  # the photo matters
    with pytest.raises(af.DladiffError, match="does not occur"):
        af.compute_rows(components, {"pretrained": components.unet}, versions, cfg, af.FigureSettings("a photo of sks person", "zzq", 200, 0), "cpu")
