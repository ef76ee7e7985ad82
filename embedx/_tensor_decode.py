"""JPEG decoding and resizing as tensor operations on the model's device (nvJPEG on a GPU).

On a GPU machine the CPU decoder, not the model, limits throughput. With
`decode="device"`, workers only read file bytes (and check the header: size limit, format);
the main process decodes the JPEGs of a batch in one batched `decode_jpeg` call on the
device — TorchCodec's when it is installed, else torchvision's (deprecated since torchvision
0.29), or, when asked for, NVIDIA nvImageCodec's (on A100/H100-class GPUs their hardware JPEG
decoders, which leave the SMs to the model); all apply EXIF orientation — then resizes
(antialiased, the model's interpolation)
and centre-crops them there. Files that are not JPEGs still go through PIL in the workers.

Results differ slightly from PIL's (another resampler; on a GPU another JPEG decoder too): the
metadata says which decoder made the embeddings, and the tests bound the difference.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

from .errors import InputError

DEVICE_DECODERS = ("torchcodec", "torchvision", "nvimgcodec")
#: what `auto` tries, in order (nvImageCodec only when asked for: its GPU speed is not measured yet)
AUTO_DECODERS = ("torchcodec", "torchvision")


def resolve_device_decoder(choice: str = "auto") -> str:
    """The library whose batched decode decodes on the device: `torchcodec`, `torchvision`,
    `nvimgcodec` (NVIDIA nvImageCodec: on a GPU, the hardware JPEG decoders where the GPU has
    them, e.g. A100 / H100, else its CUDA decoder), or `auto` (TorchCodec when it loads, else
    torchvision's deprecated decoder, with a warning that says why). Raises InputError when the
    one asked for (or, for auto, neither) is usable."""
    if choice not in ("auto", *DEVICE_DECODERS):
        raise InputError(f"--device-decoder must be auto, {', '.join(DEVICE_DECODERS[:-1])} or {DEVICE_DECODERS[-1]}, "
                         f"not {choice!r}.")
    problems = {}
    for name in AUTO_DECODERS if choice == "auto" else (choice,):
        problems[name] = _load_problem(name)
        if problems[name] is None:
            if choice == "auto" and name == "torchvision":
                _warn_torchvision_fallback(problems["torchcodec"])
            return name
    found = "; ".join(f"{k}: {v}" for k, v in problems.items())
    raise InputError(f"--decode device needs a batched JPEG decoder and none is usable ({found}). "
                     "Install TorchCodec (`pip install torchcodec`, the successor of torchvision's decoders), "
                     "or use --decode pil (CPU decoder processes).")


@functools.lru_cache(maxsize=None)
def _load_problem(name: str) -> str | None:
    """None if `name`'s decode_jpeg imports, else why not (cached: importing is slow)."""
    try:
        if name == "torchcodec":
            from torchcodec.decoders import decode_jpeg  # noqa: F401
        elif name == "nvimgcodec":
            _import_nvimgcodec()
        else:
            from torchvision.io import decode_jpeg  # noqa: F401 - deprecated since torchvision 0.29
    except ModuleNotFoundError as e:
        return f"not installed ({e})"
    except Exception as e:  # noqa: BLE001 - e.g. a native library built for another torch
        return f"failed to load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


@functools.lru_cache(maxsize=None)
def _warn_torchvision_fallback(torchcodec_problem: str) -> None:
    # once a process (cached), not once a run
    warnings.warn(f"--decode device: TorchCodec {torchcodec_problem}; decoding with torchvision's decode_jpeg, "
                  "deprecated since torchvision 0.29 (`pip install torchcodec` to use its successor).",
                  stacklevel=3)


def _decoder(name: str):
    """A function: (list of CPU uint8 byte tensors, device) -> list of upright (3, H, W) uint8 RGB
    tensors. All turn EXIF-rotated JPEGs upright (TorchCodec always does; tested against PIL)."""
    if name == "torchcodec":
        from torchcodec.decoders import decode_jpeg

        return lambda data, device: decode_jpeg(data, mode="RGB", device=device)
    if name == "nvimgcodec":
        return _nvimgcodec_decode
    from torchvision.io import ImageReadMode, decode_jpeg

    # (its DeprecationWarning, attributed to torchvision, stays hidden by Python's default filters)
    return lambda data, device: decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)


def _import_nvimgcodec():
    import os

    # its Python log would print an [ERROR] line for each optional library it lacks (nvJPEG2000,
    # nvTIFF: other formats than JPEG) on every machine; decoding errors are reported per image here
    os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")
    from nvidia import nvimgcodec

    return nvimgcodec


@functools.lru_cache(maxsize=None)
def _nvimgcodec_decoder(device: str):
    """One nvImageCodec Decoder per device (making one loads its codecs): on a GPU its hardware
    JPEG decoder first, then its CUDA decoder, then the CPU for what neither takes (e.g. CMYK);
    on the CPU libjpeg-turbo."""
    import torch

    nv = _import_nvimgcodec()
    dev = torch.device(device)
    if dev.type == "cpu":
        return nv.Decoder(device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY, backends=[nv.Backend(nv.BackendKind.CPU_ONLY)])
    kinds = (nv.BackendKind.HW_GPU_ONLY, nv.BackendKind.GPU_ONLY, nv.BackendKind.CPU_ONLY)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return nv.Decoder(device_id=index, backends=[nv.Backend(k) for k in kinds])


