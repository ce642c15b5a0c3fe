"""``dladiff protect``: both layers on a folder of portraits, outputs checked and reported.

Data flow: photos → (layer 1: static surrogate, DSUR + ADFT at the model resolution, δ1 resized
back to each photo) → (layer 2: identity PGD on every detected face) → lossless PNGs whose
L∞ distance to the input is measured on the saved file, and ``report.json``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dladiff import __version__
from dladiff.config import Config, config_to_dict
from dladiff.data import (Portrait, SkippedFile, atomic_write, apply_perturbation, check_output_folder, encode_png,
                          grey_of, is_greyscale, linf_255, load_folder, model_batch, psnr, save_json, save_png)
from dladiff.errors import BoundViolationError, DladiffError
from dladiff.outdir import LOCK, Manifest, output_lock, refuse_foreign_files
from dladiff.runtime import StopRequest, select_device

log = logging.getLogger("dladiff")

RUN_DIR = ".dladiff-run"
REPORT_HTML = "report.html"
PREVIEW_DIR = "preview"
LAYER1_RESULT = "layer1_result.safetensors"
LAYER1_RESULT_KIND = "layer-1 result"
REPORT = "report.json"


@dataclass
class ProtectOutcome:
    """What a protect run produced: the report written to ``out_dir/report.json`` and skipped files."""

    out_dir: Path
    report: dict
    skipped: list[SkippedFile] = field(default_factory=list)
    failed: list[SkippedFile] = field(default_factory=list)


def bound_255(epsilon: float) -> float:
    """An L∞ bound in [-1, 1] units expressed in 0-255 units."""
    return epsilon * 127.5


def allowed_linf_255(cfg: Config, layers: tuple[int, ...]) -> float:
    """The largest L∞ distance (0-255 units) a saved output may have from its input."""
    total = 0.0
    if 1 in layers:
        total += np.floor(bound_255(cfg.layer1.epsilon) + 1e-6)
    if 2 in layers:
        total += np.floor(bound_255(cfg.layer2.epsilon) + 1e-6)
    return float(total)


def save_checked_png(pixels: np.ndarray, reference: np.ndarray, limit_255: float, path: Path) -> float:
    """Write ``pixels`` as PNG atomically after re-reading it and checking ‖saved − reference‖∞.

    A greyscale ``reference`` (R = G = B) is saved greyscale: the rounded mean of the channels,
    which keeps the bound (:func:`~dladiff.data.grey_of`). The check runs on the decoded file,
    without other full-size copies. Raises :class:`BoundViolationError` (and writes nothing) if the
    saved file exceeds the bound; returns the measured L∞ distance in 0-255 units.
    """
    grey = is_greyscale(reference)
    data = grey_of(pixels) if grey else pixels
    measured = {}

    def write(tmp: Path) -> None:
        encode_png(data, tmp)
        with Image.open(tmp) as img:
            img.load()
            if img.mode != ("L" if grey else "RGB") or img.size != (reference.shape[1], reference.shape[0]):
                raise BoundViolationError(f"{path}: the re-read file is {img.mode} {img.size}, not the photo written; not written")
            saved = np.asarray(img)
        measured["linf"] = linf_255(saved, reference[..., 0] if grey else reference)
        if measured["linf"] > limit_255:
            raise BoundViolationError(f"{path}: L∞ {measured['linf']} > bound {limit_255} (0-255 units); not written")

    atomic_write(Path(path), write)
    return measured["linf"]


def _prepare_run_dir(out_dir: Path, resume: bool) -> Path:
    run_dir = out_dir / RUN_DIR
    if run_dir.exists() and any(p.name != LOCK for p in run_dir.iterdir()) and not resume:
        raise DladiffError(f"{out_dir} holds an earlier run ({run_dir}); add --resume to continue it, or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def planned_outputs(out_dir: Path, portraits: list[Portrait], layers: tuple[int, ...], surrogate_dir: Path | None) -> list[str]:
    """Names in ``out_dir`` the run will write: the PNGs, their previews, the reports and the static surrogate's files."""
    names = [p.output_name for p in portraits] + [f"{PREVIEW_DIR}/{p.output_name}" for p in portraits] + [REPORT, REPORT_HTML]
    trained = Path(out_dir) / "surrogate"
    if 1 in layers and surrogate_dir is None and not (trained / "surrogate.json").is_file():
        names.append("surrogate/unet")  # replaced when the surrogate is trained; dladiff's has a surrogate.json beside it
    return names


