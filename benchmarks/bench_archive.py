"""Images read in place from a .tar archive vs the same files in a folder, side by side in one run.

On one folder of real-photo JPEGs (~500x375, made from scikit-image's photos with a fixed
seed, as bench_extract.py) and a WebDataset-style .tar of the same files (key.jpg + key.cls),
reports, over --rounds interleaved rounds (medians):

1. listing - `list_images` on the folder vs on the archive (its member index built afresh each
             round: the cost a run pays once per archive), in microseconds per image;
2. decode  - one decoder (one process, one thread, embedx's default decode path for the default
             model) over every image, read from the folder vs from the archive, in ms per image;

and the ratios archive/folder (1.0: no cost for reading in place).

    python benchmarks/bench_archive.py --images 512
    python benchmarks/bench_archive.py --quick        # a smoke run (the test suite uses it)
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

from _results import write_result

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_archive(folder: Path, tar: Path) -> Path:
    """A WebDataset-style archive of every JPEG under `folder`: NNNNNN.jpg + NNNNNN.cls (its folder)."""
    if tar.exists():
        return tar
    files = sorted(folder.rglob("*.jpg"))
    tmp = tar.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tf:
        for i, f in enumerate(files):
            tf.add(f, arcname=f"{i:06d}.jpg")
            label = f.parent.name.encode()
            info = tarfile.TarInfo(f"{i:06d}.cls")
            info.size = len(label)
            tf.addfile(info, io.BytesIO(label))
    tmp.rename(tar)
    return tar


def time_listing(source: Path) -> float:
    """Seconds for list_images(source), the archive's member index built afresh."""
    from embedx import archives
    from embedx.images import list_images

    archives._members.cache_clear()
    t = time.perf_counter()
    listing = list_images([source])
    seconds = time.perf_counter() - t
    assert listing.records
    return seconds


def time_decode(source: Path, spec) -> float:
    """ms per image for one decoder over every image of `source` (listing not counted)."""
    from embedx._loader import ImageDataset
    from embedx.images import list_images

    ds = ImageDataset(list_images([source]).records, spec)
    ds[0]  # warm: imports, the archive's member index
    t = time.perf_counter()
    for i in range(len(ds)):
        assert ds[i][4] is None, ds[i][4]
    return (time.perf_counter() - t) / len(ds) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "embedx-bench")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the benchmark runs")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.images, args.rounds = 16, 1

    import torch

    from bench_extract import photo_folder
    from embedx.backbone import load_backbone

    torch.set_num_threads(1)  # as in the decoder workers
    folder = photo_folder(args.images, args.cache)
    tar = make_archive(folder, args.cache / f"{folder.name}.tar")
    spec = load_backbone(args.model).decode_spec(True)
    n = sum(1 for _ in folder.rglob("*.jpg"))
    rounds: dict[str, list[float]] = {k: [] for k in ("list_folder_us", "list_archive_us", "decode_folder_ms",
                                                      "decode_archive_ms")}
    for _ in range(args.rounds):
        rounds["list_folder_us"].append(time_listing(folder) / n * 1e6)
        rounds["list_archive_us"].append(time_listing(tar) / n * 1e6)
        rounds["decode_folder_ms"].append(time_decode(folder, spec))
        rounds["decode_archive_ms"].append(time_decode(tar, spec))
    med = {k: statistics.median(v) for k, v in rounds.items()}
    result = {
        "images": n,
        "model": args.model,
        "archive_bytes": tar.stat().st_size,
        "medians": med,
        "listing_archive_over_folder": med["list_archive_us"] / med["list_folder_us"],
        "decode_archive_over_folder": med["decode_archive_ms"] / med["decode_folder_ms"],
        "rounds": rounds,
        "env": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
        "command": "python benchmarks/bench_archive.py" + (" --quick" if args.quick else f" --images {args.images}"),
    }
    print(f"{n} JPEGs ~500x375, folder vs WebDataset .tar (+ .cls labels), medians of {args.rounds} rounds")
    print(f"  listing: {med['list_folder_us']:.1f} vs {med['list_archive_us']:.1f} us/image "
          f"(archive/folder {result['listing_archive_over_folder']:.2f})")
    print(f"  decode:  {med['decode_folder_ms']:.3f} vs {med['decode_archive_ms']:.3f} ms/image "
          f"(archive/folder {result['decode_archive_over_folder']:.3f})")
    write_result(result, "archive", args.quick, args.out)


if __name__ == "__main__":
    main()
