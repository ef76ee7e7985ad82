"""JPEG decoding and resizing as tensor operations on the model's device (nvJPEG on a GPU).

On a GPU machine the CPU decoder, not the model, limits throughput. With
`decode="device"`, workers only read file bytes (and check the header: size limit, format);
the main process decodes the JPEGs of a batch in one batched `decode_jpeg` call on the
device — TorchCodec's when it is installed, else torchvision's (deprecated since torchvision
0.29); both apply EXIF orientation — then resizes (antialiased, the model's interpolation)
and centre-crops them there. Files that are not JPEGs still go through PIL in the workers.

Results differ slightly from PIL's (another resampler; on a GPU another JPEG decoder too): the
metadata says which decoder made the embeddings, and the tests bound the difference.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

from .errors import InputError

DEVICE_DECODERS = ("torchcodec", "torchvision")


def resolve_device_decoder(choice: str = "auto") -> str:
    """The library whose batched `decode_jpeg` decodes on the device: `torchcodec`, `torchvision`,
    or `auto` (TorchCodec when it loads, else torchvision's deprecated decoder, with a warning
    that says why). Raises InputError when the one asked for (or, for auto, neither) is usable."""
    if choice not in ("auto", *DEVICE_DECODERS):
        raise InputError(f"--device-decoder must be auto, torchcodec or torchvision, not {choice!r}.")
    problems = {}
    for name in DEVICE_DECODERS if choice == "auto" else (choice,):
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
    tensors. Both turn EXIF-rotated JPEGs upright (TorchCodec always does; tested against PIL)."""
    if name == "torchcodec":
        from torchcodec.decoders import decode_jpeg

        return lambda data, device: decode_jpeg(data, mode="RGB", device=device)
    from torchvision.io import ImageReadMode, decode_jpeg

    # (its DeprecationWarning, attributed to torchvision, stays hidden by Python's default filters)
    return lambda data, device: decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)


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


#: how decode_batch resizes: "batched" (one pair of matrix products for many sizes), "per-size"
#: (an interpolate call per distinct image size), or "auto": batched on CUDA, per-size elsewhere
#: (on a CPU the dense products cost ~50x the FLOPs of the filter). The benchmark switches it.
RESIZE = "auto"

#: most pixels (H x W, padded) resized in one batched group: 2**24 is 200 MB of float32 RGB
GROUP_PIXELS = 2 ** 24
#: most padded pixels a group holds per pixel of its own images
GROUP_SLACK = 1.5


@functools.lru_cache(maxsize=512)
def _axis_weights(n_in: int, n_out: int, start: int, length: int, mode: str, device: str):
    """(length, n_in) float32 on `device`: row i holds the weights by which outputs start + i of
    an n_in -> n_out resize (aten's, as `resize_crop_batch` calls it) mix the inputs. Made by
    resizing an identity, so the kernel is aten's own, not a re-derivation of it."""
    import torch
    import torch.nn.functional as F

    # the identity as one image whose other axis keeps its size (the filter leaves that axis as it
    # is). Not as n_in channels of width 1: aten's antialiased kernels resize an image of width 1
    # wrongly (torch 2.14, CPU: up to 0.87 off on values in 0..1 against the same column inside a
    # wider image). In slices of at most 1024 columns: a 6000-pixel side needs 24 MB, not 144.
    if n_in == 1:
        return torch.ones((length, 1), dtype=torch.float32, device=device)
    parts, k = [], 0
    while k < n_in:
        c = min(1024, n_in - k)
        k0 = k - 1 if c == 1 else k  # (never width 1, see above: one column more, dropped after)
        cols = torch.zeros((n_in, k + c - k0), dtype=torch.float32, device=device)
        cols[torch.arange(k0, k + c, device=device), torch.arange(k + c - k0, device=device)] = 1.0
        out = F.interpolate(cols[None, None], size=(n_out, cols.shape[1]), mode=mode,
                            antialias=mode != "nearest", align_corners=False if mode != "nearest" else None)
        parts.append(out[0, 0, start:start + length, k - k0:])
        k += c
    return torch.cat(parts, 1).contiguous()


def batchable(h: int, w: int, pre: TensorPreprocess) -> bool:
    """Whether an (h, w) image can take the batched resize: its resize covers the crop and is
    not `oversized` (banners keep their windowed path)."""
    from ._resize import oversized, resized_size

    nh, nw = resized_size(h, w, pre.resize_size)
    ch, cw = pre.crop
    return nh >= ch and nw >= cw and not oversized(nh, nw, tuple(pre.crop))


def _groups(shapes: list[tuple[int, int]], limit: int, slack: float) -> list[list[int]]:
    """Indices of `shapes` ((h, w) each) in groups to pad to a common size: sorted by shape
    (aspect ratio in steps of ~19%, then size), a group grows while its padded pixels stay within
    `slack` x its own and within `limit` (a single image may exceed it)."""
    order = sorted(range(len(shapes)), key=lambda i: (round(4 * math.log2(shapes[i][1] / shapes[i][0])), shapes[i]))
    groups, cur, mh, mw, own = [], [], 0, 0, 0
    for i in order:
        h, w = shapes[i]
        nh, nw, nown = max(mh, h), max(mw, w), own + h * w
        padded = (len(cur) + 1) * nh * nw
        if cur and (padded > slack * nown or padded > limit):
            groups.append(cur)
            cur, nh, nw, nown = [], h, w, h * w
        cur.append(i)
        mh, mw, own = nh, nw, nown
    if cur:
        groups.append(cur)
    return groups


