import time

import numpy as np
import pytest
import torch

from embedx import weights as W
from embedx.backbone import load_backbone
from embedx.errors import WeightsError

from .conftest import real_photo


def _imagenet_top5(model_name, photo):
    """Classify a real photo with the bundled weights, classifier included."""
    import timm
    from PIL import Image

    model = timm.create_model(model_name, num_classes=1000).eval()
    sd = W.load_state_dict(W.bundled_file(model_name))
    model.load_state_dict(W.convert(sd, W.detect_layout(sd), model))
    bb = load_backbone(model_name)
    x = torch.from_numpy(np.array(bb.pil_transform()(Image.fromarray(photo)))).permute(2, 0, 1)[None].float() / 255
    mean = torch.tensor(bb.data_config.mean).view(1, 3, 1, 1)
    std = torch.tensor(bb.data_config.std).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model((x - mean) / std)
    return logits.topk(5).indices[0].tolist()


@pytest.mark.parametrize("model_name", ["tf_efficientnet_lite0", "mobilenetv2_100"])
def test_bundled_weights_are_real_imagenet_weights(model_name):
    # ImageNet classes 281-285 are domestic cats; 967 espresso / 504 coffee mug
    assert set(_imagenet_top5(model_name, real_photo("chelsea"))) & {281, 282, 283, 284, 285}
    assert set(_imagenet_top5(model_name, real_photo("coffee"))) & {967, 504, 968}


def test_key_map_is_checked_not_positional():
    import timm

    lite0 = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    mbv2_sd = W.load_state_dict(W.bundled_file("mobilenetv2_100"))
    with pytest.raises(WeightsError):
        W.convert(mbv2_sd, "torchvision_mobilenetv2", lite0)
    lite_sd = W.load_state_dict(W.bundled_file("tf_efficientnet_lite0"))
    broken = dict(lite_sd)
    broken.pop("_blocks.3._bn1.running_var")
    with pytest.raises(WeightsError, match="lacks"):
        W.convert(broken, "lukemelas_effnet_lite", lite0)
    broken = dict(lite_sd, **{"_extra.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match="no place"):
        W.convert(broken, "lukemelas_effnet_lite", lite0)


def test_local_file_pth_and_safetensors_match(tmp_path, backbone):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in backbone.model.state_dict().items()}
    torch.save(sd, tmp_path / "w.pth")
    save_file(sd, str(tmp_path / "w.safetensors"))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = backbone.model(x)
        for name in ("w.pth", "w.safetensors"):
            b = load_backbone("tf_efficientnet_lite0", str(tmp_path / name))
            assert b.weights_source.startswith("file:") and len(b.weights_sha256) == 64
            torch.testing.assert_close(b.model(x), ref)
    # a foreign-layout file given by path is detected and converted
    b = load_backbone("mobilenetv2_100", str(W.bundled_file("mobilenetv2_100")))
    assert b.weights_source.startswith("file:")


def test_wrong_checkpoint_for_model_fails(tmp_path):
    with pytest.raises(WeightsError):
        load_backbone("resnet18", str(W.bundled_file("tf_efficientnet_lite0")))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="Cannot read"):
        load_backbone("resnet18", str(tmp_path / "junk.pth"))
    with pytest.raises(WeightsError, match="neither an existing file"):
        load_backbone("resnet18", str(tmp_path / "missing.pth"))


def test_hub_offline_fails_fast_with_options(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(WeightsError) as e:
        load_backbone("resnet18")  # no bundled weights, not in the (empty) hub cache
    assert time.perf_counter() - t0 < 20
    msg = str(e.value)
    assert "--weights PATH" in msg and "HF_HUB_OFFLINE" in msg and "random" in msg


@pytest.mark.parametrize("name, suggested", [("resnet18x", "resnet18"), ("efficientnet_lite", "efficientnet_lite0"),
                                             ("tf_efficientnet_lit0", "tf_efficientnet_lite0")])
def test_unknown_model_names_suggest_real_ones(name, suggested):
    from embedx.backbone import create_model
    from embedx.errors import EmbedxError

    with pytest.raises(EmbedxError, match=f"Unknown timm model '{name}'") as e:
        create_model(name)
    similar = str(e.value).split("Similar names: ")[1].split(". ")[0].split(", ")
    assert suggested in similar, str(e.value)


def test_random_only_when_asked(random_backbone):
    assert random_backbone.weights_source == "random" and random_backbone.weights_sha256 is None
    with pytest.raises(WeightsError, match="No bundled weights"):
        load_backbone("test_efficientnet", weights="bundled")


def test_random_weights_are_the_same_network_in_every_process(tmp_path):
    """weights="random" is seeded: another process builds the very same network (benchmarks and
    scale-out compare random-weight runs across processes), and the caller's random state is
    left as it was."""
    import subprocess
    import sys

    torch.manual_seed(123)
    expected_next = torch.rand(3, generator=torch.Generator().manual_seed(123))
    b = load_backbone("test_efficientnet", weights="random")
    assert torch.equal(torch.rand(3), expected_next)  # the global generator was not touched
    again = load_backbone("test_efficientnet", weights="random")
    state = b.model.state_dict()
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in state.items())
    code = ("import torch; from embedx.backbone import load_backbone; "
            f"torch.save(load_backbone('test_efficientnet', 'random').model.state_dict(), {str(tmp_path / 'sd.pt')!r})")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    other = torch.load(tmp_path / "sd.pt")
    assert other.keys() == state.keys() and all(torch.equal(v, other[k]) for k, v in state.items())
    assert any(v.is_floating_point() and v.std() > 0 for v in state.values())  # initialised, not zeros


def test_preprocessing_comes_from_the_model():
    b = load_backbone("test_efficientnet", weights="random")
    # timm's test model is 160 px: no hard-coded 224
    assert b.data_config.input_size[-1] != 224
    steps = [type(s).__name__ for s in b.pil_transform().transforms]
    assert steps[0] == "Resize" and "CenterCrop" in steps


def test_hub_weights_load_from_the_local_cache_offline(tmp_path, monkeypatch):
    """A populated Hugging Face cache (as a past online run leaves it) serves timm's hub
    weights with HF_HUB_OFFLINE=1 and no network wait."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = timm.create_model("test_efficientnet", num_classes=1000)  # stands in for the hub's weights
    repo = tmp_path / "hub" / "models--timm--test_efficientnet.r160_in1k"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(snap / "model.safetensors"))
    import huggingface_hub.constants as hf_constants

    # huggingface_hub reads its settings from the environment at import: set both
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    t0 = time.perf_counter()
    b = load_backbone("test_efficientnet", "hub")
    assert time.perf_counter() - t0 < 20
    assert b.weights_source == "hub:timm/test_efficientnet.r160_in1k" and len(b.weights_sha256) == 64
    for name, value in b.model.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[name])