def _nvimgcodec_decode(data: list, device: str) -> list:
    """nvImageCodec's batched decode of CPU uint8 byte tensors: upright (EXIF) (3, H, W) uint8 RGB
    tensors on `device`, queued on its current CUDA stream; a ValueError in the place of each
    file it cannot decode (it reports those as None instead of failing the batch)."""
    import numpy as np
    import torch

    nv = _import_nvimgcodec()
    params = nv.DecodeParams(color_spec=nv.ColorSpec.SRGB, apply_exif_orientation=True)
    cuda = torch.device(device).type == "cuda"
    stream = torch.cuda.current_stream(torch.device(device)).cuda_stream if cuda else 0
    images = _nvimgcodec_decoder(str(device)).decode([t.numpy() for t in data], params=params, cuda_stream=stream)
    out = []
    for img in images:
        if img is None:
            out.append(ValueError("nvImageCodec could not decode it"))
            continue
        # on a GPU the tensor shares the decoded image's memory (DLPack keeps it alive)
        hwc = torch.from_dlpack(img) if cuda else torch.from_numpy(np.asarray(img))
        out.append(hwc.permute(2, 0, 1))
    return out


@dataclass(frozen=True)
class TensorPreprocess:
    resize_size: int  # shortest side after resize
    crop: tuple[int, int]  # (H, W)
    interpolation: str  # timm name: bicubic | bilinear | nearest


def _mode(name: str):
    from torchvision.transforms import InterpolationMode

    return {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
            "nearest": InterpolationMode.NEAREST}.get(name, InterpolationMode.BICUBIC)


def resize_crop_batch(imgs, pre: TensorPreprocess):
    """(n, 3, H, W) uint8 of one size -> (n, 3, crop_h, crop_w) float32 in 0..255: timm's eval
    Resize(shortest side, antialiased) + CenterCrop (the batch is rounded and clamped later)."""
    import torch.nn.functional as F

    from ._resize import oversized, resized_size, window_resize_crop

    h, w = imgs.shape[2:]
    nh, nw = resized_size(h, w, pre.resize_size)
    mode = {"bicubic": "bicubic", "bilinear": "bilinear"}.get(pre.interpolation, "nearest")
    x = imgs.float()
    if oversized(nh, nw, tuple(pre.crop)):  # a banner or a panorama: resize only what the crop keeps
        return window_resize_crop(x, nh, nw, tuple(pre.crop), mode)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode=mode, antialias=mode != "nearest",
                          align_corners=False if mode != "nearest" else None)
    ch, cw = pre.crop
    top, left = int(round((nh - ch) / 2.0)), int(round((nw - cw) / 2.0))
    if top < 0 or left < 0:  # smaller than the crop: pad like torchvision's center_crop
        import torchvision.transforms.v2.functional as TF

        return TF.center_crop(x, [ch, cw])
    return x[:, :, top:top + ch, left:left + cw]


def finish_batch(images: list):
    """Stack float crops and round/clamp them to the 0..255 grid the PIL path produces."""
    import torch

    return torch.stack(images).round_().clamp_(0, 255)


def decode_batch(encoded: list, device: str, pre: TensorPreprocess, decoder: str = "torchvision"):
    """Decode and preprocess JPEG byte tensors on `device` with `decoder`'s batched decode_jpeg
    (a name from DEVICE_DECODERS), upright by their EXIF orientation.

    Returns:
        (images, sizes, failures): a list with a (3, H, W) float tensor or None per input,
        the upright (width, height) per input (0, 0 on failure), and {input index: message}.
    """
    decode = _decoder(decoder)
    try:
        decoded = decode(encoded, device)  # nvimgcodec: an exception in the place of each failure
    except (RuntimeError, ValueError):
        # one bad file fails the whole batched call: find it by decoding one at a time
        decoded = []
        for data in encoded:
            try:
                decoded.append(decode([data], device)[0])
            except (RuntimeError, ValueError) as e:
                decoded.append(e)
    images, sizes, failures = [None] * len(decoded), [(0, 0)] * len(decoded), {}
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(decoded):
        if isinstance(img, Exception):
            failures[i] = f"{type(img).__name__}: {str(img).splitlines()[0] if str(img) else ''}"
            continue
        sizes[i] = (int(img.shape[2]), int(img.shape[1]))
        by_shape.setdefault(tuple(img.shape[1:]), []).append(i)
    import torch

    # photos of one camera share a size: resize each size group in one call. (Tried and dropped,
    # session 16, commit b9116e3: all sizes at once, zero-padded, as two batched matrix products of
    # each axis's resize weights. Same pixels, but slower on an H200: 22.8k vs 30.6k img/s for the
    # resize alone, 0.90-0.95x end to end; its Python bookkeeping and per-image copies into the
    # padded batch cost what the per-size interpolate calls do, the products ~1 us an image.
    # benchmarks/results/session16_probe_resize.log)
    for idxs in by_shape.values():
        group = torch.stack([decoded[i] for i in idxs]) if len(idxs) > 1 else decoded[idxs[0]][None]
        out = resize_crop_batch(group, pre)
        for j, i in enumerate(idxs):
            images[i] = out[j]
    return images, sizes, failures
