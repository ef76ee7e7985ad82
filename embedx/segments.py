"""Growing a shard directory: `extract --update` appends the images that are new since the
runs before, as a new segment of rows, and rewrites nothing.

A shard directory holds one or more segments of row ids. Segment 0 is the first run: row ids
0..N-1 in listing order, identified by the fingerprint of that listing. Each update appends a
segment whose row ids start at the next shard boundary, so its rows go into new shards and
every row id already handed out keeps its meaning. An update's rows are planned once and saved
to `segments/NNNN.parquet` (row_id, path, file, label) before any of them is embedded: an
interrupted update resumes the same rows with the same ids, whatever the input holds by then.

An image is new when its path (as the shards write it: relative to the input root) is in no
shard and has no error row (`errors.parquet`, made from the manifest's). Rows whose images have gone, or whose label has changed
since, stay as they are; `diff` counts them so that the caller can say so. With
`--retry-errors`, the inputs recorded as errors are planned again in the new segment, and their
old error rows are dropped (`forget_errors`): each path then has one row or one error row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from . import shards
from .errors import EmbedxError, FeaturesError
from .images import ImageRecord

SEGMENTS_DIR = "segments"


def segments(manifest: dict) -> list[dict]:
    """The segments of a manifest: [{"first_row", "num_images"}, ...] (one for a directory
    never updated, including those written before segments existed)."""
    return manifest.get("segments") or [{"first_row": 0, "num_images": manifest["num_images"]}]


def shard_rows(segs: list[dict], index: int, shard_size: int) -> int:
    """How many rows shard `index` holds once complete, given `segments(manifest)`: shards
    never straddle segments."""
    start = index * shard_size
    for seg in segs:
        end = seg["first_row"] + seg["num_images"]
        if seg["first_row"] <= start < end:
            return min(shard_size, end - start)
    raise ValueError(f"shard {index} is in no segment of this run")


def num_shards(manifest: dict, shard_size: int) -> int:
    last = segments(manifest)[-1]
    return -(-(last["first_row"] + last["num_images"]) // shard_size)


def append(out: Path, manifest: dict, records: list[ImageRecord], shard_size: int) -> list[ImageRecord]:
    """Plan a new segment for `records` (listing order): give them row ids from the next shard
    boundary, save the plan, and add the segment to `manifest` (not written here). Returns the
    records with their new row ids."""
    segs = segments(manifest)
    first = num_shards(manifest, shard_size) * shard_size
    done = [s["index"] for s in manifest["shards"]]
    if done and first // shard_size <= max(done):  # would write into shards that exist: rows lost
        raise EmbedxError(f"internal error: an update planned from row {first}, but shard {max(done)} exists")
    planned = [ImageRecord(first + i, r.path, r.file, r.label) for i, r in enumerate(records)]
    _write_plan(out, len(segs), planned)
    manifest["segments"] = [*segs, {"first_row": first, "num_images": len(planned)}]
    manifest["num_images"] = (sum(s["num_images"] for s in manifest["segments"])
                              - manifest.get("superseded_errors", 0))
    manifest["num_shards"] = num_shards(manifest, shard_size)
    manifest["complete"] = False
    return planned


def unfinished(out: Path, manifest: dict, shard_size: int) -> list[ImageRecord]:
    """The planned records (by `append`) of every update with shards still missing, in row-id
    order: an interrupted update that was resumed with more new images may leave two."""
    done = {s["index"] for s in manifest["shards"]}
    records: list[ImageRecord] = []
    for i, seg in enumerate(segments(manifest)[1:], start=1):
        first, end = seg["first_row"] // shard_size, -(-(seg["first_row"] + seg["num_images"]) // shard_size)
        if all(index in done for index in range(first, end)):
            continue
        path = _plan_path(out, i)
        if not path.exists():
            raise FeaturesError(f"{path} is missing: the unfinished update cannot be resumed. Rerun with --overwrite.")
        records += [ImageRecord(*row) for row in zip(*shards.read_plan(path))]
    return records


def errored_paths(manifest: dict) -> set[str]:
    """The paths of the inputs recorded as errors (errors.parquet is made from these)."""
    return {e["path"] for s in manifest["shards"] for e in s.get("errors", [])}


def forget_errors(manifest: dict, paths: set[str]) -> int:
    """Drop the error rows of `paths` from `manifest` (not written here): they are planned again
    (`--retry-errors`), and the retry's row or error row replaces them. Their row ids stay
    unused. Returns how many were dropped."""
    # segment 0's size is read from num_images while "segments" is absent: pin it first
    manifest["segments"] = segments(manifest)
    dropped = 0
    for s in manifest["shards"]:
        keep = [e for e in s.get("errors", []) if e["path"] not in paths]
        dropped += len(s.get("errors", [])) - len(keep)
        s["errors"] = keep
    manifest["superseded_errors"] = manifest.get("superseded_errors", 0) + dropped
    manifest["num_images"] -= dropped
    return dropped


@dataclass(frozen=True)
class Diff:
    """The input against what a shard directory holds already."""

    new: list[ImageRecord]  # in listing order, row ids of the listing (not yet of the directory)
    known: int  # input images with a row (or an error row) in the directory
    gone: int  # rows of the directory whose path is no longer in the input
    relabelled: int  # input images whose label differs from their row's
    retried: int = 0  # inputs recorded as errors, planned again (--retry-errors)


def diff(out: Path, manifest: dict, records: list[ImageRecord], also_known: list[ImageRecord] = ()) -> Diff:
    """Compare the listing with the rows in `out`'s shards and the error rows of its manifest
    (plus `also_known`: the planned rows of unfinished updates). Reads the path and label
    columns only."""
    rows: dict[str, str | None] = {}
    for table in shards.iter_shards(out, columns=["path", "label"]):
        rows.update(zip(table.column("path").to_pylist(), table.column("label").to_pylist()))
    errored = errored_paths(manifest)
    for r in also_known:
        rows.setdefault(r.path, r.label)
    new, relabelled, seen = [], 0, set()
    for r in records:
        seen.add(r.path)
        if r.path in rows:
            relabelled += rows[r.path] != r.label
        elif r.path not in errored:  # an error row has no label to compare
            new.append(r)
    gone = len((rows.keys() | errored) - seen)
    return Diff(new, len(records) - len(new), gone, relabelled)


def _plan_path(out: Path, index: int) -> Path:
    return Path(out) / SEGMENTS_DIR / f"{index:04d}.parquet"


def _write_plan(out: Path, index: int, records: list[ImageRecord]) -> None:
    path = _plan_path(out, index)
    os.makedirs(path.parent, exist_ok=True)
    shards.write_plan(path, [r.row_id for r in records], [r.path for r in records], [r.file for r in records],
                      [r.label for r in records])
