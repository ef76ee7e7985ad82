"""The `embedx` command line: a thin typer shell over the library.

This is the only place that turns `EmbedxError`s into messages and exit codes; any other
exception is a bug and keeps its traceback. Heavy imports happen inside the commands so
that `embedx --help` is instant.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ._openmp import shorten_spin_wait
from .errors import EmbedxError

# before anything loads torch (and its OpenMP runtime, which reads this once): lets the extract
# engine's decode threads use the cores the model has just left (see _openmp)
shorten_spin_wait()

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Turn image folders into embeddings you can train on and search.",
    rich_markup_mode=None,
)


#: storage errors a user can act on, and what to do (others keep their traceback: a bug to report)
_STORAGE_ERRORS = {
    errno.ENOSPC: "The disk is full: free some space (or write to another disk: a new --out).",
    errno.EDQUOT: "The disk quota is used up: free some space (or write to another disk: a new --out).",
    errno.EROFS: "The file system is read-only: write to another place (--out).",
    errno.EACCES: "Permission denied: write to a directory you can write to (--out), or fix its permissions.",
}


def _handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EmbedxError as e:
            typer.echo(f"Error: {e}", err=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            typer.echo("Interrupted. Completed work is kept: rerun the same command to resume.", err=True)
            raise typer.Exit(code=130) from None
        except OSError as e:
            advice = _STORAGE_ERRORS.get(e.errno)
            if advice is None:
                raise
            where = f" ({e.filename})" if e.filename else ""
            typer.echo(f"Error: {e.strerror or e}{where}. {advice} Then rerun the same command: completed "
                       "work is kept (extract and finetune resume where they stopped).", err=True)
            raise typer.Exit(code=1) from None

    return wrapper


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _echo_time_shares(r) -> None:
    """One line on stderr: where the run's time went (the knobs to turn depend on it)."""
    shares = r.time_shares()
    if not shares or r.num_done == 0 or r.seconds <= 0:
        return
    parts = [f"{name} {sec:.1f} s ({sec / r.seconds:.0%})" for name, sec in shares.items() if sec / r.seconds >= 0.005]
    typer.echo("Time: " + ", ".join(parts), err=True)
    waiting = shares["waiting for images"] / r.seconds
    if r.device.startswith("cuda") and waiting >= 0.25:
        typer.echo(f"The GPU waited for images {waiting:.0%} of the time: the decoders are the bottleneck. More "
                   "--num-workers, or --decode device (nvJPEG), feed it faster.", err=True)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


# preprocessing overrides (timm's script options), shared by extract and finetune
_IMG_SIZE = typer.Option(None, help="Input size (square) instead of the model's own; convolutional networks take any.")
_CROP_PCT = typer.Option(None, help="Centre-crop fraction instead of the model's own (1.0: keep the whole image's short side).")
_CROP_MODE = typer.Option(None, help="center | squash (resize to the input size, no crop) | border (fit, pad) [default: the model's].")
_INTERPOLATION = typer.Option(None, help="bilinear | bicubic | … [default: the model's].")


