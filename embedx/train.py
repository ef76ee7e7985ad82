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
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import shards
from .errors import InputError
from .trainset import TrainingSet, class_indices, load_training_set, take_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadConfig:
    head: str = "linear"  # linear | mlp
    solver: str = "auto"  # auto (lbfgs for linear, adamw for mlp) | lbfgs | adamw
    # lbfgs sweep; strong L2 wins on small training sets (Fashion-MNIST, 3,000 rows x 1280: 0.1 was
    # the best of a grid that ended there), weak L2 on large ones
    l2s: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
    max_iter: int = 200  # lbfgs steps
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)  # adamw sweep: every lr with every weight decay
    weight_decays: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2)
    hidden: int = 512
    dropout: float = 0.5
    epochs: int = 100
    batch_size: int = 1024
    patience: int = 10
    val_fraction: float = 0.2
    class_weights: str = "none"  # none | balanced
    knn: bool = True
    stream: str = "auto"  # auto | yes | no: memory-map the features instead of loading them
    device: str = "auto"
    seed: int = 0

    def resolved_solver(self) -> str:
        from .heads import SOLVERS

        solver = {"linear": "lbfgs", "mlp": "adamw"}.get(self.head, "adamw") if self.solver == "auto" else self.solver
        if solver not in SOLVERS:
            raise InputError(f"--solver must be auto, lbfgs or adamw, not {self.solver!r}.")
        if solver == "lbfgs" and self.head != "linear":
            raise InputError("--solver lbfgs trains linear heads only; use --solver adamw for an mlp head.")
        return solver


@dataclass
class LabelledFeatures:
    x: np.ndarray
    y: np.ndarray
    paths: list[str]
    metadata: dict


def load_labelled(directory, classes: list[str] | None = None) -> tuple[LabelledFeatures, list[str]]:
    """All labelled rows of a shard directory in memory; classes are sorted label names unless given."""
    f = shards.read_features(directory)
    rows, y, classes = class_indices(directory, f.labels, classes)
    return LabelledFeatures(take_rows(f.embeddings, rows), y, [f.paths[i] for i in rows], f.metadata), classes


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
        config: head type, solver, sweep, training and validation settings.
        val: optional second shard directory used as the validation split.

    Returns:
        The metrics dict written to metrics.json.
    """
    from .backbone import resolve_device
    from .heads import predict_proba
    from .knn import knn_accuracy

    t0 = time.perf_counter()
    device = resolve_device(config.device)
    solver = config.resolved_solver()
    if config.class_weights not in ("none", "balanced"):
        raise InputError("--class-weights must be none or balanced.")
    out = Path(out)
    cache = out / "_stream"
    try:
        data = load_training_set(features, val=val, val_fraction=config.val_fraction, seed=config.seed,
                                 stream=config.stream, cache_dir=cache)
        metrics, head, best = _fit(data, config, solver, device)
        metrics["train_seconds"] = time.perf_counter() - t0
        classes = data.classes
        xtr, ytr, xva, yva = data.x_train, data.y_train, data.x_val, data.y_val
        scores, cm, report = evaluate(predict_proba(head, xva, device=device), yva,
                                      predict_proba(head, xtr, device=device), ytr, classes)
        metrics = {**scores, **metrics, "val_source": data.val_source, "streamed": data.streamed}
        if config.knn:
            metrics.update(knn_accuracy(xtr, ytr, xva, yva, len(classes), device=device))
        dim = int(xtr.shape[1])
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    head_config = {
        "kind": "head",
        "head": best.kind,
        "hidden": best.hidden,
        "dropout": best.dropout,
        "dim": dim,
        "classes": classes,
        "standardize": "mean/std of the training split, stored in head.safetensors",
        "hyperparameters": best.hyperparameters(),
        "provenance": data.metadata,
        "features": str(Path(features).resolve()),
        "train_config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
    }
    save_outputs(out, head, head_config, metrics, cm, report, classes)
    return metrics


def _fit(data: TrainingSet, config: HeadConfig, solver: str, device: str):
    """Train the sweep with `solver`; (metrics without accuracies, best head, its spec)."""
    from .heads import build_grid, build_l2_grid, train_grid, train_lbfgs

    num_classes = len(data.classes)
    xtr, ytr = data.x_train, data.y_train
    cw = balanced_weights(ytr, num_classes) if config.class_weights == "balanced" else None
    if solver == "lbfgs":
        specs = build_l2_grid(list(config.l2s))
        grid = train_lbfgs(xtr, ytr, data.x_val, data.y_val, num_classes, specs, max_iter=config.max_iter,
                           class_weights=cw, device=device, seed=config.seed)
        steps = "iterations"
        extra = {"max_iter": config.max_iter}
    else:
        specs = build_grid(config.head, list(config.lrs), list(config.weight_decays), config.hidden, config.dropout)
        # small datasets: at least ~10 steps an epoch, or a few epochs are only a few steps
        batch_size = max(1, min(config.batch_size, max(64, len(ytr) // 10)))
        grid = train_grid(xtr, ytr, data.x_val, data.y_val, num_classes, specs, epochs=config.epochs,
                          batch_size=batch_size, patience=config.patience, class_weights=cw, device=device,
                          seed=config.seed)
        steps = "best_epoch"
        extra = {"epochs_run": grid.epochs_run, "batch_size": batch_size}
    best = grid.specs[grid.best_index]
    metrics = {
        "num_classes": num_classes,
        "classes": data.classes,
        "num_train": int(len(ytr)),
        "num_val": int(len(data.y_val)),
        "head": best.kind,
        "solver": solver,
        "best": {**best.hyperparameters(), steps: grid.best_epoch[grid.best_index]},
        "sweep": [{"name": s.name, **s.hyperparameters(), "val_accuracy": a, steps: e,
                   **({"stop": grid.stops[i]} if grid.stops else {})}
                  for i, (s, a, e) in enumerate(zip(grid.specs, grid.val_accuracy, grid.best_epoch))],
        **extra,
    }
    return metrics, grid.best_head, best


def load_head(head_dir: str | os.PathLike):
    """(Head module in eval mode, config dict) from a HEAD_DIR."""
    from safetensors.torch import load_file

    from .heads import make_head

    head_dir = Path(head_dir)
    cfg_path = head_dir / "config.json"
    if not cfg_path.exists():
        raise InputError(f"{head_dir} is not a head directory (no config.json). Train one with `embedx train-head`.")
    retrain = "Train it again (the `embedx train-head` or `embedx finetune` command that wrote it)."
    try:
        cfg = json.loads(cfg_path.read_text())
        head = make_head(cfg["head"], cfg["dim"], len(cfg["classes"]), cfg.get("hidden") or 1, cfg.get("dropout") or 0.0)
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{cfg_path} is damaged ({type(e).__name__}: {e}). {retrain}") from None
    weights = head_dir / "head.safetensors"
    if not weights.exists():
        raise InputError(f"{weights} is missing. {retrain}")
    try:
        state = load_file(str(weights))
    except Exception as e:  # noqa: BLE001 - safetensors' SafetensorError (header, truncation) and OSError
        raise InputError(f"{weights} cannot be read ({type(e).__name__}: {e}): the file is damaged. {retrain}") from None
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise InputError(f"{weights} does not fit {cfg_path} ({str(e).splitlines()[0]}). {retrain}") from None
    return head.eval(), cfg
