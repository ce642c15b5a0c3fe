"""``dladiff evaluate``: play the attacker on protected photos and score the result (paper §5).

For each identity (one folder, or every identity of a dataset, sharded across ``accelerate``
processes): run each configured attack (cached), score its images (cached in
``EVAL_DIR/<identity>/metrics.json``), draw a contact sheet; then merge every identity into
``results.json``, ``results.csv`` and ``results.md``. The merge runs at the end of every process under
a file lock, so the last process to finish writes the complete tables (no collective barrier that a
long shard could time out); ``merge_only`` redoes just the merge.
"""

from __future__ import annotations

import importlib
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dladiff import __version__
from dladiff.config import config_to_dict
from dladiff.data import Portrait, save_json, save_png
from dladiff.errors import DladiffError, InputError, ModelUnavailableError
from dladiff.evaluate import metrics
from dladiff.evaluate.attack import AttackContext, AttackResult
from dladiff.evaluate.cache import file_lock, load_generated, prompt_slug, read_json
from dladiff.evaluate.config import ZERO_SHOT_ATTACKS, EvaluateConfig, fingerprint
from dladiff.dataset import ProcessShare, process_share
from dladiff.layout import IdentityFolders, dataset_identities, shard, single_identity
from dladiff.evaluate.report import contact_sheet, json_safe, pooled_rows, write_results
from dladiff.evaluate.scoring import (DISABLED, Scorers, clean_pairs, generated_row, load_images, load_scorers, photo_row,
                                      reference_matrix, zero_shot_scores)
from dladiff.runtime import Interrupted, progress, select_device

log = logging.getLogger("dladiff")

ATTACK_MODULES = {
    "dreambooth": "dladiff.evaluate.dreambooth",
    "lora": "dladiff.evaluate.lora",
    "faceid": "dladiff.evaluate.faceid",
    "instantid": "dladiff.evaluate.instantid",
}
METRICS_FILE = "metrics.json"
CONTACT_SHEET = "contact_sheet.png"
FEATURES_DIR = "features"
RESULTS_LOCK = ".results.lock"
RUN_RECORD = "evaluation.json"


@dataclass
class EvaluationOutcome:
    """What an evaluation wrote: the merged results, this process's identities, skipped attacks."""

    out_dir: Path
    results: dict
    evaluated: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped_attacks: dict[str, dict[str, str]] = field(default_factory=dict)


def attack_model(name: str, cfg: EvaluateConfig) -> str:
    """The diffusion model an attack samples from (model transfer: set ``model.id``)."""
    return {"faceid": cfg.faceid.base_model, "instantid": cfg.instantid.base_model}.get(name, cfg.model.id)


def run_attack(name: str, ctx: AttackContext) -> AttackResult:
    """One attack on one identity; missing weights skip it with the reason."""
    module = importlib.import_module(ATTACK_MODULES[name])
    try:
        return module.run(ctx)
    except ModelUnavailableError as exc:
        log.warning("%s: attack %s skipped: %s", ctx.identity, name, exc)
        return AttackResult(name, "skipped", reason=str(exc))


def pixels(portraits: list[Portrait]) -> list[np.ndarray]:
    return [p.pixels for p in portraits]


def features_path(id_dir: Path, attack: str, prompt: str) -> Path:
    return id_dir / FEATURES_DIR / f"{attack}__{prompt_slug(prompt)}.npy"


def clean_features(clean: list[Portrait], scorers: Scorers, id_dir: Path) -> np.ndarray | None:
    """Inception features of the clean photos (FID's reference set, paper Appendix 7.3), saved for pooling."""
    if scorers.fid is None:
        return None
    features = scorers.fid(pixels(clean))
    np.save(id_dir / FEATURES_DIR / "clean.npy", features)
    return features


def metrics_key(photos, clean, references, results: dict[str, AttackResult], cfg: EvaluateConfig, scorers: Scorers) -> str:
    """Everything the identity's metrics depend on: inputs, finished attacks, metric settings, models."""
    done = {name: r.fingerprint or r.reason for name, r in results.items()}
    hashes = [[p.sha256 for p in group] for group in (photos, clean, references)]
    return fingerprint(cfg.metrics, scorers.availability(), done, hashes)


