"""timm's eval Resize + CenterCrop, without resizing what the crop throws away.

`Resize(256)` keeps the aspect ratio, so a 30000 x 3 web banner becomes 2,560,000 x 256 pixels
(1.9 GB as uint8, 7.9 GB as float32) of which `CenterCrop(224)` keeps 224 x 224: ~1 s and ~2 GB
in a decoder (a four-image run with two banners peaked at 4.9 GB), and a few in one batch of
decoder processes could have the run killed for memory, again at every resume. When the resized image would have more than
`OVERSIZE_FACTOR` times the crop's pixels, only the source region under the crop is resized:
on tensors (the uint8 fast path, the device path) a window of the source, with the filter's
reach around it, resized at the whole resize's scale by the same kernels (the whole resize's
pixels: tested), and on PIL images (timm's exact transform) PIL's `resize(box=...)`, which
samples where the whole resize would, with the same filter and edges. Photos up to ~3:1 (for a
256 -> 224 crop) never take these paths.
"""

from __future__ import annotations

import functools
import math

#: resize only the crop's region when the resized image would have more than this many times
#: the crop's pixels
OVERSIZE_FACTOR = 4

#: half-width of each interpolation's filter, in input pixels when upsampling (times the scale
#: when downsampling with antialiasing), as torch and PIL define them
_SUPPORT = {"nearest": 1.0, "bilinear": 1.0, "bicubic": 2.0}


