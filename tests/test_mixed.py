"""The half-resolution layers in fp32 under bf16 (embedx.mixed): which layers, that they really
run in fp32 and the rest in bf16, the accuracy it buys on real photos, and its records."""

import dataclasses

import pytest
import torch

from embedx import shards
from embedx.backbone import load_backbone
from embedx.errors import EmbedxError
from embedx.extractor import ExtractConfig, _Embedder, _prepare_model, extract, fp32_modules, prepare_model
from embedx.fold import foldable_pairs
from embedx.mixed import Float32, half_resolution_modules, keep_fp32, store_bf16_weights
from embedx.query import QueryEncoder

from .conftest import row_cosines
from .test_fold import _batchnorms


@pytest.mark.parametrize("name,expected", [
    ("tf_efficientnet_lite0", ["conv_stem", "bn1", "blocks.0"]),
    ("resnet10t", ["conv1", "bn1", "act1"]),
    ("test_vit", []),  # patches straight to 1/16: nothing at half resolution
    ("test_convnext", []),  # a stride-4 stem
])
def test_the_half_resolution_layers_come_from_timms_feature_info(name, expected):
    model = load_backbone(name, "random").model
    assert half_resolution_modules(model) == expected
    assert half_resolution_modules(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1))) == []  # no feature_info


def test_the_kept_layers_run_in_fp32_and_the_rest_in_bf16(backbone):
    names = half_resolution_modules(backbone.model)
    model = keep_fp32(backbone.model, names, tuple(backbone.data_config.input_size))
    assert model is not backbone.model and not any(isinstance(m, Float32) for m in backbone.model.modules())
    assert [n for n, m in model.named_modules() if isinstance(m, Float32)] == names
    seen = {}

    def spy(name):
        def hook(module, args, out):
            seen[name] = (args[0].dtype, out.dtype)  # returns None: the output is left as it is
        return hook

    model.conv_stem.module.register_forward_hook(spy("conv_stem"))  # the first layer kept
    model.blocks[0].module.register_forward_hook(spy("blocks.0"))  # the last layer kept
    model.blocks[1][0].conv_pw.register_forward_hook(spy("blocks.1"))  # the first layer after them
    x = torch.randn(2, *backbone.data_config.input_size)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert seen["conv_stem"] == (torch.float32, torch.float32)  # the pixels are not rounded to bf16
    assert seen["blocks.0"] == (torch.float32, torch.float32)
    assert seen["blocks.1"][1] == torch.bfloat16


def test_bf16_with_the_fp32_stem_is_within_0_999_of_fp32_on_real_photos(photo_dir, tmp_path, backbone):
    """The CPU's fast path (bf16, BatchNorms folded, half-resolution layers in fp32) against fp32
    without folding, on real photos: cosine mean >= 0.9995 and min >= 0.998 (measured on 128
    photos: mean 0.9996, min 0.9989; all-bf16: 0.9988, 0.9956; bench_extract.py --fp32-stem), and
    closer than all-bf16 is."""
    runs = {"fp32": ExtractConfig(precision="fp32", fold_bn=False, progress=False),
            "bf16": ExtractConfig(precision="bf16", progress=False),
            "all_bf16": ExtractConfig(precision="bf16", fp32_stem=False, progress=False)}
    feats = {}
    for name, config in runs.items():
        extract(photo_dir, tmp_path / name, config, backbone=backbone)
        feats[name] = shards.read_features(tmp_path / name)
    assert feats["fp32"].paths == feats["bf16"].paths == feats["all_bf16"].paths
    cos = row_cosines(feats["bf16"].embeddings, feats["fp32"].embeddings)
    cos_all = row_cosines(feats["all_bf16"].embeddings, feats["fp32"].embeddings)
    print(f"vs fp32: fp32 stem min {cos.min():.5f} mean {cos.mean():.5f}; all bf16 min {cos_all.min():.5f} "
          f"mean {cos_all.mean():.5f}")
    assert cos.mean() >= 0.9995 and cos.min() >= 0.998
    assert cos.mean() > cos_all.mean()
    # recorded: queries of these features are embedded the same way (QueryEncoder)
    assert feats["bf16"].metadata["fp32_modules"] == ["conv_stem", "bn1", "blocks.0"]
    assert feats["all_bf16"].metadata["fp32_modules"] == feats["fp32"].metadata["fp32_modules"] == []
    older = {k: v for k, v in feats["all_bf16"].metadata.items() if k != "fp32_modules"}  # before embedx recorded it
    for f, metadata in ((feats["bf16"], feats["bf16"].metadata), (feats["all_bf16"], feats["all_bf16"].metadata),
                        (feats["all_bf16"], older)):
        # a query image lands on its own row (bf16 runs differ by ~1e-3 when made another way)
        query = QueryEncoder(metadata, backbone=backbone, device="cpu").embed([str(photo_dir / p) for p in f.paths])
        assert row_cosines(query.embeddings, f.embeddings).min() > 0.99999


