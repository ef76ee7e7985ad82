"""`predict`: classify new images (backbone + head) or existing shards (head only)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FeaturesError, InputError
from .indexer import provenance_mismatch


@dataclass(frozen=True)
class Predictions:
    paths: list[str]
    proba: np.ndarray  # (n, num_classes)
    classes: list[str]
    failures: list[tuple[str, str]]

    def top_k(self, k: int):
        k = min(k, len(self.classes))
        order = np.argsort(-self.proba, axis=1, kind="stable")[:, :k]
        return order, np.take_along_axis(self.proba, order, 1)

    def top_k_labels(self, k: int) -> tuple[list[list[str]], np.ndarray]:
        """Per image, the k most probable class names (most probable first) and their probabilities."""
        order, probs = self.top_k(k)
        return [[self.classes[j] for j in row] for row in order], probs


def _is_shard_dir(p: Path) -> bool:
    return p.is_dir() and ((p / "manifest.json").exists() or any(p.glob("part-*.parquet")))


def predict(head_dir, inputs: list[str], *, device: str = "auto", batch_size: int | None = None,
            isolate: bool = False) -> Predictions:
    """Class probabilities for images or shard directories, with the head in `head_dir`.
    `isolate`: images are decoded in a process of their own (`_isolated.DecodeProcess`), so that
    one that crashes the decoding library is a failure, not the end of the run; its start-up
    (~2.7 s on 2 cores, the imports of a fresh interpreter) is why it is not the default:
    256 photos took 4.5 s instead of 1.8, one photo 2.9 s instead of 0.2."""
    from . import shards
    from ._isolated import DecodeProcess
    from .backbone import load_backbone, load_backbone_for
    from .extractor import embed_files
    from .heads import predict_proba
    from .images import list_images
    from .train import load_head

    head, cfg = load_head(head_dir)
    head_dir = Path(head_dir)
    prov = cfg["provenance"]
    paths: list[str] = []
    feats: list[np.ndarray] = []
    failures: list[tuple[str, str]] = []
    image_inputs = []
    for raw in inputs:
        p = Path(raw)
        if _is_shard_dir(p):
            f = shards.read_features(p)
            if cfg["kind"] == "finetune" and f.metadata.get("weights_sha256") != cfg.get("backbone_sha256"):
                raise FeaturesError(
                    f"{p} was extracted with another backbone than this fine-tuned head's. Give images, or "
                    f"re-extract with --weights {head_dir / 'backbone.safetensors'}."
                )
            diffs = [] if cfg["kind"] == "finetune" else provenance_mismatch(prov, f.metadata)
            if cfg["kind"] != "finetune" and bool(prov.get("normalized")) != bool(f.metadata.get("normalized")):
                diffs.append("normalized differs")
            if diffs:
                raise FeaturesError(f"{p} does not match the head's features: {'; '.join(diffs)}.")
            paths += f.paths
            feats.append(f.embeddings)
        else:
            image_inputs.append(raw)
    if image_inputs:
        files = [r.file for r in list_images(image_inputs, labels="none").records]
        # started now, its imports overlap loading the backbone
        decoder = DecodeProcess() if isolate and files else None
        if decoder is not None:
            decoder.start()
        try:
            if cfg["kind"] == "finetune":
                backbone = load_backbone(cfg["model"], str(head_dir / cfg["backbone_weights"]))
                backbone = backbone.as_recorded(cfg.get("provenance"))
                normalize, precision = False, "fp32"
            else:
                backbone = load_backbone_for(prov)
                normalize, precision = bool(prov.get("normalized")), prov.get("precision", "fp32")
            emb = embed_files(files, backbone, device=device, precision=precision, normalize=normalize,
                              batch_size=batch_size, decoder=decoder)
        finally:
            if decoder is not None:
                decoder.close()
        paths += [f for f, ok in zip(files, emb.ok) if ok]
        failures += [(f, f"{e[0]}: {e[1]}") for f, ok, e in zip(files, emb.ok, emb.errors) if not ok]
        feats.append(emb.embeddings)
    if not feats:
        raise InputError("Nothing to predict: give images, image folders or shard directories.")
    x = np.concatenate(feats)
    if x.shape[1] != cfg["dim"]:
        raise FeaturesError(f"Features have dimension {x.shape[1]}, the head expects {cfg['dim']}.")
    return Predictions(paths, predict_proba(head, x), cfg["classes"], failures)


def write_predictions(pred: Predictions, out: str | os.PathLike, k: int = 5) -> Path:
    """Parquet (default) or CSV (by suffix): path, predicted, probability, top-k labels and probabilities."""
    import pyarrow as pa

    out = Path(out)
    labels, probs = pred.top_k_labels(k)
    table = pa.table({
        "path": pa.array(pred.paths, pa.string()),
        "predicted": pa.array([row[0] for row in labels], pa.string()),
        "probability": pa.array(probs[:, 0].astype(np.float32)),
        "top_k": pa.array(labels, pa.list_(pa.string())),
        "top_k_probability": pa.array([row.astype(np.float32) for row in probs], pa.list_(pa.float32())),
    })
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        import csv

        with open(out, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "predicted", "probability", "top_k", "top_k_probability"])
            for p, lab, pr in zip(pred.paths, labels, probs):
                w.writerow([p, lab[0], f"{pr[0]:.6f}", ";".join(lab), ";".join(f"{v:.6f}" for v in pr)])
    else:
        import pyarrow.parquet as pq

        pq.write_table(table, out)
    return out


def table_lines(pred: Predictions, k: int = 5):
    """The predictions as tab-separated lines for a terminal (header first): path, predicted,
    probability, and the top k as 'name probability' pairs."""
    labels, probs = pred.top_k_labels(k)
    yield "path\tpredicted\tprobability\ttop_k"
    for path, lab, pr in zip(pred.paths, labels, probs):
        yield f"{path}\t{lab[0]}\t{pr[0]:.4f}\t" + ", ".join(f"{name} {p:.4f}" for name, p in zip(lab, pr))