def _copy_all(dst: list, src: list) -> None:
    import torch

    foreach = getattr(torch, "_foreach_copy_", None)  # one call for the list (torch >= 2.1)
    if foreach is not None:
        foreach(dst, src)
    else:  # pragma: no cover - older torch
        for d, s in zip(dst, src):
            d.copy_(s)


def batched_resize_crop(imgs: list, pre: TensorPreprocess) -> list:
    """(3, H, W) uint8 images of many sizes -> (3, crop_h, crop_w) float32 each in 0..255, as
    `resize_crop_batch` makes them (timm's Resize + CenterCrop, antialiased), for images that are
    `batchable`. A resize followed by a crop is linear along each axis: output = Wy @ image @ Wx^T,
    with Wy holding only the crop's rows of the resize's weights (`_axis_weights`, cached per size).
    Images are zero-padded to their group's largest size (zero weights there), so a whole group
    is two batched matrix products instead of a few kernels per image: on a GPU, where the
    per-image Python and launches of one interpolate call each were the cost, not the FLOPs.

    float32 products: with `torch.backends.cuda.matmul.allow_tf32` on, results move by ~0.1 level.
    """
    import torch

    from ._resize import crop_anchor, resized_size

    if not imgs:
        return []
    ch, cw = pre.crop
    mode = {"bicubic": "bicubic", "bilinear": "bilinear"}.get(pre.interpolation, "nearest")
    device = imgs[0].device
    shapes = [(int(x.shape[1]), int(x.shape[2])) for x in imgs]
    out: list = [None] * len(imgs)
    for group in _groups(shapes, GROUP_PIXELS, GROUP_SLACK):
        hm = max(shapes[i][0] for i in group)
        wm = max(shapes[i][1] for i in group)
        g = len(group)
        # (g, Hm, 3, Wm): the H contraction then reads each image as one (Hm, 3 * Wm) matrix
        x = torch.zeros((g, hm, 3, wm), dtype=torch.float32, device=device)
        wy = torch.zeros((g, ch, hm), dtype=torch.float32, device=device)
        wx = torch.zeros((g, cw, wm), dtype=torch.float32, device=device)
        dst, src = [], []
        for j, i in enumerate(group):
            h, w = shapes[i]
            nh, nw = resized_size(h, w, pre.resize_size)
            top, left = crop_anchor(nh, nw, ch, cw)
            dst += [x[j, :h, :, :w], wy[j, :, :h], wx[j, :, :w]]
            src += [imgs[i].permute(1, 0, 2), _axis_weights(h, nh, top, ch, mode, str(device)),
                    _axis_weights(w, nw, left, cw, mode, str(device))]
        _copy_all(dst, src)
        rows = torch.bmm(wy, x.view(g, hm, 3 * wm)).view(g, ch * 3, wm)  # (g, ch, 3, Wm)
        res = torch.bmm(rows, wx.transpose(1, 2)).view(g, ch, 3, cw).permute(0, 2, 1, 3)
        for j, i in enumerate(group):
            out[i] = res[j]
    return out


def decode_batch(encoded: list, device: str, pre: TensorPreprocess, decoder: str = "torchvision",
                 resize: str | None = None):
    """Decode and preprocess JPEG byte tensors on `device` with `decoder`'s batched decode_jpeg
    (a name from DEVICE_DECODERS), upright by their EXIF orientation; `resize`: see RESIZE (None:
    RESIZE's value).

    Returns:
        (images, sizes, failures): a list with a (3, H, W) float tensor or None per input,
        the upright (width, height) per input (0, 0 on failure), and {input index: message}.
    """
    decode = _decoder(decoder)
    try:
        decoded = decode(encoded, device)
    except (RuntimeError, ValueError):
        # one bad file fails the whole batched call: find it by decoding one at a time
        decoded = []
        for data in encoded:
            try:
                decoded.append(decode([data], device)[0])
            except (RuntimeError, ValueError) as e:
                decoded.append(e)
    images, sizes, failures = [None] * len(decoded), [(0, 0)] * len(decoded), {}
    resize = resize or RESIZE
    if resize not in ("auto", "batched", "per-size"):
        raise ValueError(f"resize must be auto, batched or per-size, not {resize!r}")
    batched = resize == "batched" or (resize == "auto" and str(device).startswith("cuda"))
    by_shape: dict[tuple[int, int], list[int]] = {}
    together: list[int] = []
    for i, img in enumerate(decoded):
        if isinstance(img, Exception):
            failures[i] = f"{type(img).__name__}: {str(img).splitlines()[0] if str(img) else ''}"
            continue
        sizes[i] = (int(img.shape[2]), int(img.shape[1]))
        if batched and batchable(int(img.shape[1]), int(img.shape[2]), pre):
            together.append(i)
        else:
            by_shape.setdefault(tuple(img.shape[1:]), []).append(i)
    import torch

    for i, img in zip(together, batched_resize_crop([decoded[i] for i in together], pre)):
        images[i] = img
    # photos of one camera share a size: resize each size group in one call
    for idxs in by_shape.values():
        group = torch.stack([decoded[i] for i in idxs]) if len(idxs) > 1 else decoded[idxs[0]][None]
        out = resize_crop_batch(group, pre)
        for j, i in enumerate(idxs):
            images[i] = out[j]
    return images, sizes, failures
