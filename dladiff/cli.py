"""The ``dladiff`` command line (Typer). Thin: every command calls one importable function.

Exit codes: 0 success; 2 an error (message on stderr, nothing half-written); 3 finished but some
input files were skipped or failed (named in the messages and in report.json); 4 finished, but
layer 2 found no face in some photos (named; they have no layer-2 protection); 130 stopped by
Ctrl-C after writing a resumable checkpoint.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Optional

import typer

from dladiff.errors import DladiffError

EXIT_ERROR, EXIT_SKIPPED, EXIT_NO_FACE, EXIT_INTERRUPTED = 2, 3, 4, 130

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=(
        "Protect portrait photos against identity theft by diffusion-model customization (DLADiff).\n\n"
        "Layer 1 (DSUR + ADFT) disrupts DreamBooth/LoRA fine-tuning; layer 2 disrupts zero-shot identity "
        "adapters (IP-Adapter FaceID, InstantID). Try it offline with the tiny random model: "
        "`dladiff protect PHOTOS --out OUT --config smoke` (proves the pipeline runs, not that it protects).\n\n"
        "Exit codes: 0 ok, 2 error, 3 some files skipped, 4 layer 2 found no face in some photos (they got no "
        "layer-2 protection), 130 interrupted (resume with --resume)."
    ),
)

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file, or a built-in name (default, smoke, ablation_no_dsur, ablation_no_adft, method_*, eot; `dladiff configs` lists them). Default: the paper's settings.")
ModelOpt = typer.Option(None, "--model", "-m", help="Stable Diffusion hub id or local diffusers folder (overrides model.id; default stabilityai/stable-diffusion-2-1-base).")
DeviceOpt = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N (overrides runtime.device).")
SeedOpt = typer.Option(None, "--seed", help="Random seed, 0 to 4294967295 (overrides runtime.seed); same seed, same result.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars or info messages (warnings and errors still shown).")


def _setup_logging(quiet: bool) -> None:
    """Our messages on stderr; the libraries' chatter off (their progress bars: :func:`dladiff.runtime.quiet_libraries`).

    Imports no heavy library: a command that never loads a diffusion model never pays for diffusers.
    """
    import warnings

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="dladiff: %(levelname)s: %(message)s", stream=sys.stderr, force=True)
    logging.captureWarnings(True)
    warnings.filterwarnings("ignore", module="dladiff")  # our warnings go through the logger already
    for noisy in ("diffusers", "transformers", "huggingface_hub", "httpx", "py.warnings"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _fail(exc: Exception) -> None:
    typer.echo(f"dladiff: error: {exc}", err=True)
    raise typer.Exit(EXIT_ERROR)


def _load(config: Optional[str], model: Optional[str], device: Optional[str], seed: Optional[int],
          method: Optional[str] = None, eot: Optional[bool] = None, **layer2):
    from dladiff.config import load_config, with_overrides

    cfg = load_config(config)
    runtime = {k: v for k, v in (("device", device), ("seed", seed)) if v is not None}
    overrides = {"runtime": runtime} if runtime else {}
    if model:
        overrides["model"] = {"id": model}
    if method:
        overrides["method"] = {"name": method}
    if eot is not None:
        overrides["eot"] = {"enabled": eot}
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
    """``dlib,arcface-r50`` (equal weights), ``dlib=0.5,arcface-r50=1`` or ``onnx:/path/model.json=0.5``.

    The weight is what follows the last ``=`` when it is a number; paths may contain ``=`` but not ``,``.
    """
    if not text:
        return None
    return dict(_split_weight(part.strip()) for part in text.split(",") if part.strip())


def _split_weight(part: str) -> tuple[str, float]:
    """``name=weight`` → (name, weight), the weight finite and > 0; ``name`` alone has weight 1."""
    name, sep, text = part.rpartition("=")
    if not sep:
        return part, 1.0
    try:
        weight = float(text)
    except ValueError:
        return part, 1.0
    if not (math.isfinite(weight) and weight > 0):
        raise DladiffError(f"--encoders {part!r}: the weight must be a finite number > 0 (leave the encoder out "
                           f"to not use it)")
    return name.strip(), weight


@app.command("protect")
def protect_cmd(
    photos: Path = typer.Argument(..., help="Folder of portraits of one person (JPEG, PNG, WebP, ...), or a dataset root with --dataset. Never modified."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: protected PNGs named after the inputs, report.json, the surrogate."),
    config: Optional[str] = ConfigOpt,
    model: Optional[str] = ModelOpt,
    surrogate: Optional[Path] = typer.Option(None, "--surrogate", "-s", help="Static surrogate from `dladiff finetune-surrogate`. Default: trained first on the same photos and kept in OUT/surrogate."),
    layers: str = typer.Option("1,2", "--layers", help="Which layers: 1 (anti fine-tuning), 2 (anti zero-shot, needs no diffusion model) or 1,2."),
    method: Optional[str] = typer.Option(None, "--method", help="Layer-1 method: dladiff (default), aspl, fsmg, mist, anti-diffusion, disdiff (same budget; see docs/methods.md)."),
    eot: Optional[bool] = typer.Option(None, "--eot/--no-eot", help="Expectation over transformations (random differentiable JPEG, resize, blur) during PGD in both layers (default: config, off)."),
    encoders: Optional[str] = typer.Option(None, "--encoders", help="Layer-2 identity encoders with optional weights: auto (default: every real recognizer present: insightface's arcface-r50/arcface-r100 packs, then sface and dlib), or a list of dlib, sface, arcface-r50, arcface-r100, onnx:PATH (an ONNX recognizer with its sidecar, see docs/transfer.md), e.g. dlib=0.5,sface=1. Weights must be finite and > 0. Paths must not contain commas."),
    detector: Optional[str] = typer.Option(None, "--detector", help="Layer-2 face detector: auto (insightface's SCRFD when a pack is present, else YuNet), yunet, dlib (HOG), insightface, retinaface."),
    dataset: bool = typer.Option(False, "--dataset", help="PHOTOS is a dataset root (one folder per identity, or the Anti-DreamBooth set_A/set_B/set_C layout): protect every identity into OUT/<identity>, skipping finished ones; shards identities across `accelerate launch` processes."),
    device: Optional[str] = DeviceOpt,
    seed: Optional[int] = SeedOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in OUT (same result as an uninterrupted run)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace files in OUT that have an output's name (e.g. report.json, photo.png) although dladiff did not write them. Without it such files stop the run; outputs of an earlier dladiff run (listed in OUT/.dladiff-manifest.json, unchanged) are replaced anyway."),
    quiet: bool = QuietOpt,
):
    """Add the protective perturbation to every photo of PHOTOS and write PNGs + report.json to OUT.

    The L∞ bound is checked on every saved file; report.json gives per image the measured L∞
    (0-255 units), the PSNR against the input and, for layer 2, per face and encoder the identity
    similarity between clean and protected face. Ctrl-C finishes the current layer-1 epoch,
    layer-2 photo or identity and leaves a checkpoint (exit 130); run the same command with
    --resume to continue. Exit 4: layer 2 found no face in some photos (named on stderr and in
    report.json's "no_face"); they got no layer-2 protection.
    """
    from dladiff.runtime import Interrupted, StopRequest

    _setup_logging(quiet)
    try:
        cfg = _load(config, model, device, seed, method, eot, encoders=_parse_encoders(encoders), detector=detector)
        chosen = _parse_layers(layers)
        stop = StopRequest()
        with stop.handle_sigint():
            if dataset:
                problems, no_face = _protect_dataset(photos, out, cfg, chosen, surrogate, quiet, stop, overwrite)
            else:
                problems, no_face = _protect_one(photos, out, cfg, chosen, surrogate, resume, quiet, stop, overwrite)
    except Interrupted as exc:
        typer.echo(f"dladiff: {exc}", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except KeyboardInterrupt:
        typer.echo("dladiff: aborted by a second Ctrl-C; the last checkpoint and the photos layer 2 finished are kept in "
                   f"{out}; rerun the same command with --resume to continue", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except DladiffError as exc:
        _fail(exc)
    if no_face:
        typer.echo(f"dladiff: warning: layer 2 found no face in {len(no_face)} photo(s), which got no layer-2 "
                   f"protection{' (saved unchanged)' if chosen == (2,) else ''}: " + ", ".join(no_face), err=True)
    if problems:
        typer.echo(f"dladiff: {len(problems)} item(s) skipped or failed: " + "; ".join(problems), err=True)
        raise typer.Exit(EXIT_SKIPPED)
    if no_face:
        raise typer.Exit(EXIT_NO_FACE)


def _protect_one(photos, out, cfg, layers, surrogate, resume, quiet, stop, overwrite) -> tuple[list[str], list[str]]:
    """Problems (skipped or failed files) and photos without a face of one folder."""
    import time

    from dladiff.protect import protect_folder, summary_line

    start = time.perf_counter()
    outcome = protect_folder(photos, out, cfg, layers, surrogate, resume, quiet, stop, overwrite)
    if not quiet:
        typer.echo(summary_line(outcome.report, time.perf_counter() - start))
    return [p.reason for p in outcome.skipped + outcome.failed], list(outcome.report.get("no_face") or [])


def _protect_dataset(root, out, cfg, layers, surrogate, quiet, stop, overwrite) -> tuple[list[str], list[str]]:
    """Problems (failed identities) and photos without a face (``identity/photo``) of a dataset."""
    from dladiff.dataset import protect_dataset

    if surrogate is not None:
        raise DladiffError("--surrogate cannot be used with --dataset: each identity gets its own surrogate")
    outcome = protect_dataset(root, out, cfg, layers, quiet, stop=stop, overwrite=overwrite)
    if not quiet:
        typer.echo(f"protected {len(outcome.protected)} identities into {out} ({len(outcome.already_done)} already done)")
    no_face = [f"{name}/{photo}" for name, photos in outcome.no_face.items() for photo in photos]
    return [f"{name}: {reason}" for name, reason in outcome.failed.items()], no_face


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
        portraits, skipped = load_folder(photos, cfg.input.max_megapixels)
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


@app.command("evaluate")
def evaluate_cmd(
    photos: Path = typer.Argument(..., help="Protected photos of one identity (or, with --dataset, the OUT root of `protect --dataset`)."),
    clean: Path = typer.Option(..., "--clean", help="The clean originals, same layout (an Anti-DreamBooth root is read as is: set_B originals, set_C references)."),
    out: Path = typer.Option(..., "--out", "-o", help="Evaluation folder: results.json/.csv/.md, contact sheets, cached attack outputs."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="Evaluation config: a YAML file or a built-in name from configs/evaluate (default, smoke, transfer_sd15)."),
    attacks: Optional[str] = typer.Option(None, "--attacks", help="Comma list of dreambooth, lora, faceid, instantid (default: config)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="The model the attacker fine-tunes (DreamBooth/LoRA); another base model than the protection's tests model transfer."),
    dataset: bool = typer.Option(False, "--dataset", help="PHOTOS and --clean are dataset roots; identities are sharded across `accelerate launch` processes and merged."),
    method: Optional[str] = typer.Option(None, "--method", help="Label of the protection in the tables (default: the folder name of PHOTOS)."),
    dataset_label: Optional[str] = typer.Option(None, "--dataset-label", help="Label of the dataset in the tables (default: the folder name of --clean in dataset mode)."),
    merge_only: bool = typer.Option(False, "--merge-only", help="Only merge the per-identity results already in OUT into the tables."),
    purify: Optional[str] = typer.Option(None, "--purify", help="Transform the protected photos before the attack, e.g. jpeg:75,resize:0.5,blur:1.0 (each alone) or resize:0.5+jpeg:75 (in sequence); every metric is reported per transform."),
    device: Optional[str] = DeviceOpt,
    seed: Optional[int] = SeedOpt,
    quiet: bool = QuietOpt,
):
    """Play the attacker on protected photos and score the result as the paper does (Tables 1-4, 9, 10).

    Fine-tunes (DreamBooth, LoRA) or runs zero-shot adapters (IP-Adapter FaceID, InstantID) on the
    photos, generates with fixed seeds, and writes FDR, ISM, FID, BRISQUE/FIQA, PSNR/SSIM and NSFW
    rate. Finished attacks are cached: a rerun (or a killed run run again) skips them.
    """
    from dladiff.evaluate.config import evaluate_config_for_cli
    from dladiff.evaluate.purified import evaluate_purified
    from dladiff.runtime import quiet_libraries

    _setup_logging(quiet)
    quiet_libraries()
    try:
        cfg = evaluate_config_for_cli(config, attacks, model, device, seed)
        if out.exists() and not out.is_dir():
            raise DladiffError(f"--out {out} is a file, not a folder; give the name of a folder (it is created if missing)")
        outcomes = evaluate_purified(photos, clean, out, cfg, dataset, method, dataset_label, merge_only, quiet, purify)
    except DladiffError as exc:
        _fail(exc)
    problems = []
    for outcome in outcomes:
        problems += [f"{name}: {reason}" for name, reason in outcome.failed.items()]
        problems += [f"{name}/{attack}: {reason}" for name, skipped in outcome.skipped_attacks.items() for attack, reason in skipped.items()]
    if not quiet:
        typer.echo("results: " + ", ".join(str(o.out_dir / "results.md") for o in outcomes))
    if problems:
        typer.echo(f"dladiff: {len(problems)} identity/attack(s) skipped or failed: " + "; ".join(problems), err=True)
        raise typer.Exit(EXIT_SKIPPED)


@app.command("evaluate-tables")
def evaluate_tables_cmd(
    eval_dirs: list[Path] = typer.Argument(..., help="Evaluation folders (each with results.json) to put in one set of tables."),
    out: Path = typer.Option(..., "--out", "-o", help="Markdown file to write."),
    ratings: Optional[list[Path]] = typer.Option(None, "--ratings", help="A ratings.csv of `dladiff rate` (or its study folder), read with the rating_items.json beside it; repeat for several raters' files. Fills the MOS column of Tables 1 and 2."),
):
    """Merge several evaluations (e.g. "w/o Protect", "Ours", other methods) into the paper's table layout.

    MOS (with --ratings): mean and 95 % t-interval over all ratings, per dataset, method, attack and prompt.
    """
    from dladiff.evaluate.report import write_comparison

    try:
        write_comparison(eval_dirs, out, ratings or ())
    except DladiffError as exc:
        _fail(exc)
    typer.echo(f"tables written to {out}")


@app.command("configs")
def configs_cmd():
    """List the built-in configs (usable by name with --config)."""
    from dladiff.config import builtin_config_dir, builtin_config_names

    from dladiff.evaluate.config import builtin_evaluate_dir, builtin_evaluate_names

    for name in builtin_config_names():
        typer.echo(f"protect\t{name}\t{builtin_config_dir() / (name + '.yaml')}")
    for name in builtin_evaluate_names():
        typer.echo(f"evaluate\t{name}\t{builtin_evaluate_dir() / (name + '.yaml')}")


@app.command("rate")
def rate_cmd(
    eval_dir: Path = typer.Argument(..., help="Study folder: an output folder of `dladiff evaluate`, or a folder holding several (one per method). Gets rating_items.json and ratings.csv."),
    port: int = typer.Option(8765, "--port", help="Port on 127.0.0.1 (0: any free port)."),
    rater: str = typer.Option("rater1", "--rater", help="Rater id stored with each rating (letters, digits, _ . @ -); each rater gets an own shuffled order."),
    attacks: str = typer.Option("dreambooth,lora", "--attacks", help="Whose generated images to rate (comma list; the paper rates fine-tuning attacks)."),
    sample: Optional[int] = typer.Option(None, "--sample", min=1, help="Rate at most N images per dataset, method, attack and prompt, drawn at random (the paper: 50 per method). Default: all."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --sample draw and of the raters' shuffles."),
):
    """Serve the MOS rating page of the paper (§7.2, Fig. 5) on 127.0.0.1 until Ctrl-C.

    Images are shown one at a time, blinded (random ids) and shuffled across methods and identities;
    keys 1-5 or buttons rate them. Each rating is appended to EVAL_DIR/ratings.csv at once; run the
    same command again to continue where the rater stopped.
    """
    from dladiff.evaluate.mos import open_study
    from dladiff.rate_server import RatingSession, make_server, url_of

    logging.basicConfig(level=logging.INFO, format="dladiff: %(levelname)s: %(message)s", stream=sys.stderr, force=True)
    try:
        parts = [a.strip() for a in attacks.split(",") if a.strip()]
        session = RatingSession.start(open_study(eval_dir, parts, sample, seed), rater)
        server = make_server(session, port)
    except DladiffError as exc:
        _fail(exc)
    state = session.state()
    typer.echo(f"rating page for {rater}: {url_of(server)}  ({state['rated']} of {state['total']} rated; Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        typer.echo(f"stopped; ratings are in {eval_dir / 'ratings.csv'}")
    finally:
        server.server_close()


@app.command("attention-maps")
def attention_maps_cmd(
    photos: Path = typer.Argument(..., help="Folder of clean portraits (the first --max-photos are drawn)."),
    surrogate: Path = typer.Option(..., "--surrogate", "-s", help="Static surrogate (θs) folder from `dladiff finetune-surrogate` (or OUT/surrogate of protect)."),
    out: Path = typer.Option(..., "--out", "-o", help="PNG file to write."),
    protected: Optional[Path] = typer.Option(None, "--protected", help="Output folder of `dladiff protect` for these photos: adds rows for the protected copies (<stem>.png)."),
    token: Optional[str] = typer.Option(None, "--token", help="Word of the prompt whose maps are drawn (default: prompt.trigger of the config, sks)."),
    timestep: int = typer.Option(200, "--timestep", min=0, help="Diffusion timestep of the one denoising pass (0-999; our choice, the paper gives none)."),
    max_photos: int = typer.Option(2, "--max-photos", min=1, help="How many photos to draw."),
    config: Optional[str] = ConfigOpt,
    model: Optional[str] = ModelOpt,
    device: Optional[str] = DeviceOpt,
    seed: Optional[int] = SeedOpt,
    quiet: bool = QuietOpt,
):
    """Draw the cross-attention maps of the trigger token (paper Fig. 7) as a labelled grid PNG.

    Rows: each photo, clean and protected, under the pretrained and the static-surrogate UNet;
    columns: every cross-attention layer at layer1.attention.resolutions, and their mean. One
    fixed pass: VAE posterior mean, noised at --timestep with the noise of --seed.
    """
    from dladiff.attention_figure import FigureSettings, attention_figure
    from dladiff.diffusion.loading import load_sd
    from dladiff.runtime import select_device

    _setup_logging(quiet)
    try:
        cfg = _load(config, model, device, seed)
        dev = select_device(cfg.runtime.device)
        components = load_sd(cfg.model.id, cfg.model.revision, dev)
        steps = components.noise_scheduler.config.num_train_timesteps
        if timestep >= steps:
            raise DladiffError(f"--timestep {timestep}: the model has timesteps 0-{steps - 1}")
        settings = FigureSettings(cfg.prompt.instance, token or cfg.prompt.trigger, timestep, cfg.runtime.seed)
        info = attention_figure(photos, surrogate, out, components, cfg, settings, protected, max_photos, dev)
    except DladiffError as exc:
        _fail(exc)
    if not quiet:
        typer.echo(f"attention maps of {len(info['rows'])} row(s) x {len(info['layers'])} layer(s) written to {out}")


EXIT_NOT_PROTECTED = 1


@app.command("verify")
def verify_cmd(
    clean: Path = typer.Argument(..., help="The clean photo, or a folder of clean photos."),
    protected: Path = typer.Argument(..., help="The protected photo, or a folder of protected photos (paired with the clean ones by file name, any extension)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write every verdict as JSON to this file."),
    config: Optional[str] = ConfigOpt,
    quiet: bool = QuietOpt,
):
    """Re-judge protected photos with every face recognizer available here, each through its own pipeline.

    Independent of how the photos were protected (dladiff, Fawkes, Anti-DreamBooth, ...): dlib (HOG +
    68 landmarks + ResNet), OpenCV's YuNet + SFace and, when installed, insightface's buffalo_l /
    antelopev2 packs judge each face as saved, after JPEG quality 75 and after a 0.5x resize.
    Exit code 0 only if every face is still detected and past every recognizer's threshold in every
    view; 1 if some face is still recognized (or lost); 2 on an error.
    """
    from rich.console import Console

    from dladiff.data import save_json
    from dladiff.verify import available_judges, face_passed, photo_pairs, verdict_table, verdicts_json, verify_pair

    _setup_logging(quiet)
    try:
        cfg = _load(config, None, None, None)
        pairs, missing = photo_pairs(clean, protected)
        judges = available_judges(cfg.layer2.model_root, cfg.layer2.det_size)
        if not quiet:
            typer.echo(f"judging {len(pairs)} photo(s) with {', '.join(judges)}", err=True)
        results = [verify_pair(c, p, judges) for c, p in pairs]
        summary = verdicts_json(results, judges, missing)
        if json_out is not None:
            save_json(summary, json_out)
    except DladiffError as exc:
        _fail(exc)
    Console().print(verdict_table(results, judges))
    for path in missing:
        typer.echo(f"dladiff: warning: {path}: no protected photo of that name", err=True)
    faces = sum(len(r.faces) for r in results)
    passed = sum(face_passed(f) for r in results for f in r.faces)
    typer.echo(f"{passed} of {faces} face(s) protected against every recognizer in every view; "
               f"{sum(r.error is not None for r in results)} photo(s) could not be compared")
    if not summary["passed"]:
        raise typer.Exit(EXIT_NOT_PROTECTED)


def main() -> None:  # pragma: no cover - console entry point
    app()
