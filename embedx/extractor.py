"""The extraction engine: image listing -> loader -> frozen backbone -> Parquet shards.

The listing is split into fixed shards of `shard_size` consecutive rows. A shard is
written (atomically) once all of its rows are embedded or recorded as errors, then the
manifest is updated. A rerun skips the shards the manifest names, so an interrupted run
resumes where it stopped and ends with exactly the shards an uninterrupted run writes.
"""

from __future__ import annotations

import copy
import contextlib
import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from . import segments, shards
from ._malloc import apply_heap, check_heap
from ._progress import progress_bar
from ._tensor_decode import resolve_device_decoder
from .backbone import (DEFAULT_MODEL, Backbone, autocast, check_preprocessing, load_backbone, resolve_device,
                       resolve_precision, usable_cpus)
from .errors import EmbedxError, InputError, OutputExistsError
from .images import DEFAULT_MAX_PIXELS, ImageListing, ImageRecord, list_images

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that decides what `extract` writes (and how fast)."""

    model: str = DEFAULT_MODEL
    weights: str | None = None
    batch_size: int | None = None  # None: default_batch_size(device)
    num_workers: int | None = None  # None: picked from the cores present
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    labels: str = "folder"
    shard_size: int = 10_000
    normalize: bool = False
    dtype: str = "float32"  # of the stored embeddings: float32 | float16
    overwrite: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    fast_decode: bool = True  # JPEG DCT-domain downscaling (PIL draft) before the resize
    decode: str = "pil"  # pil (CPU workers) | device (JPEGs decoded + resized on the model's device)
    device_share: float = 1.0  # --decode device: share of JPEGs the device decodes; the CPU workers do the rest
    device_decoder: str = "auto"  # --decode device: whose decode_jpeg: auto (torchcodec if it loads) | torchcodec | torchvision | nvimgcodec
    channels_last: bool = True
    prefetch: int | None = None  # batches prepared ahead on a background thread (own CUDA stream); 0: inline; None: default_prefetch
    compile: str = "auto"  # auto | yes | no: torch.compile the backbone (auto: when the run is long enough)
    heap: str = "auto"  # auto | keep | release: glibc keeps freed blocks for reuse (auto: on CPU); see _malloc
    progress: bool = True
    # (added after the fields above, so that positional construction keeps working)
    # preprocessing overrides of the model's data config (None: the model's own; see Backbone.with_preprocessing)
    img_size: int | None = None
    crop_pct: float | None = None
    crop_mode: str | None = None  # center | squash | border
    interpolation: str | None = None  # bilinear | bicubic | …
    pool: str | None = None  # global pooling instead of the model's own (timm's global_pool: avg, max, avgmax, …)
    update: bool = False  # out holds this run already: embed the images new since, as new shards (see segments)
    retry_errors: bool = False  # out holds this run already: embed again the inputs errors.parquet lists
    fold_bn: bool = True  # on a CPU, run a copy of the model with its BatchNorms folded into the convolutions (embedx.fold)
    # on a CPU, eager runs: apply each activation after a convolution inside it (oneDNN post-op, embedx.fuse)
    fuse_act: bool = True
    # in bf16 (or fp16), run the model's half-resolution layers in fp32 (embedx.mixed): None (the
    # default) and True on every device, False nowhere
    fp32_stem: bool | None = None
    decode_threads: int | None = None  # with 0 decoder processes: threads decoding each batch (model waiting); None: default_decode_threads


#: torch.compile costs ~10-60 s on 2 CPU cores (EfficientNet-Lite0) and gains 1.2-1.4x there in
#: fp32; it pays off from a few thousand images. These thresholds keep well clear of break-even.
COMPILE_MIN_IMAGES = {"cpu": 20_000, "cuda": 200_000}
#: CPU precisions where `--compile auto` may compile. Not bf16 in general (Lite0, an AMD AVX-512-bf16
#: CPU without AMX, `python benchmarks/bench_extract.py --compile`): compiled without freezing (see
#: below) it ran 0.92x (session 11) to 1.18x (session 12) eager, for an 18 s first call.
CPU_COMPILE_PRECISIONS = ("fp32",)
#: ... but bf16 too on CPUs with AMX (Intel Xeon since Sapphire Rapids): on one (2 cores, Lite0,
#: session 17) compiled bf16 ran 1.49x eager model-only, same cosine to fp32, and end to end
#: through the CLI (`bench_extract.py --compile-runs 4096,16384`) 1.35x after a ~26 s longer
#: start: it paid from ~15k images.
AMX_COMPILE_PRECISIONS = ("bf16",)


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (and torch can use them)."""
    import torch

    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # torch >= 2.3; private, hence the care
    try:
        return bool(probe and probe())
    except Exception:  # noqa: BLE001 - no answer means no AMX as far as the defaults are concerned
        return False


#: CPU precisions whose compiled model runs with inductor's freezing (the weights as constants:
#: BatchNorm folding, oneDNN weight prepacking, fused pointwise ops; Dynamo reads the flag while
#: it traces, so it is set around each call, never for the whole process). fp32: the same output.
#: Not bf16: inductor then folds every BatchNorm in bf16 too, as `embedx.fold` declines to, which
#: cost accuracy (cosine to fp32 on real photos min 0.9986 vs eager's 0.9991) for 1.33x eager.
CPU_FREEZING_PRECISIONS = ("fp32",)


def should_compile(choice: str, device: str, num_images: int, precision: str = "fp32") -> bool:
    """Whether to torch.compile the backbone: `yes`/`no` as said; `auto` for runs long enough to
    repay the compile (COMPILE_MIN_IMAGES), and on a CPU only at a precision where compiling
    was measured to be faster (CPU_COMPILE_PRECISIONS; AMX_COMPILE_PRECISIONS on AMX CPUs)."""
    if choice not in ("auto", "yes", "no"):
        raise InputError(f"--compile must be auto, yes or no, not {choice!r}.")
    if choice != "auto":
        return choice == "yes"
    if device.startswith("cuda"):
        return num_images >= COMPILE_MIN_IMAGES["cuda"]
    if num_images < COMPILE_MIN_IMAGES["cpu"]:
        return False
    return precision in CPU_COMPILE_PRECISIONS or (precision in AMX_COMPILE_PRECISIONS and cpu_has_amx())