def score_identity(identity: IdentityFolders, photos, clean, references, results: dict[str, AttackResult],
                   id_dir: Path, cfg: EvaluateConfig, scorers: Scorers) -> dict:
    """Rows of one identity (cached in ``metrics.json`` under a key of everything they depend on)."""
    key = metrics_key(photos, clean, references, results, cfg, scorers)
    cached = read_json(id_dir / METRICS_FILE)
    if cached is not None and cached.get("fingerprint") == key:
        return cached
    shutil.rmtree(id_dir / FEATURES_DIR, ignore_errors=True)
    (id_dir / FEATURES_DIR).mkdir(parents=True)
    reference_embeddings = reference_matrix(pixels(references), scorers.embedder)
    clean_feats = clean_features(clean, scorers, id_dir)
    pairs = clean_pairs(photos, clean)
    rows = [{"model": "", **photo_row(photos, clean, scorers, pairs)}]
    sections = [("clean", pixels(clean)), ("attacked photos", pixels(photos))]
    for name, result in results.items():
        for prompt, folder in result.prompts.items():
            images = load_generated(folder)
            row = {"attack": name, "model": attack_model(name, cfg), "prompt": prompt}
            row.update(generated_row(images, reference_embeddings, clean_feats, scorers, features_path(id_dir, name, prompt)))
            if name in ZERO_SHOT_ATTACKS:
                row.update(zero_shot_scores(name, images, pairs, pixels(references), scorers))
            rows.append(row)
            sections.append((f"{name}: {prompt}", images))
    record = {"fingerprint": key, "identity": identity.name, "rows": rows, "unavailable": scorers.unavailable,
              "skipped_attacks": {n: r.reason for n, r in results.items() if r.status == "skipped"},
              "folders": {"photos": str(identity.photos), "clean": str(identity.clean), "references": str(identity.references)}}
    save_json(json_safe(record), id_dir / METRICS_FILE)
    if cfg.metrics.contact_sheet_samples > 0:
        save_png(contact_sheet(sections, cfg.metrics.contact_sheet_samples), id_dir / CONTACT_SHEET)
    return record


def evaluate_identity(identity: IdentityFolders, out_dir: Path, cfg: EvaluateConfig, device: torch.device,
                      scorers: Scorers, quiet: bool) -> dict:
    """Every configured attack on one identity, then its metrics."""
    photos, clean, references = (load_images(f) for f in (identity.photos, identity.clean, identity.references))
    if not photos or not clean:
        raise InputError(f"identity {identity.name}: no photos in {identity.photos if not photos else identity.clean}")
    id_dir = out_dir / identity.name
    results = {}
    for name in cfg.attacks:
        ctx = AttackContext(identity.name, photos, id_dir / name, out_dir, cfg, device, quiet)
        results[name] = run_attack(name, ctx)
    return score_identity(identity, photos, clean, references, results, id_dir, cfg, scorers)


def pooled_fid(out_dir: Path, identities: list[str], rows: list[dict]) -> dict[tuple, float]:
    """Table 1's FID per (attack, model, prompt): :func:`metrics.pooled_fid` of the identities' saved features.

    A group is left out when an identity lacks its features or a side has fewer than 2.
    """
    clean_paths = {n: out_dir / n / FEATURES_DIR / "clean.npy" for n in identities}
    if not clean_paths or not all(p.is_file() for p in clean_paths.values()):
        return {}
    clean = {n: np.load(p) for n, p in clean_paths.items()}
    out = {}
    for attack, model, prompt in {(r["attack"], r["model"], r["prompt"]) for r in rows if r["attack"] != "photos"}:
        paths = {n: features_path(out_dir / n, attack, prompt) for n in identities}
        if all(p.is_file() for p in paths.values()):
            try:
                out[(attack, model, prompt)] = metrics.pooled_fid(clean, {n: np.load(p) for n, p in paths.items()})
            except InputError:
                continue
    return out


def merge(out_dir: Path, identities: list[str], dataset: str, method: str, cfg: EvaluateConfig) -> dict:
    """Collect every identity's ``metrics.json`` into the results files (under a lock)."""
    with file_lock(out_dir / RESULTS_LOCK):
        records = {n: read_json(out_dir / n / METRICS_FILE) for n in identities}
        done = [n for n, r in records.items() if r is not None]
        rows = [{"identity": n, **row} for n in done for row in records[n]["rows"]]
        pooled = pooled_rows(rows, pooled_fid(out_dir, done, rows))
        unavailable = {k: v for n in done for k, v in records[n].get("unavailable", {}).items()}
        results = {
            "dladiff_version": __version__, "dataset": dataset, "method": method,
            "identities": done, "missing_identities": [n for n in identities if n not in done],
            "unavailable": unavailable,
            "skipped_attacks": {n: records[n]["skipped_attacks"] for n in done if records[n].get("skipped_attacks")},
            "rows": [{"dataset": dataset, "method": method, **r} for r in rows + pooled],
            "settings": config_to_dict(cfg),
        }
        write_results(results, out_dir)
    return results


