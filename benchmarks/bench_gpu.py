"""GPU extraction: model-only ceiling vs `embedx extract` end to end, CPU-worker decode vs
on-GPU JPEG decode (TorchCodec's and torchvision's, whichever are installed), for large
backbones at bf16. Run it through `gpu_extract.sh`.

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


#: --device-share values tried for the first model (the device decodes that share of the JPEGs)
SHARES = (0.4, 0.7)


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


def usable_device_decoders() -> list[str]:
    """The libraries whose batched decode loads here (of torchcodec, torchvision, nvimgcodec)."""
    from embedx._tensor_decode import DEVICE_DECODERS, _load_problem

    return [d for d in DEVICE_DECODERS if _load_problem(d) is None]


def bench_device_decode(files: list[Path], backbone, device: str, batch_size: int, decoder: str) -> dict:
    """img/s of the `--decode device` stage alone with `decoder`'s decode_jpeg, on JPEG bytes
    already in memory: decode only, then decode + embedx's resize + crop (what the prefetch
    thread does per batch)."""
    import torch

    from embedx._tensor_decode import _decoder, decode_batch, finish_batch
    from embedx.extractor import _tensor_preprocess

    pre = _tensor_preprocess(backbone)
    data = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]
    batches = [data[i:i + batch_size] for i in range(0, len(data), batch_size)]
    decode = _decoder(decoder)

    def decode_only(b):
        decode(b, device)

    def decode_resize(b):
        images, _, _ = decode_batch(b, device, pre, decoder)
        finish_batch(images)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    out = {}
    for name, fn in (("decode_only", decode_only), ("decode_resize", decode_resize)):
        fn(batches[0])  # warm-up (nvJPEG handles, kernels)
        sync()
        t = time.perf_counter()
        for b in batches:
            fn(b)
        sync()
        out[name] = len(data) / (time.perf_counter() - t)
    return out


def _profile(folder: Path, out: Path, name: str, args, backbone) -> None:
    """One GPU-decode extraction under cProfile (the calling thread only: the loop, start-up and
    finishing; the decoder processes and the prefetch thread are not in it); the top functions by
    cumulative time printed."""
    import cProfile
    import pstats

    from embedx.extractor import ExtractConfig, extract

    cfg = ExtractConfig(model=name, batch_size=args.batch_size, device=args.device, decode="device",
                        progress=False, compile="no")
    prof = cProfile.Profile()
    prof.enable()
    extract(folder, out, cfg, backbone=backbone)
    prof.disable()
    shutil.rmtree(out, ignore_errors=True)
    print(f"--- cProfile, {name}, --decode device, calling thread, by cumulative time:", flush=True)
    pstats.Stats(prof, stream=sys.stdout).sort_stats("cumulative").print_stats(30)
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--models", default="resnet50,vit_base_patch16_224")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_extract.json"))
    ap.add_argument("--variants", choices=("all", "main"), default="all",
                    help="main: only CPU-worker decode and GPU decode with the defaults, per model (for large --images)")
    ap.add_argument("--profile", action="store_true",
                    help="also run the first model's GPU-decode extraction once under cProfile (the calling thread: "
                         "where its time goes outside the timed stages) and print the top functions")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run for the test suite: 48 images, test_efficientnet, on the CPU")
    args = ap.parse_args()
    if args.quick:
        args.images, args.models, args.batch_size, args.device = 48, "test_efficientnet", 16, "cpu"
    import torch

    from bench_extract import bench_ceiling
    from embedx.backbone import load_backbone, resolve_precision
    from embedx.extractor import ExtractConfig, default_num_workers, extract, fp32_modules
    from embedx.images import jpeg_decoder

    tmp = Path(tempfile.mkdtemp(prefix="embedx-gpu-"))
    t0 = time.perf_counter()
    folder = make_jpegs(args.images, tmp)
    print(f"wrote {args.images} JPEGs in {time.perf_counter() - t0:.1f} s", flush=True)
    precision = resolve_precision("auto", args.device)
    env = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor(),
           "torch": torch.__version__, "cpu_count": os.cpu_count(), "precision": precision,
           "num_workers": default_num_workers(args.device), "images": args.images, "batch_size": args.batch_size,
           "jpeg_decoder": jpeg_decoder(), "device_decoders": usable_device_decoders()}
    print(json.dumps(env), flush=True)
    runs = []
    first = args.models.split(",")[0]
    files = sorted(folder.rglob("*.jpg"))[:2048]
    try:
        # one short run first, so that no timed run pays this process's one-time costs (imports,
        # the first Parquet write, CUDA context)
        extract([str(f) for f in files[:256]], tmp / "warm-up",
                ExtractConfig(model="test_efficientnet", device=args.device, progress=False, compile="no"),
                backbone=load_backbone("test_efficientnet", "random"))
        for name in args.models.split(","):
            backbone = load_backbone(name, "random")
            row = {"model": name, "dim": backbone.dim}
            n = max(4096, args.batch_size * 16)
            # bf16 with the half-resolution layers in fp32 (the default on every device since session
            # 15; its accuracy on real photos is tests/test_gpu.py's): the ceiling without them
            # (--no-fp32-stem) beside it, from a fresh backbone, says what they cost here
            row["fp32_modules"] = fp32_modules(backbone, args.device, precision)
            if row["fp32_modules"]:
                row["ceiling_no_fp32_stem"] = bench_ceiling(load_backbone(name, "random"), n, args.batch_size,
                                                            args.device, precision, fp32_stem=False)
            row["ceiling"] = bench_ceiling(backbone, n, args.batch_size, args.device, precision, fp32_stem=None)
            if name == first and args.variants == "all":
                row["device_decode_stage"] = {d: bench_device_decode(files, backbone, args.device, args.batch_size, d)
                                              for d in env["device_decoders"]}
                for d, v in row["device_decode_stage"].items():
                    print(f"{name:>24}: --decode device stage alone ({d}), img/s: {v}", flush=True)
            # prefetch 0 (batches prepared inline, serially with the model) is the baseline for the
            # prefetch thread + CUDA stream; run for the first model only, to stay under 5 minutes
            # and the device decoding a share of the JPEGs while the CPU workers decode the rest
            # --decode device uses the default decoder (TorchCodec when it loads); with both
            # installed, the first model also runs torchvision's, side by side
            # and, where the model has half-resolution layers, GPU decode without them in fp32
            # (a fresh backbone: as every run with them does, it starts from one on the CPU)
            variants = [("pil", 2, 1.0, "auto", None), ("device", 2, 1.0, "auto", None)]
            # nvImageCodec (the hardware JPEG decoders, sparing the SMs): every model, where it loads
            nvimg = "nvimgcodec" in env["device_decoders"]
            variants += [("device", 2, 1.0, "nvimgcodec", None)] if nvimg else []
            if name == first and args.variants == "all":
                variants += [("pil", 0, 1.0, "auto", None), ("device", 0, 1.0, "auto", None)]
                variants += [("device", 2, x, "auto", None) for x in SHARES]
                variants += [("device", 2, 1.0, d, None) for d in env["device_decoders"][1:] if d != "nvimgcodec"]
                variants += [("device", 2, 1.0, "auto", False)] if row["fp32_modules"] else []
            for decode, prefetch, share, device_decoder, stem in variants:
                key = (decode + ("" if prefetch else "_prefetch0") + ("" if share == 1.0 else f"_share{share}")
                       + ("" if device_decoder == "auto" else f"_{device_decoder}") + ("_no_fp32_stem" if stem is False else ""))
                out = tmp / f"out-{name}-{key}"
                cfg = ExtractConfig(model=name, batch_size=args.batch_size, device=args.device, decode=decode,
                                    device_share=share, device_decoder=device_decoder, prefetch=prefetch,
                                    progress=False, compile="no", fp32_stem=stem)
                t = time.perf_counter()
                r = extract(folder, out, cfg, backbone=load_backbone(name, "random") if stem is False else backbone)
                wall = time.perf_counter() - t
                row[f"e2e_{key}"] = r.num_embedded / wall
                # wall = listing the folder + r.seconds (plan, start-up, the loop, finishing)
                row[f"seconds_{key}"] = {"wall": round(wall, 3), "run": round(r.seconds, 3)}
                row[f"stages_{key}"] = {k: round(v, 3) for k, v in (r.stage_seconds or {}).items()}
                shutil.rmtree(out, ignore_errors=True)
            best = max(v for k, v in row.items() if k.startswith("e2e_") and not k.endswith("_no_fp32_stem"))
            row["efficiency_pil"] = row["e2e_pil"] / row["ceiling"]
            row["efficiency_device"] = row["e2e_device"] / row["ceiling"]
            row["efficiency_best"] = best / row["ceiling"]
            runs.append(row)
            print(f"{name:>24}: ceiling {row['ceiling']:8.0f} img/s | e2e CPU-decode {row['e2e_pil']:8.0f} "
                  f"({row['efficiency_pil']:.2f}) | e2e GPU-decode {row['e2e_device']:8.0f} ({row['efficiency_device']:.2f})",
                  flush=True)
            if nvimg:
                r_ = row["e2e_device_nvimgcodec"]
                print(f"{'':>24}  GPU-decode with nvImageCodec: e2e {r_:8.0f} img/s ({r_ / row['ceiling']:.2f}); "
                      f"stages {row['stages_device_nvimgcodec']}", flush=True)
            print(f"{'':>24}  seconds by stage, CPU-decode: {row['stages_pil']}", flush=True)
            print(f"{'':>24}  seconds by stage, GPU-decode: {row['stages_device']}", flush=True)
            print(f"{'':>24}  seconds (wall, run), CPU-decode: {row['seconds_pil']}, GPU-decode: {row['seconds_device']}",
                  flush=True)
            if name == first and args.profile:
                _profile(folder, tmp / "profiled", name, args, backbone)
            if name == first and args.variants == "all":
                print(f"{'':>24}  prefetch 0 (inline): e2e CPU-decode {row['e2e_pil_prefetch0']:8.0f} img/s, "
                      f"GPU-decode {row['e2e_device_prefetch0']:8.0f} img/s -> prefetch gain "
                      f"{row['e2e_pil'] / row['e2e_pil_prefetch0']:.2f}x / "
                      f"{row['e2e_device'] / row['e2e_device_prefetch0']:.2f}x", flush=True)
                for x in SHARES:
                    r_ = row[f"e2e_device_share{x}"]
                    print(f"{'':>24}  device share {x}: e2e {r_:8.0f} img/s ({r_ / row['ceiling']:.2f})", flush=True)
                if "e2e_device_no_fp32_stem" in row:
                    print(f"{'':>24}  with {', '.join(row['fp32_modules'])} in fp32 (the default): ceiling "
                          f"{row['ceiling'] / row['ceiling_no_fp32_stem']:.2f}x, e2e GPU-decode "
                          f"{row['e2e_device'] / row['e2e_device_no_fp32_stem']:.2f}x of all-bf16's "
                          f"({row['ceiling_no_fp32_stem']:8.0f} / {row['e2e_device_no_fp32_stem']:8.0f} img/s)", flush=True)
                for d in env["device_decoders"][1:]:
                    if d == "nvimgcodec":
                        continue  # printed above
                    r_ = row[f"e2e_device_{d}"]
                    print(f"{'':>24}  GPU-decode with {d}'s decoder: e2e {r_:8.0f} img/s ({r_ / row['ceiling']:.2f}) "
                          f"vs {env['device_decoders'][0]}'s {row['e2e_device']:8.0f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "gpu_extract", "env": env, "runs": runs}, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