@dataclass(frozen=True)
class ExtractResult:
    """Summary of one `extract` call."""

    out_dir: str
    num_images: int
    num_embedded: int
    num_errors: int
    num_skipped: int  # rows already done by an earlier (interrupted) run
    seconds: float
    bytes_written: int
    precision: str
    device: str
    # where the time went. plan: importing torch/timm, loading the model (unless passed in),
    # the fingerprint and manifest; startup: decoders and model moved to the device. Main
    # thread: input_wait (no prepared batch ready), model, write;
    # prefetch thread (overlaps them): loader_wait (starved by the decoders), prepare (copy to
    # the device, and device_decode within it with --decode device). With --prefetch 0 all run
    # on the main thread, and with --num-workers 0 loader_wait is the decoding itself
    stage_seconds: dict | None = None
    # files in the input folders left out as not images by their extension: {".txt": 2, ...}
    ignored_files: dict = field(default_factory=dict)
    # folders of the input not walked (symlink loops, unreadable), and why: {folder: reason}
    skipped_dirs: dict = field(default_factory=dict)
    # when out held this run already (a rerun, or --update): images appended as new rows by this
    # call, rows whose images are no longer in the input (kept), images whose label changed (kept)
    num_added: int = 0
    num_gone: int = 0
    num_relabelled: int = 0
    num_retried: int = 0  # --retry-errors: inputs recorded as errors, embedded again by this call

    @property
    def num_done(self) -> int:
        """Images this call embedded or recorded as errors (rows of earlier runs not counted)."""
        return self.num_embedded + self.num_errors - self.num_skipped

    @property
    def images_per_second(self) -> float:
        """Images done by this call per second of the whole call, start-up included."""
        return self.num_done / self.seconds if self.seconds > 0 else 0.0

    @property
    def setup_seconds(self) -> float:
        """The one-off part of `seconds`: the plan and startup stages (imports, model loading,
        decoders starting). Small runs are mostly this; the rest is the throughput of the engine."""
        stages = self.stage_seconds or {}
        return stages.get("plan", 0.0) + stages.get("startup", 0.0)

    def time_shares(self) -> dict[str, float]:
        """Where this call's seconds went on the engine's main thread, in order: {"model",
        "waiting for images" (the decode, or decoders not keeping up), "writing", "start-up",
        "finding a crashing image" (only after a decoder died), "other" (listing, finishing)}; {} for engines that do not time their stages (Ray,
        several devices)."""
        stages = self.stage_seconds or {}
        if "model" not in stages:
            return {}
        shares = {"model": stages["model"], "waiting for images": stages.get("input_wait", 0.0),
                  "writing": stages.get("write", 0.0), "start-up": self.setup_seconds}
        if stages.get("crash_check"):  # images decoded one at a time after a decoder died
            shares["finding a crashing image"] = stages["crash_check"]
        shares["other"] = max(0.0, self.seconds - sum(shares.values()))
        return shares

    @property
    def engine_images_per_second(self) -> float:
        """Images done per second after the start-up (`setup_seconds`): the engine's rate."""
        running = self.seconds - self.setup_seconds
        return self.num_done / running if running > 0 else 0.0


def default_batch_size(device: str) -> int:
    """256 on GPUs; on CPUs, per intra-op thread, 8 images with AVX-512 and 2 without (4 to 32).

    On CPUs small batches stay in cache; how small depends on the CPU. EfficientNet-Lite0 on 2
    cores, end to end, a fresh process per run, interleaved rounds (`bench_extract.py
    --batch-sizes`): on an AVX2 CPU batch 4 won (26.7-29.4 and 25.9-27.1 img/s vs 24.3-26.7 for
    16, two sessions); on an AVX-512 CPU (with bf16) batch 16 won in both precisions (bf16
    233-261 vs 180-206 img/s for 4; fp32 154-176 vs 141-156; session 9). Scaling with the
    thread count (so that many-core CPUs still have work for every thread) is an assumption,
    not measured here.
    """
    if device.startswith("cuda"):
        return 256
    import torch

    per_thread = 8 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 2
    return int(min(32, max(4, per_thread * torch.get_num_threads())))


