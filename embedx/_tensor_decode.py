"""JPEG decoding and resizing as tensor operations on the model's device (nvJPEG on a GPU).

On a GPU machine the CPU decoder, not the model, limits throughput. With
`decode="device"`, workers only read file bytes (and check the header: size limit, format);
the main process decodes the JPEGs of a batch in one `torchvision.io.decode_jpeg` call on
the device, then resizes (antialiased, the model's interpolation) and centre-crops them
there. Files that are not JPEGs still go through PIL in the workers.

Results differ slightly from PIL's (another JPEG decoder and resampler): the metadata says
which decoder made the embeddings, and the tests bound the difference.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorPreprocess:
    resize_size: int  # shortest side after resize
    crop: tuple[int, int]  # (H, W)
    interpolation: str  # timm name: bicubic | bilinear | nearest


def _mode(name: str):
    from torchvision.transforms import InterpolationMode

    return {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
            "nearest": InterpolationMode.NEAREST}.get(name, InterpolationMode.BICUBIC)


def resized_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """torchvision's Resize(int): the shortest side becomes `size`, the other keeps the aspect."""
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def resize_crop_batch(imgs, pre: TensorPreprocess):
    """(n, 3, H, W) uint8 of one size -> (n, 3, crop_h, crop_w) float32 in 0..255: timm's eval
    Resize(shortest side, antialiased) + CenterCrop (the batch is rounded and clamped later)."""
    import torch.nn.functional as F

    h, w = imgs.shape[2:]
    nh, nw = resized_shape(h, w, pre.resize_size)
    mode = {"bicubic": "bicubic", "bilinear": "bilinear"}.get(pre.interpolation, "nearest")
    x = imgs.float()
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


def decode_batch(encoded: list, device: str, pre: TensorPreprocess):
    """Decode and preprocess JPEG byte tensors on `device`.

    Returns:
        (images, sizes, failures): a list with a (3, H, W) uint8 tensor or None per input,
        the upright (width, height) per input (0, 0 on failure), and {input index: message}.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    except RuntimeError:
        # one bad file fails the whole batched call: find it by decoding one at a time
        decoded = []
        for data in encoded:
            try:
                decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True))
            except RuntimeError as e:
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

    # photos of one camera share a size: resize each size group in one call
    for idxs in by_shape.values():
        group = torch.stack([decoded[i] for i in idxs]) if len(idxs) > 1 else decoded[idxs[0]][None]
        out = resize_crop_batch(group, pre)
        for j, i in enumerate(idxs):
            images[i] = out[j]
    return images, sizes, failures
