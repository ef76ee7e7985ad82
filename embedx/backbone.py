"""A frozen timm backbone with its own preprocessing and weight provenance.

`load_backbone` builds any timm model headless (`num_classes=0`), loads weights from the
source `weights.resolve` picked, and derives preprocessing from the model's own data
config (`resolve_model_data_config` + `create_transform`): never a hard-coded resize.

Preprocessing is split in two so that workers ship uint8 pixels (4x less to move than
float32) and normalisation runs on the device:

* `pil_transform`: timm's eval transform up to and excluding ToTensor (resize, crop);
* `normalize`: (x / 255 - mean) / std on a uint8 NCHW batch, on the model's device.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field

from . import weights as weights_mod
from .errors import EmbedxError, InputError, WeightsError
from .images import DEFAULT_MAX_PIXELS

log = logging.getLogger(__name__)

DEFAULT_MODEL = "tf_efficientnet_lite0"


@dataclass(frozen=True)
class DataConfig:
    """The preprocessing a checkpoint expects (from timm's data config)."""

    input_size: tuple[int, int, int]
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    crop_mode: str

    @property
    def resize_size(self) -> int:
        """Shortest side after the resize, before the centre crop (what timm computes)."""
        import math

        return math.floor(self.input_size[-1] / self.crop_pct)

    def to_dict(self) -> dict:
        return {
            "input_size": list(self.input_size),
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
        }


@dataclass
class Backbone:
    """A headless timm model, ready for inference, with everything needed to reproduce it."""

    model: "object"  # torch.nn.Module
    model_name: str
    weights_source: str
    weights_sha256: str | None
    data_config: DataConfig
    dim: int
    pooling: str
    provenance: dict = field(default_factory=dict)

    def pil_transform(self):
        """timm's eval transform minus ToTensor/Normalize: PIL image -> resized, cropped PIL image."""
        import torchvision.transforms as T
        from timm.data import create_transform

        t = create_transform(**self.timm_data_config(), is_training=False)
        steps = [s for s in t.transforms if not _is_tensor_step(s)]
        if len(steps) == len(t.transforms):
            raise EmbedxError(f"Unexpected timm eval transform for {self.model_name}: {t}")
        return T.Compose(steps)

    def draft_size(self, fast: bool = True) -> int | None:
        """Target of the JPEG DCT-domain downscaling (PIL `draft`) decoders use when `fast`:
        twice the resize size, so that an antialiased resize still follows. Drafting straight
        to the resize size skips that filtering and moved Lite0 embeddings of real photos to
        cosine 0.989 of timm's exact transform; at twice the size the minimum is 0.9995."""
        return 2 * self.data_config.resize_size if fast else None

    def worker_transform(self, fast: bool = True):
        """What decoder workers apply to a decoded image: `UInt8ResizeCrop` when `fast` and
        timm's eval transform is a plain Resize + CenterCrop (bilinear or bicubic); else, for a
        Resize + CenterCrop, `PILResizeCrop` (timm's transform, except that a banner's or a
        panorama's crop region alone is resized: timm's pixels without a gigabyte resize), and
        for any other transform `pil_transform()` itself."""
        from ._loader import UInt8ResizeCrop
        from ._resize import bounded, resize_crop_steps

        pil = self.pil_transform()
        found = resize_crop_steps(pil)
        if found is None or len(pil.transforms) != 2:
            return pil
        size, max_size, crop, interpolation = found
        mode = getattr(interpolation, "value", str(interpolation))
        if not fast or mode not in ("bilinear", "bicubic"):
            return bounded(pil)  # timm's transform, but a banner's crop region alone is resized
        return UInt8ResizeCrop(size, mode, max_size, crop)

    def decode_spec(self, fast: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS, decode: str = "pil",
                    device_share: float = 1.0, device_decoder: str = "torchvision"):
        """What decoders need to make this model's pixels: `worker_transform(fast)` with the
        matching `draft_size(fast)` (the two go together), the input size, and the limits."""
        from ._loader import DecodeSpec

        return DecodeSpec(self.worker_transform(fast), tuple(self.data_config.input_size), self.draft_size(fast),
                          max_pixels, decode, device_share, device_decoder)

    def with_preprocessing(self, img_size: int | None = None, crop_pct: float | None = None,
                           crop_mode: str | None = None, interpolation: str | None = None) -> "Backbone":
        """This backbone with its data config changed where an argument is given (timm's own
        overrides: `--img-size`, `--crop-pct`, `--crop-mode`, `--interpolation` of its scripts).
        The model is tried at a new input size first: models built for one size (ViT, Swin)
        refuse any other with an error that says so.

        Raises:
            InputError: a value out of range, or an input size the model does not take.
        """
        import dataclasses

        check_preprocessing(img_size, crop_pct, crop_mode, interpolation)
        d = self.data_config
        new = dataclasses.replace(
            d,
            input_size=(d.input_size[0], img_size, img_size) if img_size else d.input_size,
            crop_pct=float(crop_pct) if crop_pct is not None else d.crop_pct,
            crop_mode=crop_mode or d.crop_mode,
            interpolation=interpolation or d.interpolation,
        )
        if new == d:
            return self
        if new.input_size != d.input_size:
            import torch

            try:
                with torch.no_grad():
                    self.model(torch.zeros(1, *new.input_size))
            except Exception as e:  # noqa: BLE001 - timm raises AssertionError/RuntimeError alike
                raise InputError(
                    f"{self.model_name} does not take {img_size}x{img_size} inputs ({str(e).splitlines()[0][:200]}): "
                    f"it was built for {d.input_size[1]}x{d.input_size[2]}. Leave --img-size out, or choose a "
                    "model that takes other sizes (convolutional networks do)."
                ) from None
        return dataclasses.replace(self, data_config=new)

    def with_pool(self, pool: str | None) -> "Backbone":
        """This backbone with another global pooling (timm's `global_pool`: avg, max, avgmax,
        catavgmax — twice the dimension — on convolutional networks; token, avg, max, avgmax on
        ViTs), on a copy of the model. Poolings that would add parameters no weights trained
        (a ViT's attention pool, `map`) are refused, as is any the model does not know.

        Raises:
            InputError: an unknown pooling, or one that adds untrained parameters.
        """
        if not pool or pool == self.pooling:
            return self
        import copy
        import dataclasses

        import torch

        model = copy.deepcopy(self.model)  # the caller's model stays as it is
        before = sum(p.numel() for p in model.parameters())
        try:
            model.reset_classifier(0, global_pool=pool)
            with torch.no_grad():
                probe = model(torch.zeros(1, *self.data_config.input_size))
        except Exception as e:  # noqa: BLE001 - timm asserts, raises ValueError/NotImplementedError/KeyError
            raise InputError(f"{self.model_name} has no global pooling {pool!r} "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}). "
                             f"Its own is {self.pooling!r}; timm's others: avg, max, avgmax, catavgmax (ViTs: "
                             "token, avg, max, avgmax).") from None
        if sum(p.numel() for p in model.parameters()) != before:
            raise InputError(f"--pool {pool} adds parameters to {self.model_name} that its weights never trained "
                             "(they would be random): choose a pooling without parameters (avg, max, avgmax, …).")
        if probe.ndim != 2:
            raise InputError(f"--pool {pool!r}: {self.model_name} then returns features of shape "
                             f"{tuple(probe.shape)}, not (N, D).")
        model.eval().requires_grad_(False)
        return dataclasses.replace(self, model=model, pooling=pool, dim=int(probe.shape[1]))

    def as_recorded(self, provenance: dict | None) -> "Backbone":
        """This backbone as recorded with features or a fine-tuned head: its `data_config`
        (overrides such as --img-size and --crop-pct included) and its `pooling` (--pool)."""
        if not provenance:
            return self
        backbone = self.with_pool(provenance.get("pooling"))
        recorded = provenance.get("data_config") or {}
        now = backbone.data_config.to_dict()
        changed = {k: recorded[k] for k in ("input_size", "crop_pct", "crop_mode", "interpolation")
                   if k in recorded and recorded[k] != now[k]}
        if not changed:
            return backbone
        return backbone.with_preprocessing(int(changed["input_size"][-1]) if "input_size" in changed else None,
                                           changed.get("crop_pct"), changed.get("crop_mode"),
                                           changed.get("interpolation"))

    def timm_data_config(self) -> dict:
        d = self.data_config
        return {
            "input_size": d.input_size, "interpolation": d.interpolation, "mean": d.mean,
            "std": d.std, "crop_pct": d.crop_pct, "crop_mode": d.crop_mode,
        }


