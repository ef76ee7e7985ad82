"""BatchNorm folding (embedx.fold): same outputs, the original untouched, wrong pairings refused."""

import logging

import numpy as np
import pytest
import torch

from embedx import shards
from embedx.extractor import ExtractConfig, extract
from embedx.fold import fold_batchnorm, foldable_pairs


def _batchnorms(model):
    return sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def _with_stats(bn, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        if bn.weight is not None:
            bn.weight.copy_(torch.randn(bn.num_features, generator=g))
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))
    return bn


def test_folding_the_real_backbone_keeps_its_output_and_leaves_it_untouched(backbone):
    model = backbone.model.eval()
    before = _batchnorms(model)
    pairs = foldable_pairs(model)
    pointwise = foldable_pairs(model, depthwise=False)
    assert len(pairs) > len(pointwise) > 0 and all(p[0].get_submodule(p[1]).groups == 1 for p in pointwise)

    folded, n = fold_batchnorm(model, tuple(backbone.data_config.input_size))
    assert n == len(pairs) and folded is not model
    assert _batchnorms(model) == before  # the backbone keeps its BatchNorms (fine-tuning uses them)
    assert _batchnorms(folded) == before - n
    x = torch.randn(3, *backbone.data_config.input_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want, got = model(x), folded(x)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)

    half, m = fold_batchnorm(model, tuple(backbone.data_config.input_size), depthwise=False)
    assert m == len(pointwise) and _batchnorms(half) == before - m


@pytest.mark.parametrize("conv_bias,affine", [(False, True), (True, True), (True, False)])
def test_fold_handles_conv_bias_and_plain_batchnorm(conv_bias, affine):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=conv_bias),
                                _with_stats(torch.nn.BatchNorm2d(8, affine=affine), 2), torch.nn.ReLU()).eval()
    folded, n = fold_batchnorm(model, (3, 16, 16))
    assert n == 1 and isinstance(folded[1], torch.nn.Identity)
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        np.testing.assert_allclose(folded(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-5)


class _Misleading(torch.nn.Module):
    """A conv registered right before a BatchNorm that it does not feed."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1, bias=False)
        self.bn = _with_stats(torch.nn.BatchNorm2d(3), 3)

    def forward(self, x):
        return self.conv(x) + self.bn(x)


def test_a_pairing_the_outputs_contradict_is_not_folded(caplog):
    model = _Misleading().eval()
    assert len(foldable_pairs(model)) == 1  # found by structure ...
    with caplog.at_level(logging.WARNING, logger="embedx"):
        folded, n = fold_batchnorm(model, (3, 8, 8))
    assert folded is model and n == 0  # ... and refused by the check
    assert "running it unfolded" in caplog.text
    train = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3)).train()
    assert fold_batchnorm(train, (3, 8, 8)) == (train, 0)  # training-mode statistics are not constants


def test_extract_folds_on_the_cpu_and_keeps_the_embeddings(tiny_dir, tmp_path, backbone, caplog):
    before = _batchnorms(backbone.model)
    with caplog.at_level(logging.INFO, logger="embedx"):
        extract(tiny_dir, tmp_path / "fold", ExtractConfig(precision="fp32", progress=False), backbone=backbone)
    assert "BatchNorm layers into their convolutions (fp32)" in caplog.text
    extract(tiny_dir, tmp_path / "plain", ExtractConfig(precision="fp32", fold_bn=False, progress=False),
            backbone=backbone)
    assert _batchnorms(backbone.model) == before
    a, b = shards.read_features(tmp_path / "fold"), shards.read_features(tmp_path / "plain")
    assert a.paths == b.paths
    cos = (a.embeddings * b.embeddings).sum(1) / np.linalg.norm(a.embeddings, axis=1) / np.linalg.norm(b.embeddings, axis=1)
    assert cos.min() > 0.99999


def test_bf16_with_folding_stays_close_to_fp32_on_real_photos(photo_dir, tmp_path, backbone):
    """All-bf16 (no fp32 stem: test_mixed has the fast path itself) with pointwise BatchNorms
    folded, against fp32 without folding, on real photos: cosine mean >= 0.998 and min >= 0.99 (measured
    on 128 photos: mean 0.9988, min 0.9927; bench_extract.py --fold). Folding the depthwise
    convolutions too gave min 0.9889 there, which is why bf16 folds pointwise ones only (this
    check, on 8 photos, does not see that difference; the next test pins the rule)."""
    extract(photo_dir, tmp_path / "fp32", ExtractConfig(precision="fp32", fold_bn=False, progress=False), backbone=backbone)
    extract(photo_dir, tmp_path / "bf16", ExtractConfig(precision="bf16", fp32_stem=False, progress=False),
            backbone=backbone)
    a, b = shards.read_features(tmp_path / "fp32"), shards.read_features(tmp_path / "bf16")
    assert a.paths == b.paths and len(a.paths) >= 5
    cos = (a.embeddings * b.embeddings).sum(1) / np.linalg.norm(a.embeddings, axis=1) / np.linalg.norm(b.embeddings, axis=1)
    print(f"bf16 folded vs fp32: cosine min {cos.min():.5f} mean {cos.mean():.5f}")
    assert cos.mean() >= 0.998 and cos.min() >= 0.99


def test_the_prepared_model_folds_by_device_and_precision(backbone):
    from embedx.extractor import prepare_model

    before = _batchnorms(backbone.model)
    every, pointwise = len(foldable_pairs(backbone.model)), len(foldable_pairs(backbone.model, depthwise=False))
    assert _batchnorms(prepare_model(backbone, "cpu", "fp32")) == before - every
    assert _batchnorms(prepare_model(backbone, "cpu", "bf16", fp32_stem=False)) == before - pointwise
    assert _batchnorms(prepare_model(backbone, "cpu", "fp32", fold_bn=False)) == before


class _OwnSizeOnly(torch.nn.Module):
    """Takes only 80 x 80 inputs (as a ViT with a fixed patch grid does)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = _with_stats(torch.nn.BatchNorm2d(4), 4)

    def forward(self, x):
        if x.shape[-2:] != (80, 80):
            raise ValueError(f"input size {tuple(x.shape[-2:])} != (80, 80)")
        return self.bn(self.conv(x)).mean((2, 3))


def test_the_check_falls_back_to_the_models_own_size():
    model = _OwnSizeOnly().eval()
    folded, n = fold_batchnorm(model, (3, 80, 80))  # the 64 x 64 check fails, the 80 x 80 one runs
    assert n == 1 and folded is not model
    x = torch.randn(2, 3, 80, 80)
    with torch.inference_mode():
        np.testing.assert_allclose(folded(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-5)
    assert fold_batchnorm(model, (3, 96, 96)) == (model, 0)  # no size it takes: not folded


@pytest.mark.parametrize("name", ["resnet10t", "mobilenetv3_small_050", "densenet121"])
def test_fold_keeps_the_output_of_other_timm_families(name):
    """Random weights with random BatchNorm statistics and affine terms (so that folding is not
    the identity); densenet registers BatchNorms before their convolutions too: only conv -> BN
    pairs fold."""
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=0).eval()
    for seed, m in enumerate(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        _with_stats(m, seed)
    folded, n = fold_batchnorm(model, (3, 224, 224))
    assert n > 0 and _batchnorms(folded) == _batchnorms(model) - n
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        want, got = model(x), folded(x)
    assert (want - got).abs().max() <= 1e-4 * want.abs().max()
