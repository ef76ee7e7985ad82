"""Linear heads on cached features: embedx vs scikit-learn, and a sweep vs one head.

Structured synthetic features shaped like real ones (10 classes, several sub-clusters per
class in a low-dimensional latent space, projected to 1280-d with noise; classes overlap so
accuracy is well below 1), or real features with --features DIR. Reports, in one run:

* embedx linear head vs scikit-learn LogisticRegression (lbfgs): fit seconds, their ratio,
  and validation accuracy of each;
* a sweep of 12 heads trained in one pass vs one head: seconds and their ratio.

    python benchmarks/bench_heads.py --n 100000 --dim 1280
    python benchmarks/bench_heads.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def structured_features(n: int, dim: int, classes: int = 10, latent: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    sub = 5
    centres = rng.standard_normal((classes, sub, latent)).astype(np.float32)
    y = rng.integers(0, classes, n)
    z = centres[y, rng.integers(0, sub, n)] + 1.1 * rng.standard_normal((n, latent)).astype(np.float32)
    proj = rng.standard_normal((latent, dim)).astype(np.float32) / np.sqrt(latent)
    x = np.maximum(z @ proj + 0.5 * rng.standard_normal((n, dim)).astype(np.float32), 0)  # ReLU-like, as CNN features
    return x.astype(np.float32), y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--features", type=Path, default=None, help="use a labelled shard directory instead")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--sklearn-max-iter", type=int, default=100)
    ap.add_argument("--device", default="cpu", help="where embedx trains the heads (cpu | cuda)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import torch
    from sklearn.linear_model import LogisticRegression

    from embedx.heads import HeadSpec, build_grid, train_grid

    if args.quick:
        args.n, args.dim, args.epochs, args.sklearn_max_iter = 2000, 64, 3, 20
    if args.features is not None:
        from embedx.train import load_labelled

        data, classes = load_labelled(args.features)
        x, y = data.x, data.y
        source = str(args.features)
    else:
        x, y = structured_features(args.n, args.dim)
        source = f"structured synthetic {args.n} x {args.dim}"
    num_classes = int(y.max()) + 1
    rng = np.random.default_rng(1)
    perm = rng.permutation(len(y))
    n_val = len(y) // 5
    va, tr = perm[:n_val], perm[n_val:]
    xtr, ytr, xva, yva = x[tr], y[tr], x[va], y[va]

    one = [HeadSpec("linear", 1e-3, 1e-4)]
    # warm-up: the first optimiser step imports a few seconds of torch modules; time the training
    train_grid(xtr[:256], ytr[:256], xva[:64], yva[:64], num_classes, one, epochs=1, batch_size=128, device=args.device)
    t0 = time.perf_counter()
    r1 = train_grid(xtr, ytr, xva, yva, num_classes, one, epochs=args.epochs, batch_size=1024, patience=10**9,
                    device=args.device)
    t_one = time.perf_counter() - t0
    grid = build_grid("linear", [1e-3, 3e-3, 1e-2], [0.0, 1e-4, 1e-3, 1e-2], 0, 0.0)
    t0 = time.perf_counter()
    rg = train_grid(xtr, ytr, xva, yva, num_classes, grid, epochs=args.epochs, batch_size=1024, patience=10**9,
                    device=args.device)
    t_grid = time.perf_counter() - t0

    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    t0 = time.perf_counter()
    clf = LogisticRegression(max_iter=args.sklearn_max_iter)
    clf.fit((xtr - mean) / std, ytr)
    t_sk = time.perf_counter() - t0
    acc_sk = float((clf.predict((xva - mean) / std) == yva).mean())

    result = {
        "benchmark": "heads", "data": source, "num_train": int(len(ytr)), "num_val": int(len(yva)),
        "classes": num_classes, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "embedx_device": args.device,
        "embedx_one_head": {"seconds": t_one, "val_accuracy": r1.val_accuracy[0], "epochs": args.epochs},
        "embedx_sweep": {"heads": len(grid), "seconds": t_grid, "best_val_accuracy": max(rg.val_accuracy)},
        "sklearn_logreg": {"seconds": t_sk, "val_accuracy": acc_sk, "max_iter": args.sklearn_max_iter,
                           "n_iter": int(np.max(clf.n_iter_))},
        "sklearn_over_embedx_time": t_sk / t_one,
        "accuracy_difference_embedx_minus_sklearn": r1.val_accuracy[0] - acc_sk,
        "sweep_over_one_head_time": t_grid / t_one,
    }
    print(f"{source}, {num_classes} classes, {torch.get_num_threads()} threads")
    print(f"  embedx linear head : {t_one:8.2f} s   val acc {r1.val_accuracy[0]:.4f}")
    print(f"  sklearn LogReg     : {t_sk:8.2f} s   val acc {acc_sk:.4f}   ({result['sklearn_over_embedx_time']:.1f}x slower)")
    print(f"  sweep of {len(grid)} heads   : {t_grid:8.2f} s   best val acc {max(rg.val_accuracy):.4f}   "
          f"({result['sweep_over_one_head_time']:.2f}x one head)")
    out = args.out or HERE / "results" / ("heads_quick.json" if args.quick else "heads.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
