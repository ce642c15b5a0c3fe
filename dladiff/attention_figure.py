"""``dladiff attention-maps``: the cross-attention figure of the paper (Fig. 7, §7.4).

For each photo, clean and (when given) protected, and for two UNets — the pretrained one and the
static surrogate θs (DreamBooth-tuned on clean photos, paper Eq. 7) — one forward pass of the
denoising UNet records, with layer 1's capturing processors, the cross-attention map of the chosen
token ("sks") at every attention layer of the captured latent resolutions (``layer1.attention``).

The pass is fixed so that the rows differ only by photo and weights: the photo is resized to the
model resolution as for protection, encoded to the VAE posterior mean, noised at timestep ``t`` with
the noise of ``torch.Generator("cpu").manual_seed(seed)``, and denoised once with the instance prompt.
A map is the softmax attention of the token's text position(s) over the image positions, averaged
over heads (and over the token's sub-word pieces). Each layer's maps of one photo share one colour
scale (their minimum to their maximum over that photo's rows), so the rows can be compared.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from dladiff.config import Config
from dladiff.data import Portrait, load_folder, load_portrait, model_batch, save_png
from dladiff.diffusion.attention import AttentionStore, install_capture, layer_resolution
from dladiff.diffusion.loading import SDComponents, encode_prompt, load_unet, token_positions
from dladiff.diffusion.tiny import TINY_SD_ID
from dladiff.errors import DladiffError, InputError

log = logging.getLogger("dladiff")

TILE = 128
LABEL_WIDTH = 210
HEADER = 44
PAD = 4
JET = np.array([[0, 0, 0.5], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [0.5, 0, 0]])


@dataclass(frozen=True)
class FigureSettings:
    """The fixed forward pass: prompt, token, timestep and noise seed."""

    prompt: str
    token: str
    timestep: int
    seed: int


@dataclass
class FigureRow:
    """One row of the grid: which photo, which version, which UNet; the model-sized photo and its maps."""

    photo: str
    version: str
    unet: str
    pixels: np.ndarray
    maps: dict[str, np.ndarray]


def find_protected(portrait: Portrait, folder: Path) -> Path | None:
    """The protected copy of ``portrait`` in ``folder``: ``<stem>.png`` (what protect writes), else the same name."""
    for name in (portrait.output_name, portrait.name):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def photo_versions(photos: Path, protected: Path | None, max_photos: int) -> list[tuple[str, str, Portrait]]:
    """(photo name, "clean"/"protected", portrait) for the first ``max_photos`` photos of ``photos``."""
    portraits, skipped = load_folder(photos)
    for s in skipped:
        log.warning("skipping %s", s.reason)
    if protected is not None and not Path(protected).is_dir():
        raise InputError(f"--protected {protected}: no such folder")
    out = []
    for portrait in portraits[:max_photos]:
        out.append((portrait.name, "clean", portrait))
        if protected is None:
            continue
        match = find_protected(portrait, protected)
        if match is None:
            log.warning("%s: no protected copy in %s (looked for %s)", portrait.name, protected, portrait.output_name)
        else:
            out.append((portrait.name, "protected", load_portrait(match)))
    return out


def short_name(layer: str, side: int) -> str:
    """``up_blocks.1.attentions.2.transformer_blocks.0.attn2.processor`` → ``up1.2 (16x16)`` (ASCII: the default font has no ²)."""
    parts = layer.split(".")
    if parts[0] == "mid_block":
        return f"mid.{parts[2]} ({side}x{side})"
    return f"{parts[0].split('_')[0]}{parts[1]}.{parts[3]} ({side}x{side})"


def unet_order(layer: str) -> tuple[int, str]:
    """Sort key: down blocks, the mid block, then up blocks (the order of the forward pass)."""
    return {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}[layer.split(".")[0]], layer


def noisy_latents(components: SDComponents, x: torch.Tensor, settings: FigureSettings, device) -> torch.Tensor:
    """z_t of the VAE posterior mean of ``x`` at the fixed timestep and noise seed."""
    vae = components.vae
    with torch.no_grad():
        latents = vae.encode(x.to(device, vae.dtype)).latent_dist.mean.float() * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=torch.Generator("cpu").manual_seed(settings.seed)).to(device)
    t = torch.tensor([settings.timestep], device=device)
    return components.noise_scheduler.add_noise(latents, noise, t)


def token_maps(unet, store: AttentionStore, noisy: torch.Tensor, timestep: int, text: torch.Tensor) -> dict[str, np.ndarray]:
    """One UNet pass; per captured cross-attention layer the token's map ``(side, side)``, mean over heads and pieces."""
    store.clear()
    with torch.no_grad():
        unet(noisy.to(unet.dtype), torch.tensor([timestep], device=noisy.device), encoder_hidden_states=text.to(unet.dtype))
    maps = {}
    for name, probs in store.cross.items():
        flat = probs[0].float().mean(dim=(0, 2))  # (Q,): heads and token pieces averaged
        side = int(round(flat.numel() ** 0.5))
        maps[name] = flat.reshape(side, side).cpu().numpy()
    return maps


