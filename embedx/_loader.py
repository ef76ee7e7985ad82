"""Decode-and-resize in worker processes (or, with none, in threads of this process:
`ThreadedBatches`); uint8 batches that carry their own indices.

Workers decode (plain JPEGs straight into arrays by simplejpeg, the rest with PIL), run the
model's resize + crop (on uint8 tensors by default, `UInt8ResizeCrop`; timm's own PIL
transform on PIL images with --exact-decode) and hand back uint8
CHW tensors through shared memory; normalisation happens later on the device. Each
item carries its position, so output order never depends on the worker count, and a
file that fails to decode travels as an error record instead of raising.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .images import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageRecord, decode_image, read_jpeg_bytes
from ._resize import channels_last_image, oversized, resize_crop, resized_size, window_resize_crop


@dataclass
class Batch:
    """Decoded images of one loader batch. `positions` index into the dataset."""

    positions: list[int]  # every item of the batch, in order
    pixels: "object"  # uint8 tensor (n_ok, 3, H, W) of the items that decoded
    ok: list[bool]  # per item: decoded or not
    widths: list[int]
    heights: list[int]
    errors: list[tuple[str, str] | None]  # per item: (kind, message) when not ok
    # decode="device": JPEG bytes still to decode, and per ok item where its pixels are
    encoded: list = None  # uint8 numpy arrays of whole JPEG files
    sources: list[str | None] = None  # per item: "pixels", "encoded" or None (failed)

    def pin_memory(self):
        self.pixels = self.pixels.pin_memory()
        return self


@dataclass(frozen=True)
class DecodeSpec:
    """How a decoder turns a file into the model's uint8 pixels. Picklable: it travels to the
    decoder processes and to Ray tasks. Made by `Backbone.decode_spec`."""

    transform: "object"  # decoded PIL image -> (H, W, 3) uint8: UInt8ResizeCrop or timm's PIL transform
    input_size: tuple[int, int, int]  # (3, H, W) the transform must produce
    draft_size: int | None  # JPEG DCT-domain downscaling target (PIL draft); None: full scale
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    decode: str = "pil"  # pil | device (workers only read JPEG bytes; the device decodes them)
    device_share: float = 1.0  # decode="device": the share of JPEGs left to the device, the rest PIL
    device_decoder: str = "torchvision"  # decode="device": whose decode_jpeg (torchcodec | torchvision)

    def on_device(self, row_id: int) -> bool:
        """Whether the device decodes this row's JPEG (decode="device"). With a share below 1 the
        rows are spread evenly (golden-ratio sequence over row ids, so a resumed run splits them
        the same way), and the CPU workers decode the others while the device does its share."""
        if self.decode != "device":
            return False
        return self.device_share >= 1.0 or (row_id * 0.6180339887498949) % 1.0 < self.device_share

    @property
    def label(self) -> str:
        """How pixels were made, for the shard metadata: torchcodec-device or torchvision-device
        (that library's decode_jpeg on the device: nvJPEG on a GPU), pil-draft2x+uint8-resize
        (PIL decode at a reduced DCT scale of at least twice the resize size, resize + crop on
        uint8 tensors), pil-draft2x (the same with timm's PIL resize), or pil (timm's exact
        transform); with a device share below 1, e.g. torchcodec-device@0.50+pil-draft2x+uint8-resize."""
        if self.decode == "device" and self.device_share >= 1.0:
            return f"{self.device_decoder}-device"
        if self.draft_size is None:
            cpu = "pil"
        else:
            cpu = "pil-draft2x+uint8-resize" if isinstance(self.transform, UInt8ResizeCrop) else "pil-draft2x"
        if self.decode == "device":  # a share of the JPEGs on the device, the rest on the CPU
            return f"{self.device_decoder}-device@{self.device_share:.2f}+{cpu}"
        return cpu


class ImageDataset:
    """Map-style dataset over image records (torch's DataLoader only needs len/getitem).
    `crashed`: row ids whose decoding killed a decoder process, with why: recorded as errors
    of kind `decoder_crashed` without being decoded again."""

    def __init__(self, records: list[ImageRecord], spec: DecodeSpec, crashed: dict[int, str] | None = None):
        self.records = records
        self.spec = spec
        self.crashed = dict(crashed or {})

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec, spec = self.records[i], self.spec
        if rec.row_id in self.crashed:
            return i, None, 0, 0, ("decoder_crashed", self.crashed[rec.row_id])
        if spec.on_device(rec.row_id):
            try:
                raw = read_jpeg_bytes(rec.file, spec.max_pixels)
            except ImageDecodeError as e:
                return i, None, 0, 0, (e.kind, str(e))
            if raw is not None:
                return i, raw, 0, 0, "encoded"
        try:
            decoded = decode_image(rec.file, draft_size=spec.draft_size, max_pixels=spec.max_pixels,
                                   as_array=isinstance(spec.transform, UInt8ResizeCrop))
            img = spec.transform(decoded.image)
            arr = np.asarray(img, dtype=np.uint8)
            if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[:2] != tuple(spec.input_size[1:]):
                raise ImageDecodeError("decode_error", f"transform produced shape {arr.shape}")
            return i, arr, decoded.width, decoded.height, None
        except ImageDecodeError as e:
            return i, None, 0, 0, (e.kind, str(e))
        except Exception as e:  # noqa: BLE001 - one bad file must never stop the run
            return i, None, 0, 0, ("decode_error", f"{type(e).__name__}: {e}")


class UInt8ResizeCrop:
    """timm's eval Resize + CenterCrop on uint8 tensors instead of PIL images.

    torchvision's antialiased uint8 kernels give PIL's pixels to within two grey levels (mean
    difference 0.004 on real photos; tested); for images whose resize would be `oversized`
    (banners, panoramas) only a window of the source around the crop is resized, by the same kernels at a third of the time on one core: the resize is
    most of a decoder's work, so on a GPU machine, where decoders are the bottleneck, this is
    throughput. Picklable: it runs in the decoder workers. Takes a PIL image or a writable HWC
    uint8 array (used in place); returns an HWC uint8 array.
    """

    def __init__(self, size, interpolation: str, max_size: int | None, crop: tuple[int, int]):
        self.size = size  # int (shorter side) or [h, w], as torchvision's Resize takes it
        self.interpolation = interpolation  # "bilinear" | "bicubic"
        self.max_size = max_size
        self.crop = list(crop)

    def __call__(self, image) -> np.ndarray:
        import torch

        if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.flags.writeable:
            hwc = torch.from_numpy(image)
        else:
            hwc = torch.from_numpy(np.array(image, dtype=np.uint8))  # a writable copy
        x = channels_last_image(hwc)  # (1, 3, H, W), the layout the fast kernels want
        nh, nw = resized_size(x.shape[2], x.shape[3], self.size, self.max_size)
        crop = tuple(self.crop)
        if oversized(nh, nw, crop):  # a banner or a panorama: resize only what the crop keeps
            out = window_resize_crop(x, nh, nw, crop, self.interpolation)
        else:
            out = resize_crop(x, nh, nw, crop, self.interpolation)
        return out[0].permute(1, 2, 0).numpy()

    def __repr__(self) -> str:
        return f"UInt8ResizeCrop(size={self.size}, {self.interpolation}, crop={self.crop})"


def collate(items) -> Batch:
    import torch

    ok_arrays = [arr for _, arr, _, _, err in items if arr is not None and err != "encoded"]
    if ok_arrays:
        pixels = torch.from_numpy(np.stack(ok_arrays)).permute(0, 3, 1, 2)  # NHWC -> NCHW view
    else:
        pixels = torch.empty((0, 3, 1, 1), dtype=torch.uint8)
    encoded = [arr for _, arr, _, _, err in items if err == "encoded"]
    return Batch(
        positions=[i for i, *_ in items],
        pixels=pixels,
        ok=[arr is not None for _, arr, _, _, _ in items],
        widths=[w for _, _, w, _, _ in items],
        heights=[h for _, _, _, h, _ in items],
        errors=[None if err == "encoded" else err for *_, err in items],
        encoded=encoded,
        sources=[("encoded" if err == "encoded" else "pixels") if arr is not None else None
                 for _, arr, _, _, err in items],
    )


def worker_init(_worker_id: int) -> None:
    import torch

    # decoding is single-threaded work; extra intra-op threads only fight the model for cores
    torch.set_num_threads(1)


class _Shares:
    """Positions [start, stop) handed out one at a time to whichever thread asks next."""

    def __init__(self, start: int, stop: int):
        import threading

        self.next, self.stop = start, stop
        self.lock = threading.Lock()

    def take(self) -> int | None:
        with self.lock:
            i = self.next
            if i >= self.stop:
                return None
            self.next = i + 1
            return i


def _decode_shares(dataset: ImageDataset, shares: _Shares, items: list, start: int) -> None:
    while (i := shares.take()) is not None:
        items[i - start] = dataset[i]


def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)  # this thread's own OpenMP setting: the model's threads keep theirs


class ThreadedBatches:
    """Batches decoded in this process by `threads` threads at the same time: the calling thread
    and a thread pool, each taking the batch's next undecoded image until none is left (so a
    slow image holds up one thread, not a fixed share of the batch: 0.79 vs 0.81 ms an image
    against fixed halves, 7 alternating runs on 512 real photos, batch 32, 2 threads). For a CPU that runs the model on every core and decodes
    between batches (no decoder processes): the decode, which is serial there, gets every core
    too instead of one, while the model waits as before. simplejpeg, PIL's decoders and torch's
    resize release the GIL, so the threads run in parallel. Each item is `ImageDataset`'s and
    keeps its place, so batches hold exactly what the serial loop gives.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, threads: int):
        if threads < 2:
            raise ValueError(f"ThreadedBatches needs 2 threads or more, not {threads}")
        self.dataset, self.batch_size, self.threads = dataset, batch_size, threads

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self):
        from concurrent.futures import ThreadPoolExecutor

        n = len(self.dataset)
        with ThreadPoolExecutor(self.threads - 1, thread_name_prefix="embedx-decode",
                                initializer=_one_torch_thread) as pool:
            for start in range(0, n, self.batch_size):
                stop = min(n, start + self.batch_size)
                shares, items = _Shares(start, stop), [None] * (stop - start)
                others = [pool.submit(_decode_shares, self.dataset, shares, items, start)
                          for _ in range(min(self.threads, stop - start) - 1)]
                _decode_shares(self.dataset, shares, items, start)
                for future in others:
                    future.result()
                yield collate(items)


