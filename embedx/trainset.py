"""Labelled features for head training: the train / validation split, in memory or on disk.

Small and medium feature sets are read into one contiguous array (`shards.read_features`)
and split. Feature sets that would not fit in memory are *streamed*: the shards are read one
at a time and the train and validation rows are written to two float32 `numpy.memmap` files,
which the solvers then read chunk by chunk (`heads.row_chunks`). Either way the solvers get
plain (N, D) arrays and never hold more than a chunk of a memory-mapped one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import shards
from .errors import FeaturesError, InputError

log = logging.getLogger(__name__)


@dataclass
class TrainingSet:
    x_train: np.ndarray  # (N, D) float32: in memory, or a numpy.memmap when streamed
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    classes: list[str]
    metadata: dict  # the training shards' provenance
    streamed: bool
    val_source: str


def available_memory() -> int:
    """Bytes of memory available to this process (MemAvailable), or 0 if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def should_stream(directories: list, mode: str) -> bool:
    """`stream` yes/no, or auto: stream when the in-memory path (the rows read, plus their
    split copies) would need more than 80% of the memory available now."""
    if mode not in ("auto", "yes", "no"):
        raise InputError("--stream must be auto, yes or no.")
    if mode != "auto":
        return mode == "yes"
    need = sum(shards.count_rows(d) * shards.embedding_dim(d) * 4 * 2 for d in directories)
    avail = available_memory()
    return bool(avail) and need > 0.8 * avail


def labels_of(directory) -> list[str | None]:
    """The label column of a shard directory, in row order (no embeddings read)."""
    if not shards.shard_files(directory):
        raise FeaturesError(f"{directory} holds no feature shards. Run `embedx extract ... --out {directory}` first.")
    out: list[str | None] = []
    for table in shards.iter_shards(directory, columns=["label"]):
        out.extend(table.column("label").to_pylist())
    return out


def class_indices(directory, labels: list[str | None], classes: list[str] | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(positions of labelled rows, their class indices, classes); classes sorted unless given."""
    if not any(lab is not None for lab in labels):
        raise FeaturesError(
            f"{directory} has no labels. Extract with --labels folder from a folder per class "
            "(or a CSV/Parquet list with a 'label' column)."
        )
    keep = np.array([lab is not None for lab in labels])
    if not keep.all():
        log.warning("%d rows without a label in %s are left out", int((~keep).sum()), directory)
    names = [lab for lab in labels if lab is not None]
    if classes is None:
        classes = sorted(set(names))
    lookup = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(names) - set(lookup))
    if unknown:
        raise FeaturesError(f"{directory} has labels the training classes lack: {unknown[:10]}.")
    return np.nonzero(keep)[0], np.array([lookup[n] for n in names], dtype=np.int64), classes


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


def take_rows(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """x[rows], without a copy when `rows` is every row in order (no unlabelled rows left out)."""
    return x if len(rows) == len(x) else x[rows]


def _write_rows(directory, rows: np.ndarray, path: Path, dim: int) -> np.memmap:
    """Copy the rows at sorted positions `rows` of a shard directory into a float32 memmap,
    one shard at a time."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(rows), dim))
    pos = 0  # position of the current shard's first row
    done = 0
    for table in shards.iter_shards(directory, columns=["embedding"]):
        n = table.num_rows
        lo, hi = np.searchsorted(rows, [pos, pos + n])
        if hi > lo:
            out[done:done + hi - lo] = shards.embeddings_of(table)[rows[lo:hi] - pos]
            done += hi - lo
        pos += n
    out.flush()
    return np.load(path, mmap_mode="r")


def load_training_set(features, *, val=None, val_fraction: float = 0.2, seed: int = 0, stream: str = "auto",
                      cache_dir: Path | None = None) -> TrainingSet:
    """The train and validation rows of labelled shard directories.

    Args:
        features: shard directory with labels.
        val: a second shard directory to validate on; else a seeded stratified `val_fraction`.
        stream: auto | yes | no -- write the rows to memory-mapped files in `cache_dir`
            instead of reading them into memory (auto: when they would not fit).
    """
    from .indexer import provenance_mismatch

    metadata = shards.read_metadata(features)
    if val is not None:
        val_meta = shards.read_metadata(val)
        diffs = provenance_mismatch(metadata, val_meta)
        if metadata.get("normalized") != val_meta.get("normalized"):
            diffs.append("normalized differs")
        if diffs:
            raise FeaturesError(f"{features} and --val {val} come from different models or preprocessing: {'; '.join(diffs)}.")
    streamed = should_stream([features] + ([val] if val is not None else []), stream)
    rows, y, classes = class_indices(features, labels_of(features), None)
    if len(classes) < 2:
        raise FeaturesError(f"{features} holds a single class ({classes[0]!r}): a classifier needs two or more.")
    if val is not None:
        val_rows, y_val, _ = class_indices(val, labels_of(val), classes)
        tr, va = np.arange(len(rows)), None
        val_source = str(val)
    else:
        tr, va = stratified_split(y, val_fraction, seed)
        val_source = f"stratified {val_fraction:g} of {features}"
    if len(tr) == 0 or (len(va) if va is not None else len(val_rows)) == 0:
        raise FeaturesError("The train or validation split is empty: give more images per class or --val FEATURES.")
    if streamed:
        if cache_dir is None:
            raise InputError("streaming features needs a cache directory")
        cache_dir.mkdir(parents=True, exist_ok=True)
        log.info("streaming features through memory-mapped files in %s", cache_dir)
        dim = shards.embedding_dim(features)
        x_train = _write_rows(features, rows[tr], cache_dir / "train.npy", dim)
        if val is not None:
            x_val = _write_rows(val, val_rows, cache_dir / "val.npy", dim)
        else:
            x_val, y_val = _write_rows(features, rows[va], cache_dir / "val.npy", dim), y[va]
        return TrainingSet(x_train, y[tr], x_val, y_val, classes, metadata, True, val_source)
    x_all = shards.read_features(features).embeddings
    if val is not None:
        x_val = take_rows(shards.read_features(val).embeddings, val_rows)
        return TrainingSet(take_rows(x_all, rows), y, x_val, y_val, classes, metadata, False, val_source)
    return TrainingSet(x_all[rows[tr]], y[tr], x_all[rows[va]], y[va], classes, metadata, False, val_source)
