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
    # and nvImageCodec (its CPU decoder here, libjpeg-turbo; on a GPU its hardware one)
    assert "nvimgcodec" in USABLE, _load_problem("nvimgcodec")


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


def test_the_decoders_give_the_same_embeddings(photo_dir, tmp_path, backbone):
    """On the CPU all are libjpeg-turbo: identical rows, only the label differs (a resume across
    two is refused as another configuration, since on a GPU their decoders differ)."""
    if len(USABLE) < 2:
        pytest.skip("needs two decoders")
    runs = {d: extract(photo_dir, tmp_path / d, _cfg(decode="device", device_decoder=d), backbone=backbone)
            for d in USABLE}
    first, *others = (embedx.read_features(r.out_dir) for r in runs.values())
    assert len(first.paths) > 0
    for other in others:
        np.testing.assert_array_equal(other.embeddings, first.embeddings)
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
    ({"device_decoder": "dali", "decode": "device"}, "must be auto, torchcodec, torchvision or nvimgcodec"),
    ({"device_decoder": "torchcodec"}, "needs --decode device"),
])
def test_device_decoder_option_checked(tiny_dir, tmp_path, kwargs, message):
    with pytest.raises(InputError, match=message):
        extract(tiny_dir, tmp_path / "out", _cfg(**kwargs))


def test_nvimgcodec_failures_come_back_in_their_place(tmp_path):
    """nvImageCodec reports an undecodable file as None in its batch (it does not raise): each
    becomes an exception in its own place, the others decode, greyscale and CMYK JPEGs as RGB."""
    from PIL import Image

    from embedx._tensor_decode import _nvimgcodec_decode

    if "nvimgcodec" not in USABLE:
        pytest.skip(_load_problem("nvimgcodec"))
    files = []
    for mode, colour in (("RGB", (10, 200, 30)), ("L", 77), ("CMYK", (0, 0, 0, 0))):
        files.append(tmp_path / f"{mode}.jpg")
        Image.new(mode, (37, 21), colour).save(files[-1], quality=95)
    data = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]
    data.insert(1, torch.frombuffer(bytearray(b"\xff\xd8\xff\xe0 not a jpeg"), dtype=torch.uint8))
    got = _nvimgcodec_decode(data, "cpu")
    assert isinstance(got[1], ValueError) and "could not decode" in str(got[1])
    for img, f in zip([got[0], *got[2:]], files):
        with Image.open(f) as im:
            want = np.asarray(im.convert("RGB")).astype(int)
        assert img.shape == (3, 21, 37) and img.dtype == torch.uint8
        assert np.abs(img.permute(1, 2, 0).numpy().astype(int) - want).max() <= 2, f.name
