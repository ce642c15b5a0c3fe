"""The ``dladiff`` command line (Typer). Thin: every command calls one importable function.

Exit codes: 0 success; 2 an error (message on stderr, nothing half-written); 3 finished but some
input files were skipped or failed (named in the messages and in report.json); 130 stopped by
Ctrl-C after writing a resumable checkpoint.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from dladiff.errors import DladiffError

EXIT_ERROR, EXIT_SKIPPED, EXIT_INTERRUPTED = 2, 3, 130

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=(
        "Protect portrait photos against identity theft by diffusion-model customization (DLADiff).\n\n"
        "Layer 1 (DSUR + ADFT) disrupts DreamBooth/LoRA fine-tuning; layer 2 disrupts zero-shot identity "
        "adapters (IP-Adapter FaceID, InstantID). Try it offline with the tiny random model: "
        "`dladiff protect PHOTOS --out OUT --config smoke` (proves the pipeline runs, not that it protects).\n\n"
        "Exit codes: 0 ok, 2 error, 3 some files skipped, 130 interrupted (resume with --resume)."
    ),
)

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file, or a built-in name (default, smoke, ablation_no_dsur, ablation_no_adft). Default: the paper's settings.")
ModelOpt = typer.Option(None, "--model", "-m", help="Stable Diffusion hub id or local diffusers folder (overrides model.id; default stabilityai/stable-diffusion-2-1-base).")
DeviceOpt = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N (overrides runtime.device).")
SeedOpt = typer.Option(None, "--seed", help="Random seed (overrides runtime.seed); same seed, same result.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars or info messages (warnings and errors still shown).")


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="dladiff: %(levelname)s: %(message)s", stream=sys.stderr, force=True)
    for noisy in ("diffusers", "transformers", "huggingface_hub", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _fail(exc: Exception) -> None:
    typer.echo(f"dladiff: error: {exc}", err=True)
    raise typer.Exit(EXIT_ERROR)


def _load(config: Optional[str], model: Optional[str], device: Optional[str], seed: Optional[int], **layer2):
    from dladiff.config import load_config, with_overrides

    cfg = load_config(config)
    runtime = {k: v for k, v in (("device", device), ("seed", seed)) if v is not None}
    overrides = {"runtime": runtime} if runtime else {}
    if model:
        overrides["model"] = {"id": model}
    l2 = {k: v for k, v in layer2.items() if v is not None}
    if l2:
        overrides["layer2"] = l2
    return with_overrides(cfg, **overrides) if overrides else cfg


def _parse_layers(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise DladiffError(f"--layers {text!r}: give 1, 2 or 1,2") from None
    if not layers or any(layer not in (1, 2) for layer in layers):
        raise DladiffError(f"--layers {text!r}: give 1, 2 or 1,2")
    return layers


def _parse_encoders(text: Optional[str]) -> Optional[dict]:
    """``dlib,arcface-r50`` (equal weights) or ``dlib=0.5,arcface-r50=1``."""
    if not text:
        return None
    weights = {}
    for part in text.split(","):
        name, _, weight = part.strip().partition("=")
        try:
            weights[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise DladiffError(f"--encoders: weight of {name!r} is not a number: {weight!r}") from None
    return weights


@app.command("protect")
def protect_cmd(
    photos: Path = typer.Argument(..., help="Folder of portraits of one person (JPEG, PNG, WebP, ...). Never modified."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: protected PNGs named after the inputs, report.json, the surrogate."),
    config: Optional[str] = ConfigOpt,
    model: Optional[str] = ModelOpt,
    surrogate: Optional[Path] = typer.Option(None, "--surrogate", "-s", help="Static surrogate from `dladiff finetune-surrogate`. Default: trained first on the same photos and kept in OUT/surrogate."),
    layers: str = typer.Option("1,2", "--layers", help="Which layers: 1 (anti fine-tuning), 2 (anti zero-shot, needs no diffusion model) or 1,2."),
    encoders: Optional[str] = typer.Option(None, "--encoders", help="Layer-2 identity encoders, e.g. dlib,arcface-r50 or dlib=0.5,arcface-r100=1 (default: config; empty = ArcFace packs present, else dlib)."),
    detector: Optional[str] = typer.Option(None, "--detector", help="Layer-2 face detector: auto, dlib, insightface, retinaface."),
    device: Optional[str] = DeviceOpt,
    seed: Optional[int] = SeedOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in OUT (same result as an uninterrupted run)."),
    quiet: bool = QuietOpt,
):
    """Add the protective perturbation to every photo of PHOTOS and write PNGs + report.json to OUT.

    The L∞ bound is checked on every saved file; report.json gives per image the measured L∞
    (0-255 units), the PSNR against the input and, for layer 2, per face and encoder the identity
    similarity between clean and protected face. Ctrl-C finishes the current epoch and leaves a
    checkpoint; run the same command with --resume to continue.
    """
    from dladiff.protect import protect_folder
    from dladiff.runtime import Interrupted, StopRequest

    _setup_logging(quiet)
    try:
        cfg = _load(config, model, device, seed, encoders=_parse_encoders(encoders), detector=detector)
        stop = StopRequest()
        with stop.handle_sigint():
            outcome = protect_folder(photos, out, cfg, _parse_layers(layers), surrogate, resume, quiet, stop)
    except Interrupted as exc:
        typer.echo(f"dladiff: {exc}", err=True)
        raise typer.Exit(EXIT_INTERRUPTED)
    except DladiffError as exc:
        _fail(exc)
    n = len(outcome.report["images"])
    if not quiet:
        typer.echo(f"protected {n} photo(s) into {outcome.out_dir} (report: {outcome.out_dir / 'report.json'})")
    problems = outcome.skipped + outcome.failed
    if problems:
        typer.echo(f"dladiff: {len(problems)} file(s) skipped or failed: " + "; ".join(p.reason for p in problems), err=True)
        raise typer.Exit(EXIT_SKIPPED)


@app.command("finetune-surrogate")
def finetune_surrogate_cmd(
    photos: Path = typer.Argument(..., help="Folder of clean portraits of the identity (may include the photos to protect)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the static surrogate (diffusers layout: unet/ + surrogate.json)."),
    config: Optional[str] = ConfigOpt,
    model: Optional[str] = ModelOpt,
    device: Optional[str] = DeviceOpt,
    seed: Optional[int] = SeedOpt,
    quiet: bool = QuietOpt,
):
    """DreamBooth-tune the UNet on clean photos (paper Eq. 7): the static surrogate θs of layer 1.

    Prompt "a photo of sks person", text encoder frozen, prior preservation off unless the config
    turns it on. Writes OUT/unet (safetensors) and OUT/surrogate.json (base model, steps, lr,
    seed, image hashes). A finished surrogate with the same settings is reused, not retrained.
    """
    from dladiff.data import check_output_folder, load_folder
    from dladiff.diffusion.loading import load_sd
    from dladiff.runtime import select_device
    from dladiff.surrogate import finetune_surrogate

    _setup_logging(quiet)
    try:
        cfg = _load(config, model, device, seed)
        check_output_folder(photos, out)
        portraits, skipped = load_folder(photos)
        for s in skipped:
            logging.getLogger("dladiff").warning("skipping %s", s.reason)
        dev = select_device(cfg.runtime.device)
        components = load_sd(cfg.model.id, cfg.model.revision, dev)
        folder = finetune_surrogate(portraits, components, cfg, out, dev, quiet)
    except DladiffError as exc:
        _fail(exc)
    if not quiet:
        typer.echo(f"static surrogate written to {folder}")
    if skipped:
        raise typer.Exit(EXIT_SKIPPED)


@app.command("configs")
def configs_cmd():
    """List the built-in configs (usable by name with --config)."""
    from dladiff.config import builtin_config_dir, builtin_config_names

    for name in builtin_config_names():
        typer.echo(f"{name}\t{builtin_config_dir() / (name + '.yaml')}")


def main() -> None:  # pragma: no cover - console entry point
    app()