CROP_MODES = ("center", "squash", "border")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")


def check_preprocessing(img_size: int | None = None, crop_pct: float | None = None, crop_mode: str | None = None,
                        interpolation: str | None = None) -> None:
    """Refuse preprocessing overrides that timm's transform would not make sense of."""
    if img_size is not None and not 16 <= img_size <= 4096:
        raise InputError(f"--img-size must be between 16 and 4096 pixels, not {img_size}.")
    if crop_pct is not None and not 0.0 < crop_pct <= 1.0:
        raise InputError(f"--crop-pct must be in (0, 1] (1.0: no border cropped), not {crop_pct}.")
    if crop_mode is not None and crop_mode not in CROP_MODES:
        raise InputError(f"--crop-mode must be one of {', '.join(CROP_MODES)}, not {crop_mode!r}.")
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise InputError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}, not {interpolation!r}.")


def _is_tensor_step(step) -> bool:
    name = type(step).__name__
    return name in ("ToTensor", "MaybeToTensor", "Normalize", "ToNumpy", "MaybeToNumpy")


def create_model(model_name: str, *, num_classes: int = 0, pretrained_from_hub: bool = False):
    """timm.create_model with clear errors for unknown names and hub failures."""
    import timm

    if not timm.is_model(model_name) and not model_name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        import difflib

        # the nearest names by spelling (typos), then names that contain the one given
        base = model_name.split(".")[0]
        close = difflib.get_close_matches(base, timm.list_models(), n=8, cutoff=0.6)
        close += [m for m in timm.list_models(f"*{base}*") if m not in close]
        close = close[:8]
        raise EmbedxError(
            f"Unknown timm model {model_name!r}." + (f" Similar names: {', '.join(close)}." if close else "")
            + " See `timm.list_models()`."
        )
    try:
        return timm.create_model(model_name, pretrained=pretrained_from_hub, num_classes=num_classes)
    except Exception as e:
        if not pretrained_from_hub:
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        raise WeightsError(
            f"Could not get pretrained weights for {model_name!r} from the Hugging Face hub"
            + (" cache (HF_HUB_OFFLINE is set)" if offline else "")
            + f": {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n"
            "Options: (1) go online once so timm caches them, then run with HF_HUB_OFFLINE=1; "
            "(2) pass a local checkpoint with --weights PATH (.pth/.safetensors); "
            f"(3) use a model with bundled weights ({', '.join(sorted(weights_mod.BUNDLED))}); "
            "(4) --weights random, if you really want an untrained network."
        ) from None


