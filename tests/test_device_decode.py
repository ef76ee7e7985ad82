"""`--decode device`: the batched JPEG decoders (TorchCodec's, torchvision's deprecated one), the
EXIF orientation both apply (checked against PIL, not assumed), and how the decoder is chosen. On
a CPU both decode with libjpeg-turbo, so their pixels can be compared with PIL's exactly; the GPU
tests cover nvJPEG."""

import sys
import types

import numpy as np
import pytest
import torch

import embedx
from embedx import _tensor_decode
from embedx._tensor_decode import DEVICE_DECODERS, _decoder, _load_problem, resolve_device_decoder
from embedx.errors import InputError, OutputExistsError
from embedx.extractor import ExtractConfig, extract

USABLE = [d for d in DEVICE_DECODERS if _load_problem(d) is None]


def _cfg(**kw):
    return ExtractConfig(**{"progress": False, "num_workers": 0, "batch_size": 8, **kw})


@pytest.fixture
def fresh_resolution():
    """Forget which decoders loaded (and the once-a-process warning), before and after."""
    _tensor_decode._load_problem.cache_clear()
    _tensor_decode._warn_torchvision_fallback.cache_clear()
    yield
    _tensor_decode._load_problem.cache_clear()
    _tensor_decode._warn_torchvision_fallback.cache_clear()


def test_torchcodec_is_installed_for_the_tests():
    # the dev install brings it: without it the TorchCodec path would go untested. PyPI's Linux
    # wheel is built for CUDA 13: beside a torch for another CUDA (or a CPU-only torch), install
    # the matching one from the PyTorch index (e.g. --index-url https://download.pytorch.org/whl/cpu)
    assert "torchcodec" in USABLE and "torchvision" in USABLE, {d: _load_problem(d) for d in DEVICE_DECODERS}


def _rotated_jpegs(tmp_path):
    """One real photo (odd size, not square) saved with each EXIF orientation 1..8."""
    from PIL import Image

    from embedx.demo_data import load_photo

    img = load_photo("chelsea").resize((173, 121))
    files = {}
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        files[o] = tmp_path / f"o{o}.jpg"
        img.save(files[o], exif=exif, quality=90)
    return files


@pytest.mark.parametrize("decoder", USABLE)
def test_exif_orientation_applied_like_pil(tmp_path, decoder):
    """Each EXIF orientation: the decoder's upright pixels equal PIL's exif_transpose exactly."""
    from PIL import Image, ImageOps

    from embedx.images import read_jpeg_bytes

    decode = _decoder(decoder)
    for o, f in _rotated_jpegs(tmp_path).items():
        (got,) = decode([torch.from_numpy(read_jpeg_bytes(str(f)))], "cpu")
        with Image.open(f) as im:
            want = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), want, err_msg=f"orientation {o}")


