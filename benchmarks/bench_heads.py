"""Linear heads on cached features: embedx vs scikit-learn, and a sweep vs one head.

Structured synthetic features shaped like real ones (10 classes, several sub-clusters per
class in a low-dimensional latent space, projected to 1280-d with noise, so the features are
strongly correlated as CNN features are; --noise sets how much the classes overlap), or real
features with --features DIR. Reports, in one run:

* embedx's default linear head (L-BFGS) vs scikit-learn LogisticRegression (lbfgs) on the
  *same objective* (sklearn's default C=1, i.e. embedx l2 = 1/n): fit seconds, their ratio,
  the objective each reached and validation accuracy of each;
* the L-BFGS sweep over embedx's default grid of L2 strengths (10) vs one head;
* the mini-batch AdamW solver (one head, and a 12-head lr x wd sweep in one pass), as before.

    python benchmarks/bench_heads.py --n 100000 --dim 1280
    python benchmarks/bench_heads.py --quick
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from _results import write_result

import numpy as np



def structured_features(n: int, dim: int, classes: int = 10, latent: int = 64, noise: float = 1.8, seed: int = 0):
    rng = np.random.default_rng(seed)
    sub = 5
    centres = rng.standard_normal((classes, sub, latent)).astype(np.float32)
    y = rng.integers(0, classes, n)
    z = centres[y, rng.integers(0, sub, n)] + noise * rng.standard_normal((n, latent)).astype(np.float32)
    proj = rng.standard_normal((latent, dim)).astype(np.float32) / np.sqrt(latent)
    x = np.maximum(z @ proj + 0.5 * rng.standard_normal((n, dim)).astype(np.float32), 0)  # ReLU-like, as CNN features
    return x.astype(np.float32), y


def objective(x, y, W, b, l2) -> float:
    """Mean cross-entropy + l2/2 ||W||^2 (float64): the objective both solvers minimise."""
    z = x.astype(np.float64) @ W.T.astype(np.float64) + b
    z -= z.max(1, keepdims=True)
    nll = np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]
    return float(nll.mean() + 0.5 * l2 * (W.astype(np.float64) ** 2).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--noise", type=float, default=1.8, help="latent noise of the synthetic features")
    ap.add_argument("--features", type=Path, default=None, help="use a labelled shard directory instead")
    ap.add_argument("--epochs", type=int, default=10, help="AdamW epochs")
    ap.add_argument("--sklearn-max-iter", type=int, default=100)
    ap.add_argument("--device", default="cpu", help="where embedx trains the heads (cpu | cuda)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import torch
    from sklearn.linear_model import LogisticRegression

    from embedx.heads import HeadSpec, build_grid, build_l2_grid, train_grid, train_lbfgs
    from embedx.train import HeadConfig

    if args.quick:
        args.n, args.dim, args.epochs, args.sklearn_max_iter = 2000, 64, 3, 20
    if args.features is not None:
        from embedx.train import load_labelled

        data, classes = load_labelled(args.features)
        x, y = data.x, data.y
        source = str(args.features)
    else:
        x, y = structured_features(args.n, args.dim, noise=args.noise)
        source = f"structured synthetic {args.n} x {args.dim}, noise {args.noise:g}"
    num_classes = int(y.max()) + 1
    rng = np.random.default_rng(1)
    perm = rng.permutation(len(y))
    n_val = len(y) // 5
    va, tr = perm[:n_val], perm[n_val:]
    xtr, ytr, xva, yva = x[tr], y[tr], x[va], y[va]
    dev = args.device
    l2_sk = 1.0 / len(ytr)  # sklearn's C=1 on the mean-loss scale

    # warm-up: first calls import torch modules and start thread pools; time the training only
    train_lbfgs(xtr[:256], ytr[:256], xva[:64], yva[:64], num_classes, build_l2_grid([l2_sk]), device=dev)
    train_grid(xtr[:256], ytr[:256], xva[:64], yva[:64], num_classes, [HeadSpec("linear", 1e-3, 1e-4)], epochs=1,
               batch_size=128, device=dev)

    t0 = time.perf_counter()
    one = train_lbfgs(xtr, ytr, xva, yva, num_classes, build_l2_grid([l2_sk]), device=dev)
    t_one = time.perf_counter() - t0
    l2s = list(HeadConfig().l2s)
    t0 = time.perf_counter()
    sweep = train_lbfgs(xtr, ytr, xva, yva, num_classes, build_l2_grid(l2s), device=dev)
    t_sweep = time.perf_counter() - t0

    t0 = time.perf_counter()
    r1 = train_grid(xtr, ytr, xva, yva, num_classes, [HeadSpec("linear", 1e-3, 1e-4)], epochs=args.epochs,
                    batch_size=1024, patience=10**9, device=dev)
    t_adam = time.perf_counter() - t0
    grid = build_grid("linear", [1e-3, 3e-3, 1e-2], [0.0, 1e-4, 1e-3, 1e-2], 0, 0.0)
    t0 = time.perf_counter()
    rg = train_grid(xtr, ytr, xva, yva, num_classes, grid, epochs=args.epochs, batch_size=1024, patience=10**9,
                    device=dev)
    t_adam_grid = time.perf_counter() - t0

    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    xs, xvs = (xtr - mean) / std, (xva - mean) / std
    t0 = time.perf_counter()
    clf = LogisticRegression(max_iter=args.sklearn_max_iter)
    clf.fit(xs, ytr)
    t_sk = time.perf_counter() - t0
    acc_sk = float((clf.predict(xvs) == yva).mean())
    head = one.best_head
    w, b = head.fc.weight.detach().numpy(), head.fc.bias.detach().numpy()
    # embedx's head standardises with its own stats (std without the 1e-6): same rows up to 1e-6
    obj_embedx = objective((xtr - head.mean.numpy()) / head.std.numpy(), ytr, w, b, l2_sk)
    obj_sk = objective(xs, ytr, clf.coef_, clf.intercept_, l2_sk)

    result = {
        "benchmark": "heads", "data": source, "num_train": int(len(ytr)), "num_val": int(len(yva)),
        "classes": num_classes, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "embedx_device": dev,
        "embedx_lbfgs_one_head": {"seconds": t_one, "val_accuracy": one.val_accuracy[0], "l2": l2_sk,
                                  "iterations": one.best_epoch[0], "objective": obj_embedx},
        "sklearn_logreg": {"seconds": t_sk, "val_accuracy": acc_sk, "C": 1.0, "max_iter": args.sklearn_max_iter,
                           "n_iter": int(np.max(clf.n_iter_)), "objective": obj_sk},
        "sklearn_over_embedx_time": t_sk / t_one,
        "accuracy_difference_embedx_minus_sklearn": one.val_accuracy[0] - acc_sk,
        "objective_difference_embedx_minus_sklearn": obj_embedx - obj_sk,
        "embedx_lbfgs_sweep": {"heads": len(l2s), "l2s": l2s, "seconds": t_sweep,
                               "val_accuracy": sweep.val_accuracy, "iterations": sweep.best_epoch,
                               "best_val_accuracy": max(sweep.val_accuracy)},
        "lbfgs_sweep_over_one_head_time": t_sweep / t_one,
        "embedx_adamw_one_head": {"seconds": t_adam, "val_accuracy": r1.val_accuracy[0], "epochs": args.epochs},
        "embedx_adamw_sweep": {"heads": len(grid), "seconds": t_adam_grid, "best_val_accuracy": max(rg.val_accuracy)},
        "adamw_sweep_over_one_head_time": t_adam_grid / t_adam,
    }
    print(f"{source}, {num_classes} classes, {torch.get_num_threads()} threads, embedx on {dev}")
    print(f"  embedx linear head, L-BFGS : {t_one:7.2f} s  val acc {one.val_accuracy[0]:.4f}  objective {obj_embedx:.6f}"
          f"  ({one.best_epoch[0]} steps)")
    print(f"  sklearn LogisticRegression : {t_sk:7.2f} s  val acc {acc_sk:.4f}  objective {obj_sk:.6f}"
          f"  ({int(np.max(clf.n_iter_))} steps)  -> embedx {t_sk / t_one:.1f}x faster")
    print(f"  L-BFGS sweep of {len(l2s)} heads   : {t_sweep:7.2f} s  best val acc {max(sweep.val_accuracy):.4f}"
          f"  ({t_sweep / t_one:.2f}x one head)")
    print(f"  AdamW one head ({args.epochs} ep)  : {t_adam:7.2f} s  val acc {r1.val_accuracy[0]:.4f}")
    print(f"  AdamW sweep of {len(grid)} heads   : {t_adam_grid:7.2f} s  best val acc {max(rg.val_accuracy):.4f}"
          f"  ({t_adam_grid / t_adam:.2f}x one head)")
    write_result(result, "heads", args.quick, args.out)


if __name__ == "__main__":
    main()
