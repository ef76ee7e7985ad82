"""Local engine vs Ray Data engine (and two local processes) on this machine, one run.

On 2 CPU cores Ray can only add overhead (scheduling, object store, actor start-up):
this measures how much, honestly. The output of every engine is checked to be the same.

    python benchmarks/bench_scale.py --images 256
    python benchmarks/bench_scale.py --quick
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _results import write_result

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import numpy as np
    import ray

    import embedx
    from embedx.extractor import ExtractConfig, extract

    from bench_extract import photo_folder

    n = 16 if args.quick else args.images
    folder = photo_folder(n, Path(tempfile.gettempdir()) / "embedx-bench")
    cpus = os.cpu_count() or 1
    cfg = ExtractConfig(model=args.model, progress=False, shard_size=max(8, n // 8), precision="fp32")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        r = extract(folder, f"{tmp}/local", cfg)
        rows["local"] = {"seconds": time.perf_counter() - t, "images": r.num_embedded}
        t = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        rows["ray_init_seconds"] = time.perf_counter() - t
        t = time.perf_counter()
        r = extract(folder, f"{tmp}/ray", cfg, engine="ray")
        rows["ray"] = {"seconds": time.perf_counter() - t, "images": r.num_embedded}
        ray.shutdown()
        t = time.perf_counter()
        r = extract(folder, f"{tmp}/two", cfg, devices=["cpu", "cpu"])
        rows["two_processes"] = {"seconds": time.perf_counter() - t, "images": r.num_embedded}
        ref = embedx.read_features(f"{tmp}/local")
        for other in ("ray", "two"):
            f = embedx.read_features(f"{tmp}/{other}")
            assert f.paths == ref.paths and np.allclose(f.embeddings, ref.embeddings, atol=1e-4), other
    for k in ("local", "ray", "two_processes"):
        rows[k]["images_per_second"] = rows[k]["images"] / rows[k]["seconds"]
    result = {"benchmark": "scale", "model": args.model, "images": n, "cpus": cpus, "runs": rows,
              "ray_over_local_throughput": rows["ray"]["images_per_second"] / rows["local"]["images_per_second"],
              "two_processes_over_local_throughput": rows["two_processes"]["images_per_second"] / rows["local"]["images_per_second"],
              "outputs_identical": True}
    print(f"{args.model}, {n} JPEGs, {cpus} CPUs (all engines wrote the same rows and embeddings)")
    for k in ("local", "ray", "two_processes"):
        print(f"  {k:>14}: {rows[k]['seconds']:7.1f} s  {rows[k]['images_per_second']:7.1f} img/s")
    print(f"  ray.init: {rows['ray_init_seconds']:.1f} s (not included); ray/local = {result['ray_over_local_throughput']:.2f}")
    write_result(result, "scale", args.quick, args.out)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(HERE))
    main()
