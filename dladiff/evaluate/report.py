"""``results.json``, ``results.csv`` and ``results.md`` (the paper's table layouts) and contact sheets.

Rows: one per identity x attack x prompt (plus an ``attack = photos`` row per identity with PSNR,
SSIM and ISM_pro of the attacked photos), and pooled rows (``identity = ALL``). Pooled values: FDR,
BRISQUE, FIQA and NSFW rate over all images; ISM, ISM_pro, ISM_gen, PSNR and SSIM as the mean over
identities (NaN-skipping); FID pooled over all clean photos vs all generated images (Table 1) and
``fid_per_identity`` the mean of the identities' FIDs (Table 10).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from dladiff.data import atomic_write, save_json
from dladiff.errors import InputError
from dladiff.evaluate import metrics
from dladiff.evaluate.scoring import ROW_METRICS, nan_mean

POOLED = "ALL"
KEY_COLUMNS = ("dataset", "method", "identity", "attack", "model", "prompt")
CSV_COLUMNS = KEY_COLUMNS + ROW_METRICS + ("fid_per_identity",)
IMAGE_WEIGHTED = ("brisque", "fiqa", "nsfw_rate")
IDENTITY_MEAN = ("ism", "ism_pro", "ism_gen", "psnr", "ssim")
ATTACK_TITLES = {"dreambooth": "DreamBooth", "lora": "LoRA", "faceid": "FaceID", "instantid": "InstantID"}


def is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and (math.isnan(value) or math.isinf(value)))


def json_safe(value):
    """NaN / inf -> None (JSON has neither), recursively."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if is_missing(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def pool_group(rows: list[dict]) -> dict:
    """One pooled row from the identities' rows of one attack, model and prompt (FID set separately)."""
    images = sum(r.get("images", 0) for r in rows)
    faces = sum(r.get("faces", 0) or 0 for r in rows)
    pooled = {k: rows[0][k] for k in ("attack", "model", "prompt")}
    pooled.update(identity=POOLED, images=images)
    if rows[0]["attack"] != "photos":
        pooled.update(faces=faces, fdr=metrics.detection_rate(faces, images))
        pooled["fid_per_identity"] = nan_mean([r.get("fid") for r in rows])
    for key in IMAGE_WEIGHTED:
        weighted = [(r[key], r["images"]) for r in rows if not is_missing(r.get(key))]
        if weighted:
            pooled[key] = float(sum(v * n for v, n in weighted) / sum(n for _, n in weighted))
    for key in IDENTITY_MEAN:
        if any(key in r for r in rows):
            pooled[key] = nan_mean([r.get(key) for r in rows])
    return pooled


def group_key(row: dict) -> tuple:
    return row["attack"], row.get("model", ""), row["prompt"]


def pooled_rows(rows: list[dict], pooled_fid: dict[tuple, float]) -> list[dict]:
    """Pooled rows for every (attack, model, prompt) group, in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(group_key(row), []).append(row)
    out = []
    for key, members in groups.items():
        pooled = pool_group(members)
        if key in pooled_fid:
            pooled["fid"] = pooled_fid[key]
        out.append(pooled)
    return out


def write_csv(rows: list[dict], path: Path) -> None:
    """``results.csv``: :data:`CSV_COLUMNS`, empty cells where a value is missing."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if is_missing(row.get(k)) else row.get(k) for k in CSV_COLUMNS})
    atomic_write(path, lambda tmp: tmp.write_text(buffer.getvalue(), encoding="utf-8"))


def fmt(value, digits: int) -> str:
    return "—" if is_missing(value) else f"{value:.{digits}f}"


DIGITS = {"fdr": 3, "ism": 3, "ism_pro": 3, "ism_gen": 3, "fid": 1, "fid_per_identity": 1, "fiqa": 3,
          "brisque": 1, "nsfw_rate": 3, "psnr": 2, "ssim": 3}
LABELS = {"fdr": "FDR", "ism": "ISM", "fid": "FID", "fiqa": "FIQA", "brisque": "BRISQUE", "nsfw_rate": "NSFWR",
          "ism_pro": "ISM_pro", "ism_gen": "ISM_gen", "psnr": "PSNR", "ssim": "SSIM", "fid_per_identity": "FID"}


def table(header: list[str], lines: list[list[str]]) -> str:
    rule = "|" + "|".join("---" for _ in header) + "|"
    return "\n".join(["| " + " | ".join(header) + " |", rule] + ["| " + " | ".join(line) + " |" for line in lines])


def pooled_of(run: dict, attack: str) -> list[dict]:
    return [r for r in run["rows"] if r["identity"] == POOLED and r["attack"] == attack]


def prompts_of(runs: list[dict], attack: str) -> list[str]:
    seen: list[str] = []
    for run in runs:
        for row in pooled_of(run, attack):
            if row["prompt"] not in seen:
                seen.append(row["prompt"])
    return seen


def fmt_mos(score) -> str:
    """``mean ± half-width`` of a :class:`~dladiff.evaluate.mos.MOS`, — when there is none."""
    if score is None:
        return "—"
    return f"{score.mean:.2f}" + ("" if is_missing(score.half_width) else f" ± {score.half_width:.2f}")


