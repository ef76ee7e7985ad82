"""GPU extraction: model-only ceiling vs `embedx extract` end to end, CPU-worker decode vs
on-GPU JPEG decode, for large backbones at bf16. Run it through `gpu_extract.sh`.

Random weights are allowed here (the GPU machine has no hub access): throughput does not
depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402


def make_jpegs(n: int, root: Path, distinct: int = 400) -> Path:
    """n JPEG files of ~500x375 made from scikit-image's photos (distinct variants, repeated)."""
    import io

    from embedx.demo_data import PHOTOS, load_photo, photo_variants

    rng = np.random.default_rng(0)
    blobs = []
    per = max(1, distinct // len(PHOTOS))
    for name in PHOTOS:
        for v in photo_variants(load_photo(name), per, rng):
            buf = io.BytesIO()
            v.save(buf, "JPEG", quality=90)
            blobs.append(buf.getvalue())
    d = root / f"jpegs-{n}"
    for i in range(n):
        sub = d / f"{i // 1000:03d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:06d}.jpg").write_bytes(blobs[i % len(blobs)])
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--models", default="resnet50,vit_base_patch16_224")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_extract.json"))
    args = ap.parse_args()
    import torch

    from bench_extract import bench_ceiling
    from embedx.backbone import load_backbone, resolve_precision
    from embedx.extractor import ExtractConfig, default_num_workers, extract

    tmp = Path(tempfile.mkdtemp(prefix="embedx-gpu-"))
    t0 = time.perf_counter()
    folder = make_jpegs(args.images, tmp)
    print(f"wrote {args.images} JPEGs in {time.perf_counter() - t0:.1f} s", flush=True)
    precision = resolve_precision("auto", args.device)
    env = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor(),
           "torch": torch.__version__, "cpu_count": os.cpu_count(), "precision": precision,
           "num_workers": default_num_workers(args.device), "images": args.images, "batch_size": args.batch_size}
    print(json.dumps(env), flush=True)
    runs = []
    try:
        for name in args.models.split(","):
            backbone = load_backbone(name, "random")
            row = {"model": name, "dim": backbone.dim}
            row["ceiling"] = bench_ceiling(backbone, max(4096, args.batch_size * 16), args.batch_size, args.device, precision)
            for decode in ("pil", "device"):
                out = tmp / f"out-{name}-{decode}"
                cfg = ExtractConfig(model=name, batch_size=args.batch_size, device=args.device, decode=decode,
                                    progress=False, compile="no")
                t = time.perf_counter()
                r = extract(folder, out, cfg, backbone=backbone)
                row[f"e2e_{decode}"] = r.num_embedded / (time.perf_counter() - t)
                row[f"stages_{decode}"] = {k: round(v, 3) for k, v in (r.stage_seconds or {}).items()}
                shutil.rmtree(out, ignore_errors=True)
            best = max(row["e2e_pil"], row["e2e_device"])
            row["efficiency_pil"] = row["e2e_pil"] / row["ceiling"]
            row["efficiency_device"] = row["e2e_device"] / row["ceiling"]
            row["efficiency_best"] = best / row["ceiling"]
            runs.append(row)
            print(f"{name:>24}: ceiling {row['ceiling']:8.0f} img/s | e2e CPU-decode {row['e2e_pil']:8.0f} "
                  f"({row['efficiency_pil']:.2f}) | e2e GPU-decode {row['e2e_device']:8.0f} ({row['efficiency_device']:.2f})",
                  flush=True)
            print(f"{'':>24}  seconds by stage, CPU-decode: {row['stages_pil']}", flush=True)
            print(f"{'':>24}  seconds by stage, GPU-decode: {row['stages_device']}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "gpu_extract", "env": env, "runs": runs}, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
