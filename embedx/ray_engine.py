"""Extraction on a Ray cluster with Ray Data: same backbone, preprocessing, shards, manifest.

Pipeline (one Ray Data dataset, streamed):

    pending records -> map_batches(decode)         CPU tasks: decode + resize + crop (uint8)
                    -> map_batches(_EmbedActor)    actor pool: one model per GPU, or per CPU slot
                    -> iter_batches on the driver  rows in listing order -> the local shard writer

The driver plans shards exactly as the local engine does (same row ids, same shard
boundaries, same manifest), skips shards that are complete, and is the only writer of
shards and manifest, so the output is indistinguishable from a local run and a failed run
resumes the same way. Order is kept with Ray Data's `preserve_order`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .errors import DependencyError

log = logging.getLogger(__name__)

# column names of the Ray Data batches (Ray Data moves dict-of-array batches)
ROW_ID, FILE, PIXELS, WIDTH, HEIGHT, OK, ERROR, MESSAGE, EMBEDDING = (
    "row_id", "file", "pixels", "width", "height", "ok", "error", "message", "embedding")


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise DependencyError("--engine ray needs Ray Data: pip install 'embedx[ray]'") from None
    return ray


def decode_batch(batch: dict, spec) -> dict:
    """Ray Data task: file paths -> uint8 NHWC pixels (zeros where decoding failed);
    `spec` is the backbone's `DecodeSpec`."""
    from ._loader import ImageDataset
    from .images import ImageRecord

    files = list(batch[FILE])
    recs = [ImageRecord(int(r), f, f, None) for r, f in zip(batch[ROW_ID], files)]
    ds = ImageDataset(recs, spec)
    h, w = spec.input_size[1], spec.input_size[2]
    pixels = np.zeros((len(files), h, w, 3), dtype=np.uint8)
    widths = np.zeros(len(files), np.int32)
    heights = np.zeros(len(files), np.int32)
    ok = np.zeros(len(files), bool)
    errors, messages = [""] * len(files), [""] * len(files)
    for i in range(len(files)):
        _, arr, wd, ht, err = ds[i]
        if arr is None:
            errors[i], messages[i] = err
        else:
            pixels[i], widths[i], heights[i], ok[i] = arr, wd, ht, True
    return {ROW_ID: np.asarray(batch[ROW_ID], np.int64), PIXELS: pixels, WIDTH: widths, HEIGHT: heights, OK: ok,
            ERROR: np.array(errors, dtype=object), MESSAGE: np.array(messages, dtype=object)}


class _EmbedActor:
    """Ray Data actor: loads the backbone once, embeds the decoded rows of each batch."""

    def __init__(self, model_name: str, weights: str | None, device: str, precision: str, normalize: bool,
                 channels_last: bool, expected_sha256: str | None, threads: int | None,
                 random_state: dict | None = None, heap: str = "auto", pool: str | None = None,
                 fold_bn: bool = True, fp32_stem: bool | None = None, fuse_act: bool = True):
        import torch

        from ._malloc import apply_heap
        from .backbone import load_matching, resolve_device
        from .extractor import _Embedder, _prepare_model

        if threads:
            torch.set_num_threads(threads)
        device = resolve_device(device) if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        apply_heap(heap, device)  # this actor's process: where the model's activations are allocated
        # pixels come decoded (the driver's preprocessing); the network needs the run's pooling
        backbone = load_matching(model_name, weights, expected_sha256, random_state).with_pool(pool)
        self.dim = backbone.dim
        model = _prepare_model(backbone, device, channels_last, precision, fold_bn, fp32_stem, fuse_act=fuse_act)
        self.runner = _Embedder(model, backbone, device, precision, normalize, channels_last)

    def __call__(self, batch: dict) -> dict:
        import torch

        ok = np.asarray(batch[OK], bool)
        out = np.zeros((len(ok), self.dim), np.float32)
        if ok.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch[PIXELS][ok])).permute(0, 3, 1, 2)
            with torch.inference_mode():
                out[ok] = self.runner.embed(pixels)
        result = {k: batch[k] for k in (ROW_ID, WIDTH, HEIGHT, OK, ERROR, MESSAGE)}
        result[EMBEDDING] = out
        return result


def run_ray(plan, out: Path, config, address: str | None, timer) -> tuple[int, int]:
    """Embed `plan.pending` on a Ray cluster; the driver writes shards as the local engine does."""
    ray = import_ray()
    from .backbone import random_state_of, weights_argument
    from .extractor import _decode_spec, _progress, _ShardWriter, default_batch_size

    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False,
                 include_dashboard=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows reach the shard writer in listing order
    ctx.enable_progress_bars = False
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    backbone = plan.backbone
    device = "cuda" if gpus and config.device in ("auto", "cuda") else "cpu"
    batch_size = config.batch_size or default_batch_size(device)
    if gpus and device == "cuda":
        actor_opts = {"num_gpus": 1, "concurrency": gpus}
        threads = None
    else:
        # no GPU: one model per two CPU slots, the other slot decodes for it
        actors = max(1, cpus // 2)
        actor_opts = {"num_cpus": 1, "concurrency": actors}
        threads = max(1, cpus // (2 * actors))
    weights = weights_argument(backbone.weights_source)
    items = [{ROW_ID: r.row_id, FILE: r.file} for r in plan.pending]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // batch_size, 4 * cpus)))
    ds = ds.map_batches(decode_batch, batch_size=batch_size, batch_format="numpy", num_cpus=1,
                        fn_kwargs={"spec": _decode_spec(backbone, config)})
    ds = ds.map_batches(_EmbedActor, batch_size=batch_size, batch_format="numpy",
                        fn_constructor_args=(backbone.model_name, weights, device, plan.precision, config.normalize,
                                             config.channels_last, backbone.weights_sha256, threads,
                                             random_state_of(backbone), config.heap, config.pool, config.fold_bn,
                                             config.fp32_stem, config.fuse_act),
                        **actor_opts)
    writer = _ShardWriter(out, plan.manifest, config, backbone.dim, plan.metadata)
    by_id = {r.row_id: r for r in plan.pending}
    bar = _progress(len(plan.records), len(plan.records) - len(plan.pending), config.progress)
    embedded = errors = 0
    try:
        with timer("ray"):
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                ok = [bool(v) for v in batch[OK]]
                recs = [by_id[int(r)] for r in batch[ROW_ID]]
                emb = batch[EMBEDDING][np.asarray(ok, bool)]
                errs = [(e, m) for e, m in zip(batch[ERROR], batch[MESSAGE])]
                e, x = writer.add_batch(recs, ok, emb, batch[WIDTH], batch[HEIGHT], errs)
                embedded += e
                errors += x
                bar.update(len(recs))
    finally:
        bar.close()
        writer.drain()
    writer.finish()
    return embedded, errors