#: the seed of weights="random": the same network in every process (for one torch and timm version)
RANDOM_INIT_SEED = 0


def load_backbone(model_name: str = DEFAULT_MODEL, weights: str | None = None) -> Backbone:
    """Build a frozen, headless timm backbone with its preprocessing.

    Args:
        model_name: any timm model name.
        weights: None/"auto" (bundled weights if a package ships them, else timm's hub
            weights), "bundled", "hub", "random" (timm's initialisation, seeded with
            `RANDOM_INIT_SEED`), or a checkpoint path.

    Raises:
        WeightsError: weights missing, unreachable, or not fitting the model.
    """
    import torch
    from timm.data import resolve_model_data_config

    spec = weights_mod.resolve(model_name, weights)
    if spec.source == "hub":
        model = create_model(model_name, pretrained_from_hub=True)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        hub_id = cfg.get("hf_hub_id") or cfg.get("url") or model_name
        source = f"hub:{hub_id}"
        sha = weights_mod.state_dict_digest(model.state_dict())
    else:
        if spec.file is None:  # random weights: seeded, so that every process builds the same network
            with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
                torch.manual_seed(RANDOM_INIT_SEED)
                model = create_model(model_name)
        else:
            model = create_model(model_name)
        source = spec.source
        sha = None
        if spec.file is not None:
            sd = weights_mod.load_state_dict(spec.file)
            weights_mod.load_into(model, sd, spec.layout)
            sha = weights_mod.sha256_file(spec.file)
            if spec.source == "file":
                source = f"file:{spec.file}"
        else:
            log.warning("Using RANDOMLY INITIALISED weights for %s (asked for with weights='random').", model_name)
    model.eval().requires_grad_(False)
    raw = resolve_model_data_config(model)
    raw.update(spec.data_config)
    data_config = DataConfig(
        input_size=tuple(raw["input_size"]),
        interpolation=str(raw.get("interpolation", "bicubic")),
        mean=tuple(float(x) for x in raw["mean"]),
        std=tuple(float(x) for x in raw["std"]),
        crop_pct=float(raw.get("crop_pct", 0.875)),
        crop_mode=str(raw.get("crop_mode", "center")),
    )
    dim = int(getattr(model, "num_features", 0))
    with torch.no_grad():
        probe = model(torch.zeros(1, *data_config.input_size))
    if probe.ndim != 2:
        raise EmbedxError(f"{model_name} returns features of shape {tuple(probe.shape)}, expected (N, D).")
    dim = int(probe.shape[1])
    pooling = str(getattr(model, "global_pool", "avg"))
    pooling = getattr(getattr(model, "global_pool", None), "pool_type", None) or pooling
    return Backbone(
        model=model, model_name=model_name, weights_source=source, weights_sha256=sha,
        data_config=data_config, dim=dim, pooling=str(pooling),
    )


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' if a GPU is present else 'cpu'; validates explicit choices."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EmbedxError("--device cuda was asked for but no CUDA GPU is visible. Use --device cpu or auto.")
    if device != "cpu" and not device.startswith("cuda"):
        raise EmbedxError(f"--device must be auto, cpu or cuda[:N], not {device!r}.")
    return device


