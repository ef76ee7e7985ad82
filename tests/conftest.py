"""Shared fixtures: tiny seeded image folders, real photos from scikit-image, the real
default backbone (bundled ImageNet weights), and structured synthetic features."""

from __future__ import annotations

import os

# never wait on the network: timm would otherwise spend ~47 s failing to reach the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# as the CLI sets it before torch loads (embedx._openmp): every extract here then runs the
# engine's default, each batch decoded by the decode threads, as `embedx extract` does
os.environ.setdefault("GOMP_SPINCOUNT", "30000")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "camera", "motorcycle")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def real_photo(name: str) -> np.ndarray:
    import skimage.data as data

    if name == "motorcycle":
        return data.stereo_motorcycle()[0]
    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return img[..., :3]


def make_shapes_image(rng: np.random.Generator, cls: int, size=(64, 48)) -> np.ndarray:
    """A seeded synthetic image whose class decides the colour and shape."""
    w, h = size
    img = np.full((h, w, 3), 235, dtype=np.uint8)
    img += rng.integers(0, 20, size=img.shape, dtype=np.uint8)
    colour = np.array([(200, 30, 30), (30, 160, 40), (40, 60, 200), (180, 160, 20)][cls % 4], dtype=np.uint8)
    cx, cy = rng.integers(w // 4, 3 * w // 4), rng.integers(h // 4, 3 * h // 4)
    r = int(rng.integers(min(w, h) // 6, min(w, h) // 3))
    yy, xx = np.mgrid[:h, :w]
    mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r if cls % 2 == 0 else (abs(xx - cx) <= r) & (abs(yy - cy) <= r)
    img[mask] = colour
    return img


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """24 small generated JPEG/PNG images in 3 class folders (seeded)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for i in range(24):
        cls = i % 3
        d = root / f"class_{cls}"
        d.mkdir(exist_ok=True)
        arr = make_shapes_image(rng, cls, size=(int(rng.integers(40, 90)), int(rng.integers(40, 90))))
        ext = "png" if i % 5 == 0 else "jpg"
        Image.fromarray(arr).save(d / f"img_{i:03d}.{ext}")
    return root


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """Real photos shipped with scikit-image, as JPEGs in one folder per photo."""
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        (root / name).mkdir()
        Image.fromarray(real_photo(name)).save(root / name / f"{name}.jpg", quality=92)
    return root


@pytest.fixture(scope="session")
def backbone():
    """The real default backbone: EfficientNet-Lite0 with bundled ImageNet weights."""
    from embedx.backbone import load_backbone

    return load_backbone()


@pytest.fixture(scope="session")
def random_backbone():
    """A tiny randomly initialised timm test model, for mechanics that need no quality."""
    from embedx.backbone import load_backbone

    return load_backbone("test_efficientnet", weights="random")


def clustered(n: int, dim: int, n_clusters: int, seed: int = 0, spread: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Seeded clustered vectors (structure, unlike pure noise): returns (x, cluster_ids)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    ids = rng.integers(0, n_clusters, size=n)
    x = centres[ids] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    return x.astype(np.float32), ids


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of `a` with the same row of `b`."""
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def timm_pixels(backbone, files, **data):
    """A batch of `files` through timm's own eval transform (the reference), with `data`
    overriding the backbone's data config (input_size, crop_pct, crop_mode, …)."""
    import torch
    from PIL import Image
    from timm.data import create_transform

    tf = create_transform(**{**backbone.timm_data_config(), **data}, is_training=False)
    return torch.stack([tf(Image.open(f).convert("RGB")) for f in files])


def _failing_decode(module: str, setup: str, test: str, hang: bool = False) -> str:
    """Source that patches `module`'s decode_image to segfault (with `hang`: sleep for an hour) on
    the files for which the expression `test` (of `file`; after the statements `setup`) holds, as
    a crash (a hang) inside a decoding library would."""
    return f"""
import os, signal
import {module} as _patched
_real = _patched.decode_image
{setup}
def _decode(file, *args, **kwargs):
    if {test}:
        if {hang!r}:
            import time
            time.sleep(3600)
        os.kill(os.getpid(), signal.SIGSEGV)  # a crash inside a decoding library
    return _real(file, *args, **kwargs)
_patched.decode_image = _decode
"""


def segfault_on(module: str, file: str) -> str:
    """Source for a script run in a subprocess: `module`'s decode_image segfaults on `file`, as a
    crash inside a decoding library would."""
    return _failing_decode(module, "", f"file == {file!r}")


def crash_on_content(tmp_path: Path, blob: bytes, hang: bool = False) -> dict:
    """Environment for Python processes (started after it is set) in which embedx._loader's
    decode_image segfaults (with `hang`: sleeps for an hour) on any file whose bytes are `blob`,
    as a crash (a hang) inside a decoding library would: a sitecustomize on PYTHONPATH, so that
    spawned processes have it too."""
    site = tmp_path / "crash-site"
    site.mkdir(exist_ok=True)
    (site / "crash.bin").write_bytes(blob)
    setup = (f"with open({str(site / 'crash.bin')!r}, 'rb') as f:\n    _CRASH = f.read()\n"
             "def _is_crash(file):\n    with open(file, 'rb') as f:\n        return f.read() == _CRASH")
    (site / "sitecustomize.py").write_text(_failing_decode("embedx._loader", setup, "_is_crash(file)", hang))
    path = os.pathsep.join([str(site)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    return {"PYTHONPATH": path}
