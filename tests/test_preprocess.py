"""Preprocessing overrides (--img-size, --crop-pct, --crop-mode, --interpolation), as timm's scripts take them."""

import pytest

import embedx
from embedx.errors import InputError, OutputExistsError
from embedx.extractor import ExtractConfig, extract

from .conftest import row_cosines, timm_pixels

FAST = dict(progress=False, num_workers=0, batch_size=8, precision="fp32")


def _timm_reference(backbone, files, **data):
    """The embeddings timm's own eval transform + the model give for `files` with `data` overrides."""
    import torch

    with torch.no_grad():
        return backbone.model(timm_pixels(backbone, files, **data)).numpy()


def test_overrides_reach_the_pixels_the_metadata_and_the_queries(photo_dir, tmp_path, backbone):
    over = dict(img_size=256, crop_pct=1.0)
    exact = extract(photo_dir, tmp_path / "exact", ExtractConfig(fast_decode=False, **over, **FAST), backbone=backbone)
    fast = extract(photo_dir, tmp_path / "fast", ExtractConfig(**over, **FAST), backbone=backbone)
    default = extract(photo_dir, tmp_path / "default", ExtractConfig(**FAST), backbone=backbone)
    assert exact.num_embedded == fast.num_embedded == default.num_embedded == 6
    fe, ff, fd = (embedx.read_features(tmp_path / d) for d in ("exact", "fast", "default"))
    dc = fe.metadata["data_config"]
    assert dc["input_size"] == [3, 256, 256] and dc["crop_pct"] == 1.0
    assert ff.metadata["data_config"] == dc and fd.metadata["data_config"]["input_size"] == [3, 224, 224]
    files = [str(photo_dir / p) for p in fe.paths]
    ref = _timm_reference(backbone, files, input_size=(3, 256, 256), crop_pct=1.0)
    assert row_cosines(fe.embeddings, ref).min() > 0.9999  # exactly timm's transform with the overrides
    assert row_cosines(ff.embeddings, fe.embeddings).min() > 0.999  # the fast decode path follows them too
    assert row_cosines(fd.embeddings, fe.embeddings).min() < 0.99  # and they changed something

    # the same command with another crop is another run: refused, as any other change of preprocessing
    with pytest.raises(OutputExistsError, match="data_config"):
        extract(photo_dir, tmp_path / "fast", ExtractConfig(img_size=256, crop_pct=0.9, **FAST), backbone=backbone)

    # queries by image are embedded with the index's preprocessing, overrides included
    from embedx.backbone import load_backbone_for
    from embedx.index import IndexConfig
    from embedx.indexer import build_index
    from embedx.query import SearchIndex, search_images

    assert load_backbone_for(ff.metadata).data_config.to_dict() == dc
    build_index(tmp_path / "fast", tmp_path / "idx", IndexConfig(factory="Flat"))
    idx = SearchIndex(tmp_path / "idx")
    results, failures = search_images(idx, [files[2]], k=2, device="cpu")
    assert failures == []
    top = results[0].neighbors[0]
    assert top.path == ff.paths[2] and top.score > 0.999, top  # the query image finds itself


def test_squash_keeps_the_whole_image_on_both_paths(photo_dir, tmp_path, backbone):
    exact = extract(photo_dir, tmp_path / "e", ExtractConfig(crop_mode="squash", crop_pct=1.0, fast_decode=False, **FAST),
                    backbone=backbone)
    extract(photo_dir, tmp_path / "f", ExtractConfig(crop_mode="squash", crop_pct=1.0, **FAST), backbone=backbone)
    fe, ff = embedx.read_features(tmp_path / "e"), embedx.read_features(tmp_path / "f")
    assert exact.num_embedded == 6 and fe.metadata["data_config"]["crop_mode"] == "squash"
    files = [str(photo_dir / p) for p in fe.paths]
    ref = _timm_reference(backbone, files, crop_mode="squash", crop_pct=1.0)
    assert row_cosines(fe.embeddings, ref).min() > 0.9999
    assert row_cosines(ff.embeddings, fe.embeddings).min() > 0.999


def test_a_fixed_size_model_refuses_another_size():
    from embedx.backbone import load_backbone

    vit = load_backbone("vit_tiny_patch16_224", weights="random")
    with pytest.raises(InputError, match=r"does not take 256x256 inputs.*built for 224x224"):
        vit.with_preprocessing(img_size=256)
    assert vit.with_preprocessing(crop_pct=1.0).data_config.crop_pct == 1.0  # other overrides are fine
    assert vit.with_preprocessing() is vit


@pytest.mark.parametrize("kwargs, message", [
    ({"crop_pct": 1.5}, r"--crop-pct must be in \(0, 1\]"),
    ({"crop_pct": 0.0}, r"--crop-pct must be in \(0, 1\]"),
    ({"img_size": 8}, "--img-size must be between 16 and 4096"),
    ({"crop_mode": "centre"}, "--crop-mode must be one of center, squash, border"),
    ({"interpolation": "cubic"}, "--interpolation must be one of bilinear, bicubic"),
])
def test_bad_overrides_are_refused_before_any_work(tiny_dir, tmp_path, kwargs, message):
    with pytest.raises(InputError, match=message):
        extract(tiny_dir, tmp_path / "out", ExtractConfig(**kwargs, **FAST))
    assert not (tmp_path / "out").exists()


def test_device_decode_refuses_what_it_cannot_reproduce(tiny_dir, tmp_path, backbone):
    pytest.importorskip("torchvision")
    with pytest.raises(InputError, match="--decode device resizes .* crop_mode 'squash'"):
        extract(tiny_dir, tmp_path / "out", ExtractConfig(decode="device", crop_mode="squash", **FAST), backbone=backbone)