def usable_cpus() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_precision(precision: str, device: str) -> str:
    """'auto' -> bf16 on CUDA and on CPUs with native bf16 support, else fp32."""
    import torch

    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise EmbedxError(f"--precision must be auto, fp32, bf16 or fp16, not {precision!r}.")
    if precision != "auto":
        if precision == "fp16" and device == "cpu":
            raise EmbedxError("--precision fp16 needs a GPU; on CPU use bf16 or fp32.")
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN has native bf16 kernels for this CPU (AVX-512 BF16 / AMX)."""
    import torch

    with contextlib.suppress(Exception):
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def autocast(device: str, precision: str):
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def assert_pretrained(backbone: Backbone) -> None:
    if backbone.weights_source == "random":
        raise WeightsError("This needs pretrained weights, but the backbone was initialised randomly.")


def weights_argument(weights_source: str) -> str:
    """The `weights` value that loads recorded weights again ("bundled:…" -> "bundled", "file:P" -> P, …)."""
    for prefix, argument in (("bundled:", "bundled"), ("hub:", "hub")):
        if weights_source.startswith(prefix):
            return argument
    if weights_source.startswith("file:"):
        return weights_source[len("file:"):]
    if weights_source == "random":
        return "random"
    raise WeightsError(f"Unknown weights source {weights_source!r} in the features' metadata.")


def random_state_of(backbone: Backbone) -> dict | None:
    """The weights to ship to other processes when they cannot load them themselves (random init)."""
    if backbone.weights_source != "random":
        return None
    return {k: v.detach().cpu() for k, v in backbone.model.state_dict().items()}


def load_matching(model_name: str, weights: str | None, expected_sha256: str | None,
                  random_state: dict | None = None) -> Backbone:
    """Load a backbone and check that its weights are the expected ones (by sha256).

    `random_state`: for weights="random", the state dict of the network to reproduce (the init is
    seeded, but another node's torch or timm may initialise differently: the weights are shipped).
    """
    backbone = load_backbone(model_name, weights)
    if random_state is not None:
        backbone.model.load_state_dict(random_state)
    if expected_sha256 and backbone.weights_sha256 != expected_sha256:
        raise WeightsError(
            f"The weights found for {model_name} ({backbone.weights_source}, sha256 {str(backbone.weights_sha256)[:12]}…) "
            f"are not the expected ones (sha256 {expected_sha256[:12]}…). Pass the original file with --weights, "
            "and on a cluster make it readable at the same path on every node."
        )
    return backbone


def load_backbone_for(provenance: dict, weights: str | None = None) -> Backbone:
    """Rebuild the backbone that produced a set of shards (from their `embedx` metadata).

    Args:
        provenance: the shards' `embedx` metadata (model, weights source and sha256, ...).
        weights: override where the weights come from (a path, say, when the original
            file moved); their sha256 must still match.

    Raises:
        WeightsError: the weights cannot be found again, or are not the same weights.
    """
    model_name = provenance["model"]
    if weights is None:
        source = provenance.get("weights_source", "")
        if source == "random":
            raise WeightsError(
                "These features were made with a randomly initialised backbone, which cannot be rebuilt: "
                "query by --id or --vectors instead of by image."
            )
        weights = weights_argument(source)
    backbone = load_matching(model_name, weights, provenance.get("weights_sha256"))
    backbone = backbone.as_recorded(provenance)
    if backbone.data_config.to_dict() != provenance.get("data_config", backbone.data_config.to_dict()):
        raise WeightsError(f"The preprocessing of {model_name} differs from the one recorded with the features.")
    return backbone