@pytest.mark.parametrize("decoder", USABLE)
def test_device_decode_matches_pil_and_survives_bad_files(photo_dir, tmp_path, backbone, decoder):
    """decode='device' with each decoder (libjpeg-turbo here, nvJPEG on a GPU) + tensor resize:
    the same rows as timm's exact PIL transform within cosine 0.999, EXIF-rotated JPEGs upright,
    bad files recorded, and the metadata names the decoder."""
    import shutil

    from PIL import Image

    from embedx import shards

    d = tmp_path / "mix"
    shutil.copytree(photo_dir, d)
    (d / "chelsea" / "zero.jpg").write_bytes(b"")
    (d / "chelsea" / "fake.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(d / "chelsea" / "png.png")
    with Image.open(d / "chelsea" / "chelsea.jpg") as im:
        for o in (3, 6, 8):
            exif = Image.Exif()
            exif[0x0112] = o
            im.save(d / "chelsea" / f"rot{o}.jpg", exif=exif, quality=92)
    a = extract(d, tmp_path / "dev", _cfg(decode="device", device_decoder=decoder, normalize=True), backbone=backbone)
    b = extract(d, tmp_path / "pil", _cfg(fast_decode=False, normalize=True), backbone=backbone)
    assert a.num_embedded == b.num_embedded == 10 and a.num_errors == b.num_errors == 2
    assert a.stage_seconds["device_decode"] > 0
    fa, fb = embedx.read_features(tmp_path / "dev"), embedx.read_features(tmp_path / "pil")
    # decoding on the prefetch thread or inline, on the consumer's thread: the same rows
    extract(d, tmp_path / "dev0", _cfg(decode="device", device_decoder=decoder, normalize=True, prefetch=0),
            backbone=backbone)
    np.testing.assert_array_equal(embedx.read_features(tmp_path / "dev0").embeddings, fa.embeddings)
    assert fa.paths == fb.paths and fa.metadata["decode"] == f"{decoder}-device"
    cos = (fa.embeddings * fb.embeddings).sum(1)
    assert cos.min() > 0.999, cos
    ta = {r["path"]: (r["width"], r["height"]) for t in shards.iter_shards(tmp_path / "dev") for r in t.to_pylist()}
    tb = {r["path"]: (r["width"], r["height"]) for t in shards.iter_shards(tmp_path / "pil") for r in t.to_pylist()}
    assert ta == tb and ta["chelsea/rot6.jpg"] == ta["chelsea/chelsea.jpg"][::-1]


def test_the_two_decoders_give_the_same_embeddings(photo_dir, tmp_path, backbone):
    """On the CPU both are libjpeg-turbo: identical rows, only the label differs (a resume across
    the two is refused as another configuration, since on a GPU their decoders may differ)."""
    if len(USABLE) < 2:
        pytest.skip("needs both decoders")
    runs = {d: extract(photo_dir, tmp_path / d, _cfg(decode="device", device_decoder=d), backbone=backbone)
            for d in USABLE}
    fa, fb = (embedx.read_features(r.out_dir) for r in runs.values())
    np.testing.assert_array_equal(fa.embeddings, fb.embeddings)
    with pytest.raises(OutputExistsError, match="decode: 'torchcodec-device' -> 'torchvision-device'"):
        extract(photo_dir, tmp_path / "torchcodec", _cfg(decode="device", device_decoder="torchvision"),
                backbone=backbone)


def test_auto_prefers_torchcodec(fresh_resolution):
    assert resolve_device_decoder("auto") == "torchcodec"
    assert resolve_device_decoder("torchvision") == "torchvision"


def test_auto_says_when_it_falls_back_to_torchvision(fresh_resolution, monkeypatch):
    # a TorchCodec whose native library does not load (here: a module without the function)
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", types.ModuleType("torchcodec.decoders"))
    with pytest.warns(UserWarning, match="TorchCodec failed to load.*deprecated since torchvision 0.29"):
        assert resolve_device_decoder("auto") == "torchvision"
    with pytest.raises(InputError, match="torchcodec: failed to load"):
        resolve_device_decoder("torchcodec")


def test_no_usable_decoder_is_refused_clearly(fresh_resolution, monkeypatch, tiny_dir, tmp_path):
    """torchvision deprecated its image decoders in 0.29; without them and without TorchCodec,
    --decode device says what to install, before any work."""
    monkeypatch.setitem(sys.modules, "torchcodec", None)  # not installed
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)
    monkeypatch.setitem(sys.modules, "torchvision.io", types.ModuleType("torchvision.io"))
    with pytest.raises(InputError, match=r"torchcodec: not installed.*pip install torchcodec.*--decode pil"):
        extract(tiny_dir, tmp_path / "out", _cfg(decode="device"))
    assert not list((tmp_path / "out").glob("*.parquet"))


@pytest.mark.parametrize("kwargs, message", [
    ({"device_decoder": "nvimgcodec", "decode": "device"}, "must be auto, torchcodec or torchvision"),
    ({"device_decoder": "torchcodec"}, "needs --decode device"),
])
def test_device_decoder_option_checked(tiny_dir, tmp_path, kwargs, message):
    with pytest.raises(InputError, match=message):
        extract(tiny_dir, tmp_path / "out", _cfg(**kwargs))


# sizes for the batched resize (a 64 -> 56 crop, as in test_resize): downscales, upscales, the
# crop's own size, portrait and landscape, equal sizes, and odd ones
_SIZES = [(375, 500), (500, 375), (120, 97), (56, 56), (64, 64), (57, 150), (150, 57), (61, 61), (375, 500),
          (199, 173), (70, 180), (1000, 640)]


