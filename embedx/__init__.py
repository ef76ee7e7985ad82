"""embedx: image folders -> embeddings you can train on and search.

Importing this package is cheap: torch, timm and faiss load only when a function that
needs them runs.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "ExtractConfig",
    "extract",
    "read_features",
    "load_backbone",
    "EmbedxError",
]


def __getattr__(name: str):
    # lazy public names: keep `import embedx` free of torch/pyarrow imports
    if name in ("ExtractConfig", "ExtractResult", "extract"):
        from . import extractor as _extract

        return getattr(_extract, name)
    if name in ("read_features", "FeatureTable", "read_metadata"):
        from . import shards

        return getattr(shards, name)
    if name in ("load_backbone", "Backbone"):
        from . import backbone

        return getattr(backbone, name)
    if name == "EmbedxError":
        from .errors import EmbedxError

        return EmbedxError
    raise AttributeError(f"module 'embedx' has no attribute {name!r}")