def evaluate(photos: Path, clean: Path, out: Path, cfg: EvaluateConfig, dataset: bool = False, method: str | None = None,
             dataset_label: str | None = None, merge_only: bool = False, quiet: bool = False,
             scorers: Scorers | None = None, share: ProcessShare | None = None) -> EvaluationOutcome:
    """Attack the photos of ``photos`` (one identity, or a dataset root with ``dataset``) and score them.

    ``clean``: the clean originals (same layout; an Anti-DreamBooth root is read as is: ``set_B`` are the
    originals and ``set_C`` the ISM references). ``method`` and ``dataset_label`` label the rows of the
    tables (defaults: the folder name of ``photos``; in dataset mode the folder name of ``clean``, else
    empty). ``share`` overrides the ``accelerate`` process share (dataset mode). Returns the merged
    results as written to ``out/results.json``.
    """
    photos, clean, out = Path(photos), Path(clean), Path(out)
    if out.resolve() in (photos.resolve(), clean.resolve()):
        raise DladiffError(f"--out {out} must differ from the photo folders")
    identities = dataset_identities(photos, clean) if dataset else [single_identity(photos, clean)]
    dataset_name = dataset_label if dataset_label is not None else (clean.name if dataset else "")
    method = method or photos.name
    share = share or (process_share(cfg.runtime.device) if dataset else ProcessShare(0, 1, cfg.runtime.device))
    out.mkdir(parents=True, exist_ok=True)
    outcome = EvaluationOutcome(out, {})
    if not merge_only:
        if share.index == 0:
            save_json({"photos": str(photos), "clean": str(clean), "dataset": dataset, "method": method,
                       "settings": config_to_dict(cfg)}, out / RUN_RECORD)
        device = select_device(share.device_name)
        scorers = scorers or load_scorers(cfg, str(device))
        mine = shard(identities, share.index, share.count)
        bar = progress(len(mine), f"identities (process {share.index + 1}/{share.count})", quiet)
        for identity in mine:
            try:
                record = evaluate_identity(identity, out, cfg, device, scorers, quiet)
                outcome.evaluated.append(identity.name)
                if record.get("skipped_attacks"):
                    outcome.skipped_attacks[identity.name] = record["skipped_attacks"]
            except Interrupted:
                raise
            except DladiffError as exc:
                log.error("identity %s: %s", identity.name, exc)
                outcome.failed[identity.name] = str(exc)
            bar.update(1)
        bar.close()
    outcome.results = merge(out, [i.name for i in identities], dataset_name, method, cfg)
    return outcome


def preflight(cfg: EvaluateConfig) -> list[tuple[str, str | None]]:
    """(what, None if present else why not) for each model the configured attacks and metrics need.

    Looks at local files (the hub cache included; with HF_HUB_OFFLINE=1 nothing is downloaded) and loads
    only the metric models on the CPU.
    """
    from dladiff.diffusion.loading import TINY_SD_ID
    from dladiff.evaluate.faceid import TINY_FACEID_ID
    from dladiff.evaluate.weights import adapter_file, adapter_folder, local_model_folder

    checks = []
    if set(cfg.attacks) & {"dreambooth", "lora"} and cfg.model.id != TINY_SD_ID:
        checks.append((f"attacked model {cfg.model.id}", lambda: local_model_folder(cfg.model.id, "attacked model")))
    if "faceid" in cfg.attacks and cfg.faceid.adapter != TINY_FACEID_ID:
        checks.append((f"FaceID adapter {cfg.faceid.adapter}", lambda: adapter_file(cfg.faceid.adapter, cfg.faceid.weight_name, "FaceID")))
        if cfg.faceid.base_model != TINY_SD_ID:
            checks.append((f"FaceID base {cfg.faceid.base_model}", lambda: local_model_folder(cfg.faceid.base_model, "FaceID base")))
    if "instantid" in cfg.attacks:
        section = cfg.instantid
        checks.append((f"InstantID adapter {section.adapter}", lambda: adapter_file(section.adapter, section.weight_name, "InstantID")))
        checks.append((f"InstantID IdentityNet {section.adapter}/{section.controlnet_folder}",
                       lambda: adapter_folder(section.adapter, section.controlnet_folder, "InstantID")))
        checks.append((f"InstantID base {section.base_model}", lambda: local_model_folder(section.base_model, "InstantID base")))
    out = []
    for what, check in checks:
        try:
            check()
            out.append((what, None))
        except ModelUnavailableError as exc:
            out.append((what, str(exc)))
    try:
        scorers = load_scorers(cfg)
        out.append((f"FDR/ISM: {scorers.embedder.name}", None))
        out += [(metric, reason) for metric, reason in scorers.unavailable.items() if reason != DISABLED]
    except ModelUnavailableError as exc:
        out.append(("FDR/ISM detector and encoder (required)", str(exc)))
    return out
