"""`embedx info`: a plain summary of a shard directory or of an index directory."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from . import shards


def describe(directory: str | os.PathLike) -> dict:
    """Rows, dimension, provenance, labels and errors of a shard directory."""
    directory = Path(directory)
    files = shards.shard_files(directory)
    manifest = shards.read_manifest(directory) or {}
    meta = shards.read_metadata(directory)
    rows = shards.count_rows(directory)
    labels: Counter = Counter()
    for table in shards.iter_shards(directory, columns=["label"]):
        labels.update(table.column("label").to_pylist())
    errors = shards.read_errors(directory)
    error_kinds = Counter(errors.column("error").to_pylist()) if errors is not None else Counter()
    return {
        "directory": str(directory),
        "rows": rows,
        "shards": len(files),
        "complete": bool(manifest.get("complete", False)),
        "num_images": manifest.get("num_images", rows),
        "updates": len(manifest.get("segments") or [None]) - 1,  # extract --update runs that added rows
        "dim": meta.get("dim"),
        "dtype": meta.get("dtype"),
        "model": meta.get("model"),
        "weights": meta.get("weights_source"),
        "precision": meta.get("precision"),
        "decode": meta.get("decode"),  # what made the pixels, e.g. pil-draft2x+uint8-resize, torchcodec-device
        "preprocess": _preprocess(meta.get("data_config") or {}),
        "pooling": meta.get("pooling"),
        "normalized": meta.get("normalized"),
        "classes": len([k for k in labels if k is not None]),
        "unlabelled": labels.get(None, 0),
        "errors": sum(error_kinds.values()),
        "error_kinds": dict(error_kinds),
        "bytes": sum(f.stat().st_size for f in files),
    }


def _preprocess(dc: dict) -> str | None:
    """'224x224, crop 0.875 (center), bilinear': the data config that made the pixels."""
    if not dc.get("input_size"):
        return None
    _, h, w = dc["input_size"]
    return f"{h}x{w}, crop {dc.get('crop_pct')} ({dc.get('crop_mode')}), {dc.get('interpolation')}"


def describe_index(directory: str | os.PathLike) -> dict:
    """Vectors, index type, measured recall and speed, provenance and sources of an index directory."""
    from . import index as fx

    info = fx.read_info(Path(directory))
    prov = info.get("provenance") or {}
    param = info.get("search_param")
    return {
        "directory": str(directory),
        "vectors": info["num_vectors"],
        "dim": info["dim"],
        "metric": info["metric"],
        "factory": info["factory"],
        "search": f"{param}={info.get('search_value')}" if param else "exact",
        "k": info.get("k"),
        "recall_at_k": info.get("recall_at_k"),  # measured against exact search on held-out queries
        "target_recall": info.get("target_recall"),
        "target_reached": info.get("target_reached"),
        "recall_measured_at_vectors": info.get("measured_at_vectors"),  # build, or the last `index add` that measured
        "qps": round(info.get("qps") or 0),
        "exact_qps": round(info.get("exact_qps") or 0),
        "bytes": info.get("index_bytes"),
        "on_disk": info.get("on_disk"),
        "model": prov.get("model"),
        "pooling": prov.get("pooling"),
        "normalized": prov.get("normalized"),
        "sources": {s["features"]: s["rows"] for s in info.get("sources", [])},
    }