def _static_surrogate_folder(portraits, components, cfg: Config, surrogate_dir: Path | None, out_dir: Path, device, quiet: bool) -> Path:
    from dladiff.surrogate import finetune_surrogate, is_complete_surrogate

    if surrogate_dir is not None:
        if not is_complete_surrogate(surrogate_dir):
            raise DladiffError(f"{surrogate_dir}: not a finished static surrogate (no surrogate.json / unet/); run `dladiff finetune-surrogate` first")
        return Path(surrogate_dir)
    return finetune_surrogate(portraits, components, cfg, out_dir / "surrogate", device, quiet)


def _saved_layer1_result(path: Path, fingerprint: str) -> dict | None:
    """The layer-1 result saved in ``path`` by an earlier run with this fingerprint, else None.

    A damaged or foreign file is not used (never unpickled): a warning, and layer 1 runs again.
    """
    from dladiff.state_io import StateFileError, read_state

    if not path.is_file():
        return None
    try:
        saved = read_state(path, LAYER1_RESULT_KIND)
    except StateFileError as exc:
        log.warning("%s; layer 1 runs again", exc)
        return None
    return saved if saved.get("fingerprint") == fingerprint else None


def run_layer1_on(portraits: list[Portrait], cfg: Config, device: torch.device, out_dir: Path, run_dir: Path,
                  surrogate_dir: Path | None, resume: bool, quiet: bool, stop: StopRequest,
                  components=None) -> tuple[list[np.ndarray], dict]:
    """Layer 1 on all photos; returns the perturbed photos (uint8, original sizes) and report info.

    ``components``: SD already loaded on ``device`` (its UNet becomes θd), else it is loaded here.
    """
    from dataclasses import replace

    from dladiff.diffusion.loading import load_sd
    from dladiff.layer1 import remove_checkpoints, run_fingerprint
    from dladiff.methods import method_fingerprint, needs_static_surrogate, run_method, uses_pretrained_unet
    from dladiff.state_io import save_state
    from dladiff.surrogate import load_static_surrogate

    method = cfg.method.name
    hashes = [p.sha256 for p in portraits]
    components = components or load_sd(cfg.model.id, cfg.model.revision, device)
    needs_static = needs_static_surrogate(method, cfg)
    static_folder = _static_surrogate_folder(portraits, components, cfg, surrogate_dir, out_dir, device, quiet) if needs_static else None
    surrogate_id = json.loads((static_folder / "surrogate.json").read_text()) if static_folder else None
    fingerprint = method_fingerprint(run_fingerprint(cfg, hashes, json.dumps(surrogate_id, sort_keys=True) if surrogate_id else None),
                                     method, cfg)
    result_path = run_dir / LAYER1_RESULT
    saved = _saved_layer1_result(result_path, fingerprint) if resume else None
    if saved is not None:
        delta, history = saved["delta"], saved["history"]
    else:
        if not uses_pretrained_unet(method, cfg):
            components = replace(components, unet=None)  # e.g. FSMG attacks θs only: free the base UNet
        static_unet = load_static_surrogate(static_folder, device, cfg.runtime.precision) if static_folder else None
        x = model_batch(portraits, cfg.model.resolution)
        result = run_method(method, x, components, static_unet, cfg, device, run_dir, fingerprint, resume, quiet, stop)
        delta, history = result.delta, result.history
        save_state({"fingerprint": fingerprint, "delta": delta, "history": history}, result_path, LAYER1_RESULT_KIND)
        remove_checkpoints(run_dir)
    eps255 = bound_255(cfg.layer1.epsilon)
    outputs = [apply_perturbation(p.pixels, delta[i], eps255, cfg.budget) for i, p in enumerate(portraits)]
    info = {"method": method, "surrogate": str(static_folder) if static_folder else None, "history": history}
    return outputs, info


