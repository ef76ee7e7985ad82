"""Fuse a convolution's activation into it on the CPU: oneDNN's eltwise post-op.

A CNN's activation after a convolution (ReLU, ReLU6, ...) is a separate pass over the
convolution's output: read it back from memory, write it again. On 2 CPU cores in bf16 that pass
cost more than the 1x1 convolution before it (EfficientNet-Lite0's first expansion, batch 4, 96 x
112 x 112: convolution 424 us, + ReLU6 1259 us, fused 473 us). oneDNN applies the activation to
the convolution's accumulators before it stores them (`torch.ops.mkldnn._convolution_pointwise`,
the op torch.compile's CPU backend emits for the same fusion), so the extra pass disappears
without a compile. Only the clipping activations (ReLU, ReLU6, Hardtanh) are fused: clipping
before or after the rounding to bf16 gives the same bits, so the output does not change.

Pairs are found by running the model once on a random image with hooks, not by module structure:
a convolution is fused with the activation module whose input is the very tensor the convolution
returned, unchanged in between (its version counter), when each of the two runs once per forward
pass. The activation module is then replaced by Identity. The fused copy is checked against the
original (fp32, one random image) and dropped, with a warning, when they disagree. The original
model is never changed. Used by the engine on the CPU in eager mode (torch.compile fuses by
itself); `ExtractConfig(fuse_act=False)` / `--no-fuse-act` switch it off.
"""

from __future__ import annotations

import copy
import logging

import torch

log = logging.getLogger("embedx")


def available() -> bool:
    """Whether this torch build has oneDNN's fused convolution op."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def post_op(act: torch.nn.Module) -> tuple[str, list[float], str] | None:
    """(oneDNN attr, scalars, algorithm) of the activation module `act`, or None for one not
    fused (exact classes only: a subclass may compute something else). Only the clipping
    activations, whose fused output is the same bit for bit: fusing SiLU was measured no faster
    (efficientnet_b0, model only, bf16 0.98x, fp32 1.04x, one run; `benchmarks/README.md`)."""
    nn = torch.nn
    kind = type(act)
    if kind is nn.ReLU:
        return "relu", [], ""
    if kind is nn.ReLU6:
        return "hardtanh", [0.0, 6.0], ""
    if kind is nn.Hardtanh:
        return "hardtanh", [float(act.min_val), float(act.max_val)], ""
    return None


def _conv_kinds() -> tuple[type, ...]:
    kinds: tuple[type, ...] = (torch.nn.Conv2d,)
    try:
        from timm.layers import Conv2dSame  # TF "SAME" padding: pads, then convolves without padding

        kinds += (Conv2dSame,)
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    return kinds


class FusedConv2d(torch.nn.Conv2d):
    """A Conv2d (or timm's Conv2dSame) and the activation after it as one oneDNN convolution
    with an eltwise post-op. Under CPU autocast it computes in autocast's dtype, as the
    convolution it replaces did; elsewhere in its input's dtype."""

    attr: str = "none"
    scalars: list[float] = []
    algorithm: str = ""
    same: bool = False

    def forward(self, x):
        dtype = _cpu_autocast_dtype()
        if dtype is not None:
            x = x.to(dtype)
        if self.same:
            from timm.layers.padding import pad_same

            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        bias = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        padding = [0, 0] if self.same else list(self.padding)
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, list(self.stride),
                                                       list(self.dilation), self.groups, self.attr,
                                                       self.scalars, self.algorithm)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", post_op={self.attr}{self.scalars or ''}{', same' if self.same else ''}"


def _cpu_autocast_dtype():
    """CPU autocast's dtype where it is on, else None (torch < 2.4 has only the older calls)."""
    try:
        return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    except TypeError:  # pragma: no cover - torch < 2.4
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


def fusable_pairs(model: torch.nn.Module, input_size: tuple[int, int, int]) -> list[tuple[str, str]]:
    """(convolution name, activation name) of each convolution whose output tensor goes,
    unchanged (its version counter), into an activation oneDNN can apply (`post_op`), found by
    one traced forward pass on a random image (`embedx.fold.forward_random_image`, fp32, on the
    model's device); each of the two must run exactly once per pass. Whether the output also
    goes elsewhere is not traced: `fuse_activations` checks the fused model's output. [] when
    the model takes neither image size."""
    return _traced_pairs(model, input_size)[0]


