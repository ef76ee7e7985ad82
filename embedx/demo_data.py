"""Real labelled images from packages that ship them, written as image folders.

* `write_photo_folder`: the real photos scikit-image ships, one class folder per photo,
  with seeded crops / flips / rescales at realistic JPEG size (~500x375).
* `write_fashion_mnist`: Fashion-MNIST from Debian's `dataset-fashion-mnist` package
  (`apt-get install dataset-fashion-mnist`), a folder per split and class.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from .errors import InputError

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "motorcycle", "horse", "page")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle_boot")


def load_photo(name: str):
    """A real photo bundled with scikit-image, as an RGB PIL image."""
    import skimage.data as data
    from PIL import Image

    arr = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return Image.fromarray(arr).convert("RGB")


def photo_variants(img, n: int, rng: np.random.Generator, size=(500, 375)):
    """Seeded crops, flips, small rotations and rescales of one photo."""
    from PIL import Image

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
        yield v.resize((int(size[0] * scale), int(size[1] * scale)), Image.Resampling.BICUBIC)


def write_photo_folder(out: str | os.PathLike, per_photo: int = 8, seed: int = 0,
                       photos: tuple[str, ...] = PHOTOS, flat: bool = False) -> int:
    """Write `per_photo` variants of each bundled photo; returns the number of files.

    Args:
        flat: all files in `out` itself instead of one folder per photo.
    """
    rng = np.random.default_rng(seed)
    out = Path(out)
    count = 0
    for name in photos:
        img = load_photo(name)
        d = out if flat else out / name
        d.mkdir(parents=True, exist_ok=True)
        for i, v in enumerate(photo_variants(img, per_photo, rng)):
            v.save(d / f"{name}_{i:05d}.jpg", quality=90)
            count += 1
    return count


def read_idx(images_gz: Path, labels_gz: Path) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(images_gz) as fh:
        images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(labels_gz) as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)
    return images, labels


def fashion_mnist_available(directory: Path = FASHION_DIR) -> bool:
    return (directory / "train-images-idx3-ubyte.gz").exists()


def write_fashion_mnist(out: str | os.PathLike, train_per_class: int | None = None, test_per_class: int | None = None,
                        seed: int = 0, directory: Path = FASHION_DIR) -> dict[str, int]:
    """Write Fashion-MNIST as out/{train,test}/<class>/<index>.png (seeded subsets if sizes given)."""
    from PIL import Image

    if not fashion_mnist_available(directory):
        raise InputError(
            f"Fashion-MNIST is not in {directory}. Install it with: apt-get install dataset-fashion-mnist"
        )
    counts = {}
    rng = np.random.default_rng(seed)
    for split, prefix, per_class in (("train", "train", train_per_class), ("test", "t10k", test_per_class)):
        images, labels = read_idx(directory / f"{prefix}-images-idx3-ubyte.gz", directory / f"{prefix}-labels-idx1-ubyte.gz")
        chosen = []
        for c in range(len(FASHION_CLASSES)):
            idx = np.nonzero(labels == c)[0]
            if per_class is not None:
                idx = np.sort(rng.choice(idx, size=min(per_class, len(idx)), replace=False))
            chosen.append(idx)
        n = 0
        for c, idx in enumerate(chosen):
            d = Path(out) / split / FASHION_CLASSES[c]
            d.mkdir(parents=True, exist_ok=True)
            for i in idx:
                Image.fromarray(images[i], "L").save(d / f"{i:05d}.png")
                n += 1
        counts[split] = n
    return counts
