"""`train-head`: classifiers on cached feature shards, evaluated and saved with provenance.

HEAD_DIR receives::

    head.safetensors   the chosen head (standardisation mean/std included)
    config.json        head type, classes in order, chosen hyper-parameters, feature provenance
    metrics.json       val/train accuracy, top-5, kNN baselines, the whole sweep table
    confusion.png      row-normalised confusion matrix on the validation split
    per_class.csv      precision / recall / F1 / support per class
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import shards
from .errors import FeaturesError, InputError
from .indexer import provenance_mismatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadConfig:
    head: str = "linear"  # linear | mlp
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    weight_decays: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2)
    hidden: int = 512
    dropout: float = 0.5
    epochs: int = 100
    batch_size: int = 1024
    patience: int = 10
    val_fraction: float = 0.2
    class_weights: str = "none"  # none | balanced
    knn: bool = True
    device: str = "auto"
    seed: int = 0


@dataclass
class LabelledFeatures:
    x: np.ndarray
    y: np.ndarray
    paths: list[str]
    metadata: dict


def load_labelled(directory, classes: list[str] | None = None) -> tuple[LabelledFeatures, list[str]]:
    """Features with labels; classes are sorted label names unless given."""
    f = shards.read_features(directory)
    labels = f.labels
    if not any(lab is not None for lab in labels):
        raise FeaturesError(
            f"{directory} has no labels. Extract with --labels folder from a folder per class "
            "(or a CSV/Parquet list with a 'label' column)."
        )
    keep = np.array([lab is not None for lab in labels])
    if not keep.all():
        log.warning("%d rows without a label are left out", int((~keep).sum()))
    names = [lab for lab in labels if lab is not None]
    if classes is None:
        classes = sorted(set(names))
    lookup = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(names) - set(lookup))
    if unknown:
        raise FeaturesError(f"{directory} has labels the training classes lack: {unknown[:10]}.")
    y = np.array([lookup[n] for n in names], dtype=np.int64)
    x = f.embeddings[keep] if not keep.all() else f.embeddings
    paths = [p for p, k in zip(f.paths, keep) if k]
    return LabelledFeatures(x, y, paths, f.metadata), classes


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split; every class with 2+ samples puts at least one in validation."""
    if not 0 < fraction < 1:
        raise InputError("--val-fraction must be between 0 and 1.")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.nonzero(y == c)[0])
        n_val = int(round(len(idx) * fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        else:
            n_val = 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def balanced_weights(y: np.ndarray, num_classes: int) -> np.ndarray:
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    return (len(y) / (num_classes * np.maximum(counts, 1))).astype(np.float32)


def evaluate(proba_val, y_val, proba_train, y_train, classes) -> tuple[dict, np.ndarray, list[dict]]:
    from .metrics import confusion_matrix, per_class_report, top_k_accuracy

    pred = proba_val.argmax(1)
    cm = confusion_matrix(y_val, pred, len(classes))
    report = per_class_report(cm, classes)
    metrics = {
        "val_accuracy": float((pred == y_val).mean()),
        "val_top5_accuracy": top_k_accuracy(proba_val, y_val, 5),
        "train_accuracy": float((proba_train.argmax(1) == y_train).mean()),
        "val_macro_f1": float(np.mean([r["f1"] for r in report])),
    }
    return metrics, cm, report


def save_outputs(out: Path, head, config: dict, metrics: dict, cm: np.ndarray, report: list[dict], classes: list[str]) -> None:
    from safetensors.torch import save_file

    from .metrics import write_confusion_png, write_per_class_csv

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out / "head.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_confusion_png(cm, classes, out / "confusion.png")
    write_per_class_csv(report, out / "per_class.csv")


def train_head(features, out, config: HeadConfig = HeadConfig(), *, val=None) -> dict:
    """Train a sweep of heads on cached features, keep the best on validation, save it.

    Args:
        features: shard directory with labels.
        out: HEAD_DIR to write.
        config: head type, sweep, training and validation settings.
        val: optional second shard directory used as the validation split.

    Returns:
        The metrics dict written to metrics.json.
    """
    from .backbone import resolve_device
    from .heads import build_grid, predict_proba, train_grid
    from .knn import knn_accuracy

    t0 = time.perf_counter()
    device = resolve_device(config.device)
    data, classes = load_labelled(features)
    if len(classes) < 2:
        raise FeaturesError(f"{features} holds a single class ({classes[0]!r}): a classifier needs two or more.")
    if val is not None:
        val_data, _ = load_labelled(val, classes)
        diffs = provenance_mismatch(data.metadata, val_data.metadata)
        if data.metadata.get("normalized") != val_data.metadata.get("normalized"):
            diffs.append("normalized differs")
        if diffs:
            raise FeaturesError(f"{features} and --val {val} come from different models or preprocessing: {'; '.join(diffs)}.")
        xtr, ytr, xva, yva = data.x, data.y, val_data.x, val_data.y
    else:
        tr, va = stratified_split(data.y, config.val_fraction, config.seed)
        xtr, ytr, xva, yva = data.x[tr], data.y[tr], data.x[va], data.y[va]
    if len(ytr) == 0 or len(yva) == 0:
        raise FeaturesError("The train or validation split is empty: give more images per class or --val FEATURES.")
    num_classes = len(classes)
    specs = build_grid(config.head, list(config.lrs), list(config.weight_decays), config.hidden, config.dropout)
    cw = balanced_weights(ytr, num_classes) if config.class_weights == "balanced" else None
    if config.class_weights not in ("none", "balanced"):
        raise InputError("--class-weights must be none or balanced.")
    # small datasets: at least ~10 steps an epoch, or a few epochs are only a few steps
    batch_size = max(1, min(config.batch_size, max(64, len(ytr) // 10)))
    grid = train_grid(xtr, ytr, xva, yva, num_classes, specs, epochs=config.epochs, batch_size=batch_size,
                      patience=config.patience, class_weights=cw, device=device, seed=config.seed)
    train_seconds = time.perf_counter() - t0
    metrics, cm, report = evaluate(predict_proba(grid.best_head, xva), yva, predict_proba(grid.best_head, xtr), ytr, classes)
    best = grid.specs[grid.best_index]
    metrics.update({
        "num_classes": num_classes,
        "classes": classes,
        "num_train": int(len(ytr)),
        "num_val": int(len(yva)),
        "head": best.kind,
        "best": {"lr": best.lr, "weight_decay": best.weight_decay, "epoch": grid.best_epoch[grid.best_index]},
        "sweep": [{"name": s.name, "lr": s.lr, "weight_decay": s.weight_decay, "val_accuracy": a, "best_epoch": e}
                  for s, a, e in zip(grid.specs, grid.val_accuracy, grid.best_epoch)],
        "epochs_run": grid.epochs_run,
        "batch_size": batch_size,
        "train_seconds": train_seconds,
        "val_source": str(val) if val is not None else f"stratified {config.val_fraction:g} of {features}",
    })
    if config.knn:
        metrics.update(knn_accuracy(xtr, ytr, xva, yva, num_classes, device=device))
    head_config = {
        "kind": "head",
        "head": best.kind,
        "hidden": best.hidden,
        "dropout": best.dropout,
        "dim": int(xtr.shape[1]),
        "classes": classes,
        "standardize": "mean/std of the training split, stored in head.safetensors",
        "hyperparameters": {"lr": best.lr, "weight_decay": best.weight_decay},
        "provenance": data.metadata,
        "features": str(Path(features).resolve()),
        "train_config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
    }
    save_outputs(Path(out), grid.best_head, head_config, metrics, cm, report, classes)
    return metrics


def load_head(head_dir: str | os.PathLike):
    """(Head module in eval mode, config dict) from a HEAD_DIR."""
    from safetensors.torch import load_file

    from .heads import make_head

    head_dir = Path(head_dir)
    cfg_path = head_dir / "config.json"
    if not cfg_path.exists():
        raise InputError(f"{head_dir} is not a head directory (no config.json). Train one with `embedx train-head`.")
    cfg = json.loads(cfg_path.read_text())
    head = make_head(cfg["head"], cfg["dim"], len(cfg["classes"]), cfg.get("hidden") or 1, cfg.get("dropout") or 0.0)
    head.load_state_dict(load_file(str(head_dir / "head.safetensors")))
    return head.eval(), cfg
