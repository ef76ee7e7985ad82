"""The `embedx` command line: a thin typer shell over the library.

This is the only place that turns `EmbedxError`s into messages and exit codes; any other
exception is a bug and keeps its traceback. Heavy imports happen inside the commands so
that `embedx --help` is instant.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import EmbedxError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Turn image folders into embeddings you can train on and search.",
    rich_markup_mode=None,
)


def _handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EmbedxError as e:
            typer.echo(f"Error: {e}", err=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            typer.echo("Interrupted. Completed work is kept: rerun the same command to resume.", err=True)
            raise typer.Exit(code=130) from None

    return wrapper


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


@app.command()
@_handle_errors
def extract(
    inputs: List[str] = typer.Argument(..., help="Image directories (walked recursively) or .txt/.csv/.parquet lists of paths."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory for the Parquet shards."),
    model: str = typer.Option("tf_efficientnet_lite0", help="Any timm model name."),
    weights: Optional[str] = typer.Option(None, help="auto (default: bundled, else hub) | bundled | hub | random | PATH to .pth/.safetensors."),
    batch_size: Optional[int] = typer.Option(None, help="Images per batch [default: 256 on GPU, 32 on CPU]."),
    num_workers: Optional[int] = typer.Option(None, help="Decoder processes [default: from the cores present]."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    precision: str = typer.Option("auto", help="auto (bf16 on GPU and bf16-capable CPUs) | fp32 | bf16 | fp16."),
    labels: str = typer.Option("folder", help="folder (parent directory name) | none."),
    shard_size: int = typer.Option(50_000, help="Rows per Parquet shard."),
    normalize: bool = typer.Option(False, "--normalize", help="L2-normalise the embeddings."),
    dtype: str = typer.Option("float32", help="Stored embedding type: float32 | float16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run with another configuration in --out."),
    max_pixels: int = typer.Option(178_956_970, help="Refuse images with more pixels than this (decompression bombs)."),
    fast_decode: bool = typer.Option(True, "--fast-decode/--exact-decode", help="Decode JPEGs at reduced scale when the model needs fewer pixels."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
):
    """Embed images with a frozen pretrained backbone into Parquet feature shards.

    Rerun the same command after an interruption to resume.

    Example:
        embedx extract photos/ --out feats/ --model tf_efficientnet_lite0 --normalize
    """
    from .extractor import ExtractConfig, extract as run_extract

    config = ExtractConfig(
        model=model, weights=weights, batch_size=batch_size, num_workers=num_workers, device=device,
        precision=precision, labels=labels, shard_size=shard_size, normalize=normalize, dtype=dtype,
        overwrite=overwrite, max_pixels=max_pixels, fast_decode=fast_decode, progress=progress,
    )
    r = run_extract(inputs, out, config)
    new = r.num_embedded + r.num_errors - r.num_skipped
    typer.echo(
        f"{r.num_embedded} embedded, {r.num_errors} errors"
        + (f" ({r.num_skipped} done by an earlier run)" if r.num_skipped else "")
        + f" in {r.seconds:.1f} s ({new / r.seconds if r.seconds else 0:.1f} img/s, {r.device}, {r.precision}); "
        f"{_human_bytes(r.bytes_written)} in {r.out_dir}"
    )
    if r.num_errors:
        typer.echo(f"Unreadable inputs are listed in {Path(r.out_dir) / 'errors.parquet'}", err=True)


@app.command()
@_handle_errors
def info(
    features: Path = typer.Argument(..., help="A shard directory written by `embedx extract`."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Show what a shard directory holds: rows, dimension, model, errors.

    Example:
        embedx info feats/
    """
    from .summary import describe

    d = describe(features)
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    for key, value in d.items():
        if isinstance(value, dict):
            value = json.dumps(value)
        typer.echo(f"{key:>16}: {value}")


def main() -> None:
    # hub access with no network would hang ~47 s before failing; users online are unaffected
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app(prog_name="embedx")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