def compute_rows(components: SDComponents, unets: dict[str, torch.nn.Module], versions, cfg: Config,
                 settings: FigureSettings, device) -> tuple[list[FigureRow], list[str]]:
    """The rows of the figure and the names of the captured cross-attention layers (in UNet order)."""
    try:
        tokens = token_positions(components.tokenizer, settings.prompt, settings.token)
    except ValueError as exc:
        raise DladiffError(f"{exc}: choose --token from the prompt, or set prompt.instance in the config") from None
    text = encode_prompt(components, settings.prompt, device)
    latent_side = cfg.model.resolution // components.vae_scale_factor
    stores = {}
    for label, unet in unets.items():
        stores[label] = AttentionStore()
        try:
            captured = install_capture(unet, stores[label], tuple(cfg.layer1.attention.resolutions), latent_side, tokens)
        except ValueError as exc:
            raise DladiffError(f"layer1.attention.resolutions: {exc}") from None
    layers = sorted((name for name in captured if name.endswith("attn2.processor")), key=unet_order)
    rows = []
    for photo, version, portrait in versions:
        x = model_batch([portrait], cfg.model.resolution)
        pixels = ((x[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        noisy = noisy_latents(components, x, settings, device)
        for label, unet in unets.items():
            rows.append(FigureRow(photo, version, label, pixels, token_maps(unet, stores[label], noisy, settings.timestep, text)))
    return rows, layers


def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → RGB uint8 with a jet-like colour map."""
    position = np.clip(values, 0, 1) * (len(JET) - 1)
    low = np.floor(position).astype(int).clip(0, len(JET) - 2)
    frac = (position - low)[..., None]
    return ((JET[low] * (1 - frac) + JET[low + 1] * frac) * 255).round().astype(np.uint8)


def overlay(pixels: np.ndarray, attention: np.ndarray, scale: tuple[float, float]) -> Image.Image:
    """The map (``scale`` = (low, high) → dark blue, dark red) upsampled to a tile, in colour over the grey photo."""
    tile = Image.fromarray(pixels).resize((TILE, TILE), Image.BILINEAR).convert("L").convert("RGB")
    grown = np.asarray(Image.fromarray(attention.astype(np.float32), "F").resize((TILE, TILE), Image.BILINEAR))
    low, high = scale
    heat = colorize((grown - low) / (high - low) if high > low else np.zeros_like(grown))
    return Image.fromarray((0.35 * np.asarray(tile) + 0.65 * heat).round().astype(np.uint8))


def layer_scales(rows: list[FigureRow], columns: list[str]) -> dict[tuple[str, str], tuple[float, float]]:
    """(photo, column) → (min, max) of that column's maps over the photo's rows: one colour scale per column and photo."""
    scales: dict[tuple[str, str], tuple[float, float]] = {}
    for row in rows:
        for column in columns:
            key, values = (row.photo, column), row.maps[column]
            low, high = scales.get(key, (np.inf, -np.inf))
            scales[key] = (min(low, float(values.min())), max(high, float(values.max())))
    return scales


def with_mean(rows: list[FigureRow], layers: list[str]) -> None:
    """Add each row's mean over layers (maps brought to the largest captured side first)."""
    for row in rows:
        side = max(row.maps[name].shape[0] for name in layers)
        grown = [np.asarray(Image.fromarray(row.maps[n].astype(np.float32), "F").resize((side, side), Image.BILINEAR)) for n in layers]
        row.maps["mean"] = np.mean(grown, axis=0)


def draw_figure(rows: list[FigureRow], layers: list[str], titles: list[str], settings: FigureSettings, footer: str) -> Image.Image:
    """The labelled grid: a row per (photo, version, UNet); columns: the photo, each layer's map, their mean."""
    columns = layers + ["mean"]
    with_mean(rows, layers)
    scales = layer_scales(rows, columns)
    font, small = ImageFont.load_default(size=13), ImageFont.load_default(size=11)
    width = LABEL_WIDTH + (len(columns) + 1) * (TILE + PAD)
    height = 2 * HEADER + len(rows) * (TILE + PAD) + 2 * HEADER
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((PAD, PAD), f"Cross-attention of “{settings.token}”, prompt “{settings.prompt}”, "
                          f"timestep {settings.timestep}, noise seed {settings.seed}", fill=(0, 0, 0), font=font)
    for index, title in enumerate(["photo (model input)"] + titles + ["mean of layers"]):
        draw.text((LABEL_WIDTH + index * (TILE + PAD), HEADER + PAD), title, fill=(0, 0, 0), font=small)
    top = 2 * HEADER
    for number, row in enumerate(rows):
        y = top + number * (TILE + PAD)
        if number and row.photo != rows[number - 1].photo:
            draw.line((PAD, y - PAD // 2, width - PAD, y - PAD // 2), fill=(120, 120, 120), width=1)
        draw.text((PAD, y + PAD), f"{row.photo}\n{row.version} photo\n{row.unet} UNet", fill=(0, 0, 0), font=font, spacing=4)
        sheet.paste(Image.fromarray(row.pixels).resize((TILE, TILE), Image.BILINEAR), (LABEL_WIDTH, y))
        for index, column in enumerate(columns, start=1):
            tile = overlay(row.pixels, row.maps[column], scales[(row.photo, column)])
            sheet.paste(tile, (LABEL_WIDTH + index * (TILE + PAD), y))
    for line, text in enumerate(footer.splitlines()):
        draw.text((PAD, top + len(rows) * (TILE + PAD) + PAD + line * 16), text, fill=(60, 60, 60), font=small)
    return sheet


FOOTER = ("Map: softmax attention of the token over image positions, mean over heads; colour: dark blue = the minimum, dark red = "
          "the maximum of that column over the photo's rows.\nLatent: VAE posterior mean of the photo resized to {resolution}x{resolution}, "
          "noised once; same noise for every row. {warning}")


def attention_figure(photos: Path, surrogate: Path, out: Path, components: SDComponents, cfg: Config,
                     settings: FigureSettings, protected: Path | None = None, max_photos: int = 2,
                     device: torch.device | str = "cpu") -> dict:
    """Draw the figure into ``out`` (PNG) and return what it shows (rows, layers, settings)."""
    versions = photo_versions(photos, protected, max_photos)
    static = load_unet(surrogate, device)
    rows, layers = compute_rows(components, {"pretrained": components.unet, "surrogate": static}, versions, cfg, settings, device)
    if not layers:
        raise DladiffError("no cross-attention layer at layer1.attention.resolutions")
    num_blocks = len(components.unet.config.block_out_channels)
    latent_side = cfg.model.resolution // components.vae_scale_factor
    titles = [short_name(n, layer_resolution(n, latent_side, num_blocks)) for n in layers]
    warning = "Tiny random model: this figure only shows that the drawing works." if cfg.model.id == TINY_SD_ID else ""
    figure = draw_figure(rows, layers, titles, settings, FOOTER.format(resolution=cfg.model.resolution, warning=warning))
    save_png(np.asarray(figure), Path(out))
    return {"rows": [(r.photo, r.version, r.unet) for r in rows], "layers": layers, "size": figure.size}
