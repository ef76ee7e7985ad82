"""Write a small real-photo image folder from the photos scikit-image ships.

Each photo becomes one class folder of seeded variants (crops, flips, rescales, small
rotations) saved as ~500x375 JPEGs. Deterministic for a seed.

    python scripts/make_demo_images.py data/demo --per-photo 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

from embedx.demo_data import PHOTOS, write_photo_folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--per-photo", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--photos", default=",".join(PHOTOS))
    args = ap.parse_args()
    photos = tuple(args.photos.split(","))
    n = write_photo_folder(args.out, args.per_photo, args.seed, photos)
    print(f"wrote {n} images in {len(photos)} classes to {args.out}")


if __name__ == "__main__":
    main()
