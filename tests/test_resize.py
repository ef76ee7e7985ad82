"""Resize + CenterCrop of banners and panoramas (embedx._resize): the crop's region alone is
resized, on every path (uint8 fast path, timm's exact PIL transform, fine-tuning's evaluation
transform, device decode), with the pixels of the whole resize (each path's own)."""

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from embedx import _resize
from embedx._loader import UInt8ResizeCrop

# a model's Resize(64) + CenterCrop(56): the geometry of 256 -> 224, with whole resizes small
# enough to compare against in a test
SIZE, CROP = 64, (56, 56)
# (H, W): banners both ways, an odd scale whose phase cannot be exact, panoramas both ways, and
# shapes under the threshold (a 3:1 panorama, a 4:3 photo) that must take the ordinary path
BANNERS = [(3, 12000), (3000, 2), (7, 5001), (500, 4000), (4000, 500)]
ORDINARY = [(300, 900), (375, 500)]
# Pillow resizes in two passes and picks their order itself; for an image a few pixels wide made
# tall, the crop's box alone gets the other order (the passes round to uint8 in between): within a
# few grey levels of the whole resize there (measured: 4), exact or within 1 elsewhere (PIL path)
PASS_ORDER_TOLERANCE = {(3000, 2): 8}


def _textured(h, w, seed=0):
    """Smooth gradients plus noise, so that a misplaced sample shows."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 7 + yy * 3) % 256, (xx * 2 + yy * 11) % 256, (xx * yy) % 256], -1)
    return np.clip(base + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)


def _timm(interpolation):
    return T.Compose([T.Resize(SIZE, interpolation=interpolation), T.CenterCrop(CROP)])


@pytest.mark.parametrize("h,w", [(3, 30000), (30000, 3), (7, 5001), (375, 500), (1000, 20000), (50, 50)])
@pytest.mark.parametrize("max_size", [None, 1000])
def test_resized_size_is_torchvisions(h, w, max_size):
    from torchvision.transforms.functional import _compute_resized_output_size

    assert list(_resize.resized_size(h, w, 256, max_size)) == _compute_resized_output_size((h, w), [256], max_size)
    assert _resize.resized_size(h, w, [240, 320]) == (240, 320)


def test_only_banners_and_panoramas_count_as_oversized():
    for size, crop in ((SIZE, CROP), (256, (224, 224))):
        for h, w in BANNERS:
            assert _resize.crop_box(h, w, size, None, crop) is not None, (h, w)
        for h, w in ORDINARY:
            assert _resize.crop_box(h, w, size, None, crop) is None, (h, w)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_uint8_path_gives_its_whole_resizes_pixels_without_it(interpolation, monkeypatch):
    import torchvision.transforms.v2.functional as F

    mode = T.InterpolationMode(interpolation)
    tf = UInt8ResizeCrop(SIZE, interpolation, None, CROP)
    for h, w in BANNERS + ORDINARY:
        arr = _textured(h, w)
        whole = F.center_crop(F.resize(torch.from_numpy(arr).permute(2, 0, 1), SIZE, interpolation=mode,
                                       antialias=True), list(CROP)).permute(1, 2, 0).numpy()
        with monkeypatch.context() as m:
            if (h, w) in BANNERS:
                m.setattr(F, "resize", lambda *a, **k: pytest.fail(f"{h}x{w} was resized whole"))
            out = tf(arr.copy())
        assert out.shape == (*CROP, 3) and out.dtype == np.uint8
        # exact but for (7, 5001), whose window cannot start on the whole resize's sample grid
        assert np.abs(out.astype(int) - whole).max() <= (2 if (h, w) == (7, 5001) else 0), (h, w)
    # the source is already the resized size: only a crop
    arr = _textured(SIZE, 10 * SIZE)
    top, left = _resize.crop_anchor(SIZE, 10 * SIZE, *CROP)
    np.testing.assert_array_equal(tf(arr.copy()), arr[top:top + CROP[0], left:left + CROP[1]])


def test_pil_path_and_finetuning_eval_transform_are_bounded(monkeypatch, backbone):
    from timm.data import create_transform

    sizes = []
    real_resize = Image.Image.resize

    def resize(self, size, *a, **k):
        sizes.append(size)
        return real_resize(self, size, *a, **k)

    timm_tf = create_transform(input_size=(3, *CROP), interpolation="bicubic", crop_pct=CROP[0] / SIZE)
    tf = _resize.bounded(timm_tf)
    assert isinstance(tf.transforms[0], _resize.PILResizeCrop) and len(tf.transforms) == len(timm_tf.transforms) - 1
    for h, w in BANNERS + ORDINARY:
        img = Image.fromarray(_textured(h, w))
        ref = timm_tf(img)
        sizes.clear()
        monkeypatch.setattr(Image.Image, "resize", resize)
        out = tf(img)
        monkeypatch.setattr(Image.Image, "resize", real_resize)
        assert out.shape == ref.shape == (3, *CROP)
        if (h, w) in ORDINARY:
            assert torch.equal(out, ref)  # timm's own transform ran
        else:
            assert max(max(s) for s in sizes) <= max(CROP), sizes  # never resized past the crop
            # normalised pixels: grey levels of 0..255 over ImageNet's smallest std (0.224)
            levels = PASS_ORDER_TOLERANCE.get((h, w), 1)
            assert (out - ref).abs().max() <= levels / 255 / 0.224 + 1e-6, (h, w)
    from embedx import finetune

    _, eval_tf = finetune._transforms(backbone, augment=True)  # what fine-tuning evaluates with
    assert isinstance(eval_tf.transforms[0], _resize.PILResizeCrop)
    assert isinstance(backbone.worker_transform(fast=False), _resize.PILResizeCrop)  # --exact-decode
    other = T.Compose([T.Resize((224, 224)), T.ToTensor()])
    assert _resize.bounded(other) is other  # squash: nothing to bound


@pytest.mark.parametrize("mode", ["bicubic", "bilinear", "nearest"])
def test_device_path_window_gives_the_whole_resize(mode):
    from embedx._tensor_decode import TensorPreprocess, resize_crop_batch

    pre = TensorPreprocess(SIZE, CROP, mode)
    for h, w in BANNERS + ORDINARY:
        imgs = torch.from_numpy(_textured(h, w, seed=1)).permute(2, 0, 1)[None].contiguous()
        nh, nw = _resize.resized_size(h, w, SIZE)
        x = imgs.float()
        whole = torch.nn.functional.interpolate(x, size=(nh, nw), mode=mode, antialias=mode != "nearest",
                                                align_corners=False if mode != "nearest" else None)
        top, left = _resize.crop_anchor(nh, nw, *CROP)
        whole = whole[..., top:top + CROP[0], left:left + CROP[1]]
        with pytest.MonkeyPatch.context() as m:
            if (h, w) in BANNERS:
                m.setattr(torch.nn.functional, "interpolate", lambda *a, **k: pytest.fail(f"{h}x{w} resized whole"))
            out = resize_crop_batch(imgs, pre)
        assert out.shape == whole.shape == (1, 3, *CROP)
        # exact but for (7, 5001), whose windows cannot start on the whole resize's sample grid
        tol = 1.0 if (h, w) == (7, 5001) else 1e-3
        assert (out - whole).abs().max() <= tol, (h, w, (out - whole).abs().max())


def test_banners_are_embedded_on_both_paths(tmp_path, backbone):
    """End to end: a 3 x 20000 banner and a 20000 x 3 one, fast and exact paths: embedded, no
    error, close (torchvision's uint8 kernels and PIL's differ most on a ~100x upscale like this:
    measured cosine 0.9975; real photos, downscaled, are held to 0.999 in test_extract)."""
    import embedx
    from embedx.extractor import ExtractConfig, extract

    d = tmp_path / "banners"
    d.mkdir()
    Image.fromarray(_textured(3, 20000)).save(d / "wide.png")
    Image.fromarray(_textured(20000, 3, seed=2)).save(d / "tall.png")
    cfg = dict(progress=False, num_workers=0, normalize=True)
    fast = extract(d, tmp_path / "fast", ExtractConfig(**cfg), backbone=backbone)
    exact = extract(d, tmp_path / "exact", ExtractConfig(fast_decode=False, **cfg), backbone=backbone)
    assert fast.num_embedded == exact.num_embedded == 2 and fast.num_errors == exact.num_errors == 0
    a, b = embedx.read_features(tmp_path / "fast"), embedx.read_features(tmp_path / "exact")
    assert (a.embeddings * b.embeddings).sum(1).min() > 0.99


@pytest.mark.parametrize("mode", ["bicubic", "bilinear", "nearest"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_direct_resize_crop_is_torchvisions(mode, dtype):
    """`resize_crop` (aten called directly, the uint8 fast path's ordinary images) gives
    torchvision's resize + center_crop exactly, padding included, on channels-last views."""
    import torchvision.transforms.v2.functional as F

    for h, w in ORDINARY + [(56, 56), (40, 90), (64, 64), (1, 1)]:
        hwc = torch.from_numpy(_textured(h, w, seed=h + w))
        if dtype is torch.float32:
            hwc = hwc.float()
        x = _resize.channels_last_image(hwc)
        assert x.is_contiguous(memory_format=torch.channels_last) and torch.equal(x[0].permute(1, 2, 0), hwc)
        nh, nw = _resize.resized_size(h, w, SIZE)
        ref = F.center_crop(F.resize(hwc.permute(2, 0, 1), [nh, nw], interpolation=T.InterpolationMode(mode),
                                     antialias=True), list(CROP))
        out = _resize.resize_crop(x, nh, nw, CROP, mode)
        assert out.dtype == dtype and out.shape == (1, 3, *CROP), (h, w)
        assert torch.equal(out[0], ref), (mode, dtype, h, w)
    small = _resize.resize_crop(_resize.channels_last_image(hwc), 40, 50, CROP, mode)  # padded like torchvision
    assert small.shape == (1, 3, *CROP) and torch.equal(
        small[0], F.center_crop(F.resize(hwc.permute(2, 0, 1), [40, 50], interpolation=T.InterpolationMode(mode),
                                         antialias=True), list(CROP)))
