"""Precision placement for bf16: the half-resolution layers kept in fp32 (`keep_fp32`; on CPUs by
default, on GPUs when asked for: `extractor.fp32_modules`), and on CPUs the other layers' weights
stored in bf16 once (`store_bf16_weights`).

In bf16 the first layers cost accuracy out of proportion to their share of the work: the input
pixels are rounded to 8 significant bits, and the stem and the first block work on few
channels at half the input resolution (Lite0's first block is a 9-tap depthwise convolution).
Run in fp32, with everything after them in bf16, they bring bf16 embeddings of real photos to
within cosine 0.999 of fp32's, for a few per cent of the speed (128 photos, 2 CPU threads,
`python benchmarks/bench_extract.py --fp32-stem`; figures in benchmarks/README.md):
EfficientNet-Lite0 min 0.9927 -> 0.9991, mean 0.9988 -> 0.9996, at 0.97x the model's speed;
MobileNetV2 min 0.9906 -> 0.9993, mean 0.9978 -> 0.9997, at 0.91x.

Which layers: timm's `feature_info` names the module that ends each feature stage and its
reduction; the last stage at reduction 2 ends the half-resolution layers, and in timm's CNNs
the modules registered before it along its path (the stem) are the ones that run before it.
Models with no stage at reduction 2 (ViTs, ConvNeXt: their stems go straight to 1/16 or 1/4)
keep nothing in fp32. Wrapping a module changes only its precision, never what it computes, and
the wrapped copy is checked in fp32 against the model it came from.
"""

from __future__ import annotations

import copy

import torch

from .fold import forward_random_image


class Float32(torch.nn.Module):
    """`module` run in fp32 with autocast off, whatever the precision around it: floating tensor
    arguments are cast to fp32, and the output stays fp32 (autocast casts it for what follows)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        args = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        device_type = next((a.device.type for a in args if torch.is_tensor(a)), "cpu")
        with torch.autocast(device_type, enabled=False):
            return self.module(*args, **kwargs)


def half_resolution_modules(model: torch.nn.Module) -> list[str]:
    """Names of the modules that run at half the input resolution (and before it), in order:
    the modules registered before each step along the path of the last `feature_info` stage at
    reduction 2, then that stage itself (`["conv_stem", "bn1", "blocks.0"]` for timm's
    EfficientNets and MobileNets, `["conv1", "bn1", "act1"]` for its ResNets); [] for a model
    without such a stage, or without timm's `feature_info`."""
    info = getattr(model, "feature_info", None)
    entries = info if isinstance(info, (list, tuple)) else getattr(info, "info", None) or []
    stages = [e["module"] for e in entries if isinstance(e, dict) and e.get("reduction") == 2 and e.get("module")]
    if not stages:
        return []
    names, parent, prefix = [], model, ""
    for part in stages[-1].split("."):
        children = list(parent.named_children())
        if part not in dict(children):
            return []  # feature_info does not describe this model's structure
        for name, _ in children:
            if name == part:
                break
            names.append(prefix + name)
        parent, prefix = dict(children)[part], prefix + part + "."
    return names + [stages[-1]]


def keep_fp32(model: torch.nn.Module, names: list[str], input_size: tuple[int, int, int], *,
              inplace: bool = False) -> torch.nn.Module:
    """`model` (with `inplace`) or a copy of it with the modules `names` wrapped in `Float32`.
    It is checked in fp32 (where the wrappers change nothing) against the model before wrapping
    on one random image (`embedx.fold.forward_random_image`): any
    difference means wrapping changed what the model computes (e.g. its forward reads an
    attribute of a wrapped module), and raises ValueError saying how."""
    x, want = forward_random_image(model, input_size)
    kept = model if inplace else copy.deepcopy(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = kept.get_submodule(parent_name) if parent_name else kept
        setattr(parent, child, Float32(getattr(parent, child)))
    try:
        with torch.inference_mode():
            got = kept(x)
    except Exception as e:  # noqa: BLE001 - wrapping broke the forward pass
        raise ValueError(f"{type(e).__name__}: {str(e)[:200]}") from None
    if not torch.equal(want, got):
        raise ValueError(f"its fp32 output changed by up to {(want - got).abs().max().item():.3g}")
    return kept


def store_bf16_weights(model: torch.nn.Module, input_size: tuple[int, int, int]) -> tuple[torch.nn.Module, int]:
    """`model` with the weights and biases of its `nn.Conv2d` and `nn.Linear` layers (outside
    `Float32` wrappers) stored in bf16, changed in place, and how many layers; for a model run
    under bf16 autocast, which otherwise casts every one of them again on every forward pass
    (the cast is no longer needed: Lite0, batch 16, 2 threads, model-only 1.06x, `python
    benchmarks/bench_extract.py --bf16-weights`). Autocast's cast
    and this one round the same way, so the output must stay bit for bit the same: checked
    under autocast on one random image; where it does not (a layer that uses its weight outside
    the convolution, e.g. weight standardisation), `model` is returned as it was, with 0."""
    keep = {id(m) for wrapper in model.modules() if isinstance(wrapper, Float32) for m in wrapper.modules()}
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and id(m) not in keep
              and m.weight.dtype == torch.float32]
    if not layers:
        return model, 0
    x, want = forward_random_image(model, input_size, torch.bfloat16)
    before = [(m, m.weight, m.bias) for m in layers]
    for m in layers:
        for name in ("weight", "bias"):
            if getattr(m, name) is not None:
                setattr(m, name, torch.nn.Parameter(getattr(m, name).detach().to(torch.bfloat16), requires_grad=False))
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.bfloat16):
        got = model(x)
    if not torch.equal(want, got):
        for m, weight, bias in before:  # the fp32 parameters back
            m.weight, m.bias = weight, bias
        return model, 0
    return model, len(layers)


__all__ = ["Float32", "half_resolution_modules", "keep_fp32", "store_bf16_weights"]
