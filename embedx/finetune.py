"""End-to-end fine-tuning: the feature-extraction-then-fine-tuning recipe of the classic
MobileNetV2 transfer-learning tutorial, on any timm backbone.

Stage 1 trains the head with the backbone frozen. Stage 2 unfreezes the top N blocks
(timm's own block grouping) and trains them with the head, the backbone at a learning
rate ~10x lower. BatchNorm layers stay in inference mode throughout (running statistics
frozen), as the tutorial does. Every epoch is checkpointed; a rerun resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ._malloc import apply_heap, check_heap
from ._progress import progress_bar
from .backbone import (DEFAULT_MODEL, Backbone, autocast, check_preprocessing, load_backbone, resolve_device,
                       resolve_precision, usable_cpus)
from .errors import EmbedxError, FeaturesError, InputError
from .images import ImageDecodeError, ImageRecord, decode_image, list_images

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
#: the images a fine-tune leaves out, path -> why (unreadable, or decoding them killed the decoder
#: process): kept in --out, so that a rerun leaves them out too, and reported in metrics.json
SKIPPED = "skipped.json"
#: decoder-process deaths one fine-tune recovers from (each finds its culprits first)
MAX_DECODER_DEATHS = 20


@dataclass(frozen=True)
class FinetuneConfig:
    model: str = DEFAULT_MODEL
    weights: str | None = None
    head: str = "linear"
    unfreeze_blocks: int = 2
    head_epochs: int = 3  # stage 1, backbone frozen
    epochs: int = 5  # stage 2, top blocks unfrozen
    lr: float = 1e-3  # head learning rate
    backbone_lr_scale: float = 0.1  # backbone lr = lr * this
    weight_decay: float = 1e-4
    batch_size: int = 32
    val_fraction: float = 0.2
    patience: int = 3
    num_workers: int | None = None
    device: str = "auto"
    augment: bool = True
    seed: int = 0
    heap: str = "auto"  # auto (keep on CPU) | keep | release: see embedx/_malloc.py
    progress: bool = True
    # preprocessing overrides of the model's data config, as for extract (None: the model's own)
    img_size: int | None = None
    crop_pct: float | None = None
    crop_mode: str | None = None
    interpolation: str | None = None


@dataclass(frozen=True)
class _Unreadable:
    """What a loader gives for an image it could not read: its position and why."""

    index: int
    kind: str
    message: str


class _LabelledImages:
    """(image tensor, class index) pairs through a timm transform; a bad file gives `_Unreadable`."""

    def __init__(self, records: list[ImageRecord], targets: list[int], transform):
        self.records, self.targets, self.transform = records, targets, transform

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        try:
            return self.transform(decode_image(self.records[i].file).image), self.targets[i]
        except ImageDecodeError as e:
            return _Unreadable(i, e.kind, str(e))
        except Exception as e:  # noqa: BLE001 - one bad file must never stop the run (as in extract)
            return _Unreadable(i, "decode_error", f"{type(e).__name__}: {e}")


@dataclass
class _Batch:
    x: object  # (n, 3, H, W) tensor, None when no image of the batch could be read
    y: object
    unreadable: list  # [_Unreadable]


def _collate(items):
    import torch

    good = [it for it in items if not isinstance(it, _Unreadable)]
    bad = [it for it in items if isinstance(it, _Unreadable)]
    if not good:
        return _Batch(None, None, bad)
    return _Batch(torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), bad)


def _note_unreadable(batch: _Batch, dataset: _LabelledImages, skipped: dict | None) -> None:
    if skipped is not None:
        for u in batch.unreadable:
            skipped.setdefault(dataset.records[u.index].path, f"{u.kind}: {u.message}")


class _Positions:
    """A dataset's items decoded (and transformed) as the fine-tune would, giving (position,):
    what `_loader.find_crashing` decodes one at a time."""

    def __init__(self, dataset: _LabelledImages):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.dataset[i]
        return (i,)


def top_block_parameters(model, n: int) -> list[str]:
    """Names of the parameters in the top `n` blocks (timm's fine block grouping), plus the
    layers after the last block (e.g. EfficientNet's conv_head / bn2)."""
    from timm.models import group_parameters

    if n <= 0:
        return []
    groups = group_parameters(model, model.group_matcher(coarse=False))
    order = sorted(groups)
    grouped = {p for g in order for p in groups[g]}
    top = {p for g in order[-n:] for p in groups[g]}
    after = {name for name, _ in model.named_parameters() if name not in grouped}
    return sorted(top | after)


def default_num_workers() -> int:
    """Loader processes for fine-tuning: up to 4, one core left to the model; none on 2-core
    machines, where a loader process preempts one of the model's two threads and the other waits
    for it: measured there (Lite0, 512 photos, `embedx finetune --head-epochs 1 --epochs 1`, three
    interleaved rounds): 50.8 / 52.3 / 63.4 s with 0 workers vs 71.0 / 73.9 / 80.9 s with 1."""
    cpus = usable_cpus()
    return 0 if cpus <= 2 else min(4, cpus - 1)


def _freeze_batchnorm(model) -> None:
    from torch import nn

    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _fingerprint(config: FinetuneConfig, records: list[ImageRecord], val_records: list[ImageRecord]) -> str:
    keep = {k: v for k, v in asdict(config).items() if k not in ("progress", "num_workers", "device", "heap")
            and not (k in ("img_size", "crop_pct", "crop_mode", "interpolation") and v is None)}  # as before they came
    h = hashlib.sha256(json.dumps(keep, sort_keys=True).encode())
    for r in records + val_records:
        h.update(f"{r.path}\0{r.label}\n".encode())
    return h.hexdigest()


def _split(images, val, config: FinetuneConfig):
    from .trainset import stratified_split

    listing = list_images(images if isinstance(images, list) else [images], labels="folder")
    records = [r for r in listing.records if r.label is not None]
    classes = sorted({r.label for r in records})
    if len(classes) < 2:
        raise FeaturesError(f"{images}: fine-tuning needs two or more class folders, found {classes}.")
    if val is not None:
        val_records = [r for r in list_images(val if isinstance(val, list) else [val], labels="folder").records]
        unknown = sorted({r.label for r in val_records} - set(classes))
        if unknown:
            raise FeaturesError(f"--val has classes the training images lack: {unknown[:10]}")
        return records, val_records, classes
    y = np.array([classes.index(r.label) for r in records])
    tr, va = stratified_split(y, config.val_fraction, config.seed)
    if len(va) == 0:
        raise FeaturesError("The validation split is empty: give more images per class or --val IMAGES.")
    return [records[i] for i in tr], [records[i] for i in va], classes


def _transforms(backbone, augment: bool):
    """(training, evaluation) transforms: timm's for the backbone's data config; the evaluation
    one resizes only the crop's region of a banner or a panorama (`embedx._resize.bounded`)."""
    from timm.data import create_transform

    from ._resize import bounded

    dc = backbone.timm_data_config()
    return create_transform(**dc, is_training=augment), bounded(create_transform(**dc, is_training=False))


def finetune(images, out, config: FinetuneConfig = FinetuneConfig(), *, val=None, overwrite: bool = False) -> dict:
    """Fine-tune a backbone and head end to end on folder-labelled images; resumable. One run
    at a time per `out` (a lock): a second, started by mistake, is refused rather than
    interleaving its checkpoints with the first's.

    Returns:
        metrics.json content (same keys as `train-head`, plus `head_only_val_accuracy`
        and the per-epoch `history`).
    """
    from .shards import DirectoryLock

    check_heap(config.heap)
    check_preprocessing(config.img_size, config.crop_pct, config.crop_mode, config.interpolation)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with DirectoryLock(out) as lock:
        return _finetune_isolating_crashes(images, out, config, val=val, overwrite=overwrite,
                                           previous_died=lock.died)


def _finetune_isolating_crashes(images, out: Path, config: FinetuneConfig, *, val, overwrite: bool,
                                previous_died: str | None) -> dict:
    """`_finetune`, surviving images whose decoding kills a decoder process (a crash in a decoding
    library, an out-of-memory kill), as `embedx extract` does: when a loader process dies, every
    image not yet left out is decoded one at a time in processes of their own; those that kill
    theirs are left out (SKIPPED, reported in metrics.json) and the run resumes from its last
    checkpoint. Without loader processes (2-core machines) such a crash ends this process: a
    rerun after a run that ended without cleaning up checks the images that way first."""
    from ._loader import decoder_died

    if overwrite:  # the old run's checkpoint and findings go; this run's own are resumed from below
        for name in (CHECKPOINT, SKIPPED):
            (out / name).unlink(missing_ok=True)
    workers = config.num_workers if config.num_workers is not None else default_num_workers()
    if previous_died and workers == 0:
        log.warning("the last fine-tune into %s (pid %s) ended without cleaning up: if decoding an image crashed it, "
                    "checking every image in a separate process first finds it", out, previous_died)
        _find_crashing_images(images, out, config, val)
    deaths = 0
    while True:
        try:
            return _finetune(images, out, config, val=val)
        except RuntimeError as e:
            if not decoder_died(e):
                raise
            deaths += 1
            if deaths > MAX_DECODER_DEATHS:
                raise EmbedxError(f"Decoder processes died {deaths} times; giving up. Rerun with --num-workers 0 "
                                  "(what was fine-tuned so far is kept: it resumes).") from e
            log.warning("a loader process died (%s): checking every image in a process of its own", e)
            if not _find_crashing_images(images, out, config, val):
                raise EmbedxError(
                    f"A loader process died ({e}), but no image kills one when decoded on its own: likely a "
                    "memory limit with several processes decoding at once. Rerun with fewer --num-workers (what "
                    "was fine-tuned so far is kept: it resumes).") from e


def _read_skipped(out: Path) -> dict[str, str]:
    try:
        return json.loads((out / SKIPPED).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        log.warning("%s is damaged: the images it left out are looked for again", out / SKIPPED)
        return {}


def _write_skipped(out: Path, skipped: dict[str, str]) -> None:
    tmp = out / (SKIPPED + ".tmp")
    tmp.write_text(json.dumps(dict(sorted(skipped.items())), indent=1))
    os.replace(tmp, out / SKIPPED)


def _find_crashing_images(images, out: Path, config: FinetuneConfig, val) -> dict[str, str]:
    """Decode (and transform for evaluation) every training and validation image not yet left
    out, one at a time in decoder processes of their own; those whose decoding kills the process
    are added to SKIPPED. Returns them (path -> why)."""
    from ._loader import find_crashing

    train_records, val_records, classes = _split(images, val, config)
    skipped = _read_skipped(out)
    backbone = load_backbone(config.model, config.weights).with_preprocessing(
        config.img_size, config.crop_pct, config.crop_mode, config.interpolation)
    _, eval_tf = _transforms(backbone, False)
    records = [r for r in train_records + val_records if r.path not in skipped]
    t0 = time.perf_counter()
    crashed = find_crashing(_Positions(_LabelledImages(records, [0] * len(records), eval_tf)), 0, len(records))
    found = {records[i].path: f"decoder_crashed: decoding it killed the decoder process ({why})"
             for i, why in crashed.items()}
    for path, why in found.items():
        log.warning("%s: %s; left out of the fine-tune", path, why)
    log.info("checked %d images for decoder crashes in %.1f s: %d found", len(records), time.perf_counter() - t0,
             len(found))
    if found:
        _write_skipped(out, {**skipped, **found})
    return found


def _finetune(images, out: Path, config: FinetuneConfig, *, val) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from .heads import make_head

    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    # backward passes free and re-allocate large blocks every step: measured on 2 cores, Lite0
    # batch 32 with 2 blocks unfrozen, ~300k page faults a step and 2.4-2.7 s/step with glibc's
    # default vs 0 and 1.6-1.7 s/step kept
    apply_heap(config.heap, device)
    precision = resolve_precision("auto", device) if device.startswith("cuda") else "fp32"
    train_records, val_records, classes = _split(images, val, config)
    fingerprint = _fingerprint(config, train_records, val_records)  # of the input: resumes after leaving some out
    skipped = _read_skipped(out)
    # the images that crash a decoder are left out; unreadable ones stay in (they are skipped as
    # they come, and the epochs' shuffles stay those of a run that was never interrupted)
    crashing = {p for p, why in skipped.items() if why.startswith("decoder_crashed")}
    train_records = [r for r in train_records if r.path not in crashing]
    val_records = [r for r in val_records if r.path not in crashing]
    lookup = {c: i for i, c in enumerate(classes)}

    backbone = load_backbone(config.model, config.weights).with_preprocessing(
        config.img_size, config.crop_pct, config.crop_mode, config.interpolation)
    model = backbone.model
    head = make_head(config.head, backbone.dim, len(classes))
    train_tf, eval_tf = _transforms(backbone, config.augment)
    workers = config.num_workers if config.num_workers is not None else default_num_workers()
    g = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(_LabelledImages(train_records, [lookup[r.label] for r in train_records], train_tf),
                              batch_size=config.batch_size, shuffle=True, generator=g, num_workers=workers,
                              collate_fn=_collate, drop_last=False)
    val_loader = DataLoader(_LabelledImages(val_records, [lookup[r.label] for r in val_records], eval_tf),
                            batch_size=config.batch_size * 2, num_workers=workers, collate_fn=_collate)
    model.to(device)
    head.to(device)
    unfreeze = top_block_parameters(model, config.unfreeze_blocks)

    state = {"stage": 1, "epoch": 0, "best_acc": -1.0, "head_only_best": -1.0, "stale": 0, "history": []}
    ckpt_path = out / CHECKPOINT
    resume = None
    if ckpt_path.exists():
        resume = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if resume.get("fingerprint") != fingerprint:
            raise InputError(f"{out} holds a fine-tune with other settings or images. Use --overwrite or another --out.")
        model.load_state_dict(resume["backbone"])
        head.load_state_dict(resume["head"])
        state = json.loads(resume["state"])
        log.info("resuming fine-tune at stage %d epoch %d", state["stage"], state["epoch"])
    if state.get("done"):
        return json.loads((out / "metrics.json").read_text())

    total_epochs = config.head_epochs + config.epochs
    for stage in (1, 2):
        if state["stage"] > stage:
            continue
        n_epochs = config.head_epochs if stage == 1 else config.epochs
        model.requires_grad_(False)
        params = [{"params": head.parameters(), "lr": config.lr}]
        if stage == 2 and unfreeze:
            named = dict(model.named_parameters())
            for name in unfreeze:
                named[name].requires_grad_(True)
            params.append({"params": [named[n] for n in unfreeze], "lr": config.lr * config.backbone_lr_scale})
        opt = torch.optim.AdamW(params, weight_decay=config.weight_decay)
        if resume is not None and resume.get("optimizer_stage") == stage and state["epoch"] > 0:
            opt.load_state_dict(resume["optimizer"])
        if state["stage"] < stage:
            state.update(stage=stage, epoch=0, stale=0)
        while state["epoch"] < n_epochs and state["stale"] < config.patience:
            t0 = time.perf_counter()
            model.train() if stage == 2 else model.eval()
            _freeze_batchnorm(model)
            head.train()
            loss_sum, seen = 0.0, 0
            for batch in progress_bar(train_loader, desc=f"stage {stage} epoch {state['epoch'] + 1}/{n_epochs}",
                                      unit="batch", enabled=config.progress, leave=False):
                _note_unreadable(batch, train_loader.dataset, skipped)
                if batch.x is None:
                    continue
                x, y = batch.x.to(device, non_blocking=True), batch.y.to(device)
                with autocast(device, precision):
                    if stage == 1:
                        with torch.no_grad():
                            feats = model(x)
                    else:
                        feats = model(x)
                    logits = head(feats.float())
                loss = torch.nn.functional.cross_entropy(logits.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(y)
                seen += len(y)
            acc, _, _ = _evaluate(model, head, val_loader, device, precision, skipped=skipped)
            state["epoch"] += 1
            improved = acc > state["best_acc"]
            state["history"].append({"stage": stage, "epoch": state["epoch"], "train_loss": loss_sum / max(seen, 1),
                                     "val_accuracy": acc, "seconds": time.perf_counter() - t0})
            if stage == 1:
                state["head_only_best"] = max(state["head_only_best"], acc)
            if improved:
                state["best_acc"] = acc
                state["stale"] = 0
                _save_best(out, model, head)
            else:
                state["stale"] += 1
            if skipped:
                _write_skipped(out, skipped)
            _checkpoint(ckpt_path, model, head, opt, stage, state, fingerprint)
            log.info("stage %d epoch %d: val acc %.4f", stage, state["epoch"], acc)
    metrics = _final_metrics(out, backbone, head, classes, train_records, val_records, config, device, precision,
                             eval_tf, workers, state, total_epochs, skipped)
    if skipped:
        _write_skipped(out, skipped)
    state["done"] = True
    _checkpoint(ckpt_path, model, head, None, 2, state, fingerprint)
    return metrics


def _evaluate(model, head, loader, device, precision, skipped: dict | None = None):
    import torch

    model.eval()
    head.eval()
    probs, ys = [], []
    with torch.no_grad(), autocast(device, precision):
        for batch in loader:
            _note_unreadable(batch, loader.dataset, skipped)
            if batch.x is None:
                continue
            logits = head(model(batch.x.to(device)).float())
            probs.append(torch.softmax(logits.float(), -1).cpu().numpy())
            ys.append(batch.y.numpy())
    if not probs:
        return 0.0, np.empty((0, 0)), np.empty(0, np.int64)
    p, y = np.concatenate(probs), np.concatenate(ys)
    return float((p.argmax(1) == y).mean()), p, y


def _atomic_torch_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _checkpoint(path: Path, model, head, opt, stage: int, state: dict, fingerprint: str) -> None:
    _atomic_torch_save({
        "backbone": model.state_dict(), "head": head.state_dict(),
        "optimizer": opt.state_dict() if opt is not None else {}, "optimizer_stage": stage,
        "state": json.dumps(state), "fingerprint": fingerprint,
    }, path)


def _save_best(out: Path, model, head) -> None:
    from safetensors.torch import save_file

    for name, module in (("backbone", model), ("head", head)):
        tmp = out / f".{name}.safetensors.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(tmp))
        os.replace(tmp, out / f"{name}.safetensors")


def _final_metrics(out: Path, backbone: Backbone, head, classes, train_records, val_records, config, device,
                   precision, eval_tf, workers, state, total_epochs, skipped: dict) -> dict:
    """Reload the best weights, evaluate on val and train (no augmentation), write outputs."""
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader

    from .train import evaluate, save_outputs
    from .weights import sha256_file

    backbone.model.load_state_dict(load_file(str(out / "backbone.safetensors")))
    head.load_state_dict(load_file(str(out / "head.safetensors")))
    lookup = {c: i for i, c in enumerate(classes)}

    def loader(recs):
        return DataLoader(_LabelledImages(recs, [lookup[r.label] for r in recs], eval_tf),
                          batch_size=config.batch_size * 2, num_workers=workers, collate_fn=_collate)

    _, pv, yv = _evaluate(backbone.model, head, loader(val_records), device, precision, skipped=skipped)
    _, pt, yt = _evaluate(backbone.model, head, loader(train_records), device, precision, skipped=skipped)
    metrics, cm, report = evaluate(pv, yv, pt, yt, classes)
    metrics.update({
        "num_classes": len(classes), "classes": classes, "num_train": len(train_records), "num_val": len(val_records),
        "head": config.head, "head_only_val_accuracy": state["head_only_best"],
        "finetune_gain": metrics["val_accuracy"] - state["head_only_best"],
        "unfreeze_blocks": config.unfreeze_blocks, "history": state["history"],
        "sweep": [{"name": f"stage{h['stage']}_epoch{h['epoch']}", "val_accuracy": h["val_accuracy"]} for h in state["history"]],
        "epochs_run": len(state["history"]), "max_epochs": total_epochs,
        # images left out: unreadable, or decoding them killed the decoder process (path -> why)
        "num_skipped": len(skipped), "skipped": dict(sorted(skipped.items())),
    })
    head.cpu()
    cfg = {
        "kind": "finetune", "head": config.head, "hidden": 0, "dropout": 0.0, "dim": backbone.dim, "classes": classes,
        "standardize": "none (trained end to end)", "model": backbone.model_name,
        "backbone_weights": "backbone.safetensors",
        "backbone_sha256": sha256_file(out / "backbone.safetensors"),
        "provenance": {"model": backbone.model_name, "weights_source": backbone.weights_source,
                       "weights_sha256": backbone.weights_sha256, "data_config": backbone.data_config.to_dict(),
                       "dim": backbone.dim, "pooling": backbone.pooling},
        "finetune_config": asdict(config),
    }
    save_outputs(out, head, cfg, metrics, cm, report, classes)
    return metrics
