"""Transfer learning on real labelled images: Fashion-MNIST (Debian's dataset-fashion-mnist)
with the bundled ImageNet EfficientNet-Lite0.

Reports, on the official test split: linear-probe, MLP and weighted-kNN accuracy on frozen
features (a seeded per-class subset of the training split, sized for 2 CPU cores), the same
linear probe on a randomly initialised backbone, and the fine-tuning gain (top blocks
unfrozen) on a smaller subset.

    python benchmarks/bench_fashion.py --train-per-class 500            # + the full 10k test split
    python benchmarks/bench_fashion.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from _results import write_result

os.environ.setdefault("HF_HUB_OFFLINE", "1")



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-per-class", type=int, default=500)
    ap.add_argument("--test-per-class", type=int, default=None, help="default: the whole official test split")
    ap.add_argument("--cmp-per-class", type=int, default=50, help="subset for the real-vs-random comparison")
    ap.add_argument("--ft-train-per-class", type=int, default=100)
    ap.add_argument("--ft-val-per-class", type=int, default=50)
    ap.add_argument("--ft-head-epochs", type=int, default=2)
    ap.add_argument("--ft-epochs", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "embedx-fashion")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from embedx.backbone import load_backbone
    from embedx.demo_data import write_fashion_mnist
    from embedx.extractor import ExtractConfig, extract
    from embedx.finetune import FinetuneConfig, finetune
    from embedx.train import HeadConfig, train_head

    if args.quick:
        args.train_per_class, args.test_per_class, args.cmp_per_class = 10, 5, 5
        args.ft_train_per_class, args.ft_val_per_class, args.ft_head_epochs, args.ft_epochs = 4, 2, 1, 1
    w = args.work / ("q" if args.quick else f"tr{args.train_per_class}-te{args.test_per_class or 'all'}")
    t0 = time.perf_counter()
    if not (w / "images" / ".done").exists():
        counts = write_fashion_mnist(w / "images", args.train_per_class, args.test_per_class, seed=0)
        (w / "images" / ".done").write_text(json.dumps(counts))
    backbone = load_backbone()
    timings = {}
    for split in ("train", "test"):
        t = time.perf_counter()
        extract(w / "images" / split, w / f"real-{split}", ExtractConfig(progress=False), backbone=backbone)
        timings[f"extract_{split}_seconds"] = time.perf_counter() - t
    # real vs randomly initialised backbone, same small seeded subset for both
    cmp_dir = args.work / f"cmp-{args.cmp_per_class}"
    if not (cmp_dir / "images" / ".done").exists():
        write_fashion_mnist(cmp_dir / "images", args.cmp_per_class, args.cmp_per_class, seed=2)
        (cmp_dir / "images" / ".done").write_text("ok")
    # one random network for both splits: a head trained on one network's features and tested on
    # another's is at chance (session 1's "0.100" was that: each extract drew its own random init)
    random_backbone = load_backbone(weights="random")
    for name, net in (("real", backbone), ("random", random_backbone)):
        for split in ("train", "test"):
            extract(cmp_dir / "images" / split, cmp_dir / f"{name}-{split}",
                    ExtractConfig(weights=None if net is backbone else "random", progress=False), backbone=net)
    results = {}
    for head in ("linear", "mlp"):
        m = train_head(w / "real-train", w / f"head-{head}", HeadConfig(head=head), val=w / "real-test")
        results[head] = {k: m[k] for k in ("val_accuracy", "val_top5_accuracy", "train_accuracy", "num_train",
                                           "num_val", "best", "train_seconds")}
        if head == "linear":
            results["knn_k10_accuracy"], results["knn_k20_accuracy"] = m["knn_k10_accuracy"], m["knn_k20_accuracy"]
    for name in ("real", "random"):
        m = train_head(cmp_dir / f"{name}-train", cmp_dir / f"head-{name}", HeadConfig(head="linear", knn=False),
                       val=cmp_dir / f"{name}-test")
        results[f"subset_linear_{name}_backbone"] = m["val_accuracy"]
    results["subset_size"] = {"train": m["num_train"], "test": m["num_val"]}

    ft_dir = args.work / f"ft-{args.ft_train_per_class}-{args.ft_val_per_class}"
    if not (ft_dir / "images" / ".done").exists():
        write_fashion_mnist(ft_dir / "images", args.ft_train_per_class, args.ft_val_per_class, seed=1)
        (ft_dir / "images" / ".done").write_text("ok")
    t = time.perf_counter()
    fm = finetune(ft_dir / "images" / "train", ft_dir / "run", FinetuneConfig(
        head_epochs=args.ft_head_epochs, epochs=args.ft_epochs, unfreeze_blocks=2, progress=False, patience=99),
        val=ft_dir / "images" / "test", overwrite=True)
    results["finetune"] = {"num_train": fm["num_train"], "num_val": fm["num_val"],
                           "head_only_val_accuracy": fm["head_only_val_accuracy"], "val_accuracy": fm["val_accuracy"],
                           "gain": fm["finetune_gain"], "unfreeze_blocks": 2, "seconds": time.perf_counter() - t,
                           "history": fm["history"]}
    result = {"benchmark": "fashion_mnist", "model": "tf_efficientnet_lite0 (bundled ImageNet weights)",
              "train_per_class": args.train_per_class, "test": "official test split" if args.test_per_class is None
              else f"{args.test_per_class} per class", "results": results, "timings": timings,
              "total_seconds": time.perf_counter() - t0}
    r = results
    print(f"Fashion-MNIST, {r['linear']['num_train']} train / {r['linear']['num_val']} test images, Lite0 ImageNet features")
    print(f"  linear probe      {r['linear']['val_accuracy']:.4f}")
    print(f"  on a {r['subset_size']['train']}/{r['subset_size']['test']} subset: linear probe, ImageNet weights "
          f"{r['subset_linear_real_backbone']:.4f} vs random init {r['subset_linear_random_backbone']:.4f}")
    print(f"  MLP head          {r['mlp']['val_accuracy']:.4f}")
    print(f"  kNN k=10 / k=20   {r['knn_k10_accuracy']:.4f} / {r['knn_k20_accuracy']:.4f}")
    f = r["finetune"]
    print(f"  fine-tune ({f['num_train']} train / {f['num_val']} val): head only {f['head_only_val_accuracy']:.4f} -> "
          f"top 2 blocks {f['val_accuracy']:.4f} (gain {f['gain']:+.4f}), {f['seconds']:.0f} s")
    write_result(result, "fashion", args.quick, args.out)


if __name__ == "__main__":
    main()
