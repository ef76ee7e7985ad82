"""Fold inference-mode BatchNorm into the convolution before it.

A frozen backbone's BatchNorm is an affine map per channel (running statistics, eval mode), so
`bn(conv(x))` equals a convolution with scaled weights and a bias: the BatchNorm's pass over
the activations disappears. On 2 CPU cores that pass is a large share of a small CNN's time
(EfficientNet-Lite0, model only, batch 16: fp32 +25 %, bf16 +13 % folding the pointwise
convolutions only; `python benchmarks/bench_extract.py --fold`).

The pairs are found by module structure (a Conv2d registered right before a BatchNorm2d in
the same parent, as timm's CNNs build their blocks), which does not prove that one feeds the
other, so the folded copy is checked against the original on a random batch and dropped, with
a warning, when they disagree. The original model is never changed (fine-tuning and other
users of the backbone keep their BatchNorm).

bf16: folding a depthwise convolution's BatchNorm moves bf16 rounding to where it costs
accuracy (Lite0 on real photos, cosine to fp32 min 0.9889 / mean 0.9982, vs 0.9957 / 0.9989
unfolded), pointwise ones do not (0.9956 / 0.9988): in bf16 only groups == 1 convolutions
are folded, and depthwise ones only in the layers kept in fp32 (`embedx.mixed`).
"""

from __future__ import annotations

import copy
import logging

log = logging.getLogger("embedx")


def _batchnorm_kinds():
    import torch

    kinds = [torch.nn.BatchNorm2d]
    try:
        from timm.layers import BatchNormAct2d  # BatchNorm, then its `drop`, then its `act`

        kinds.append(BatchNormAct2d)
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    return tuple(kinds)


def foldable_pairs(model, depthwise: bool | tuple[str, ...] = True) -> list[tuple]:
    """(parent, conv name, batchnorm name) for each Conv2d registered right before a BatchNorm
    (exactly `nn.BatchNorm2d` or timm's `BatchNormAct2d`, whose behaviour is known) with running
    statistics in eval mode (in training mode they are not constants). Grouped (depthwise)
    convolutions: all with `depthwise=True`, none with False, or only those inside the modules
    a tuple names (e.g. the layers `embedx.mixed` keeps in fp32)."""
    import torch

    kinds = _batchnorm_kinds()
    pairs = []
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if not isinstance(conv, torch.nn.Conv2d) or type(bn) not in kinds:
                continue
            if bn.training or bn.running_mean is None or bn.running_var is None or bn.num_features != conv.out_channels:
                continue
            name = f"{parent_name}.{conv_name}" if parent_name else conv_name
            if conv.groups != 1 and not (depthwise is True or _inside(name, depthwise or ())):
                continue
            pairs.append((parent, conv_name, bn_name))
    return pairs


def _inside(name: str, modules: tuple[str, ...]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def _fold_pair(parent, conv_name: str, bn_name: str) -> None:
    import torch

    conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var.float() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.float()
        shift = -bn.running_mean.float() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.float()
        if conv.bias is not None:
            shift = shift + conv.bias.float() * scale
        weight = conv.weight.float() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
        conv.weight = torch.nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
        conv.bias = torch.nn.Parameter(shift.to(conv.weight.dtype), requires_grad=False)
    after = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
    setattr(parent, bn_name, torch.nn.Sequential(*after) if after else torch.nn.Identity())


def forward_random_image(model, input_size: tuple[int, int, int], autocast_dtype=None, *, inference: bool = True):
    """(x, model(x)) for one random image x on the model's device, at 64 x 64 pixels where the
    model takes that (checks at 224 cost ten times more, and what they check does not depend on
    the size), else at `input_size`; under autocast to `autocast_dtype` when given; in
    inference mode, or with `inference=False` under no_grad (where tensors' version counters
    count). Raises what the model raises at `input_size`."""
    import torch

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    channels, height, width = input_size
    sizes = list(dict.fromkeys([(channels, min(height, 64), min(width, 64)), (channels, height, width)]))
    for size in sizes:
        x = torch.randn((1, *size), generator=torch.Generator().manual_seed(0)).to(device)
        try:
            with (torch.inference_mode() if inference else torch.no_grad()), \
                    torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                return x, model(x)
        except Exception:  # noqa: BLE001 - a model that takes only its own size
            if size == sizes[-1]:
                raise


def fold_batchnorm(model, input_size: tuple[int, int, int], *, depthwise: bool | tuple[str, ...] = True,
                   tolerance: float = 1e-3) -> tuple[object, int]:
    """A copy of `model` with its (eval-mode) Conv2d -> BatchNorm pairs folded, and how many
    (`depthwise`: which grouped convolutions, see `foldable_pairs`);
    `model` itself when there is nothing to fold or the copy's output differs from the
    original's (max abs difference > tolerance x the output's largest magnitude, fp32, one
    random image on the model's device, `same_output`): then a warning says so."""
    if not foldable_pairs(model, depthwise):
        return model, 0
    folded = copy.deepcopy(model)
    pairs = foldable_pairs(folded, depthwise)
    for pair in pairs:
        _fold_pair(*pair)
    if not same_output(model, folded, input_size, tolerance, "BatchNorm folding", "running the model unfolded",
                       "running it unfolded"):
        return model, 0
    return folded, len(pairs)


def same_output(model, changed, input_size: tuple[int, int, int], tolerance: float, what: str,
                if_unchecked: str, if_changed: str, reference=None) -> bool:
    """Whether `changed` (a rewritten copy of `model`, or `model` rewritten in place) gives
    `model`'s output on one random image (`forward_random_image`, fp32): max abs difference <=
    tolerance x the output's largest magnitude. `reference`: that image and `model`'s output on
    it, already computed (needed when `changed` is `model` itself). When not, or when it cannot
    be run, a warning says that `what` did so and what happens instead (`if_unchecked`,
    `if_changed`)."""
    import torch

    try:
        x, want = reference if reference is not None else forward_random_image(model, input_size)
        with torch.inference_mode():
            got = changed(x)
    except Exception as e:  # noqa: BLE001 - a model that takes neither size, or a rewrite that fails
        log.warning("%s could not be checked (%s: %s): %s", what, type(e).__name__, str(e)[:200], if_unchecked)
        return False
    want, got = want.float(), got.float()
    err = (want - got).abs().max().item()
    limit = tolerance * max(want.abs().max().item(), 1e-6)
    if not err <= limit:
        log.warning("%s changed the model's output (max difference %.3g > %.3g): %s", what, err, limit, if_changed)
        return False
    return True


__all__ = ["fold_batchnorm", "foldable_pairs", "forward_random_image", "same_output"]
