"""Classification metrics and the confusion-matrix picture (drawn with PIL: no matplotlib)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def top_k_accuracy(proba: np.ndarray, y: np.ndarray, k: int) -> float:
    if len(y) == 0:
        return float("nan")
    k = min(k, proba.shape[1])
    topk = np.argpartition(-proba, k - 1, axis=1)[:, :k]
    return float((topk == y[:, None]).any(1).mean())


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def per_class_report(cm: np.ndarray, classes: list[str]) -> list[dict]:
    """Precision, recall, F1 and support per class (rows of cm: truth, columns: prediction)."""
    tp = np.diag(cm).astype(np.float64)
    pred = cm.sum(0)
    true = cm.sum(1)
    rows = []
    for i, c in enumerate(classes):
        p = tp[i] / pred[i] if pred[i] else 0.0
        r = tp[i] / true[i] if true[i] else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        rows.append({"class": c, "precision": p, "recall": r, "f1": f1, "support": int(true[i])})
    return rows


def write_per_class_csv(rows: list[dict], path: str | os.PathLike) -> None:
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["class", "precision", "recall", "f1", "support"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, **{k: f"{r[k]:.4f}" for k in ("precision", "recall", "f1")}})


def write_confusion_png(cm: np.ndarray, classes: list[str], path: str | os.PathLike, cell: int = 36) -> Path:
    """Row-normalised confusion matrix as a PNG heat map with counts."""
    from PIL import Image, ImageDraw, ImageFont

    n = len(classes)
    font = ImageFont.load_default()
    margin = 12 + 7 * min(24, max((len(c) for c in classes), default=1))
    size = (margin + n * cell + 10, margin + n * cell + 30)
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    for i in range(n):
        for j in range(n):
            v = float(norm[i, j])
            colour = (int(255 - 200 * v), int(255 - 120 * v), 255)
            x0, y0 = margin + j * cell, margin + i * cell
            d.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=colour, outline=(220, 220, 220))
            d.text((x0 + 3, y0 + cell // 3), str(int(cm[i, j])), fill="black" if v < 0.6 else "white", font=font)
        label = classes[i][:24]
        d.text((4, margin + i * cell + cell // 3), label, fill="black", font=font)
        d.text((margin + i * cell + 2, margin - 14), label[:5], fill="black", font=font)
    d.text((margin, margin + n * cell + 8), "rows: true class, columns: predicted", fill="black", font=font)
    path = Path(path)
    img.save(path)
    return path