def _traced_pairs(model: torch.nn.Module, input_size: tuple[int, int, int]):
    """`fusable_pairs`, and the traced pass's (image, output) (None when no pass ran): the
    reference the fused model's output is checked against."""
    from .fold import forward_random_image

    kinds = _conv_kinds()
    names = {id(m): n for n, m in model.named_modules()}
    calls: dict[str, int] = {}
    produced: dict[int, tuple[str, torch.Tensor, int]] = {}  # id(output) -> (conv, output, its version)
    found: list[tuple[str, str]] = []
    hooks = []

    def conv_done(module, args, out):
        name = names[id(module)]
        calls[name] = calls.get(name, 0) + 1
        if torch.is_tensor(out):
            produced[id(out)] = (name, out, out._version)

    def act_starts(module, args):
        name = names[id(module)]
        calls[name] = calls.get(name, 0) + 1
        x = args[0] if args else None
        entry = produced.get(id(x)) if torch.is_tensor(x) else None
        if entry is not None and entry[1] is x and x._version == entry[2]:
            found.append((entry[0], name))

    for module in model.modules():
        if type(module) in kinds and module.padding_mode == "zeros" and not isinstance(module.padding, str):
            hooks.append(module.register_forward_hook(conv_done))
        elif post_op(module) is not None:
            hooks.append(module.register_forward_pre_hook(act_starts))
    if not hooks:
        return [], None
    # each try at another image size starts the trace afresh (prepended: before the root's own
    # hooks, where the root is itself a convolution or an activation)
    def start_afresh(module, args):  # returns None: a pre-hook's result would replace the input
        calls.clear()
        produced.clear()
        found.clear()

    hooks.append(model.register_forward_pre_hook(start_afresh, prepend=True))
    try:
        reference = forward_random_image(model, input_size, inference=False)  # no_grad: version counters count
    except Exception:  # noqa: BLE001 - a model that takes neither size
        return [], None
    finally:
        for h in hooks:
            h.remove()
    return [(c, a) for c, a in dict.fromkeys(found) if calls.get(c) == 1 and calls.get(a) == 1], reference


def fuse_activations(model: torch.nn.Module, input_size: tuple[int, int, int], *,
                     tolerance: float = 1e-4, inplace: bool = False) -> tuple[torch.nn.Module, int]:
    """`model` (with `inplace`) or a copy of it with each convolution -> activation pair
    (`fusable_pairs`) run as one `FusedConv2d`, and how many; `model` itself, unchanged, with 0,
    when oneDNN's op is missing, the model is not on the CPU, nothing is fusable, or the fused
    output differs from the traced pass's (max abs difference > tolerance x the output's largest
    magnitude, fp32, one random image): then a warning says so (and in place, the pairs are
    put back as they were)."""
    param = next(model.parameters(), None)
    if not available() or (param is not None and param.device.type != "cpu"):
        return model, 0
    pairs, reference = _traced_pairs(model, input_size)
    if not pairs:
        return model, 0
    fused = model if inplace else copy.deepcopy(model)
    undo = []
    for conv_name, act_name in pairs:
        conv, act = fused.get_submodule(conv_name), fused.get_submodule(act_name)
        attr, scalars, algorithm = post_op(act)
        parent_name, _, child = act_name.rpartition(".")
        parent = fused.get_submodule(parent_name) if parent_name else fused
        undo.append((conv, conv.__class__, parent, child, act))
        same = type(conv) is not torch.nn.Conv2d  # Conv2dSame
        conv.__class__ = FusedConv2d
        conv.attr, conv.scalars, conv.algorithm, conv.same = attr, scalars, algorithm, same
        setattr(parent, child, torch.nn.Identity())
    from .fold import same_output

    if not same_output(model, fused, input_size, tolerance, "fusing activations into convolutions",
                       "running them apart", "running them apart", reference=reference):
        if inplace:
            for conv, cls, parent, child, act in reversed(undo):
                conv.__class__ = cls
                for name in ("attr", "scalars", "algorithm", "same"):
                    conv.__dict__.pop(name, None)
                setattr(parent, child, act)
        return model, 0
    return fused, len(pairs)


__all__ = ["FusedConv2d", "available", "fusable_pairs", "fuse_activations", "post_op"]
