#!/usr/bin/env python
"""Benchmark the image input/output path: seconds and peak memory, as JSON.

    python scripts/bench_io.py write --width 2000 --height 1500        # the output step of one 3 MP photo
    python scripts/bench_io.py levels --width 2000 --height 1500       # PNG compression level: size vs time
    python scripts/bench_io.py protect --width 9000 --height 6000      # `dladiff protect --layers 1 --config smoke`

``write`` times each part of writing one output: δ resized into the photo and added (composition,
quantization, bound clip), the PNG encode, the re-read with the bound check, and the PSNR for the
report; the photo is scikit-image's astronaut enlarged to the size asked (a real photo's texture,
so PNG sizes are realistic). It runs in a fresh process, so ``peak_rss`` is that of one output
step plus the libraries (``rss_before`` is the baseline once the photo is in memory). ``protect``
runs the whole CLI on a folder holding one such photo, in a child process, and reports its wall
time and peak RSS as ``getrusage(RUSAGE_CHILDREN)`` gives it (as ``/usr/bin/time -v`` does).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GB = 1024**3


def rss_now() -> int:
    """Resident set size of this process in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_photo(width: int, height: int) -> np.ndarray:
    """scikit-image's astronaut enlarged to ``width`` x ``height`` (uint8 RGB)."""
    from PIL import Image
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((width, height), Image.Resampling.BICUBIC))


def timed(fn, repeats: int) -> dict:
    """Best wall and CPU seconds of ``repeats`` calls of ``fn``."""
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return {"wall": round(min(wall), 4), "cpu": round(min(cpu), 4)}


def write_phase(width: int, height: int, resolution: int = 512, repeats: int = 3) -> dict:
    """Seconds of each part of the output step for one photo (best of ``repeats``) and peak RSS.

    ``total`` = compose + save_checked_png (encode, re-read, bound check, rename) + psnr: what
    ``protect`` does per photo after the optimization. The other entries split save_checked_png.
    """
    import torch
    from PIL import Image

    from dladiff.data import apply_perturbation, encode_png, linf_255, psnr
    from dladiff.protect import save_checked_png

    pixels = bench_photo(width, height)
    delta = torch.sign(torch.randn(3, resolution, resolution, generator=torch.Generator().manual_seed(0))) * 0.05
    bound = 0.05 * 127.5
    rss_before = rss_now()
    with tempfile.TemporaryDirectory() as tmp:
        path, raw = Path(tmp) / "out.png", Path(tmp) / "raw.png"
        out = apply_perturbation(pixels, delta, bound)
        encode_png(out, raw)

        def reread():
            with Image.open(raw) as img:
                img.load()
                np.asarray(img)

        parts = {
            "compose": timed(lambda: apply_perturbation(pixels, delta, bound), repeats),
            "save_checked_png": timed(lambda: save_checked_png(out, pixels, float(np.floor(bound)), path), repeats),
            "psnr": timed(lambda: psnr(out, pixels), repeats),
            "of_which_encode": timed(lambda: encode_png(out, raw), repeats),
            "of_which_reread": timed(reread, repeats),
            "of_which_linf": timed(lambda: linf_255(out, pixels), repeats),
        }
        size = path.stat().st_size
    total = {k: round(sum(parts[p][k] for p in ("compose", "save_checked_png", "psnr")), 4) for k in ("wall", "cpu")}
    return {"phase": "write", "width": width, "height": height, "megapixels": round(width * height / 1e6, 2),
            "seconds": {**parts, "total": total}, "png_bytes": size,
            "rss_before_bytes": rss_before, "peak_rss_bytes": peak_rss(),
            "peak_rss_gb": round(peak_rss() / GB, 3)}


def encode_row(name: str, encode, repeats: int = 3) -> dict:
    """Encode seconds (best wall and CPU of ``repeats``), PIL decode seconds and size of one encoder setting."""
    import io

    from PIL import Image

    buffers = []

    def run():
        buf = io.BytesIO()
        encode(buf)
        buffers.append(buf)

    encode_s = timed(run, repeats)
    data = buffers[-1].getvalue()

    def decode():
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            np.asarray(img)

    return {"encoder": name, "encode_s": encode_s, "decode_s": timed(decode, repeats), "bytes": len(data)}


def levels_phase(width: int, height: int) -> dict:
    """Size against time: PIL's zlib levels 0-9 (default strategy), PIL with Z_RLE / Z_HUFFMAN_ONLY, and
    dladiff.png (Average filter, Z_RLE, strips on 1 and 2 threads), on a perturbed photo as the tool writes it."""
    import zlib

    import torch
    from PIL import Image

    from dladiff.data import apply_perturbation
    from dladiff.png import write_png

    pixels = bench_photo(width, height)
    delta = torch.sign(torch.randn(3, 512, 512, generator=torch.Generator().manual_seed(0))) * 0.05
    out = apply_perturbation(pixels, delta, 0.05 * 127.5)
    image = Image.fromarray(out, "RGB")

    def pil(**options):
        return lambda buf: image.save(buf, format="PNG", **options)

    rows = [encode_row(f"PIL compress_level={level}", pil(compress_level=level)) for level in range(10)]
    rows += [encode_row(f"PIL compress_level=1 compress_type={name}", pil(compress_level=1, compress_type=value))
             for name, value in (("Z_RLE", zlib.Z_RLE), ("Z_HUFFMAN_ONLY", zlib.Z_HUFFMAN_ONLY))]
    rows += [encode_row(f"dladiff.png threads={n}", lambda buf, n=n: write_png(out, buf, threads=n)) for n in (1, 2)]
    return {"phase": "levels", "width": width, "height": height, "raw_bytes": out.nbytes, "rows": rows}


def protect_phase(width: int, height: int, config: str, layers: str) -> dict:
    """Wall time and peak RSS of ``dladiff protect`` on one photo, in a child process."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        Image.fromarray(bench_photo(width, height)).save(photos / "big.png", compress_level=1)
        cmd = [sys.executable, "-c", "from dladiff.cli import main; main()", "protect", str(photos), "--out", str(Path(tmp) / "out"),
               "--config", config, "--layers", layers, "--quiet"]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"phase": "protect", "width": width, "height": height, "config": config, "layers": layers,
            "command": "dladiff " + " ".join(cmd[3:]), "exit_code": done.returncode, "stderr_tail": done.stderr[-400:],
            "seconds": round(wall, 2), "peak_rss_bytes": child, "peak_rss_gb": round(child / GB, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["write", "levels", "protect"])
    parser.add_argument("--width", type=int, default=2000, help="pixels")
    parser.add_argument("--height", type=int, default=1500, help="pixels")
    parser.add_argument("--config", default="smoke", help="protect: config name or file")
    parser.add_argument("--layers", default="1", help="protect: --layers value")
    args = parser.parse_args()
    if args.phase == "write":
        result = write_phase(args.width, args.height)
    elif args.phase == "levels":
        result = levels_phase(args.width, args.height)
    else:
        result = protect_phase(args.width, args.height, args.config, args.layers)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
