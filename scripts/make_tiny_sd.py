#!/usr/bin/env python
"""Write a miniature, randomly initialized Stable Diffusion in diffusers layout.

    python scripts/make_tiny_sd.py OUT_DIR [--seed 0]

The folder (unet, vae, text_encoder, tokenizer with a small vocabulary written here, scheduler,
model_index.json) loads with the same ``from_pretrained`` calls as the real SD weights, e.g.
``dladiff protect PHOTOS --out OUT --config smoke --model OUT_DIR``. It is random: it proves that
the pipeline runs, not that anything is protected.
"""

import argparse

from dladiff.diffusion.tiny import build_tiny_sd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder to write (replaced if it exists)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args()
    print(build_tiny_sd(args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
