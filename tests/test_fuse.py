"""Activations fused into convolutions (embedx.fuse): the same output bit for bit, the original
untouched, and pairs refused where the activation's input is not the convolution's output."""

import logging

import numpy as np
import pytest
import torch

from embedx import fuse, shards
from embedx.extractor import ExtractConfig, _prepare_model, extract

pytestmark = pytest.mark.skipif(not fuse.available(), reason="this torch build has no oneDNN fused convolution")


def _fused(model):
    return [m for m in model.modules() if isinstance(m, fuse.FusedConv2d)]


def _relu6s(model):
    return sum(type(m) is torch.nn.ReLU6 for m in model.modules())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_real_backbone_fused_gives_the_same_bits(backbone, precision):
    """Lite0 as the engine prepares it (folded, fp32 stem, bf16 weights), with and without the
    fusion: ReLU6 clips the same before and after the rounding, so the embeddings are equal."""
    before = _relu6s(backbone.model)
    plain = _prepare_model(backbone, "cpu", True, precision, fold_bn=True, fp32_stem=None)
    fused = _prepare_model(backbone, "cpu", True, precision, fold_bn=True, fp32_stem=None, fuse_act=True)
    n = len(_fused(fused))
    # fp32 folds every BatchNorm, so every ReLU6 follows a convolution; bf16 keeps the depthwise ones' BatchNorm
    assert n == (before if precision == "fp32" else 18) and _relu6s(fused) == before - n
    assert not _fused(plain) and _relu6s(backbone.model) == before  # the backbone itself is untouched
    x = torch.randint(0, 256, (3, *backbone.data_config.input_size), generator=torch.Generator().manual_seed(3))
    x = ((x / 255.0 - 0.45) / 0.25).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        want, got = plain(x), fused(x)
    assert torch.equal(want, got)


class _Residual(torch.nn.Module):
    """conv -> += shortcut -> ReLU (ResNet's last activation): the ReLU's input is the
    convolution's output tensor, changed in place, so the pair must not be fused."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.act1 = torch.nn.ReLU(inplace=True)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.act2 = torch.nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.act1(self.conv1(x))
        y = self.conv2(y)
        y += x
        return self.act2(y)


class _SharedAct(torch.nn.Module):
    """One activation module applied after two convolutions: fusing it into either would drop it
    from the other."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.act = torch.nn.Conv2d(4, 4, 1), torch.nn.Conv2d(4, 4, 1), torch.nn.ReLU6()

    def forward(self, x):
        return self.act(self.b(self.act(self.a(x))))


def test_pairs_are_found_by_what_flows_not_by_structure():
    assert fuse.fusable_pairs(_Residual().eval(), (4, 8, 8)) == [("conv1", "act1")]
    assert fuse.fusable_pairs(_SharedAct().eval(), (4, 8, 8)) == []
    model = _Residual().eval()
    fused, n = fuse.fuse_activations(model, (4, 8, 8))
    assert n == 1 and isinstance(fused.act1, torch.nn.Identity) and isinstance(fused.conv1, fuse.FusedConv2d)
    assert isinstance(model.act1, torch.nn.ReLU) and type(model.conv1) is torch.nn.Conv2d  # the original untouched
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(fused(x), model(x))


class _OwnSizeAfterAConv(torch.nn.Module):
    """Runs its convolution and activation, then refuses all but 80 x 80 inputs: the trace's
    first try, at 64 x 64, must not count toward its second, at the model's own size."""

    def __init__(self):
        super().__init__()
        self.conv, self.act = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()

    def forward(self, x):
        y = self.act(self.conv(x))
        if x.shape[-1] != 80:
            raise ValueError("80 x 80 only")
        return y


def test_the_trace_starts_afresh_at_the_models_own_size():
    model = _OwnSizeAfterAConv().eval()
    assert fuse.fusable_pairs(model, (3, 80, 80)) == [("conv", "act")]
    fused, n = fuse.fuse_activations(model, (3, 80, 80))
    assert n == 1 and isinstance(fused.act, torch.nn.Identity)


def test_a_wrong_pair_is_caught_by_the_check_and_the_model_runs_apart(monkeypatch, caplog):
    model = _Residual().eval()
    traced = fuse._traced_pairs
    monkeypatch.setattr(fuse, "_traced_pairs", lambda m, size: ([("conv1", "act1"), ("conv2", "act2")],
                                                                traced(m, size)[1]))
    with caplog.at_level(logging.WARNING, logger="embedx"):
        got, n = fuse.fuse_activations(model, (4, 8, 8))
    assert got is model and n == 0
    assert "changed the model's output" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="embedx"):  # in place: the pairs are put back
        got, n = fuse.fuse_activations(model, (4, 8, 8), inplace=True)
    assert got is model and n == 0 and "changed the model's output" in caplog.text
    assert [type(m) for m in (model.conv1, model.act1, model.conv2, model.act2)] == [
        torch.nn.Conv2d, torch.nn.ReLU, torch.nn.Conv2d, torch.nn.ReLU]
    assert not any("attr" in vars(m) for m in (model.conv1, model.conv2))


def test_in_place_fusing_changes_the_model_itself_with_the_same_output():
    model = _Residual().eval()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model(x)
    got, n = fuse.fuse_activations(model, (4, 8, 8), inplace=True)
    assert got is model and n == 1 and isinstance(model.conv1, fuse.FusedConv2d)
    with torch.inference_mode():
        assert torch.equal(model(x), want)


def test_smooth_activations_and_timm_same_padding():
    from timm.layers import Conv2dSame

    assert fuse.post_op(torch.nn.SiLU()) is None and fuse.post_op(torch.nn.GELU()) is None
    assert fuse.post_op(torch.nn.Hardtanh(-1.0, 2.0)) == ("hardtanh", [-1.0, 2.0], "")
    model = torch.nn.Sequential(Conv2dSame(3, 8, 3, stride=2), torch.nn.ReLU6(), torch.nn.Conv2d(8, 8, 1),
                                torch.nn.SiLU()).eval()
    fused, n = fuse.fuse_activations(model, (3, 15, 15))  # odd size: TF "SAME" pads unevenly
    assert n == 1 and fused[0].same and isinstance(fused[1], torch.nn.Identity) and type(fused[3]) is torch.nn.SiLU
    x = torch.randn(2, 3, 15, 15, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        np.testing.assert_array_equal(fused(x).numpy(), model(x).numpy())


def test_extract_fuses_by_default_and_keeps_the_embeddings(tiny_dir, tmp_path, backbone, caplog):
    with caplog.at_level(logging.INFO, logger="embedx"):
        extract(tiny_dir, tmp_path / "fused", ExtractConfig(precision="bf16", progress=False), backbone=backbone)
    assert "activations into their convolutions (bf16)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="embedx"):
        extract(tiny_dir, tmp_path / "apart", ExtractConfig(precision="bf16", fuse_act=False, progress=False),
                backbone=backbone)
    assert "activations into their convolutions" not in caplog.text
    a, b = shards.read_features(tmp_path / "fused"), shards.read_features(tmp_path / "apart")
    assert a.paths == b.paths and len(a.paths) > 0
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