def finetune_table(runs: list[dict], attack: str, title: str, mos: dict | None = None) -> str | None:
    """Table 1 / Table 2 layout: FDR, ISM, FID, FIQA, BRISQUE (and MOS when ratings are given) per dataset, method and prompt."""
    keys = ("fdr", "ism", "fid", "fiqa", "brisque")
    lines = []
    for run in runs:
        for r in pooled_of(run, attack):
            line = [run.get("dataset", ""), run.get("method", ""), r["prompt"]] + [fmt(r.get(k), DIGITS[k]) for k in keys]
            if mos:
                line.append(fmt_mos(mos.get((run.get("dataset", ""), run.get("method", ""), attack, r["prompt"]))))
            lines.append(line)
    if not lines:
        return None
    header = ["Dataset", "Method", "Prompt"] + [LABELS[k] for k in keys] + (["MOS"] if mos else [])
    return f"### {title}\n\n" + table(header, lines)


def mos_notes(runs: list[dict], mos: dict) -> str:
    """How the MOS column was computed, and rated groups that match no table line."""
    shown = {(run.get("dataset", ""), run.get("method", ""), r["attack"], r["prompt"])
             for run in runs for r in run["rows"] if r["identity"] == POOLED}
    lines = [f"- MOS {key[1]} / {key[2]} / “{key[3]}”: {m.n} ratings by {m.raters} rater(s)" for key, m in sorted(mos.items())]
    lines += [f"- MOS ratings for {key[1]} ({key[0] or 'no dataset'}) / {key[2]} / “{key[3]}” match no evaluation given"
              for key in sorted(mos) if key not in shown]
    return ("### MOS\n\nMOS: the paper's 1-5 visual-quality scale (§7.2; lower = more distortion = stronger protection), "
            "mean ± half-width of the 95 % t-interval over all ratings of the group (ratings treated as independent).\n\n"
            + "\n".join(lines))


def transfer_table(runs: list[dict]) -> str | None:
    """Table 3 layout: DreamBooth on the attacked model, first prompt: FDR, ISM, FID, NSFWR."""
    lines = []
    for run in runs:
        rows = pooled_of(run, "dreambooth")
        if rows:
            r = rows[0]
            lines.append([run.get("dataset", ""), run.get("method", ""), r.get("model", ""), r["prompt"]]
                         + [fmt(r.get(k), DIGITS[k]) for k in ("fdr", "ism", "fid", "nsfw_rate")])
    if not lines:
        return None
    return "### Table 3 layout — DreamBooth on the attacked model (model transfer), NSFW rate\n\n" + table(
        ["Dataset", "Method", "Model", "Prompt", "FDR", "ISM", "FID", "NSFWR"], lines)


def zero_shot_table(runs: list[dict]) -> str | None:
    """Table 4 layout: FaceID and InstantID ISM_pro / ISM_gen (means over prompts)."""
    attacks = [a for a in ("faceid", "instantid") if any(pooled_of(run, a) for run in runs)]
    if not attacks:
        return None
    header = ["Dataset", "Method"] + [f"{ATTACK_TITLES[a]} {LABELS[k]}" for a in attacks for k in ("ism_pro", "ism_gen")]
    lines = []
    for run in runs:
        cells = []
        for a in attacks:
            rows = pooled_of(run, a)
            cells += [fmt(nan_mean([r.get(k) for r in rows]), 3) for k in ("ism_pro", "ism_gen")]
        lines.append([run.get("dataset", ""), run.get("method", "")] + cells)
    return "### Table 4 layout — zero-shot (ISM_pro: protected vs clean photo; ISM_gen: generated vs clean)\n\n" + table(header, lines)


def photos_table(runs: list[dict]) -> str | None:
    """Table 9 layout: PSNR (and SSIM, ISM_pro) of the attacked photos against the clean ones."""
    lines = []
    for run in runs:
        for r in pooled_of(run, "photos"):
            lines.append([run.get("dataset", ""), run.get("method", "")] + [fmt(r.get(k), DIGITS[k]) for k in ("psnr", "ssim", "ism_pro")])
    if not lines:
        return None
    return "### Table 9 layout — attacked photos vs clean originals\n\n" + table(["Dataset", "Method", "PSNR (dB)", "SSIM", "ISM_pro"], lines)


def per_identity_fid_table(runs: list[dict]) -> str | None:
    """Table 10 layout: mean per-identity FID of each fine-tuning attack and prompt."""
    columns = [(a, p) for a in ("dreambooth", "lora") for p in prompts_of(runs, a)]
    if not columns:
        return None
    lines = []
    for run in runs:
        cells = []
        for a, p in columns:
            row = next((r for r in pooled_of(run, a) if r["prompt"] == p), {})
            cells.append(fmt(row.get("fid_per_identity"), 1))
        lines.append([run.get("dataset", ""), run.get("method", "")] + cells)
    header = ["Dataset", "Method"] + [f"{ATTACK_TITLES[a]} “{p}”" for a, p in columns]
    return "### Table 10 layout — FID per identity (mean over identities)\n\n" + table(header, lines)