def _textured(h, w, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 7 + yy * 3) % 256, (xx * 2 + yy * 11) % 256, (xx * yy) % 256], 0)
    return torch.from_numpy(np.clip(base + rng.integers(-20, 21, (3, h, w)), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("mode", ["bicubic", "bilinear", "nearest"])
@pytest.mark.parametrize("group_pixels,slack", [(2 ** 25, float("inf")), (40_000, 1.5)])
def test_batched_resize_equals_the_per_size_one(mode, group_pixels, slack, monkeypatch):
    """Images of many sizes resized together (padded, two matrix products a group) give the pixels
    that one interpolate call per image gives, in one group or split into many."""
    from embedx._tensor_decode import TensorPreprocess, _groups, batchable, batched_resize_crop, resize_crop_batch

    monkeypatch.setattr(_tensor_decode, "GROUP_PIXELS", group_pixels)
    monkeypatch.setattr(_tensor_decode, "GROUP_SLACK", slack)
    pre = TensorPreprocess(64, (56, 56), mode)
    imgs = [_textured(h, w, seed) for seed, (h, w) in enumerate(_SIZES)]
    assert all(batchable(h, w, pre) for h, w in _SIZES)
    groups = _groups(_SIZES, group_pixels, slack)
    assert sorted(i for g in groups for i in g) == list(range(len(_SIZES)))
    assert (len(groups) == 1) == (slack == float("inf")), groups  # all padded to 1000 x 640, or many groups
    got = batched_resize_crop(imgs, pre)
    for (h, w), img, out in zip(_SIZES, imgs, got):
        want = resize_crop_batch(img[None], pre)[0]
        assert out.shape == want.shape == (3, 56, 56)
        assert (out - want).abs().max() < 1e-3, (h, w, mode, (out - want).abs().max())


@pytest.mark.parametrize("n_in,n_out", [(1025, 300), (2049, 512), (700, 256), (100, 256), (1, 256)])
@pytest.mark.parametrize("mode", ["bicubic", "bilinear", "nearest"])
def test_axis_weights_are_the_resize_of_one_axis(n_in, n_out, mode):
    """The cached weights (built in slices of 1024 columns, none of width 1) applied to columns =
    aten's resize of those columns, for the crop's rows."""
    from embedx._tensor_decode import _axis_weights

    w = _axis_weights(n_in, n_out, 10, 200, mode, "cpu")
    x = torch.rand(1, 1, n_in, 5, generator=torch.Generator().manual_seed(0))
    ref = torch.nn.functional.interpolate(x, size=(n_out, 5), mode=mode, antialias=mode != "nearest",
                                          align_corners=False if mode != "nearest" else None)[0, 0, 10:210]
    assert w.shape == (200, n_in)
    assert (w @ x[0, 0] - ref).abs().max() < 1e-5


def test_groups_stay_within_their_padding_and_pixel_limits():
    from embedx._tensor_decode import _groups

    # photo-like: a few aspect ratios, portrait and landscape, many scales
    rng = np.random.default_rng(0)
    shapes = [(int(s), int(s * rng.choice([4 / 3, 3 / 4, 3 / 2, 2 / 3, 1, 16 / 9]))) for s in rng.integers(200, 1200, 300)]
    for limit in (3_000_000, 2 ** 25):
        groups = _groups(shapes, limit, 1.5)
        assert sorted(i for g in groups for i in g) == list(range(300))
        for g in groups:
            padded = len(g) * max(shapes[i][0] for i in g) * max(shapes[i][1] for i in g)
            own = sum(shapes[i][0] * shapes[i][1] for i in g)
            assert len(g) == 1 or (padded <= limit and padded <= 1.5 * own), (g, padded, own)
    assert len(groups) <= 20, len(groups)  # 300 images in 18 groups (ordered by size alone: 40)


def test_decode_batch_batched_keeps_banners_and_failures_apart(tmp_path):
    """resize="batched": ordinary JPEGs (one upscaled) go through the batched products; a banner
    (windowed resize) and a broken file take their own paths; all equal to resize="per-size"."""
    from PIL import Image

    from embedx._tensor_decode import TensorPreprocess, decode_batch

    pre = TensorPreprocess(64, (56, 56), "bicubic")
    blobs = []
    for seed, (h, w) in enumerate([(375, 500), (120, 97), (3, 1200), (40, 30), (375, 500)]):
        f = tmp_path / f"{seed}.jpg"
        Image.fromarray(_textured(h, w, seed).permute(1, 2, 0).numpy()).save(f, quality=95)
        blobs.append(torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8))
    blobs.insert(2, torch.frombuffer(bytearray(b"\xff\xd8\xff not a jpeg"), dtype=torch.uint8))
    calls = []
    real = _tensor_decode.batched_resize_crop
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_tensor_decode, "batched_resize_crop", lambda imgs, p: calls.append(len(imgs)) or real(imgs, p))
        a, sizes_a, fail_a = decode_batch(blobs, "cpu", pre, USABLE[0], resize="batched")
    b, sizes_b, fail_b = decode_batch(blobs, "cpu", pre, USABLE[0], resize="per-size")
    assert calls == [4]  # all but the banner and the broken file
    assert sizes_a == sizes_b and list(fail_a) == list(fail_b) == [2] and a[2] is None
    for i, (x, y) in enumerate(zip(a, b)):
        if i != 2:
            assert x.shape == y.shape == (3, 56, 56) and (x - y).abs().max() < 1e-3, i
    with pytest.raises(ValueError, match="per-size"):
        decode_batch(blobs[:1], "cpu", pre, USABLE[0], resize="fast")


def test_extract_with_the_batched_resize_gives_the_same_rows(photo_dir, tmp_path, backbone, monkeypatch):
    """End to end on the CPU with RESIZE forced to "batched" (the CUDA default) against "per-size"
    (the CPU default): the same rows (fp32: bf16 would blur the comparison)."""
    from .conftest import row_cosines

    batched = []
    real = _tensor_decode.batched_resize_crop
    monkeypatch.setattr(_tensor_decode, "batched_resize_crop", lambda imgs, p: batched.append(len(imgs)) or real(imgs, p))
    for resize in ("batched", "per-size"):
        monkeypatch.setattr(_tensor_decode, "RESIZE", resize)
        extract(photo_dir, tmp_path / resize, _cfg(decode="device", device_decoder=USABLE[0], precision="fp32"),
                backbone=backbone)
        assert (sum(batched) > 0) == (resize == "batched")
        batched.clear()
    a, b = embedx.read_features(tmp_path / "batched"), embedx.read_features(tmp_path / "per-size")
    assert len(a.paths) == len(b.paths) > 0 and list(a.paths) == list(b.paths)
    cos = row_cosines(a.embeddings, b.embeddings)
    assert cos.min() > 0.99999, cos.min()