def protect_folder(photos_dir: Path, out_dir: Path, cfg: Config, layers: tuple[int, ...] = (1, 2),
                   surrogate_dir: Path | None = None, resume: bool = False, quiet: bool = False,
                   stop: StopRequest | None = None, overwrite: bool = False, components=None) -> ProtectOutcome:
    """Protect every photo of ``photos_dir`` into ``out_dir`` (PNG + ``report.json``).

    One run at a time per ``out_dir`` (a lock); files there that dladiff did not write are not
    replaced unless ``overwrite``. Layer 2 keeps each finished photo in the run folder, so a
    stopped run (``stop``, Ctrl-C) resumed with ``resume`` redoes none of them. ``components``: SD
    already loaded for layer 1 (dataset mode shares it with the surrogate), else loaded here.
    """
    photos_dir, out_dir = Path(photos_dir), Path(out_dir)
    layers = tuple(sorted(set(layers)))
    if not layers or any(layer not in (1, 2) for layer in layers):
        raise DladiffError(f"--layers must name layers 1 and/or 2, got {layers}")
    check_output_folder(photos_dir, out_dir)
    portraits, skipped = load_folder(photos_dir, cfg.input.max_megapixels)
    for s in skipped:
        log.warning("skipping %s", s.reason)
    device = select_device(cfg.runtime.device) if 1 in layers else torch.device("cpu")
    if 1 not in layers and cfg.runtime.device not in ("auto", "cpu"):
        log.warning("device %s: layer 2 runs on the CPU (its face models are small); the device setting is used by layer 1 only",
                    cfg.runtime.device)
    layer2_models = None
    if 2 in layers:
        from dladiff.layer2 import prepare_layer2

        layer2_models = prepare_layer2(cfg.layer2)  # missing encoders fail here, before any long work
    out_dir.mkdir(parents=True, exist_ok=True)
    with output_lock(out_dir / RUN_DIR):
        run_dir = _prepare_run_dir(out_dir, resume)
        manifest = Manifest(out_dir)
        refuse_foreign_files(out_dir, planned_outputs(out_dir, portraits, layers, surrogate_dir), manifest, overwrite)
        stop = stop or StopRequest()
        current = [p.pixels for p in portraits]
        layer1_info, face_reports = None, [None] * len(portraits)
        if 1 in layers:
            current, layer1_info = run_layer1_on(portraits, cfg, device, out_dir, run_dir, surrogate_dir, resume, quiet, stop,
                                                   components)
        if 2 in layers:
            from dladiff.layer2 import protect_photos
            from dladiff.layer2_resume import Layer2Checkpoints

            current, face_reports = protect_photos(portraits, current, cfg, quiet, layer2_models, Layer2Checkpoints(run_dir), stop)
        limit = allowed_linf_255(cfg, layers)
        entries, failed = _save_outputs(portraits, current, face_reports, out_dir, limit, manifest)
        report = _report(photos_dir, out_dir, cfg, layers, device, entries, skipped + failed, layer1_info, limit)
        save_json(report, out_dir / REPORT)
        manifest.record(REPORT)
        write_presentation(report, portraits, current, out_dir, manifest)
        if not failed:
            shutil.rmtree(run_dir, ignore_errors=True)
    return ProtectOutcome(out_dir, report, skipped, failed)


