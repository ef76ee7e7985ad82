"""Write a small real-photo image folder from the photos scikit-image ships.

Each photo becomes one class folder holding seeded variants (crops, flips, rescales,
small rotations), saved as JPEGs of realistic size (~500x375). Deterministic for a seed.

    python scripts/make_demo_images.py data/demo --per-photo 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "motorcycle", "horse", "page")


def load_photo(name: str) -> Image.Image:
    import skimage.data as data

    if name == "motorcycle":
        arr = data.stereo_motorcycle()[0]
    else:
        arr = getattr(data, name)()
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    img = Image.fromarray(arr)
    return img.convert("RGB")


def variants(img: Image.Image, n: int, rng: np.random.Generator, size=(500, 375)):
    w, h = img.size
    for _ in range(n):
        s = rng.uniform(0.6, 1.0)
        cw, ch = int(w * s), int(h * s)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        v = img.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            v = v.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        v = v.rotate(float(rng.uniform(-8, 8)), resample=Image.Resampling.BILINEAR, fillcolor=(128, 128, 128))
        scale = rng.uniform(0.8, 1.2)
        target = (int(size[0] * scale), int(size[1] * scale))
        yield v.resize(target, Image.Resampling.BICUBIC)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--per-photo", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--photos", default=",".join(PHOTOS))
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    count = 0
    for name in args.photos.split(","):
        img = load_photo(name)
        d = args.out / name
        d.mkdir(parents=True, exist_ok=True)
        for i, v in enumerate(variants(img, args.per_photo, rng)):
            v.save(d / f"{name}_{i:04d}.jpg", quality=90)
            count += 1
    print(f"wrote {count} images in {len(args.photos.split(','))} classes to {args.out}")


if __name__ == "__main__":
    main()