def default_num_workers(device: str) -> int:
    cpus = usable_cpus()
    if device.startswith("cuda"):
        return max(1, min(cpus - 1, 16))  # on a GPU the decoder is the bottleneck
    # on a CPU the model is the bottleneck and its intra-op threads use every core. On 2 cores a
    # decoder process preempts one of the model's two threads, and the other waits for it at the
    # next barrier: decoding in this process between batches (0 workers) was faster end to end,
    # 9 interleaved fresh-process rounds, ahead in 8 (e.g. 37.8-45.4 vs 33.0-37.6 img/s, Lite0,
    # batch 4). With more cores one decoder per ~4 cores (not measured here: no such machine)
    if cpus <= 2:
        return 0
    return max(1, cpus // 4)


def default_decode_threads(num_workers: int) -> int:
    """Threads that decode each batch in this process when there are no decoder processes. The
    model waits for the decode there, so the decode may use the cores the model has just left:
    as many as the model's threads (every core, unless `--devices` shares them out; at most 8),
    where idle OpenMP workers leave them soon (`_openmp`; the CLI sees to it), else 1: behind
    workers that still spin, more threads only contended (2 threads made the decode ~1.6x
    faster with the short spin wait, no faster without: benchmarks/README.md, "decode threads")."""
    from ._openmp import runtime, spin_wait_is_short

    if num_workers != 0 or not spin_wait_is_short(openmp=runtime()):
        return 1
    return max(1, min(_model_threads(), 8))


def _model_threads() -> int:
    import torch

    return torch.get_num_threads()


def default_prefetch(device: str, num_workers: int) -> int:
    """Batches prepared ahead on the prefetch thread: 2; but 0 (inline) on a CPU that decodes in
    this process, where that thread would decode while the model runs, the contention that
    decoding between batches avoids (measured: 35.9-38.0 img/s with the thread vs 37.3-42.6)."""
    return 0 if device == "cpu" and num_workers == 0 else 2


def extract(inputs: list[str | os.PathLike] | str | os.PathLike, out: str | os.PathLike,
            config: ExtractConfig = ExtractConfig(), *, backbone: Backbone | None = None, engine: str = "local",
            address: str | None = None, devices: list[str] | None = None) -> ExtractResult:
    """Embed every image under `inputs` with a frozen backbone into Parquet shards in `out`.

    Args:
        inputs: image directories and/or list files (see `images.list_images`).
        out: output directory (created if needed).
        config: what to run and how.
        backbone: an already-loaded backbone to reuse (must match `config.model`).
        engine: "local" (this process and its decoder workers) or "ray" (a Ray cluster).
        address: Ray cluster address for engine="ray" (default: start or join a local one).
        devices: several devices of this machine (e.g. ["cuda:0", "cuda:1"]): one process each,
            shards assigned round-robin.

    Returns:
        An `ExtractResult` summary. Rerunning after an interruption resumes.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    _check_config(config)
    if engine not in ("local", "ray"):
        raise InputError(f"--engine must be local or ray, not {engine!r}.")
    if engine == "ray" and config.decode != "pil":
        raise InputError("--decode device works with the local engine (and --devices); with --engine ray, Ray tasks "
                         "decode on CPU workers: leave out --decode device.")
    listing = list_images(list(inputs), labels=config.labels, progress=config.progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with shards.DirectoryLock(out) as lock:
        return _extract_locked(listing, out, config, backbone, engine, address, devices, previous_died=lock.died)


def _check_config(config: ExtractConfig) -> None:
    if (config.update or config.retry_errors) and config.overwrite:
        raise InputError("--update / --retry-errors add to the run in --out; --overwrite replaces that run. Pick one.")
    if config.dtype not in ("float32", "float16"):
        raise InputError(f"--dtype must be float32 or float16, not {config.dtype!r}.")
    if config.shard_size < 1:
        raise InputError("--shard-size must be at least 1.")
    if config.batch_size is not None and config.batch_size < 1:
        raise InputError("--batch-size must be at least 1.")
    if config.num_workers is not None and config.num_workers < 0:
        raise InputError("--num-workers must be 0 or more.")
    if config.decode_threads is not None and config.decode_threads < 1:
        raise InputError(f"--decode-threads must be 1 (decode serially) or more, not {config.decode_threads}.")
    if config.decode not in ("pil", "device"):
        raise InputError(f"--decode must be pil or device, not {config.decode!r}.")
    if not 0.0 < config.device_share <= 1.0:
        raise InputError(f"--device-share must be in (0, 1], not {config.device_share}.")
    if config.device_share < 1.0 and config.decode != "device":
        raise InputError("--device-share splits JPEG decoding between the device and the CPU workers: "
                         "it needs --decode device.")
    if config.decode == "device":
        resolve_device_decoder(config.device_decoder)  # raises InputError, saying what to install
    elif config.device_decoder != "auto":
        raise InputError("--device-decoder picks the library that decodes JPEGs on the device: it needs --decode device.")
    if config.prefetch is not None and config.prefetch < 0:
        raise InputError(f"--prefetch must be 0 (prepare batches inline) or more, not {config.prefetch}.")
    check_heap(config.heap)
    check_preprocessing(config.img_size, config.crop_pct, config.crop_mode, config.interpolation)


def configured(backbone: Backbone, config: ExtractConfig) -> Backbone:
    """The backbone as the run asks for it: preprocessing overrides (--img-size, --crop-pct, …)
    and global pooling (--pool) applied."""
    return backbone.with_preprocessing(config.img_size, config.crop_pct, config.crop_mode,
                                       config.interpolation).with_pool(config.pool)


@dataclass
class _Plan:
    """What a run has to do: the shards still missing and everything needed to write them."""

    backbone: Backbone
    device: str
    precision: str
    metadata: dict
    manifest: dict
    records: list[ImageRecord]
    pending: list[ImageRecord]  # records of the shards not yet complete, in listing order
    skipped: int
    embedded_before: int
    errors_before: int
    change: "segments.Diff | None" = None  # the input against the directory, when it held this run already


def _extract_locked(listing: ImageListing, out: Path, config: ExtractConfig, backbone: Backbone | None,
                    engine: str = "local", address: str | None = None, devices: list[str] | None = None,
                    previous_died: str | None = None) -> ExtractResult:
    t0 = time.perf_counter()
    timer = _StageTimer()
    with timer("plan"):
        plan = _plan(listing, out, config, backbone)
    embedded = errors = 0
    if plan.pending:
        if plan.change and plan.change.new:
            log.info("adding %d new images (%d already in %s)", len(plan.change.new), plan.change.known, out)
        elif plan.skipped:
            log.info("resuming: %d of %d shards already complete", len(plan.manifest["shards"]), plan.manifest["num_shards"])
        if engine == "ray":
            from .ray_engine import run_ray

            embedded, errors = run_ray(plan, out, config, address, timer)
        elif devices and len(devices) > 1:
            from .multi_device import run_devices

            embedded, errors = run_devices(plan, out, config, devices)
        else:
            embedded, errors = _run_local_isolating_crashes(plan, out, config, timer, previous_died)
    return replace(_finalize(out, plan, embedded, errors, t0, timer), ignored_files=dict(listing.ignored),
                   skipped_dirs=dict(listing.skipped_dirs))


def _plan(listing: ImageListing, out: Path, config: ExtractConfig, backbone: Backbone | None) -> _Plan:
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    if backbone is None:
        backbone = load_backbone(config.model, config.weights)
    elif backbone.model_name != config.model:
        raise EmbedxError(f"backbone {backbone.model_name!r} does not match config.model {config.model!r}")
    backbone = configured(backbone, config)
    d = backbone.data_config
    if config.decode == "device" and (d.crop_mode != "center" or d.interpolation not in ("bilinear", "bicubic")):
        raise InputError(f"--decode device resizes (bilinear or bicubic) and centre-crops; {backbone.model_name} "
                         f"here uses crop_mode {d.crop_mode!r} with {d.interpolation!r} interpolation. "
                         "Use --decode pil (the default), or --crop-mode center / --interpolation bicubic.")
    records = listing.records
    metadata = provenance(backbone, config, precision, device)

    manifest = shards.read_manifest(out)
    if manifest is not None and config.overwrite:
        _clear(out)
        manifest = None
    elif manifest is None and any(out.glob("part-*.parquet")):
        if not config.overwrite:
            raise OutputExistsError(f"{out} holds shards but no manifest.json. Use --overwrite to replace them.")
        _clear(out)
    if manifest is not None:
        _redo_bad_shards(out, manifest)
    fingerprint = _fingerprint(metadata, records, config.shard_size, manifest.get("metadata") if manifest else None)
    change = None
    if manifest is not None and (config.update or config.retry_errors or manifest.get("fingerprint") != fingerprint
                                 or len(segments.segments(manifest)) > 1):
        diffs = _config_diffs(manifest, metadata, config)
        if diffs:
            # the fp32 stem became the default on GPUs too (session 15): a run begun all-bf16
            # before that goes on with the flag
            all_bf16 = (config.fp32_stem is None and manifest.get("metadata", {}).get("fp32_modules") == []
                        and metadata.get("fp32_modules"))
            raise OutputExistsError(
                f"{out} already holds a run with a different configuration:\n  " + "\n  ".join(diffs)
                + "\nUse another --out directory, or --overwrite to replace it."
                + ("\nThat run kept every layer in bf16: add --no-fp32-stem to go on with it as it was "
                   "(the half-resolution layers in fp32 are now the default on every device)." if all_bf16 else "")
            )
        records, change = _plan_update(out, manifest, listing, config, fingerprint)
    if manifest is None:
        manifest = {
            "format_version": shards.FORMAT_VERSION,
            "fingerprint": fingerprint,
            "config": _config_for_manifest(config),
            "metadata": metadata,
            "root": listing.root,
            "num_images": len(records),
            "num_shards": _num_shards(len(records), config.shard_size),
            "shards": [],
            "complete": False,
        }
        shards.write_manifest(out, manifest)
    done = {s["index"] for s in manifest["shards"]}
    pending = [r for r in records if r.row_id // config.shard_size not in done]
    embedded_before = sum(s["rows"] for s in manifest["shards"])
    errors_before = sum(len(s.get("errors", [])) for s in manifest["shards"])
    return _Plan(
        backbone=backbone, device=device, precision=precision, metadata=metadata, manifest=manifest,
        records=records, pending=pending, skipped=embedded_before + errors_before,
        embedded_before=embedded_before, errors_before=errors_before, change=change,
    )


def _redo_bad_shards(out: Path, manifest: dict) -> None:
    """Shards the manifest lists whose file is missing, damaged or short (a disk fault, a file
    deleted or overwritten by hand) are forgotten, so that this run embeds their rows again:
    a rerun never reports "nothing to do" over rows it does not have. A damaged file is kept
    beside, renamed `*.damaged`; a warning names each. A damaged errors.parquet is written
    again from the manifest."""
    try:
        shards.read_errors(out)
    except EmbedxError:  # errors.parquet is made from the manifest: made again
        log.warning("%s is damaged: written again from manifest.json", out / shards.ERRORS)
        shards.write_errors_of(out, manifest)
    bad = shards.check_shards(out, manifest)
    if not bad:
        return
    for entry, why in bad:
        path = out / entry["file"]
        if path.exists():
            os.replace(path, path.with_name(path.name + ".damaged"))
        log.warning("%s is %s: its %d rows are embedded again%s", path, why, entry["rows"] + len(entry.get("errors", [])),
                    f" (the file is kept as {path.name}.damaged)" if why != "missing" else "")
    dropped = {id(entry) for entry, _ in bad}
    manifest["shards"] = [s for s in manifest["shards"] if id(s) not in dropped]
    manifest["complete"] = False
    shards.write_errors_of(out, manifest)
    shards.write_manifest(out, manifest)


def _plan_update(out: Path, manifest: dict, listing: ImageListing, config: ExtractConfig,
                 fingerprint: str) -> tuple[list[ImageRecord], "segments.Diff"]:
    """The records to run into a directory that holds this configuration already, when the
    input may differ from its first run's: what is unfinished, plus, appended as a new
    segment, the images that are new (with --update) and the inputs recorded as errors (with
    --retry-errors). A rerun of an unchanged input finds nothing new; new images without
    --update are refused with that advice."""
    if manifest.get("complete"):
        unfinished: list[ImageRecord] = []
    elif len(segments.segments(manifest)) == 1:
        if manifest.get("fingerprint") != fingerprint:
            raise OutputExistsError(
                f"{out} holds a run that has not finished, and its input has changed since. Finish it "
                "first (rerun it with the input it had), then add the new images with --update; or use "
                "--overwrite to start over."
            )
        unfinished = listing.records  # the first run, resumed
    else:
        unfinished = segments.unfinished(out, manifest, config.shard_size)
    change = segments.diff(out, manifest, listing.records, unfinished)
    held = sum(s["rows"] + len(s.get("errors", [])) for s in manifest["shards"])
    if change.new and change.known == 0 and held:
        # nothing in common: another collection, or the same one named from another root (paths
        # are relative to the input root): "adding" it would embed every image a second time
        raise OutputExistsError(
            f"None of the input's {len(listing.records)} images is in {out}, which holds {held}. Its paths are "
            f"named from {manifest.get('root')}, this input's from {listing.root} (paths are relative to the input "
            "root: adding a folder beside the first changes it). Extract this input into another --out (and "
            "`embedx index add` both to one index), or use --overwrite to start over."
        )
    if change.new and not config.update:
        raise OutputExistsError(
            f"{out} lacks {len(change.new)} of the input's images (it holds the other {change.known}). Add them with "
            "--update (appended as new shards; the rows there stay as they are), or use --overwrite to start over."
        )
    retry = segments.errored_paths(manifest) & {r.path for r in listing.records} if config.retry_errors else set()
    wanted = {r.path for r in change.new} | retry
    todo = [r for r in listing.records if r.path in wanted]  # in listing order
    added = []
    if todo:
        if retry:  # their error rows give way to what the retry makes of them
            segments.forget_errors(manifest, retry)
        added = segments.append(out, manifest, todo, config.shard_size)
        shards.write_manifest(out, manifest)
        if retry:
            shards.write_errors_of(out, manifest)
    return list(unfinished) + added, replace(change, retried=len(retry))


def _finalize(out: Path, plan: _Plan, embedded: int, errors: int, t0: float, timer: "_StageTimer") -> ExtractResult:
    manifest = plan.manifest
    num_embedded = plan.embedded_before + embedded
    num_errors = plan.errors_before + errors
    manifest["complete"] = True
    manifest["num_embedded"] = num_embedded
    manifest["num_errors"] = num_errors
    shards.write_manifest(out, manifest)
    if not (out / shards.ERRORS).exists():
        shards.write_errors(out, [])
    seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in out.glob("*.parquet"))
    change = plan.change
    return ExtractResult(str(out), manifest["num_images"], num_embedded, num_errors, plan.skipped, seconds, size,
                         plan.precision, plan.device, stage_seconds=dict(timer.seconds),
                         num_added=len(change.new) if change else 0, num_gone=change.gone if change else 0,
                         num_relabelled=change.relabelled if change else 0,
                         num_retried=change.retried if change else 0)


#: decoder-process deaths one run recovers from before it gives up (each finds its culprits first)
MAX_DECODER_DEATHS = 20


def _run_local_isolating_crashes(plan: _Plan, out: Path, config: ExtractConfig, timer: "_StageTimer",
                                 previous_died: str | None = None) -> tuple[int, int]:
    """`_run_local`, surviving images whose decoding kills a decoder process (a crash in a
    decoding library, an out-of-memory kill), which would otherwise end the run, and every
    resume of it, at the same image. When a decoder process dies, the completed shards are kept
    (as on any interruption); the images that may have been in flight — the unfinished shard
    and the batches the decoders had been given — are decoded one at a time in a process of
    their own to find those that kill it; they are recorded as errors (`decoder_crashed`) and
    the run goes on from the first unfinished shard. Without decoder processes (`--num-workers
    0`, the 2-core default) a crash takes the run with it; the rerun then sees that the previous
    run did not exit cleanly (`previous_died`, from the directory's lock) and first decodes the
    images it may have died on, one at a time in a process of their own (1,056 photos in ~1.3 s
    after a kill -9 here), so
    that the one that crashed it is recorded instead of crashing every resume."""
    from ._loader import ImageDataset, decoder_died, find_crashing

    crashed: dict[int, str] = {}
    embedded = errors = 0
    workers = default_num_workers(plan.device) if config.num_workers is None else config.num_workers
    batch_size = config.batch_size or default_batch_size(plan.device)

    def record(found: dict[int, str], records: list) -> None:
        for pos, why in found.items():
            crashed[records[pos].row_id] = f"decoding it killed the decoder process ({why})"
            log.warning("%s: decoding it killed the decoder process (%s): recorded as an error", records[pos].file, why)

    if previous_died and workers == 0 and plan.pending:
        depth = default_prefetch(plan.device, workers) if config.prefetch is None else config.prefetch
        window = min(len(plan.pending), config.shard_size + (depth + 2) * batch_size)
        log.warning("The previous run into %s (pid %s) ended without cleaning up: a crash, a kill or a power cut. "
                    "Decoding its next %d images in a separate process first, in case one of them crashed it",
                    out, previous_died, window)
        with timer("crash_check"):
            found = find_crashing(ImageDataset(plan.pending, _decode_spec(plan.backbone, config)), 0, window)
        record(found, plan.pending)
    for _ in range(MAX_DECODER_DEATHS + 1):
        try:
            e, r = _run_local(plan, out, config, timer, crashed=crashed)
            return embedded + e, errors + r
        except RuntimeError as err:
            if not decoder_died(err):
                raise
            death = str(err).strip()
        done = {s["index"] for s in plan.manifest["shards"]}
        left = [r for r in plan.pending if r.row_id // config.shard_size not in done]
        # what this run has written so far, from the manifest (the attempt's own counts died with it)
        embedded = sum(s["rows"] for s in plan.manifest["shards"]) - plan.embedded_before
        errors = sum(len(s.get("errors", [])) for s in plan.manifest["shards"]) - plan.errors_before
        window = config.shard_size + (workers * 4 + 4) * batch_size  # unfinished shard + batches in flight
        dataset = ImageDataset(left, _decode_spec(plan.backbone, config), crashed)
        log.warning("A decoder process died (%s); decoding the next %d images one at a time to find the one "
                    "that killed it", death.rstrip("."), min(window, len(left)))
        with timer("crash_check"):
            found = find_crashing(dataset, 0, min(window, len(left)))
        if not found:
            raise EmbedxError(f"{death} A decoder process died, and no image among the {min(window, len(left))} "
                              "it may have been decoding kills one on its own: out of memory? Rerun with fewer "
                              "--num-workers or a smaller --batch-size (completed shards are kept).") from None
        record(found, left)
        plan = replace(plan, pending=left)
    raise EmbedxError(f"Decoder processes died more than {MAX_DECODER_DEATHS} times in one run; the last: {death}")


def _run_local(plan: _Plan, out: Path, config: ExtractConfig, timer: "_StageTimer",
               shared_manifest: bool = False, crashed: dict[int, str] | None = None) -> tuple[int, int]:
    """The single-process engine: decoder worker processes -> one device -> shard writer.

    With `shared_manifest`, other processes write shards of the same plan at the same time
    (multi-device runs): manifest updates re-read the file under a lock.
    """
    import torch

    from ._loader import ImageDataset, make_loader
    from ._prefetch import Prefetcher

    backbone, device, pending = plan.backbone, plan.device, plan.pending
    apply_heap(config.heap, device)  # before the decoders fork, so that they inherit it
    batch_size = config.batch_size or default_batch_size(device)
    num_workers = default_num_workers(device) if config.num_workers is None else config.num_workers
    writer = _ShardWriter(out, plan.manifest, config, backbone.dim, plan.metadata, shared=shared_manifest)
    dataset = ImageDataset(pending, _decode_spec(backbone, config), crashed)
    threads = default_decode_threads(num_workers) if config.decode_threads is None else config.decode_threads
    loader = make_loader(dataset, batch_size, num_workers, pin_memory=device.startswith("cuda"), decode_threads=threads)
    with timer("startup"):
        # the model's checked changes (folding, fp32 stem, bf16 weights: forward passes on the
        # CPU) before the decoder processes start: with 15 of them decoding beside it, the fp32
        # stem's check took 2-5 s on the H200 machine's 16 cores (session 15); then the decoder
        # processes, before CUDA is initialised here (forking a process that holds a CUDA context
        # is slower and not safe); then the model to the device
        compiled = should_compile(config.compile, device, len(pending), plan.precision)
        model = _prepare_model(backbone, device, config.channels_last, plan.precision, fold_bn=config.fold_bn,
                               fp32_stem=config.fp32_stem, place=False, fuse_act=config.fuse_act and not compiled)
        batches = iter(loader)
        model = _place(model, device, config.channels_last)
        runner = _Embedder(model, backbone, device, plan.precision, config.normalize, config.channels_last,
                           compile=compiled)
    bar = _progress(len(plan.records), len(plan.records) - len(pending), config.progress)
    pre = _tensor_preprocess(backbone)
    counts = {"embedded": 0, "errors": 0}

    def finish(batch, handle):
        # the previous batch's embeddings: on a GPU this waits only for that batch, while
        # the batch launched after it keeps the device busy
        with timer("model"):
            emb = runner.result(handle)
        with timer("write"):
            counts_batch = writer.add_batch([pending[p] for p in batch.positions], batch.ok, emb, batch.widths,
                                            batch.heights, batch.errors)
        counts["embedded"] += counts_batch[0]
        counts["errors"] += counts_batch[1]
        bar.update(len(batch.positions))
        bar.set_postfix(errors=plan.errors_before + counts["errors"], refresh=False)

    def prepare(batch):
        # runs on the prefetch thread (and on a GPU its own stream), one batch ahead of the model
        if batch.encoded:
            with timer("device_decode"):
                return _device_decode(batch, device, pre, dataset.spec.device_decoder)
        return batch.pixels.to(device, non_blocking=True)

    depth = default_prefetch(device, num_workers) if config.prefetch is None else config.prefetch
    prefetcher = Prefetcher(batches, prepare, device, depth=depth, timer=timer)
    try:
        with torch.inference_mode():
            in_flight = None
            ready = iter(prefetcher)
            while True:
                with timer("input_wait"):
                    item = next(ready, None)
                if item is None:
                    break
                batch, pixels = item
                with timer("model"):
                    handle = runner.launch(pixels)
                if in_flight is not None:
                    finish(*in_flight)
                in_flight = (batch, handle)
            if in_flight is not None:
                finish(*in_flight)
    finally:
        prefetcher.close()
        bar.close()
        with timer("write"):
            writer.drain()
    writer.finish()
    return counts["embedded"], counts["errors"]


def provenance(backbone: Backbone, config: ExtractConfig, precision: str, device: str) -> dict:
    """The `embedx` schema metadata: everything needed to reproduce or query the embeddings."""
    from . import __version__

    return {
        "model": backbone.model_name,
        "weights_source": backbone.weights_source,
        "weights_sha256": backbone.weights_sha256,
        "data_config": backbone.data_config.to_dict(),
        "pooling": backbone.pooling,
        "normalized": bool(config.normalize),
        "dim": backbone.dim,
        "dtype": config.dtype,
        "precision": precision,
        "fp32_modules": fp32_modules(backbone, device, precision, config.fp32_stem),
        "decode": _decode_spec(backbone, config).label,
        "embedx_version": __version__,
    }


def _decode_spec(backbone: Backbone, config: ExtractConfig):
    """The one DecodeSpec of a run: what its decoders (local workers or Ray tasks) apply, and what
    its shards' `decode` label names."""
    device_decoder = resolve_device_decoder(config.device_decoder) if config.decode == "device" else "torchvision"
    return backbone.decode_spec(config.fast_decode, config.max_pixels, config.decode, config.device_share,
                                device_decoder)


def _fingerprint(metadata: dict, records: list[ImageRecord], shard_size: int, recorded: dict | None = None) -> str:
    """What identifies a run: its metadata (only the keys of `recorded`, the metadata of the run
    already in the directory, when given: an older embedx recorded fewer), input and shard size."""
    keep = {k: v for k, v in metadata.items() if k != "embedx_version" and (recorded is None or k in recorded)}
    h = hashlib.sha256(repr(sorted(keep.items())).encode())
    h.update(f"|shard_size={shard_size}|n={len(records)}|".encode())
    for r in records:
        h.update(r.path.encode())
        h.update(b"\0")
        h.update((r.label or "").encode())
        h.update(b"\n")
    return h.hexdigest()


def _config_diffs(manifest: dict, metadata: dict, config: ExtractConfig) -> list[str]:
    """What differs between a directory's run and this configuration, besides the input (in the
    metadata that run recorded: keys an older embedx did not record are not compared)."""
    old = manifest.get("metadata", {})
    diffs = [f"{k}: {old.get(k)!r} -> {metadata.get(k)!r}" for k in sorted(metadata)
             if k != "embedx_version" and k in old and old.get(k) != metadata.get(k)]
    old_shard = manifest.get("config", {}).get("shard_size")
    if old_shard != config.shard_size:
        diffs.append(f"shard_size: {old_shard} -> {config.shard_size}")
    return diffs


def _config_for_manifest(config: ExtractConfig) -> dict:
    d = asdict(config)
    for action in ("overwrite", "update", "retry_errors", "progress"):
        d.pop(action)
    return d


def _num_shards(n: int, shard_size: int) -> int:
    return (n + shard_size - 1) // shard_size


def _clear(out: Path) -> None:
    for p in (list(out.glob("part-*.parquet")) + list((out / segments.SEGMENTS_DIR).glob("*.parquet"))
              + [out / shards.ERRORS, out / shards.MANIFEST]):
        if p.exists():
            p.unlink()
    for p in out.glob(".*.tmp"):
        p.unlink()


def prepare_model(backbone: Backbone, device: str, precision: str = "auto", fold_bn: bool = True,
                  fp32_stem: bool | None = None, fuse_act: bool = True):
    """`backbone`'s model on `device` as `embed_files` runs it at `precision`: channels_last, and
    on a CPU with its BatchNorms folded (`embedx.fold`) unless `fold_bn` is False and its
    activations fused into the convolutions before them (`embedx.fuse`) unless `fuse_act` is
    False; in bf16, its half-resolution layers in fp32 as `fp32_stem` says (`fp32_modules`)."""
    device = resolve_device(device)
    return _prepare_model(backbone, device, True, resolve_precision(precision, device), fold_bn=fold_bn,
                          fp32_stem=fp32_stem, fuse_act=fuse_act)


def fp32_modules(backbone: Backbone, device: str, precision: str, fp32_stem: bool | None = None) -> list[str]:
    """The modules `_prepare_model` keeps in fp32 with these settings: in bf16 or fp16, the model's
    half-resolution layers (`embedx.mixed`) unless `fp32_stem` is False (None, the default, and
    True: on every device). Measured, bf16 cosine to fp32 on real photos: a CPU, Lite0, min
    0.993 -> 0.999; an H200, min 0.99876 -> 0.99971 for 0.99x of resnet50's model-only speed
    (`tests/test_gpu.py`, `benchmarks/bench_gpu.py`, session 15). Else none."""
    wanted = True if fp32_stem is None else fp32_stem
    if not (wanted and precision in ("bf16", "fp16")):
        return []
    from .mixed import half_resolution_modules

    return half_resolution_modules(backbone.model)


def _prepare_model(backbone: Backbone, device: str, channels_last: bool, precision: str | None = None,
                   fold_bn: bool = False, fp32_stem: bool | None = False, bf16_weights: bool = True,
                   place: bool = True, fuse_act: bool = False):
    """The model to run: `backbone.model` itself (moved to `device`), or on a CPU a copy with
    - with `fold_bn`, at precision fp32 or bf16, its BatchNorms folded into the convolutions before
      them (bf16: pointwise ones, and depthwise ones in the layers kept in fp32; see `embedx.fold`);
    - with `fuse_act`, at precision fp32 or bf16, each activation after a convolution applied by
      the convolution itself (oneDNN's post-op, `embedx.fuse`; for eager runs: torch.compile fuses
      by itself);
    - in bf16 (or fp16), as `fp32_stem` says, its half-resolution layers in fp32 (`fp32_modules`,
      `embedx.mixed`; on any device);
    - in bf16, the other layers' weights stored in bf16 (`embedx.mixed.store_bf16_weights`: the
      same output, checked; `bf16_weights=False` leaves them fp32, for benchmarks).
    Then moved to `device` (channels_last as asked: `_place`), unless `place` is False.

    Raises:
        EmbedxError: keeping the layers in fp32 changed what the model computes."""
    model = backbone.model
    kept = fp32_modules(backbone, device, precision, fp32_stem)
    input_size = tuple(backbone.data_config.input_size)
    if fold_bn and device == "cpu" and precision in ("fp32", "bf16"):
        from .fold import fold_batchnorm

        model, folded = fold_batchnorm(model, input_size, depthwise=True if precision == "fp32" else tuple(kept))
        if folded:
            log.info("folded %d BatchNorm layers into their convolutions (%s)", folded, precision)
    if fuse_act and device == "cpu" and precision in ("fp32", "bf16"):
        from .fuse import fuse_activations

        # in place on folding's copy; else a copy when it fuses anything
        model, fused = fuse_activations(model, input_size, inplace=model is not backbone.model)
        if fused:
            log.info("fused %d activations into their convolutions (%s)", fused, precision)
    if kept:
        from .mixed import keep_fp32

        try:
            model = keep_fp32(model, kept, input_size, inplace=model is not backbone.model)  # a copy already
        except ValueError as e:
            raise EmbedxError(f"Keeping {', '.join(kept)} of {backbone.model_name} in fp32 changed the model ({e}). "
                              "Run without it: --no-fp32-stem (ExtractConfig(fp32_stem=False)).") from None
        log.info("running %s in fp32, the rest in %s", ", ".join(kept), precision)
    if bf16_weights and device == "cpu" and precision == "bf16":
        from .mixed import store_bf16_weights

        model, stored = store_bf16_weights(model if model is not backbone.model else copy.deepcopy(model), input_size)
        if stored:
            log.info("stored the weights of %d layers in bf16 (autocast's cast, done once: the same output)", stored)
    return _place(model, device, channels_last) if place else model


def _place(model, device: str, channels_last: bool):
    import torch

    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


class _StageTimer:
    """Accumulates wall-clock seconds per named stage: `with timer("model"): ...`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def _tensor_preprocess(backbone: Backbone):
    from ._tensor_decode import TensorPreprocess

    d = backbone.data_config
    return TensorPreprocess(d.resize_size, tuple(d.input_size[1:]), d.interpolation)


def _device_decode(batch, device: str, pre, decoder: str):
    """Decode the batch's JPEG bytes on the device with `decoder` (torchcodec | torchvision) and
    merge them with the CPU-decoded pixels, in item order; JPEGs that fail to decode become
    error records."""
    import torch

    from ._tensor_decode import decode_batch, finish_batch

    images, sizes, failures = decode_batch([torch.from_numpy(e) for e in batch.encoded], device, pre, decoder)
    cpu_pixels = batch.pixels.to(device, non_blocking=True).float()
    parts, k_enc, k_px = [], 0, 0
    for item, source in enumerate(batch.sources):
        if source == "encoded":
            if k_enc in failures:
                batch.ok[item] = False
                batch.errors[item] = ("decode_error", failures[k_enc])
            else:
                parts.append(images[k_enc])
                batch.widths[item], batch.heights[item] = sizes[k_enc]
            k_enc += 1
        elif source == "pixels":
            parts.append(cpu_pixels[k_px])
            k_px += 1
    if not parts:
        return torch.empty((0, 3, *pre.crop), dtype=torch.float32, device=device)
    return finish_batch(parts).contiguous(memory_format=torch.channels_last)


class _Embedder:
    """uint8 NCHW batch -> normalised float on device -> model -> (n, D) float32 numpy.

    A batch that runs out of GPU memory is split in halves and retried, recursively.
    """

    def __init__(self, model, backbone: Backbone, device: str, precision: str, normalize: bool, channels_last: bool,
                 compile: bool = False):
        import torch

        self.model = model
        self.eager = model
        if compile:
            log.info("compiling the backbone with torch.compile (first batch is slow)")
            self.model = torch.compile(model)
        self.compiled = compile
        self.freezing = compile and device == "cpu" and precision in CPU_FREEZING_PRECISIONS
        self.device = device
        self.precision = precision
        self.normalize = normalize
        self.channels_last = channels_last
        mean = torch.tensor(backbone.data_config.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(backbone.data_config.std, dtype=torch.float32).view(1, 3, 1, 1)
        # (x / 255 - mean) / std == x * scale + shift
        self.scale = (1.0 / (255.0 * std)).to(device)
        self.shift = (-mean / std).to(device)
        self.dim = backbone.dim

    def embed(self, pixels) -> np.ndarray:
        """Embeddings of a uint8 (or 0-255 float) NCHW batch, as (n, D) float32 numpy."""
        return self.result(self.launch(pixels))

    def launch(self, pixels) -> "_HostCopy":
        """Queue the batch on the device, and the copy of its embeddings back to the host behind
        it; returns the pending copy (`result` waits for it)."""
        return _HostCopy(self._embeddings(pixels))

    def _embeddings(self, pixels):
        """The batch's embeddings as a device tensor (not yet synchronised). Out-of-memory is
        raised at allocation, here, so the split-and-retry lives here."""
        import torch

        if pixels.shape[0] == 0:
            return torch.empty((0, self.dim), dtype=torch.float32, device=self.device)
        try:
            return self._forward(pixels)
        except Exception as e:  # noqa: BLE001 - only out-of-memory errors are retried
            if not _is_oom(e) or pixels.shape[0] == 1:
                raise
            self._free()
            half = pixels.shape[0] // 2
            log.warning("out of memory on a batch of %d; retrying as two halves", pixels.shape[0])
            return torch.cat([self._embeddings(pixels[:half]), self._embeddings(pixels[half:])])

    @staticmethod
    def result(handle: "_HostCopy") -> np.ndarray:
        return handle.wait()

    def _forward(self, pixels):
        import torch

        x = pixels.to(self.device, non_blocking=True)
        x = x.float().mul_(self.scale).add_(self.shift)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision), _inductor_freezing(self.freezing and self.compiled):
            try:
                feats = self.model(x)
            except Exception as e:  # noqa: BLE001
                if not self.compiled or _is_oom(e):
                    raise
                # a model torch.compile cannot handle still runs: eagerly, and the user is told
                log.warning("torch.compile failed (%s: %s); running the model eagerly", type(e).__name__, str(e)[:200])
                self.model, self.compiled = self.eager, False
                feats = self.model(x)
        feats = feats.float()
        if self.normalize:
            feats = torch.nn.functional.normalize(feats, dim=1)
        return feats

    def _free(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _inductor_freezing(on: bool):
    """Inductor's freezing for the compiles (first call, recompiles) within; nothing when off."""
    if not on:
        return contextlib.nullcontext()
    import torch._inductor.config

    return torch._inductor.config.patch(freezing=True)


class _HostCopy:
    """A batch's embeddings on their way to the host.

    On a GPU the copy goes to pinned memory, queued (non-blocking) on the stream right behind the
    batch's model, with an event after it: waiting for the event waits for this batch only. A
    plain `.cpu()` would instead wait for everything queued on the stream so far — by then also
    the next batch, launched before this one is collected — and the GPU would idle while the
    host writes this batch's rows and launches the one after.
    """

    def __init__(self, feats):
        import torch

        self.event = None
        if feats.is_cuda:
            self.host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
            self.host.copy_(feats, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(feats.device))
        else:
            self.host = feats.cpu()  # a no-op on the CPU

    def wait(self) -> np.ndarray:
        if self.event is None:
            return self.host.numpy()
        self.event.synchronize()
        # a pageable copy: the rows are kept until their shard is written, pinned memory is not
        # held that long
        return self.host.numpy().copy()


def _is_oom(e: Exception) -> bool:
    import torch

    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


class _ShardWriter:
    """Accumulates rows shard by shard, in listing order, and writes each shard once complete."""

    def __init__(self, out: Path, manifest: dict, config: ExtractConfig, dim: int, metadata: dict,
                 shared: bool = False):
        self.shared = shared
        self.out = out
        self.manifest = manifest
        self.shard_size = config.shard_size
        self.dtype = config.dtype
        self.dim = dim
        self.metadata = metadata
        # fixed for the run (only shard entries are added to the manifest while it runs), and read
        # here on the main thread while the writer thread swaps the manifest's contents
        self.segments = segments.segments(manifest)
        self.current: int | None = None
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedx-shard-writer")
        self._pending: list = []
        self._failed = False
        self._reset()

    def _reset(self):
        self.row_ids: list[int] = []
        self.paths: list[str] = []
        self.labels: list[str | None] = []
        self.embs: list[np.ndarray] = []
        self.widths: list[int] = []
        self.heights: list[int] = []
        self.errors: list[shards.ErrorRow] = []
        self.seen = 0

    def _enter(self, rec: ImageRecord) -> None:
        index = rec.row_id // self.shard_size
        if self.current is None:
            self.current = index
        assert index == self.current, "records must arrive in listing order"

    def _maybe_flush(self) -> None:
        if self.seen == segments.shard_rows(self.segments, self.current, self.shard_size):
            self._flush()

    def add(self, rec: ImageRecord, embedding: np.ndarray, width: int, height: int) -> None:
        self._enter(rec)
        self.row_ids.append(rec.row_id)
        self.paths.append(rec.path)
        self.labels.append(rec.label)
        self.embs.append(embedding)
        self.widths.append(width)
        self.heights.append(height)
        self.seen += 1
        self._maybe_flush()

    def add_batch(self, recs: list[ImageRecord], ok: list[bool], embeddings: np.ndarray, widths, heights,
                  errors) -> tuple[int, int]:
        """Rows of one batch in listing order; `embeddings` holds the ok rows only.
        Returns (embedded, errors)."""
        k = n_err = 0
        for rec, good, w, h, err in zip(recs, ok, widths, heights, errors):
            if good:
                self.add(rec, embeddings[k], int(w), int(h))
                k += 1
            else:
                self.add_error(rec, str(err[0]), str(err[1]))
                n_err += 1
        return k, n_err

    def add_error(self, rec: ImageRecord, kind: str, message: str) -> None:
        self._enter(rec)
        self.errors.append(shards.ErrorRow(rec.row_id, rec.path, kind, message))
        self.seen += 1
        self._maybe_flush()

    def _flush(self) -> None:
        # stacking the rows (a shard of 2048-d rows is 80 MB: ~0.05-0.2 s), compressing and writing
        # them overlap the next batches; one writer thread keeps shards (and manifest updates) in order
        columns = (self.row_ids, self.paths, self.labels, self.embs, self.widths, self.heights)
        self._pending.append(self._pool.submit(self._write, self.current, columns, list(self.errors)))
        for f in [f for f in self._pending if f.done()]:
            f.result()  # surface a failed write early
        self._pending = [f for f in self._pending if not f.done()]
        self.current = None
        self._reset()

    def _write(self, index: int, columns: tuple, errors) -> None:
        if self._failed:
            raise EmbedxError(f"shard {index} not written: an earlier shard write failed")
        try:
            row_ids, paths, labels, embs, widths, heights = columns
            rows = shards.ShardRows(
                np.asarray(row_ids, dtype=np.int64), paths, labels,
                np.stack(embs) if embs else np.empty((0, self.dim), dtype=np.float32),
                np.asarray(widths), np.asarray(heights),
            )
            path = shards.write_shard(self.out, index, rows, self.dim, self.dtype, self.metadata)
            if self.shared:
                with shards.ManifestLock(self.out):
                    # other processes add their shards too: start from the file, not our copy
                    self.manifest = shards.read_manifest(self.out)
                    self._record(index, path, rows, errors)
            else:
                self._record(index, path, rows, errors)
        except BaseException:
            self._failed = True
            raise

    def _record(self, index: int, path: Path, rows, errors) -> None:
        entry = {"index": index, "file": path.name, "rows": len(rows.row_ids), "errors": [asdict(e) for e in errors]}
        updated = dict(self.manifest)
        updated["shards"] = sorted(self.manifest["shards"] + [entry], key=lambda s: s["index"])
        # errors.parquet first, then the manifest: a crash in between only means the
        # errors file lists a shard the manifest does not yet name, and is rewritten on resume
        shards.write_errors_of(self.out, updated)
        shards.write_manifest(self.out, updated)
        # the caller's manifest dict is updated in place only once the shard is on disk
        self.manifest.clear()
        self.manifest.update(updated)

    def drain(self) -> None:
        """Wait for the shards already handed to the writer thread (also on Ctrl-C: they are
        complete, so they land in the manifest and a rerun skips them)."""
        try:
            for f in self._pending:
                f.result()  # re-raises a failed write
        finally:
            self._pending = []
            self._pool.shutdown(wait=True)

    def finish(self) -> None:
        self.drain()
        if self.seen:
            raise EmbedxError(f"internal error: shard {self.current} ended incomplete ({self.seen} rows)")


def _progress(total: int, initial: int, enabled: bool):
    return progress_bar(desc="extract", unit="img", enabled=enabled, total=total, initial=initial)


@dataclass(frozen=True)
class EmbeddedFiles:
    """In-memory embeddings of a few files (queries, predictions): no shards written."""

    files: list[str]
    embeddings: np.ndarray  # (n_ok, D) float32, rows of the files that decoded
    ok: list[bool]
    errors: list[tuple[str, str] | None]


def embed_files(files: list[str], backbone: Backbone, *, device: str = "auto", precision: str = "auto",
                normalize: bool = False, batch_size: int | None = None, num_workers: int = 0,
                fast_decode: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                model=None, decoder=None) -> EmbeddedFiles:
    """Embed image files in memory with the same pipeline as `extract`.

    Args:
        model: `backbone`'s model already prepared for `device` by `prepare_model`, so that
            callers embedding many small batches (a server's queries) do not pay for that on
            every call (Lite0 on a CPU, with the copy, folding and checks: ~28 ms in fp32, 42-57 ms
            in bf16; a forward pass of one image is ~7 ms).
        decoder: a `_isolated.DecodeProcess` that decodes the files instead of this process (and
            `num_workers`): an image that crashes the decoding library is then an error
            (`decoder_crashed`), not the end of the caller.
    """
    import torch

    from ._loader import ImageDataset, collate, make_loader

    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    records = [ImageRecord(i, str(f), str(Path(f).resolve()), None) for i, f in enumerate(files)]
    if model is None:
        model = prepare_model(backbone, device, precision)
    runner = _Embedder(model, backbone, device, precision, normalize, channels_last=True)
    dataset = ImageDataset(records, backbone.decode_spec(fast_decode, max_pixels))
    batch_size = batch_size or default_batch_size(device)
    if decoder is not None:
        loader = (collate(decoder.decode(dataset, s, min(len(dataset), s + batch_size)))
                  for s in range(0, len(dataset), batch_size))
    else:
        loader = make_loader(dataset, batch_size, num_workers, pin_memory=device.startswith("cuda"),
                             decode_threads=default_decode_threads(num_workers))
    embs, ok, errors = [], [], []
    with torch.inference_mode():
        for batch in loader:
            embs.append(runner.embed(batch.pixels))
            ok.extend(batch.ok)
            errors.extend(batch.errors)
    emb = np.concatenate(embs) if embs else np.empty((0, backbone.dim), np.float32)
    return EmbeddedFiles([str(f) for f in files], emb, ok, errors)


__all__ = ["ExtractConfig", "ExtractResult", "EmbeddedFiles", "embed_files", "extract", "provenance"]