def make_loader(dataset: ImageDataset, batch_size: int, num_workers: int, pin_memory: bool,
                decode_threads: int = 1):
    """Batches of `dataset`: from `num_workers` decoder processes (torch's DataLoader), or, with
    none, decoded in this process by `decode_threads` threads (`ThreadedBatches`) or one."""
    from torch.utils.data import DataLoader

    if num_workers == 0 and decode_threads > 1:
        return ThreadedBatches(dataset, batch_size, decode_threads)

    kwargs = {}
    if num_workers > 0:
        kwargs.update(prefetch_factor=4, worker_init_fn=worker_init, persistent_workers=False)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=collate, pin_memory=pin_memory, **kwargs,
    )


def decoder_died(e: BaseException) -> bool:
    """Whether `e` is torch's DataLoader saying a worker process died (a crash in a decoding
    library, an out-of-memory kill): "DataLoader worker (pid N) is killed by signal: ...", or
    "... exited unexpectedly"."""
    text = str(e)
    return isinstance(e, RuntimeError) and "DataLoader worker" in text and (
        "killed by signal" in text or "exited unexpectedly" in text)


class _Span:
    """Positions [start, stop) of a dataset, each item keeping its position in the dataset."""

    def __init__(self, dataset, start: int, stop: int):
        self.dataset, self.start, self.stop = dataset, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, j: int):
        return self.dataset[self.start + j]