def write_presentation(report: dict, portraits: list[Portrait], current: list[np.ndarray], out_dir: Path,
                       manifest: Manifest) -> None:
    """What a person looks at: ``preview/<photo>.png`` per saved photo and the self-contained ``report.html``.

    A preview that cannot be written is a warning: the protected photos and report.json are already saved.
    """
    from dladiff.preview import preview_image
    from dladiff.report_html import png_data_uri, render_report_html

    saved = {entry["input"]: entry for entry in report["images"]}
    previews = {}
    for portrait, pixels in zip(portraits, current):
        entry = saved.get(portrait.name)
        if entry is None:
            continue
        strip = preview_image(portrait.pixels, pixels, (entry.get("layer2") or {}).get("faces") if "layer2" in entry else None)
        name = f"{PREVIEW_DIR}/{portrait.output_name}"
        try:
            save_png(strip, out_dir / name)
            manifest.record(name)
        except DladiffError as exc:
            log.warning("%s", exc)
        previews[entry["output"]] = png_data_uri(strip)
    html_text = render_report_html(report, previews)
    atomic_write(out_dir / REPORT_HTML, lambda tmp: tmp.write_text(html_text, encoding="utf-8"))
    manifest.record(REPORT_HTML)


def face_protected(face: dict, view: str = "png") -> bool | None:
    """Whether every native judge that still finds ``face`` in ``view`` sees another person (None: none judged)."""
    verdicts = [per[view] for per in (face.get("native") or {}).values() if view in per and per[view].get("detected")]
    return None if not verdicts else all(v["same_person"] is False for v in verdicts)


def summary_line(report: dict, seconds: float) -> str:
    """One line for the end of ``protect``: photos done and skipped, faces protected, time, where the report is."""
    images = report["images"]
    faces = [face for e in images for face in (e.get("layer2") or {}).get("faces") or []]
    text = f"{len(images)} photo(s) protected, {len(report['skipped'])} skipped"
    if 2 in report["layers"]:
        judged = [face_protected(face) for face in faces]
        text += (f", {len(faces)} face(s): {sum(v is True for v in judged)} no longer recognized by any local "
                 f"recognizer as saved, {sum(v is False for v in judged)} still recognized by one")
    return f"{text}; {seconds:.1f} s; report: {Path(report['output_dir']) / REPORT_HTML}"


def _save_outputs(portraits, current, face_reports, out_dir: Path, limit: float, manifest: Manifest):
    """Save every photo (one failure does not stop the others); returns report entries and failures."""
    entries, failed = [], []
    for portrait, pixels, faces in zip(portraits, current, face_reports):
        try:
            entries.append(_save_output(portrait, pixels, faces, out_dir, limit))
            manifest.record(portrait.output_name)
        except (DladiffError, OSError) as exc:
            failed.append(SkippedFile(portrait.path, str(exc)))
            log.error("%s", exc)
    return entries, failed


def _save_output(portrait: Portrait, pixels: np.ndarray, faces, out_dir: Path, limit: float) -> dict:
    path = out_dir / portrait.output_name
    if path.resolve() == portrait.path.resolve():
        raise DladiffError(f"{path}: refusing to write over an input")
    measured = save_checked_png(pixels, portrait.pixels, limit, path)
    entry = {
        "input": portrait.name, "output": path.name, "input_sha256": portrait.sha256,
        "width": int(portrait.pixels.shape[1]), "height": int(portrait.pixels.shape[0]),
        "linf_255": measured, "psnr_db": _finite_or_none(round(psnr(pixels, portrait.pixels), 3)),
    }
    if faces is not None:
        entry["faces"] = len(faces["faces"])
        entry["layer2"] = faces
    return entry


def _finite_or_none(value: float) -> float | None:
    """JSON has no Infinity: ``None`` stands for a PSNR of identical images (infinite)."""
    return value if math.isfinite(value) else None


def _report(photos_dir, out_dir, cfg: Config, layers, device, entries, skipped, layer1_info, limit) -> dict:
    return {
        "dladiff_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "input_dir": str(photos_dir), "output_dir": str(out_dir), "layers": list(layers), "device": str(device),
        "bound_linf_255": {"layer1": bound_255(cfg.layer1.epsilon) if 1 in layers else None,
                           "layer2": bound_255(cfg.layer2.epsilon) if 2 in layers else None, "checked_limit": limit},
        "images": entries,
        "no_face": [e["input"] for e in entries if e.get("faces") == 0] if 2 in layers else None,
        "skipped": [{"file": str(s.path), "reason": s.reason} for s in skipped],
        "layer1": layer1_info,
        "settings": config_to_dict(cfg),
    }