def resized_size(h: int, w: int, size, max_size: int | None = None) -> tuple[int, int]:
    """(H, W) that torchvision's `Resize(size, max_size=...)` makes of an (h, w) image: an int
    (or one-element list) sets the shorter side, keeping the aspect ratio; [H, W] is taken as is."""
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    short_new = int(size[0] if isinstance(size, (list, tuple)) else size)
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = short_new, int(short_new * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if w <= h else (new_short, new_long)


def crop_anchor(nh: int, nw: int, ch: int, cw: int) -> tuple[int, int]:
    """(top, left) of torchvision's `CenterCrop((ch, cw))` in an (nh, nw) image."""
    return int(round((nh - ch) / 2.0)), int(round((nw - cw) / 2.0))


def oversized(nh: int, nw: int, crop: tuple[int, int]) -> bool:
    """Whether resizing to (nh, nw) before a `crop` would make more than OVERSIZE_FACTOR times
    the crop's pixels (and the crop fits: no padding)."""
    ch, cw = crop
    return nh >= ch and nw >= cw and nh * nw > OVERSIZE_FACTOR * ch * cw


def crop_box(h: int, w: int, size, max_size: int | None, crop: tuple[int, int]):
    """The source region (left, upper, right, lower) that `Resize(size)` + `CenterCrop(crop)`
    keep of an (h, w) image, in source pixels (floats), when the resize is `oversized`; else None."""
    nh, nw = resized_size(h, w, size, max_size)
    if not oversized(nh, nw, crop):
        return None
    ch, cw = crop
    top, left = crop_anchor(nh, nw, ch, cw)
    sy, sx = h / nh, w / nw
    return (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)


def pil_resize_crop(img, box, crop: tuple[int, int], resample):
    """`img`'s `box` resized to `crop` (H, W) by PIL: each output pixel sampled where the whole
    resize would sample it, with the filter reaching past the box into the image as it would."""
    ch, cw = crop
    return img.resize((cw, ch), resample, box=box)


class PILResizeCrop:
    """timm's eval transform when it is a Resize (shorter side) + CenterCrop on PIL images: the
    transform itself, except for `oversized` images, whose crop region alone is resized
    (`pil_resize_crop`). Picklable: it runs in decoder processes."""

    def __init__(self, transform, size, max_size: int | None, crop: tuple[int, int], resample):
        self.transform = transform  # timm's Compose([Resize, CenterCrop])
        self.size = size
        self.max_size = max_size
        self.crop = tuple(crop)
        self.resample = resample  # PIL's filter constant

    def __call__(self, img):
        w, h = img.size
        box = crop_box(h, w, self.size, self.max_size, self.crop)
        return self.transform(img) if box is None else pil_resize_crop(img, box, self.crop, self.resample)

    def __repr__(self) -> str:
        return f"PILResizeCrop({self.transform!r})"


def resize_crop_steps(transform):
    """(size, max_size, (crop H, W), interpolation) of a torchvision Compose that starts with a
    Resize and a CenterCrop (timm's eval transform), else None."""
    import torchvision.transforms as T

    steps = getattr(transform, "transforms", [])
    if len(steps) < 2 or type(steps[0]) is not T.Resize or type(steps[1]) is not T.CenterCrop:
        return None
    resize, crop = steps[:2]
    size = resize.size if isinstance(resize.size, int) else list(resize.size)
    if isinstance(size, list) and len(size) == 1:
        size = size[0]
    crop_size = crop.size if isinstance(crop.size, (tuple, list)) else (crop.size, crop.size)
    return size, resize.max_size, tuple(crop_size), resize.interpolation


def bounded(transform):
    """`transform` (a torchvision Compose on PIL images) with a leading Resize + CenterCrop done
    by `PILResizeCrop`: the same pixels, without resizing the whole of a banner. Any other
    transform is returned as it is."""
    import torchvision.transforms as T
    from torchvision.transforms.functional import pil_modes_mapping

    found = resize_crop_steps(transform)
    if found is None:
        return transform
    size, max_size, crop, interpolation = found
    steps = transform.transforms
    first = PILResizeCrop(T.Compose(steps[:2]), size, max_size, crop, pil_modes_mapping[interpolation])
    return first if len(steps) == 2 else T.Compose([first, *steps[2:]])


def _axis_window(n_in: int, n_out: int, start: int, length: int, support: float):
    """For outputs [start, start + length) of a resize n_in -> n_out: the input window [a, b)
    and the output index k that the window's first output stands for. Resized at the same scale,
    the window's outputs j are the whole resize's outputs k + j when a * n_out / n_in is the
    integer k: a is chosen (up to 256 pixels before what the filter needs) to be as close to
    that as possible — exact for a banner upscaled from 3 pixels, ~1/256 of an output pixel at worst."""
    scale = n_in / n_out
    reach = support * max(scale, 1.0) + 2.0  # the filter's half-width in input pixels, + rounding room
    lo = max(0.0, start * scale - reach)
    hi = min(float(n_in), (start + length) * scale + reach)
    best_err, a = 2.0, 0
    for cand in range(int(math.floor(lo)), max(-1, int(math.floor(lo)) - 256), -1):
        pos = cand / scale
        err = abs(pos - round(pos))
        if err < best_err:
            best_err, a = err, cand
            if err < 1e-9:
                break
    b = min(n_in, int(math.ceil(hi)))
    return a, b, int(round(a / scale))


def _native_uint8(mode: str, device) -> bool:
    """Whether aten resizes uint8 images in `mode` itself on `device` (torchvision's rule, CPUs):
    bicubic always, bilinear on AVX2 / AVX-512 / ARM; anything else goes through float."""
    return _native_uint8_on(mode, getattr(device, "type", device))


@functools.lru_cache(maxsize=None)
def _native_uint8_on(mode: str, device_type: str) -> bool:
    import platform

    import torch

    if device_type != "cpu":
        return mode == "nearest"
    if mode == "bilinear":
        return (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
                or platform.machine() in ("aarch64", "arm64"))
    return mode in ("bicubic", "nearest")


def window_resize_crop(x, nh: int, nw: int, crop: tuple[int, int], mode: str):
    """(n, C, H, W) float or uint8 -> (n, C, ch, cw), same dtype: "resize to (nh, nw), then
    centre-crop", computed on a window of the source along each axis whose resized length is
    more than twice the crop's (the whole axis otherwise), at the whole resize's scale, through
    aten's resize ops, which take an output size and a scale at once. Antialiased for bilinear
    and bicubic, as timm's transform is. For `oversized` resizes; correct for any."""
    import torch

    if x.dtype == torch.uint8 and not _native_uint8(mode, x.device):
        # as torchvision does where aten has no uint8 kernel for the mode: in float, rounded back
        return window_resize_crop(x.float(), nh, nw, crop, mode).round_().clamp_(0, 255).to(torch.uint8)
    ch, cw = crop
    h, w = x.shape[-2:]
    top, left = crop_anchor(nh, nw, ch, cw)
    if (nh, nw) == (h, w):  # nothing to resize
        return x[..., top:top + ch, left:left + cw]
    support = _SUPPORT.get(mode, 1.0)
    windows = []
    for n_in, n_out, start, length in ((h, nh, top, ch), (w, nw, left, cw)):
        if n_out > 2 * length:  # resize a window of this axis
            a, b, k = _axis_window(n_in, n_out, start, length, support)
            m = start - k + length + 1  # outputs the window must give (one spare)
            windows.append((a, b, k, m, n_out / n_in))
        else:
            windows.append((0, n_in, 0, n_out, None))
    (ay, by, ky, my, sy), (ax, bx, kx, mx, sx) = windows
    src = x[..., ay:by, ax:bx]
    out = _aten_resize(src, my, mx, mode, sy, sx)
    return out[..., top - ky:top - ky + ch, left - kx:left - kx + cw]


def _aten_resize(x, nh: int, nw: int, mode: str, scale_h: float | None = None, scale_w: float | None = None):
    """aten's resize op for `mode` (antialiased for bilinear and bicubic), called directly; the
    scales, when given, are the full image's (for a window of it)."""
    import torch

    if mode == "bicubic":
        return torch.ops.aten._upsample_bicubic2d_aa(x, [nh, nw], False, scale_h, scale_w)
    if mode == "bilinear":
        return torch.ops.aten._upsample_bilinear2d_aa(x, [nh, nw], False, scale_h, scale_w)
    return torch.ops.aten.upsample_nearest2d(x, [nh, nw], scale_h, scale_w)


def channels_last_image(hwc):
    """A contiguous (H, W, C) tensor as a (1, C, H, W) view with channels-last strides, the
    batch stride included (torchvision's restride: from `permute(...)[None]` aten cannot tell a
    one-image batch's layout, and its uint8 kernels then repack the output, ~10% slower)."""
    h, w, c = hwc.shape
    if not hwc.is_contiguous():
        hwc = hwc.contiguous()
    return hwc.as_strided((1, c, h, w), (h * w * c, 1, w * c, c))


def resize_crop(x, nh: int, nw: int, crop: tuple[int, int], mode: str):
    """(n, C, H, W) float or uint8 -> (n, C, ch, cw), same dtype: torchvision's `resize` to
    (nh, nw) (antialiased for bilinear and bicubic) and `center_crop`, with their pixels (tested),
    by aten's resize op called directly: per image, torchvision's checks and dispatch cost about
    a tenth of the resize itself. Uint8 in a mode aten has no kernel for goes through float and
    is rounded back, as torchvision does. A resize smaller than the crop is padded, as there."""
    import torch

    if x.dtype == torch.uint8 and not _native_uint8(mode, x.device):
        return resize_crop(x.float(), nh, nw, crop, mode).round_().clamp_(0, 255).to(torch.uint8)
    if (nh, nw) != tuple(x.shape[-2:]):
        x = _aten_resize(x, nh, nw, mode)
    ch, cw = crop
    top, left = crop_anchor(nh, nw, ch, cw)
    if top < 0 or left < 0 or nh < ch or nw < cw:
        from torchvision.transforms.v2 import functional as F

        return F.center_crop(x, [ch, cw])
    return x[..., top:top + ch, left:left + cw]