@app.command()
@_handle_errors
def extract(
    inputs: List[str] = typer.Argument(..., help="Image directories (walked recursively), .tar archives (WebDataset shards: read in place) or .txt/.csv/.parquet lists of paths."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory for the Parquet shards."),
    model: str = typer.Option("tf_efficientnet_lite0", help="Any timm model name."),
    weights: Optional[str] = typer.Option(None, help="auto (default: bundled, else hub) | bundled | hub | random | PATH to .pth/.safetensors."),
    batch_size: Optional[int] = typer.Option(None, help="Images per batch [default: 256 on GPU; on CPU 2 per thread, 8 with AVX-512, 4 to 32]."),
    num_workers: Optional[int] = typer.Option(None, help="Decoder processes; 0: decode in this process between batches [default: from the cores present; 0 on 2-core CPUs]."),
    decode_threads: Optional[int] = typer.Option(None, help="With 0 decoder processes: threads that decode each batch while the model waits [default: as many as the model's threads (every core), at most 8, where OpenMP's idle workers sleep soon (the CLI sets GOMP_SPINCOUNT=30000 unless set), else 1]."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    precision: str = typer.Option("auto", help="auto (bf16 on GPU and bf16-capable CPUs) | fp32 | bf16 | fp16."),
    labels: str = typer.Option("folder", help="folder (parent directory name; in .tar archives a WebDataset .cls file first) | none."),
    img_size: Optional[int] = _IMG_SIZE,
    crop_pct: Optional[float] = _CROP_PCT,
    crop_mode: Optional[str] = _CROP_MODE,
    interpolation: Optional[str] = _INTERPOLATION,
    pool: Optional[str] = typer.Option(None, help="Global pooling instead of the model's own: avg | max | avgmax | catavgmax (2x dim) | token (ViTs)."),
    shard_size: int = typer.Option(10_000, help="Rows per Parquet shard (also the unit of resumption)."),
    normalize: bool = typer.Option(False, "--normalize", help="L2-normalise the embeddings."),
    dtype: str = typer.Option("float32", help="Stored embedding type: float32 | float16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run with another configuration in --out."),
    update: bool = typer.Option(False, "--update", help="--out holds this run already: embed only the images new since (paths in no shard), appended as new shards; nothing there is rewritten."),
    retry_errors: bool = typer.Option(False, "--retry-errors", help="--out holds this run already: embed again the inputs errors.parquet lists (after a storage hiccup, or files mended), as new shards."),
    max_pixels: int = typer.Option(178_956_970, help="Refuse images with more pixels than this (decompression bombs)."),
    fast_decode: bool = typer.Option(True, "--fast-decode/--exact-decode", help="Fast path: JPEGs decoded by simplejpeg (PIL's pixels) at a reduced DCT scale when the model "
                                     "needs fewer pixels, resize + crop on uint8 tensors (cosine >= 0.999 of timm's exact "
                                     "PIL transform). --exact-decode: timm's PIL transform as is."),
    decode: str = typer.Option("pil", help="pil (on the CPU: decoder processes, simplejpeg or PIL) | device (JPEG decode + resize on the GPU with nvJPEG)."),
    device_share: float = typer.Option(1.0, help="With --decode device: the share of JPEGs decoded on the device; the CPU workers decode the rest at the same time."),
    device_decoder: str = typer.Option("auto", help="With --decode device: whose decode_jpeg: auto (TorchCodec when installed, else torchvision's, deprecated) | torchcodec | torchvision | nvimgcodec (NVIDIA nvImageCodec: the GPU's hardware JPEG decoders where it has them; pip install 'embedx[nvimgcodec]')."),
    prefetch: Optional[int] = typer.Option(None, help="Batches prepared ahead (copied to / decoded on the device) on a background thread; 0: inline [default: 2; 0 on a CPU that decodes in-process]."),
    compile: str = typer.Option("auto", help="auto (for runs of 20k+ images on a CPU in fp32, or in bf16 on CPUs with AMX; 200k+ on a GPU) | yes | no: torch.compile the backbone."),
    fold_bn: bool = typer.Option(True, "--fold-bn/--no-fold-bn", help="On a CPU, fold the model's BatchNorms into the convolutions before them (checked against the unfolded model; in bf16 pointwise convolutions only, and depthwise ones in the layers --fp32-stem keeps in fp32)."),
    fuse_act: bool = typer.Option(True, "--fuse-act/--no-fuse-act", help="On a CPU, without --compile: apply each activation after a convolution inside it (oneDNN's post-op; checked against the unfused model)."),
    fp32_stem: Optional[bool] = typer.Option(None, "--fp32-stem/--no-fp32-stem", show_default=False, help="In bf16, run the model's half-resolution layers (its stem and first block) in fp32: bf16 embeddings within cosine ~0.999 of fp32's instead of ~0.993 (CPU) / ~0.9988 (H200), for a few per cent of the model's speed [default: on]."),
    heap: str = typer.Option("auto", help="auto (keep on CPU) | keep | release: keep = glibc reuses freed memory instead of returning it to the OS (no page faults per batch; the process keeps its peak)."),
    engine: str = typer.Option("local", help="local | ray (Ray Data on a cluster: pip install 'embedx[ray]')."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address for --engine ray (e.g. ray://head:10001, auto)."),
    devices: Optional[str] = typer.Option(None, help="Several devices of this machine, e.g. cuda:0,cuda:1: one process each."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
):
    """Embed images with a frozen pretrained backbone into Parquet feature shards.

    Rerun the same command after an interruption to resume; add --update when the input has
    grown since, to embed only the new images.

    Examples:

    \b
        embedx extract photos/ --out feats/ --model tf_efficientnet_lite0 --normalize
        embedx extract photos/ --out feats/ --normalize --update    # later: only what is new
        embedx extract shards/*.tar --out feats/ --dtype float16
        embedx extract s3-mounted/ --out /shared/feats --engine ray --address auto
    """
    from .extractor import ExtractConfig, extract as run_extract

    config = ExtractConfig(
        model=model, weights=weights, batch_size=batch_size, num_workers=num_workers, decode_threads=decode_threads,
        device=device, precision=precision, labels=labels, img_size=img_size, crop_pct=crop_pct, crop_mode=crop_mode,
        interpolation=interpolation, pool=pool, shard_size=shard_size, normalize=normalize, dtype=dtype,
        overwrite=overwrite, update=update, retry_errors=retry_errors, max_pixels=max_pixels, fast_decode=fast_decode, decode=decode, device_share=device_share,
        device_decoder=device_decoder, prefetch=prefetch,
        compile=compile, fold_bn=fold_bn, fuse_act=fuse_act, fp32_stem=fp32_stem, heap=heap, progress=progress,
    )
    r = run_extract(inputs, out, config, engine=engine, address=address,
                    devices=[d.strip() for d in devices.split(",")] if devices else None)
    if r.num_done == 0 and r.num_skipped:  # a rerun of a finished run
        typer.echo(f"Nothing to do: all {r.num_skipped} images were done by an earlier run "
                   f"({r.num_embedded} embedded, {r.num_errors} errors; checked in {r.seconds:.1f} s); "
                   f"{_human_bytes(r.bytes_written)} in {r.out_dir}")
    else:
        typer.echo(
            f"{r.num_embedded} embedded, {r.num_errors} errors"
            + (f" ({r.num_skipped} done by an earlier run)" if r.num_skipped else "")
            + f" in {r.seconds:.1f} s: {r.engine_images_per_second:.1f} img/s after {r.setup_seconds:.1f} s of "
            f"start-up (imports, model loading) on {r.device}, {r.precision}; "
            f"{_human_bytes(r.bytes_written)} in {r.out_dir}"
        )
    _echo_time_shares(r)
    if r.num_retried:
        typer.echo(f"Retried {_count(r.num_retried, 'input')} recorded as errors before; {r.num_errors} errors now.", err=True)
    if r.num_added:
        typer.echo(f"Added {_count(r.num_added, 'new image')} as new rows; `embedx index add IDX {r.out_dir}` adds "
                   "them to an index built over it.", err=True)
    if r.num_gone or r.num_relabelled:
        kept = []
        if r.num_gone:
            kept.append(f"{_count(r.num_gone, 'row')} whose images are no longer in the input")
        if r.num_relabelled:
            kept.append(f"{_count(r.num_relabelled, 'row')} whose images have another label now")
        typer.echo(f"Kept as they were: {' and '.join(kept)} (--overwrite re-extracts everything).", err=True)
    if r.num_errors:
        typer.echo(f"Unreadable inputs are listed in {Path(r.out_dir) / 'errors.parquet'}", err=True)
    if r.ignored_files:
        from .images import describe_ignored, ignored_advice

        typer.echo(f"Left out as not images by their extension: {describe_ignored(r.ignored_files)}; "
                   f"{ignored_advice(r.ignored_files)}.", err=True)


@app.command()
@_handle_errors
def info(
    features: Path = typer.Argument(..., help="A shard directory written by `embedx extract`, or an index directory."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Show what a shard directory holds (rows, dimension, model, errors), or an index directory
    (vectors, index type, measured recall and queries/s, sources).

    Examples:

    \b
        embedx info feats/
        embedx info idx/ --json
    """
    from .index import INFO_FILE
    from .summary import describe, describe_index

    d = describe_index(features) if (features / INFO_FILE).exists() else describe(features)
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    for key, value in d.items():
        if isinstance(value, dict):
            value = json.dumps(value)
        typer.echo(f"{key:>16}: {value}")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


@app.command("train-head")
@_handle_errors
def train_head_cmd(
    features: Path = typer.Argument(..., help="Shard directory with labels (from `embedx extract`)."),
    out: Path = typer.Option(..., "--out", "-o", help="HEAD_DIR to write."),
    head: str = typer.Option("linear", help="linear | mlp."),
    solver: str = typer.Option("auto", help="auto (lbfgs for linear, adamw for mlp) | lbfgs | adamw."),
    val: Optional[Path] = typer.Option(None, help="A second shard directory to validate on (e.g. the test split)."),
    val_fraction: float = typer.Option(0.2, help="Seeded stratified validation fraction when --val is not given."),
    l2: str = typer.Option("1e-6,1e-5,1e-4,1e-3,3e-3,1e-2,3e-2,1e-1,3e-1,1",
                           help="lbfgs: L2 strengths of the sweep (on standardised features, mean loss)."),
    max_iter: int = typer.Option(200, help="lbfgs: maximum L-BFGS steps."),
    lrs: str = typer.Option("1e-3,3e-3,1e-2", help="adamw: learning rates of the sweep."),
    weight_decays: str = typer.Option("0,1e-4,1e-3,1e-2", help="adamw: weight decays of the sweep."),
    epochs: int = typer.Option(100, help="adamw: maximum epochs (early stopping on validation)."),
    patience: int = typer.Option(10, help="adamw: stop after this many epochs without improvement."),
    batch_size: int = typer.Option(1024, help="adamw: training batch size."),
    hidden: int = typer.Option(512, help="Hidden units of the mlp head."),
    class_weights: str = typer.Option("none", help="none | balanced (for imbalanced labels)."),
    knn: bool = typer.Option(True, "--knn/--no-knn", help="Report a weighted kNN baseline (k=10, 20)."),
    stream: str = typer.Option("auto", help="auto | yes | no: read features through memory-mapped files "
                               "instead of loading them (auto: when they would not fit in memory)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    seed: int = typer.Option(0, help="Seed for the split and initialisation."),
):
    """Train linear/MLP heads on cached features: a whole sweep of heads in the same passes.

    Linear heads default to L-BFGS logistic regression over a sweep of L2 strengths; MLP heads
    (or --solver adamw) to AdamW over a learning-rate x weight-decay sweep, with early stopping.

    Examples:

    \b
        embedx train-head feats/train --val feats/test --out head/ --head linear
    """
    from .train import HeadConfig, train_head

    config = HeadConfig(head=head, solver=solver, l2s=_floats(l2), max_iter=max_iter, lrs=_floats(lrs),
                        weight_decays=_floats(weight_decays), hidden=hidden, epochs=epochs, batch_size=batch_size,
                        patience=patience, val_fraction=val_fraction, class_weights=class_weights, knn=knn,
                        stream=stream, device=device, seed=seed)
    m = train_head(features, out, config, val=val)
    best = ", ".join(f"{k} {v:g}" for k, v in m["best"].items() if k != "solver")
    typer.echo(
        f"{m['head']} head ({m['solver']}): val accuracy {m['val_accuracy']:.4f} (top-5 {m['val_top5_accuracy']:.4f}), "
        f"train {m['train_accuracy']:.4f}; best {best} of {len(m['sweep'])} heads; "
        + (f"kNN k=20 {m['knn_k20_accuracy']:.4f}; " if "knn_k20_accuracy" in m else "")
        + f"{m['train_seconds']:.1f} s -> {out}"
    )


@app.command()
@_handle_errors
def finetune(
    images: List[str] = typer.Argument(..., help="Image folders with one sub-folder per class."),
    out: Path = typer.Option(..., "--out", "-o", help="HEAD_DIR to write (backbone + head)."),
    model: str = typer.Option("tf_efficientnet_lite0", help="Any timm model name."),
    weights: Optional[str] = typer.Option(None, help="auto | bundled | hub | random | PATH."),
    val: Optional[str] = typer.Option(None, help="Validation image folder [default: --val-fraction of IMAGES]."),
    val_fraction: float = typer.Option(0.2, help="Seeded stratified validation fraction."),
    unfreeze_blocks: int = typer.Option(2, help="Top backbone blocks to unfreeze in stage 2."),
    head_epochs: int = typer.Option(3, help="Stage 1 epochs (backbone frozen)."),
    epochs: int = typer.Option(5, help="Stage 2 epochs (top blocks unfrozen)."),
    lr: float = typer.Option(1e-3, help="Head learning rate."),
    backbone_lr_scale: float = typer.Option(0.1, help="Backbone learning rate = lr x this."),
    batch_size: int = typer.Option(32, help="Batch size."),
    patience: int = typer.Option(3, help="Early stopping patience (epochs)."),
    head: str = typer.Option("linear", help="linear | mlp."),
    num_workers: Optional[int] = typer.Option(None, help="Data loader processes [default: up to 4; 0 on 2-core machines]."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    heap: str = typer.Option("auto", help="auto (keep on CPU) | keep | release: as for `extract`."),
    img_size: Optional[int] = _IMG_SIZE,
    crop_pct: Optional[float] = _CROP_PCT,
    crop_mode: Optional[str] = _CROP_MODE,
    interpolation: Optional[str] = _INTERPOLATION,
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over instead of resuming."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
):
    """Fine-tune the top blocks of a backbone together with a head (resumable).

    Examples:

    \b
        embedx finetune data/fashion/train --val data/fashion/test --out ft/ --unfreeze-blocks 2
    """
    from .finetune import FinetuneConfig, finetune as run

    config = FinetuneConfig(model=model, weights=weights, head=head, unfreeze_blocks=unfreeze_blocks,
                            head_epochs=head_epochs, epochs=epochs, lr=lr, backbone_lr_scale=backbone_lr_scale,
                            batch_size=batch_size, val_fraction=val_fraction, patience=patience,
                            num_workers=num_workers, device=device, heap=heap, img_size=img_size, crop_pct=crop_pct,
                            crop_mode=crop_mode, interpolation=interpolation, progress=progress)
    m = run(images, out, config, val=val, overwrite=overwrite)
    overrides = "".join(f" --{k.replace('_', '-')} {v}" for k, v in (("img_size", img_size), ("crop_pct", crop_pct),
                        ("crop_mode", crop_mode), ("interpolation", interpolation)) if v is not None)
    typer.echo(
        f"fine-tuned: val accuracy {m['val_accuracy']:.4f} (head only {m['head_only_val_accuracy']:.4f}, "
        f"gain {m['finetune_gain']:+.4f}) -> {out}; re-extract with: embedx extract IMAGES --model {model} "
        f"--weights {Path(out) / 'backbone.safetensors'}{overrides}"
    )
    if m.get("num_skipped"):
        typer.echo(f"{m['num_skipped']} images left out (unreadable, or decoding them crashed the decoder): "
                   f"'skipped' in {Path(out) / 'metrics.json'}", err=True)


@app.command()
@_handle_errors
def predict(
    head_dir: Path = typer.Argument(..., help="A HEAD_DIR from `train-head` or `finetune`."),
    inputs: List[str] = typer.Argument(..., help="Images, image folders or shard directories."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output .parquet or .csv [default: a table on stdout]."),
    k: int = typer.Option(5, "-k", help="Top-k classes to list."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    isolate_decode: bool = typer.Option(False, "--isolate-decode/--no-isolate-decode", help="Decode the images in a process of their own: one that crashes the decoding library (a crafted file) is skipped as decoder_crashed instead of ending the run; costs that process's start-up (~3 s)."),
):
    """Classify new images or existing shards with a trained head.

    Examples:

    \b
        embedx predict head/ new_photos/ --out predictions.csv
        embedx predict head/ photo.jpg -k 3
    """
    from .predict import predict as run, table_lines, write_predictions

    pred = run(head_dir, inputs, device=device, isolate=isolate_decode)
    for f, why in pred.failures:
        typer.echo(f"skipped {f}: {why}", err=True)
    if out is None:  # tab-separated, one image a line: readable, and cut/awk-able
        for line in table_lines(pred, k):
            typer.echo(line)
        return
    write_predictions(pred, out, k)
    typer.echo(f"{len(pred.paths)} predictions -> {out}")


@app.command("index")
@_handle_errors
def index_cmd(
    args: List[str] = typer.Argument(..., help="FEATURES (build), or: add INDEX_DIR FEATURES (extend)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Index directory to write (build)."),
    metric: str = typer.Option("cosine", help="cosine | ip | l2."),
    factory: Optional[str] = typer.Option(None, help="Any FAISS index_factory string [default: chosen from size, dim, memory]."),
    max_memory: Optional[str] = typer.Option(None, help="Memory budget for the index, e.g. 4G [default: half the RAM]."),
    target_recall: float = typer.Option(0.95, help="Tune nprobe/efSearch until recall@10 reaches this."),
    gpu: str = typer.Option("auto", help="auto | yes | no: build and search on GPUs with faiss-gpu."),
    on_disk: bool = typer.Option(False, "--on-disk", help="IVF only: merge per-shard partial indexes into inverted lists on disk (larger than RAM)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing index in --out."),
    measure: str = typer.Option("auto", help="index add: measure recall again and re-tune nprobe/efSearch: auto (an approximate index grown 10%+ since last measured) | yes | no."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
):
    """Build a FAISS index over feature shards (or `index add` more shards to one).

    Recall@10 against exact search is measured on held-out queries and written to
    INDEX_DIR/index.json with queries/s and memory. `index add` measures it again (queries
    from the added vectors) once the index has grown by 10%, and re-tunes the search parameter.

    Examples:

    \b
        embedx index feats/ --out idx/ --target-recall 0.95
        embedx index add idx/ more-feats/
        embedx index add idx/ feats/          # feats/ grew (extract --update): add its new rows
    """
    from .index import IndexConfig, parse_bytes
    from .indexer import add_to_index, build_index

    if args[0] == "add":
        if len(args) != 3:
            raise typer.BadParameter("usage: embedx index add INDEX_DIR FEATURES")
        info = add_to_index(args[1], args[2], progress=progress, measure=measure)
        typer.echo(f"added {info['added']} vectors; {info['num_vectors']} in {args[1]}"
                   + ("" if info["added"] else f" ({args[2]} has nothing the index lacks)"))
        again, param = info.get("remeasured"), info.get("search_param")
        if again:
            tuned = (f"; {param} {again['value_before']} -> {info['search_value']}"
                     if param and again["value_before"] != info["search_value"] else "")
            typer.echo(f"recall@{info['k']} measured again on {info['num_queries']} added vectors: "
                       f"{info['recall_at_k']:.3f} (was {again['recall_before']:.3f}){tuned}, "
                       f"{info['qps']:.0f} queries/s"
                       + ("" if info["target_reached"] else f"; target {info['target_recall']} not reached: "
                          "rebuild the index (embedx index ... --overwrite)"))
        elif info["added"] and param and info.get("measured_at_vectors"):
            typer.echo(f"recall@{info['k']} {info['recall_at_k']:.3f} as measured at {info['measured_at_vectors']} "
                       "vectors (--measure yes measures it again)")
        return
    if len(args) != 1 or out is None:
        raise typer.BadParameter("usage: embedx index FEATURES --out INDEX_DIR")
    config = IndexConfig(metric=metric, factory=factory, max_memory=parse_bytes(max_memory),
                         target_recall=target_recall, use_gpu=gpu, on_disk=on_disk)
    info = build_index(args[0], out, config, overwrite=overwrite, progress=progress)
    typer.echo(
        f"{info['factory']} over {info['num_vectors']} x {info['dim']} ({info['metric']}): "
        f"recall@{info['k']} {info['recall_at_k']:.3f} at {info['search_param'] or 'exact'}"
        f"{'=' + str(info['search_value']) if info['search_param'] else ''}, {info['qps']:.0f} queries/s "
        f"(exact {info['exact_qps']:.0f}/s), {_human_bytes(info['index_bytes'])}, built in {info['build_seconds']:.1f} s -> {out}"
    )


@app.command()
@_handle_errors
def search(
    index_dir: Path = typer.Argument(..., help="An index directory from `embedx index`."),
    queries: Optional[List[str]] = typer.Argument(None, help="Query images or directories of images."),
    row_id: Optional[List[int]] = typer.Option(None, "--id", help="Query by indexed row id (repeatable)."),
    vectors: Optional[Path] = typer.Option(None, help="Query vectors: .npy or .parquet with an 'embedding' column."),
    k: int = typer.Option(10, "-k", help="Neighbours per query."),
    exclude_self: bool = typer.Option(False, "--exclude-self", help="Leave the query itself out of its results."),
    label: Optional[List[str]] = typer.Option(None, "--label", help="Only neighbours with this label (repeatable: any of them)."),
    fmt: str = typer.Option("table", "--format", help="table | json | csv."),
    html_out: Optional[Path] = typer.Option(None, "--html", help="Also write a contact sheet of the results."),
    weights: Optional[str] = typer.Option(None, help="Where to find the index's backbone weights, if they moved."),
    device: str = typer.Option("auto", help="Device to embed query images on."),
):
    """Find the nearest indexed images of query images, row ids or vectors.

    Examples:

    \b
        embedx search idx/ query.jpg -k 5 --html results.html
        embedx search idx/ --id 42 --exclude-self --format json
        embedx search idx/ query.jpg --label cat --label lynx
    """
    from .query import SearchIndex, load_vectors, search_ids, search_images

    if not queries and not row_id and vectors is None:
        raise typer.BadParameter("give query images, --id ROW_ID or --vectors FILE")
    if fmt not in ("table", "json", "csv"):
        raise typer.BadParameter("--format must be table, json or csv")
    idx = SearchIndex(index_dir)
    results, query_files = [], []
    if queries:
        found, failures = search_images(idx, list(queries), k, exclude_self, weights=weights, device=device,
                                        labels=label)
        for f, why in failures:
            typer.echo(f"skipped {f}: {why}", err=True)
        results += found
        query_files += [r.query for r in found]
    if row_id:
        found = search_ids(idx, list(row_id), k, exclude_self, labels=label)
        results += found
        query_files += [idx.absolute_path(idx.position_of(r)) for r in row_id]
    if vectors is not None:
        xq = load_vectors(vectors)
        found = idx.search(xq, k, names=[f"{vectors.name}:{i}" for i in range(len(xq))], labels=label)
        results += found
        query_files += [None] * len(found)
    _print_results(results, fmt)
    if html_out is not None:
        from .sheet import write_sheet

        rows = []
        for r, qf in zip(results, query_files):
            neigh = [(idx.absolute_path(n.position), f"#{n.rank} {n.score:.3f} {n.path}") for n in r.neighbors]
            rows.append((r.query, qf, neigh))
        write_sheet(html_out, rows, f"embedx search: {index_dir}")
        typer.echo(f"contact sheet: {html_out}", err=True)


def _print_results(results, fmt: str) -> None:
    if fmt == "json":
        typer.echo(json.dumps([r.to_dict() for r in results], indent=2))
        return
    import csv

    if fmt == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(["query", "rank", "row_id", "path", "score"])
        for r in results:
            for n in r.neighbors:
                w.writerow([r.query, n.rank, n.row_id, n.path, f"{n.score:.6f}"])
        return
    for r in results:
        typer.echo(f"query: {r.query}")
        for n in r.neighbors:
            typer.echo(f"  {n.rank:>3}  {n.score:8.4f}  {n.row_id:>8}  {n.path}")


@app.command()
@_handle_errors
def serve(
    index_dir: Path = typer.Argument(..., help="An index directory from `embedx index`."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface; there is no authentication)."),
    port: int = typer.Option(8000, help="Port to listen on (0: a free one, printed)."),
    images: bool = typer.Option(True, "--images/--no-images", help="Load the index's backbone for image queries (--no-images: vectors and ids only)."),
    weights: Optional[str] = typer.Option(None, help="Where to find the index's backbone weights, if they moved."),
    device: str = typer.Option("auto", help="Device to embed query images on."),
    cors: Optional[str] = typer.Option(None, help="Answer Access-Control-Allow-Origin with this (e.g. '*'), so that web pages elsewhere may call the API."),
    max_batch: int = typer.Option(64, help="Most query images embedded in one backbone call, gathered from the requests that arrive while it is busy (1: one request at a time)."),
    token: Optional[str] = typer.Option(None, envvar="EMBEDX_SERVE_TOKEN", show_envvar=True,
                                        help="Require 'Authorization: Bearer TOKEN' of every request (best given by the environment variable: a command line shows in `ps`)."),
    isolate_decode: bool = typer.Option(True, "--isolate-decode/--no-isolate-decode", help="Decode query images in a process of their own: an image that crashes the decoding library is answered as an error (decoder_crashed) and the server goes on (--no-isolate-decode: in the server's process, for inputs you trust)."),
):
    """Serve an index over HTTP: JSON queries by vector, row id or image, with the index and the
    backbone loaded once. GET / says what is served; POST /search takes {"vectors": [[...]]},
    {"ids": [...]} or {"images": [base64, ...]} with "k" and "labels"; POST /search/image takes
    one image file as the body; GET /image/ROW_ID returns a result's image as a JPEG. Answers are
    JSON, as `embedx search --format json`.

    Examples:

    \b
        embedx serve idx/ --port 8000
        EMBEDX_SERVE_TOKEN=s3cret embedx serve idx/ --host 0.0.0.0   # requests must send the token
        curl -s localhost:8000/search -d '{"ids": [42], "k": 5, "labels": ["cat"]}'
        curl -s --data-binary @query.jpg 'localhost:8000/search/image?k=5'
    """
    import logging

    from .serve import SearchService, make_server

    service = SearchService.open(index_dir, weights=weights, device=device, images=images, max_batch=max_batch,
                                 isolate=isolate_decode)
    server = make_server(service, host, port, cors=cors, token=token)
    access = logging.getLogger("embedx.serve")
    if not access.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
    d = service.describe()
    h, p = server.server_address[:2]
    typer.echo(f"Serving {index_dir} ({d['rows']} rows, {d['factory']}, {d['model']}; image queries "
               f"{'on' if d['images'] else 'off'}) on http://{h}:{p}{'; token required' if token else ''}  "
               "(Ctrl-C stops)", err=True)
    if token is None and host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"Warning: listening on {host} with no token: anyone who reaches this port can query the index "
                   "and fetch its images. Set EMBEDX_SERVE_TOKEN (or --token) to require one.", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        typer.echo("stopped", err=True)
    finally:
        server.server_close()
        service.close()  # (the image-embedding thread and the decoder process)


@app.command()
@_handle_errors
def dedup(
    index_dir: Path = typer.Argument(..., help="An index directory from `embedx index`."),
    threshold: float = typer.Option(0.95, help="Similarity at or above which images are duplicates (l2: distance at or below)."),
    k: int = typer.Option(10, "-k", help="Neighbours examined per image."),
    out: Path = typer.Option(Path("duplicates.parquet"), "--out", "-o", help="Parquet file of the groups."),
    html_out: Optional[Path] = typer.Option(None, "--html", help="Also write a contact sheet of the groups."),
    across_sources: bool = typer.Option(False, "--across-sources", help="Only pairs from two different shard directories of the index (train/test leakage)."),
):
    """List groups of near-duplicate images, in bounded memory.

    Examples:

    \b
        embedx dedup idx/ --threshold 0.95 --out dups.parquet --html dups.html
        embedx dedup idx/ --across-sources --out leaks.parquet     # idx = train, + index add test
    """
    from .dedup import find_duplicates, write_groups
    from .query import SearchIndex

    idx = SearchIndex(index_dir)
    groups = find_duplicates(idx, threshold, k, across_sources=across_sources)
    write_groups(groups, out)
    typer.echo(f"{groups.num_groups} groups, {len(groups.positions)} images -> {out}")
    if html_out is not None:
        from .sheet import write_sheet

        rows = []
        for g in range(groups.num_groups):
            members = [i for i in range(len(groups.group)) if groups.group[i] == g]
            first, rest = members[0], members[1:]
            rows.append((f"group {g}: {groups.paths[first]}", idx.absolute_path(int(groups.positions[first])),
                         [(idx.absolute_path(int(groups.positions[i])), f"{groups.best_score[i]:.3f} {groups.paths[i]}") for i in rest]))
        write_sheet(html_out, rows, f"embedx dedup: {index_dir} (threshold {threshold})")


def main() -> None:
    # hub access with no network would hang ~47 s before failing; users online are unaffected
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app(prog_name="embedx")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
