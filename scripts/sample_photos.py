#!/usr/bin/env python
"""Write real portrait photos that ship inside installed packages to a folder, for the offline demo.

    python scripts/sample_photos.py PHOTOS_DIR

Writes scikit-image's astronaut (a 512x512 portrait), insightface's ``t1.jpg`` (6 people) and its
aligned ``Tom_Hanks_54745.png`` crop. Nothing is downloaded; the images stay under their packages'
licences and are not part of this repository.
"""

import argparse
import shutil
from pathlib import Path

from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    out = Path(parser.parse_args().out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import insightface
    from skimage import data

    images = Path(insightface.__file__).parent / "data" / "images"
    Image.fromarray(data.astronaut()).save(out / "astronaut.png")
    shutil.copyfile(images / "t1.jpg", out / "group.jpg")
    shutil.copyfile(images / "Tom_Hanks_54745.png", out / "hanks.png")
    print(f"wrote 3 photos to {out}")


if __name__ == "__main__":
    main()