def identity_table(run: dict) -> str:
    keys = ("images", "faces", "fdr", "ism", "fid", "fiqa", "brisque", "nsfw_rate", "ism_pro", "ism_gen", "psnr", "ssim")
    lines = [[r["identity"], r["attack"], r["prompt"]] + [str(r.get(k, "")) if k in ("images", "faces") else fmt(r.get(k), DIGITS[k]) for k in keys]
             for r in run["rows"]]
    return "### All rows\n\n" + table(["Identity", "Attack", "Prompt", "Images", "Faces"] + [LABELS[k] for k in keys[2:]], lines)


def notes(runs: list[dict]) -> str:
    lines = []
    for run in runs:
        for metric, reason in sorted(run.get("unavailable", {}).items()):
            lines.append(f"- {run.get('method', '')}: {metric} not computed: {reason}")
        for identity, skipped in sorted(run.get("skipped_attacks", {}).items()):
            for attack, reason in sorted(skipped.items()):
                lines.append(f"- {run.get('method', '')}: {identity}: {attack} skipped: {reason}")
        if run.get("missing_identities"):
            lines.append(f"- {run.get('method', '')}: not yet evaluated: {', '.join(run['missing_identities'])}")
    return "### Notes\n\n" + "\n".join(lines) if lines else ""


def render_markdown(runs: Sequence[dict], with_rows: bool = True, mos: dict | None = None) -> str:
    """The paper's table layouts for one or several evaluations (one line per dataset and method).

    ``mos``: (dataset, method, attack, prompt) → :class:`~dladiff.evaluate.mos.MOS`, from ``dladiff rate``.
    """
    runs = list(runs)
    mos_text = "MOS: see the MOS section." if mos else "MOS (subjective) is not computed (run `dladiff rate`, then give --ratings)."
    parts = ["# dladiff evaluation", "FDR, ISM: lower = stronger protection; FID: higher = stronger protection; "
             f"{mos_text} — = not available (see Notes)."]
    sections = [finetune_table(runs, "dreambooth", "Table 1 layout — DreamBooth", mos),
                finetune_table(runs, "lora", "Table 2 layout — LoRA", mos), transfer_table(runs), zero_shot_table(runs),
                photos_table(runs), per_identity_fid_table(runs), mos_notes(runs, mos) if mos else None]
    parts += [s for s in sections if s]
    if with_rows and len(runs) == 1:
        parts.append(identity_table(runs[0]))
    parts.append(notes(runs))
    return "\n\n".join(p for p in parts if p) + "\n"


def write_comparison(eval_dirs: Sequence[Path], out: Path, ratings: Sequence[Path] = ()) -> str:
    """One set of tables with a line per evaluation (e.g. "w/o Protect" and "Ours" on each dataset).

    ``ratings``: ratings files (or study folders) of ``dladiff rate``, which fill the MOS column.
    """
    from dladiff.evaluate.cache import read_json
    from dladiff.evaluate.mos import mos_by_group

    runs = []
    for folder in eval_dirs:
        results = read_json(Path(folder) / "results.json")
        if results is None:
            raise InputError(f"{folder}: no results.json (run dladiff evaluate first)")
        runs.append(results)
    markdown = render_markdown(runs, with_rows=False, mos=mos_by_group(ratings) if ratings else None)
    atomic_write(Path(out), lambda tmp: tmp.write_text(markdown, encoding="utf-8"))
    return markdown


def write_results(results: dict, out_dir: Path) -> None:
    """``results.json``, ``results.csv`` and ``results.md`` in ``out_dir``."""
    results = json_safe(results)
    save_json(results, out_dir / "results.json")
    write_csv(results["rows"], out_dir / "results.csv")
    markdown = render_markdown([results])
    atomic_write(out_dir / "results.md", lambda tmp: tmp.write_text(markdown, encoding="utf-8"))


def tile(image: np.ndarray, size: int) -> Image.Image:
    """``image`` letterboxed into a ``size``² grey square."""
    pil = Image.fromarray(image)
    pil.thumbnail((size, size))
    canvas = Image.new("RGB", (size, size), (128, 128, 128))
    canvas.paste(pil, ((size - pil.width) // 2, (size - pil.height) // 2))
    return canvas


def contact_sheet(sections: list[tuple[str, list[np.ndarray]]], samples: int, size: int = 128, label_width: int = 220) -> np.ndarray:
    """A grid: one labelled line per section (clean | protected | each attack and prompt), ``samples`` tiles each."""
    columns = max(1, samples)
    sheet = Image.new("RGB", (label_width + columns * size, max(1, len(sections)) * size), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for line, (label, images) in enumerate(sections):
        draw.text((6, line * size + 6), label, fill=(0, 0, 0))
        for column, image in enumerate(images[:columns]):
            sheet.paste(tile(image, size), (label_width + column * size, line * size))
    return np.asarray(sheet)