def _as_is(item):
    return item


def find_crashing(dataset: ImageDataset, start: int, stop: int) -> dict[int, str]:
    """Decode positions [start, stop) of `dataset` one at a time in one decoder process, started
    again after each death: {position: why} for the images whose decoding killed it. One image
    is in flight at a time (prefetch 1), so the one that was being decoded is the culprit."""
    crashed: dict[int, str] = {}
    pos = start
    while pos < stop:
        died = _decode_in_one_process(dataset, pos, stop)
        if died is None:
            break
        pos, why = died
        # torch reports a death from a SIGCHLD handler, which may fire just before the loop
        # has counted the image received last: the blamed image is checked on its own
        alone = _decode_in_one_process(dataset, pos, pos + 1)
        if alone is not None:
            crashed[pos] = why if "signal" in why else alone[1]
        pos += 1
    return crashed


def _decode_in_one_process(dataset, start: int, stop: int):
    """Decode positions [start, stop) in one decoder process, one at a time: None if it lived,
    else (the position it died on, how: "killed by signal: ..." where torch says)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(_Span(dataset, start, stop), batch_size=None, num_workers=1, prefetch_factor=1,
                        collate_fn=_as_is, worker_init_fn=worker_init)
    pos = start
    batches = iter(loader)
    try:
        for item in batches:
            pos = item[0] + 1
    except RuntimeError as e:
        if not decoder_died(e):
            raise
        text = str(e)
        if "killed by signal" in text:
            return pos, text[text.index("killed by signal"):].strip().rstrip(".")
        # the worker's exit code, where torch keeps its processes (a private attribute: else unsaid)
        codes = [getattr(w, "exitcode", None) for w in getattr(batches, "_workers", [])]
        return pos, how_it_ended(next((c for c in codes if c), None))
    return None


def how_it_ended(code: int | None) -> str:
    """A dead process's exit status in words: "killed by signal SIGSEGV", "it exited with code 1",
    or (unknown) "it exited"."""
    import signal

    if code is None:
        return "it exited"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"it exited with code {code}"