def test_bf16_folds_the_depthwise_convolutions_of_the_kept_layers_only(backbone):
    kept = fp32_modules(backbone, "cpu", "bf16")
    # by default on every device (measured on a CPU and on an H200)
    assert kept == half_resolution_modules(backbone.model) == fp32_modules(backbone, "cuda", "bf16")
    assert fp32_modules(backbone, "cpu", "fp32") == fp32_modules(backbone, "cpu", "bf16", fp32_stem=False) == []
    # asked for (--fp32-stem), on any device and in either half precision; never in fp32
    assert fp32_modules(backbone, "cuda", "bf16", fp32_stem=True) == fp32_modules(backbone, "cuda:1", "fp16", True) == kept
    assert fp32_modules(backbone, "cuda", "fp32", fp32_stem=True) == []
    pointwise = foldable_pairs(backbone.model, depthwise=False)
    inside = foldable_pairs(backbone.model, depthwise=tuple(kept))
    extra = [(p, c) for p, c, _ in inside if p.get_submodule(c).groups != 1]
    assert len(inside) == len(pointwise) + len(extra) and len(extra) == 1
    assert extra[0][0] is backbone.model.blocks[0][0]  # the depthwise convolution of blocks.0

    before = _batchnorms(backbone.model)
    model = prepare_model(backbone, "cpu", "bf16")
    assert _batchnorms(model) == before - len(inside)
    assert [n for n, m in model.named_modules() if isinstance(m, Float32)] == kept
    assert not any(isinstance(m, Float32) for m in prepare_model(backbone, "cpu", "bf16", fp32_stem=False).modules())
    assert not any(isinstance(m, Float32) for m in prepare_model(backbone, "cpu", "fp32").modules())
    unfolded = prepare_model(backbone, "cpu", "bf16", fold_bn=False)  # a copy: the backbone stays as it was
    assert unfolded is not backbone.model and _batchnorms(unfolded) == before
    assert not any(isinstance(m, Float32) for m in backbone.model.modules())


class _ReadsItsStem(torch.nn.Module):
    """A forward that reads an attribute of a layer it would keep in fp32."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.head = torch.nn.Conv2d(4, 4, 1)
        self.feature_info = [{"module": "stem", "reduction": 2, "num_chs": 4}]

    def forward(self, x):
        return self.head(self.stem(x) * self.stem.weight.mean()).mean((2, 3))


def test_a_model_that_wrapping_breaks_is_refused_with_the_way_out(random_backbone):
    model = _ReadsItsStem().eval()
    assert half_resolution_modules(model) == ["stem"]
    with pytest.raises(ValueError, match="AttributeError"):
        keep_fp32(model, ["stem"], (3, 16, 16))
    broken = dataclasses.replace(random_backbone, model=model)
    with pytest.raises(EmbedxError, match="--no-fp32-stem"):
        _prepare_model(broken, "cpu", True, "bf16", fp32_stem=True)
    assert isinstance(model.stem, torch.nn.Conv2d)  # the model itself is left as it was


def test_bf16_weights_are_stored_once_with_the_same_output(backbone):
    """In bf16 the layers outside the fp32 ones keep their weights in bf16: autocast's own cast,
    done once instead of every batch, so the embeddings are bit for bit the same."""
    fp32_weights = _prepare_model(backbone, "cpu", True, "bf16", fold_bn=True, fp32_stem=True, bf16_weights=False)
    model = _prepare_model(backbone, "cpu", True, "bf16", fold_bn=True, fp32_stem=True)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    kept = [n for n, _ in layers if n.startswith(("conv_stem", "blocks.0."))]
    assert len(kept) == 3  # conv_stem, and blocks.0's depthwise and pointwise convolutions
    assert all(m.weight.dtype == (torch.float32 if n in kept else torch.bfloat16) for n, m in layers)
    assert all(p.dtype == torch.float32 for p in backbone.model.parameters())  # the backbone as it was
    x = torch.randint(0, 256, (3, *backbone.data_config.input_size), dtype=torch.uint8)
    with torch.inference_mode():
        want = _Embedder(fp32_weights, backbone, "cpu", "bf16", False, True).embed(x)
        got = _Embedder(model, backbone, "cpu", "bf16", False, True).embed(x)
    assert (got == want).all()


class _StandardisedConv(torch.nn.Conv2d):
    """Uses its weight outside the convolution (weight standardisation, as timm's StdConv2d)."""

    def forward(self, x):
        w = torch.nn.functional.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                                           training=True, eps=1e-6).reshape_as(self.weight)
        return torch.nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


def test_bf16_weights_that_would_change_the_output_stay_fp32():
    torch.manual_seed(0)
    model = torch.nn.Sequential(_StandardisedConv(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    params = list(model.parameters())
    same, stored = store_bf16_weights(model, (3, 16, 16))
    assert same is model and stored == 0
    assert [p is q for p, q in zip(model.parameters(), params)] == [True] * 4  # the fp32 parameters themselves
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    plain, stored = store_bf16_weights(plain, (3, 16, 16))
    assert stored == 2 and all(p.dtype == torch.bfloat16 for p in plain.parameters())


def test_fp32_stem_asked_for_off_the_cpu_wraps_the_layers_and_nothing_else(backbone):
    """--fp32-stem on a GPU (measured there by bench_gpu.py / test_gpu.py when one is lent): the
    same layers wrapped, checked on the CPU before the move, and none of the CPU-only steps
    (folding, bf16 weights). The "meta" device stands in for a GPU: the model moves, no data."""
    model = _prepare_model(backbone, "meta", True, "bf16", fold_bn=True, fp32_stem=True)
    assert [n for n, m in model.named_modules() if isinstance(m, Float32)] == half_resolution_modules(backbone.model)
    assert _batchnorms(model) == _batchnorms(backbone.model)  # nothing folded
    assert {p.dtype for p in model.parameters()} == {torch.float32} and {p.device.type for p in model.parameters()} == {"meta"}
    assert next(backbone.model.parameters()).device.type == "cpu"  # wrapped on a copy: the backbone stays
