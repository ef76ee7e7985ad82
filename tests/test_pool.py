"""--pool: another global pooling of the same frozen network (timm's global_pool)."""

import numpy as np
import pytest

import embedx
from embedx.errors import InputError
from embedx.extractor import ExtractConfig, extract

from .conftest import row_cosines, timm_pixels

FAST = dict(progress=False, num_workers=0, batch_size=8, precision="fp32", fast_decode=False)


def _feature_maps(backbone, files):
    """The network's last feature maps (N, C, H, W) for `files` through timm's exact eval transform."""
    import torch

    with torch.no_grad():
        return backbone.model.forward_features(timm_pixels(backbone, files))


def test_pool_max_and_catavgmax_are_those_of_the_feature_maps(photo_dir, tmp_path, backbone):
    extract(photo_dir, tmp_path / "max", ExtractConfig(pool="max", **FAST), backbone=backbone)
    extract(photo_dir, tmp_path / "cat", ExtractConfig(pool="catavgmax", **FAST), backbone=backbone)
    fm, fc = embedx.read_features(tmp_path / "max"), embedx.read_features(tmp_path / "cat")
    assert fm.metadata["pooling"] == "max" and fm.metadata["dim"] == 1280 == fm.embeddings.shape[1]
    assert fc.metadata["pooling"] == "catavgmax" and fc.embeddings.shape[1] == 2560
    maps = _feature_maps(backbone, [str(photo_dir / p) for p in fm.paths])
    mx, avg = maps.amax(dim=(2, 3)).numpy(), maps.mean(dim=(2, 3)).numpy()
    assert row_cosines(fm.embeddings, mx).min() > 0.9999
    assert row_cosines(fc.embeddings, np.concatenate([avg, mx], axis=1)).min() > 0.9999
    assert backbone.pooling == "avg" and backbone.dim == 1280  # the caller's backbone is left as it was

    # queries by image are pooled as the index is: the query image finds itself
    from embedx.index import IndexConfig
    from embedx.indexer import build_index
    from embedx.query import SearchIndex, search_images

    build_index(tmp_path / "max", tmp_path / "idx", IndexConfig(factory="Flat"))
    results, failures = search_images(SearchIndex(tmp_path / "idx"), [str(photo_dir / fm.paths[1])], k=1, device="cpu")
    assert failures == [] and results[0].neighbors[0].path == fm.paths[1] and results[0].neighbors[0].score > 0.999


def test_poolings_that_add_parameters_or_do_not_exist_are_refused(backbone):
    from embedx.backbone import load_backbone

    vit = load_backbone("vit_tiny_patch16_224", weights="random")
    assert vit.pooling == "token" and vit.with_pool("avg").pooling == "avg"
    with pytest.raises(InputError, match="has no global pooling 'map' .*attention pooling"):
        vit.with_pool("map")  # an attention pool would be new, untrained weights: timm refuses
    with pytest.raises(InputError, match="has no global pooling 'median'"):
        backbone.with_pool("median")
    with pytest.raises(InputError, match="has no global pooling 'catavgmax'"):
        load_backbone("test_vit", weights="random").with_pool("catavgmax")
    assert backbone.with_pool(None) is backbone and backbone.with_pool("avg") is backbone


def test_a_pooling_that_would_add_untrained_parameters_is_refused(backbone):
    """A model whose reset_classifier builds new layers for a pooling (none of timm's does so
    today: they refuse) must not get them silently: they would be random."""
    import dataclasses

    import torch

    class AttentionPooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Conv2d(3, 8, 3)
            self.pool = torch.nn.AdaptiveAvgPool2d(1)

        def reset_classifier(self, num_classes, global_pool):
            self.pool = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 1), torch.nn.AdaptiveAvgPool2d(1))  # new weights

        def forward(self, x):
            return self.pool(self.body(x)).flatten(1)

    fake = dataclasses.replace(backbone, model=AttentionPooled(), dim=8, model_name="attention_pooled")
    with pytest.raises(InputError, match="adds parameters to attention_pooled that its weights never trained"):
        fake.with_pool("attn")
