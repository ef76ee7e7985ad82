"""GPU checks (skipped without CUDA): bf16 on the GPU against fp32 on the CPU, and on-GPU
JPEG decode against PIL, on real photos with the real default weights; heads on the GPU
against the same heads on the CPU."""

import numpy as np
import pytest

import embedx
from embedx.extractor import ExtractConfig, extract

from .conftest import row_cosines

pytestmark = pytest.mark.gpu


def test_cuda_all_bf16_close_to_cpu_fp32(photo_dir, tmp_path, backbone):
    """--no-fp32-stem: every layer in bf16 (min 0.99876 on an H200, session 15)."""
    g = extract(photo_dir, tmp_path / "g", ExtractConfig(device="cuda", fp32_stem=False, progress=False, num_workers=2),
                backbone=backbone)
    extract(photo_dir, tmp_path / "c", ExtractConfig(device="cpu", precision="fp32", progress=False, num_workers=0),
            backbone=backbone)
    assert g.precision == "bf16" and g.device == "cuda"
    fg, fc = embedx.read_features(tmp_path / "g"), embedx.read_features(tmp_path / "c")
    assert fg.metadata["precision"] == "bf16" and fg.paths == fc.paths and fg.metadata["fp32_modules"] == []
    cos = row_cosines(fg.embeddings, fc.embeddings)
    print(f"bf16 (cuda) vs fp32 (cpu) cosine: min {cos.min():.5f} mean {cos.mean():.5f}")
    assert cos.min() > 0.99


def test_cuda_bf16_default_with_the_fp32_stem_within_0_999_of_cpu_fp32(photo_dir, tmp_path, backbone):
    """The default on a GPU (since session 15) keeps the half-resolution layers in fp32: on the CPU
    it brought bf16 from min cosine 0.993 to 0.999 of fp32 (test_mixed); on an H200 from 0.99876
    to 0.99971 (session 15, asked for with --fp32-stem then). Printed for the README; held to
    0.999. A copy of the backbone still on the CPU, so that the wrapping is checked there, as in
    a user's run."""
    import copy
    import dataclasses

    fresh = dataclasses.replace(backbone, model=copy.deepcopy(backbone.model).cpu())
    s = extract(photo_dir, tmp_path / "s", ExtractConfig(device="cuda", progress=False, num_workers=2), backbone=fresh)
    extract(photo_dir, tmp_path / "c", ExtractConfig(device="cpu", precision="fp32", progress=False, num_workers=0),
            backbone=fresh)
    fs, fc = embedx.read_features(tmp_path / "s"), embedx.read_features(tmp_path / "c")
    assert s.precision == "bf16" and fs.metadata["fp32_modules"] == ["conv_stem", "bn1", "blocks.0"]
    cos = row_cosines(fs.embeddings, fc.embeddings)
    print(f"bf16 + fp32 stem (cuda) vs fp32 (cpu) cosine: min {cos.min():.5f} mean {cos.mean():.5f}")
    assert cos.min() > 0.999


def test_collecting_a_batch_does_not_wait_for_the_next_one():
    """The engine launches batch i+1 before collecting batch i: collecting must wait for batch i
    only, so the GPU keeps running i+1 while the host writes i's rows."""
    import torch

    from embedx.extractor import _HostCopy

    stream = torch.cuda.current_stream()
    feats = torch.randn(256, 1280, device="cuda")
    pending = _HostCopy(feats * 2)
    torch.cuda._sleep(2_000_000_000)  # the "next batch": ~1 s of GPU work queued behind the copy
    got = pending.wait()
    assert not stream.query(), "collecting the batch waited for the work queued after it"
    np.testing.assert_array_equal(got, (feats * 2).cpu().numpy())  # (this one waits for all)
    assert stream.query()


@pytest.mark.parametrize("decoder", ["torchcodec", "torchvision", "nvimgcodec"])
def test_cuda_device_decode_close_to_pil(photo_dir, tmp_path, backbone, decoder):
    from embedx._tensor_decode import _load_problem

    if _load_problem(decoder):
        pytest.skip(f"{decoder}: {_load_problem(decoder)}")
    a = extract(photo_dir, tmp_path / "a", ExtractConfig(device="cuda", decode="device", device_decoder=decoder,
                                                        precision="fp32", progress=False, num_workers=2),
                backbone=backbone)
    b = extract(photo_dir, tmp_path / "b", ExtractConfig(device="cuda", fast_decode=False, precision="fp32",
                                                        progress=False, num_workers=2), backbone=backbone)
    assert a.num_embedded == b.num_embedded > 0
    cos = row_cosines(embedx.read_features(tmp_path / "a").embeddings, embedx.read_features(tmp_path / "b").embeddings)
    print(f"nvJPEG ({decoder}) + tensor resize vs PIL cosine: min {cos.min():.5f} mean {cos.mean():.5f}")
    assert cos.min() > 0.995


def test_lbfgs_heads_on_cuda_equal_cpu():
    from embedx.heads import build_l2_grid, train_lbfgs

    from .conftest import clustered

    x, y = clustered(4000, 64, 5, seed=0, spread=2.0)
    specs = build_l2_grid([1e-4, 1e-2])
    g = train_lbfgs(x[:3000], y[:3000], x[3000:], y[3000:], 5, specs, device="cuda", tol=1e-5)
    c = train_lbfgs(x[:3000], y[:3000], x[3000:], y[3000:], 5, specs, device="cpu", tol=1e-5)
    np.testing.assert_allclose(g.val_accuracy, c.val_accuracy, atol=2e-3)
    np.testing.assert_allclose(g.best_head.fc.weight.detach().numpy(), c.best_head.fc.weight.detach().numpy(), atol=5e-3)
