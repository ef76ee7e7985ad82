"""Parquet feature shards: the only pyarrow code (schema, writer, reader, manifest, lock).

A shard directory holds::

    part-00000.parquet …   row_id int64, path string, label string?, embedding
                           fixed_size_list<float32|float16>[D], width int32, height int32;
                           schema metadata key "embedx" = JSON provenance
    errors.parquet         path, error, message: inputs that could not be embedded
    manifest.json          completed shards with row counts and errors, plus the config
    segments/NNNN.parquet  the rows planned by each `extract --update` (see `segments`)
    .lock                  held (flock) while a process writes

Every file is written to a temporary name and renamed into place, so a killed run
leaves either a complete shard or none, and `manifest.json` only names complete shards.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._arrow import keep_rows, numeric_array, parquet_file, read_table, string_array, to_numpy
from .errors import DamagedFileError, FeaturesError, LockedError

MANIFEST = "manifest.json"
ERRORS = "errors.parquet"
METADATA_KEY = b"embedx"
FORMAT_VERSION = 1


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def schema(dim: int, dtype: str = "float32", metadata: dict | None = None):
    import pyarrow as pa

    value_type = {"float32": pa.float32(), "float16": pa.float16()}[dtype]
    fields = [
        pa.field("row_id", pa.int64(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=True),
        pa.field("embedding", pa.list_(pa.field("item", value_type, nullable=False), dim), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
    ]
    meta = {METADATA_KEY: json.dumps(metadata or {}, sort_keys=True).encode()}
    return pa.schema(fields, metadata=meta)


@dataclass(frozen=True)
class ShardRows:
    """Rows of one shard, columnar. `embeddings` is (N, D) float32 or float16."""

    row_ids: np.ndarray
    paths: list[str]
    labels: list[str | None]
    embeddings: np.ndarray
    widths: np.ndarray
    heights: np.ndarray


@dataclass(frozen=True)
class ErrorRow:
    row_id: int
    path: str
    error: str
    message: str


@contextlib.contextmanager
def _atomic_path(path: Path):
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`
    (readers see the old file or the new one, never half of one); on failure remove it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with _atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def _atomic_write_table(path: Path, table, compression: str = "zstd", use_dictionary=True,
                        row_group_size: int | None = None) -> None:
    import pyarrow.parquet as pq

    with _atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression=compression, use_dictionary=use_dictionary,
                       row_group_size=row_group_size)


def write_plan(path: Path, row_ids: list[int], paths: list[str], files: list[str], labels: list[str | None]) -> None:
    """The planned rows of an update (`segments`): row_id, path, file, label."""
    import pyarrow as pa

    _atomic_write_table(Path(path), pa.table({
        "row_id": numeric_array(row_ids, np.int64), "path": string_array(paths),
        "file": string_array(files), "label": string_array(labels),
    }))


def read_plan(path: Path) -> tuple[list[int], list[str], list[str], list[str | None]]:
    t = read_table(path).to_pydict()
    return t["row_id"], t["path"], t["file"], t["label"]


# dictionary-encoded columns of a shard: not the embedding (float values rarely repeat; on real
# Lite0 features the attempt, abandoned once the dictionary outgrows its page, made writing 512
# rows 2.3x slower and the file 34 % larger) nor the unique row ids
_SHARD_DICTIONARY_COLUMNS = ["path", "label", "width", "height"]

# rows per Parquet row group of a shard: a query by row id reads the row group that holds the row
# (found from the row_id column's min/max statistics) instead of the whole shard. Measured on a
# 10,000 x 512 float32 shard: one row 3.9 ms vs 51.5 ms with one row group, the same file size
# (18.98 vs 18.97 MB) and whole-shard reads no slower (20 vs 31 ms).
SHARD_ROW_GROUP_ROWS = 1024


def write_shard(directory: Path, index: int, rows: ShardRows, dim: int, dtype: str, metadata: dict) -> Path:
    """Write one shard atomically and return its path."""
    import pyarrow as pa

    emb = np.ascontiguousarray(rows.embeddings, dtype=np.float16 if dtype == "float16" else np.float32)
    if emb.ndim != 2 or emb.shape[1] != dim or emb.shape[0] != len(rows.paths):
        raise ValueError(f"embeddings shape {emb.shape} does not fit {len(rows.paths)} rows x {dim}")
    sch = schema(dim, dtype, metadata)
    values = numeric_array(emb, emb.dtype)  # the schema's value type: float16 or float32, as emb
    table = pa.Table.from_arrays(
        [
            numeric_array(rows.row_ids, np.int64),
            string_array(rows.paths),
            string_array(rows.labels),
            pa.FixedSizeListArray.from_arrays(values, dim),
            numeric_array(rows.widths, np.int32),
            numeric_array(rows.heights, np.int32),
        ],
        schema=sch,
    )
    path = Path(directory) / shard_name(index)
    _atomic_write_table(path, table, use_dictionary=_SHARD_DICTIONARY_COLUMNS, row_group_size=SHARD_ROW_GROUP_ROWS)
    return path


def write_errors(directory: Path, errors: list[ErrorRow]) -> None:
    import pyarrow as pa

    table = pa.table(
        {
            "row_id": numeric_array([e.row_id for e in errors], np.int64),
            "path": string_array([e.path for e in errors]),
            "error": string_array([e.error for e in errors]),
            "message": string_array([e.message for e in errors]),
        }
    )
    _atomic_write_table(Path(directory) / ERRORS, table)


def write_errors_of(directory: Path, manifest: dict) -> None:
    """errors.parquet as the manifest's shard entries list the errors (it is made from them)."""
    write_errors(directory, [ErrorRow(**e) for s in manifest["shards"] for e in s.get("errors", [])])


def read_errors(directory: str | os.PathLike):
    """The errors table (pyarrow) of a shard directory; empty if there were none."""
    path = Path(directory) / ERRORS
    if not path.exists():
        return None
    with _rerun_advice(directory):  # it is written again from the manifest by the next extract
        return read_table(path)


# ---------------------------------------------------------------------------------------
# Manifest


def read_manifest(directory: str | os.PathLike) -> dict | None:
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FeaturesError(f"{path} is corrupt ({e}). Rerun with --overwrite to start over.") from None


def write_manifest(directory: str | os.PathLike, manifest: dict) -> None:
    atomic_write_bytes(Path(directory) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())


class DirectoryLock:
    """An exclusive, non-blocking flock on DIR/.lock; released automatically if the process dies.
    The file holds the holder's pid while it runs and is emptied when it exits cleanly (an
    exception or Ctrl-C included): `died` then says whether the previous holder ended without
    unwinding (a crash, a kill, power loss) — a run that resumes after one can take care."""

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / ".lock"
        self._fh = None
        self.died: str | None = None  # the previous holder's pid, when it did not exit cleanly

    def __enter__(self):
        self._fh = open(self.path, "a+")
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self._fh.close()
            self._fh = None
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise LockedError(
                    f"Another embedx process is writing to {self.path.parent} (lock {self.path} is held). "
                    "Wait for it to finish, or write to another --out directory."
                ) from None
            raise
        self._fh.seek(0)
        self.died = self._fh.read().strip() or None
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(str(os.getpid()))
        self._fh.flush()
        return self

    def __exit__(self, *exc):
        if self._fh is not None:
            self._fh.seek(0)
            self._fh.truncate()  # a clean exit: nothing for the next holder to take care of
            self._fh.flush()
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


class ManifestLock:
    """A blocking flock on DIR/.manifest.lock around read-modify-write of the manifest, for
    runs where several processes add shards (multi-device)."""

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / ".manifest.lock"

    def __enter__(self):
        self._fh = open(self.path, "a+")
        fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
        self._fh.close()


# ---------------------------------------------------------------------------------------
# Reading


@dataclass
class FeatureTable:
    """All rows of a shard directory, with embeddings as one contiguous (N, D) array."""

    row_ids: np.ndarray
    paths: list[str]
    labels: list[str | None]
    embeddings: np.ndarray
    metadata: dict
    root: str | None = None

    def __len__(self) -> int:
        return len(self.row_ids)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])


def _footer(path):
    """A Parquet file's footer (row count, row groups, schema), no data read; DamagedFileError
    when it cannot be read."""
    with parquet_file(path) as f:
        return f.metadata


@contextlib.contextmanager
def _rerun_advice(directory):
    """A damaged shard of `directory` is reported with what mends it."""
    advice = (f"Rerun the `embedx extract` command that wrote {directory}: it embeds the rows of missing (or "
              "visibly damaged) shards again.")
    try:
        yield
    except DamagedFileError as e:
        raise DamagedFileError(f"{e} Delete it, then: {advice}", e.path, e.reason) from None
    except FileNotFoundError as e:
        raise DamagedFileError(f"{e.filename or 'A shard'} is missing (its manifest.json lists it). {advice}",
                               str(e.filename), "missing") from None


def check_shards(directory: str | os.PathLike, manifest: dict) -> list[tuple[dict, str]]:
    """The manifest's shard entries whose file is missing, cannot be read, or holds another number
    of rows than the manifest says, each with why (footers only: 0.04 ms a shard here, cached)."""
    bad = []
    for s in manifest.get("shards", []):
        path = Path(directory) / s["file"]
        try:
            rows = _footer(path).num_rows
        except FileNotFoundError:
            bad.append((s, "missing"))
            continue
        except DamagedFileError as e:
            bad.append((s, f"damaged ({e.reason.rstrip('.')})"))
            continue
        if rows != s["rows"]:
            bad.append((s, f"damaged (it holds {rows} rows, not the {s['rows']} written)"))
    return bad


def shard_files(directory: str | os.PathLike) -> list[Path]:
    """Completed shards in order: those the manifest names (or all part-*.parquet without one)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FeaturesError(f"{directory} is not a directory. Give the --out directory of `embedx extract`.")
    manifest = read_manifest(directory)
    if manifest is not None:
        names = [s["file"] for s in sorted(manifest.get("shards", []), key=lambda s: s["index"])]
        return [directory / n for n in names]
    return sorted(directory.glob("part-*.parquet"))


def files_for_rows(directory: str | os.PathLike, row_ids) -> list[Path]:
    """The completed shards that can hold these row ids: row id // shard_size names the shard in
    a directory `extract` wrote (updates included); every shard where that is unknown."""
    manifest = read_manifest(directory)
    size = ((manifest or {}).get("config") or {}).get("shard_size")
    if not size:
        return shard_files(directory)
    wanted = {int(r) // size for r in row_ids}
    return [Path(directory) / s["file"] for s in sorted(manifest.get("shards", []), key=lambda s: s["index"])
            if s["index"] in wanted]


def count_rows(directory: str | os.PathLike) -> int:
    """Rows of the completed shards, from the Parquet footers (no data read)."""
    with _rerun_advice(directory):
        return sum(_footer(f).num_rows for f in shard_files(directory))


def embedding_dim(directory: str | os.PathLike) -> int:
    """D of a shard directory: from its provenance, else from the first shard's schema."""
    files = shard_files(directory)
    if not files:
        raise FeaturesError(f"{directory} holds no feature shards. Run `embedx extract ... --out {directory}` first.")
    with _rerun_advice(directory):
        sch = _footer(files[0]).schema.to_arrow_schema()
    return int(_metadata_of(sch).get("dim") or sch.field("embedding").type.list_size)


def read_metadata(directory: str | os.PathLike) -> dict:
    """The `embedx` provenance of a shard directory (from its first shard)."""
    files = shard_files(directory)
    if not files:
        raise FeaturesError(f"{directory} holds no feature shards. Run `embedx extract ... --out {directory}` first.")
    with _rerun_advice(directory):
        return _metadata_of(_footer(files[0]).schema.to_arrow_schema())


def _metadata_of(sch) -> dict:
    raw = (sch.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def iter_shards(directory: str | os.PathLike, columns: list[str] | None = None,
                skip_row_ids: np.ndarray | None = None):
    """Yield one pyarrow Table per completed shard (bounded memory for streaming consumers);
    with `skip_row_ids`, without those rows (a shard holding only such rows is not read past
    its row ids). For a few given rows, `read_rows`."""
    for f in shard_files(directory):
        keep = None
        with _rerun_advice(directory):
            if skip_row_ids is not None and len(skip_row_ids):
                keep = ~np.isin(to_numpy(read_table(f, columns=["row_id"]).column("row_id")), skip_row_ids)
                if not keep.any():
                    continue
            table = read_table(f, columns=columns)
        yield table if keep is None or keep.all() else keep_rows(table, keep)


def read_rows(directory: str | os.PathLike, row_ids, columns: list[str] | None = None):
    """Yield, per shard that holds some of `row_ids`, a Table of just those rows (any order;
    ids not found are simply absent). Reads only the shards that can hold them
    (`files_for_rows`) and, within each, only the row groups whose row_id statistics cover
    one of them (shards written before row groups were used have one: read whole)."""
    wanted = np.unique(np.fromiter((int(r) for r in row_ids), dtype=np.int64))
    if not len(wanted):
        return
    read_columns = None if columns is None else list(dict.fromkeys(["row_id", *columns]))
    for f in files_for_rows(directory, wanted):
        with _rerun_advice(directory), parquet_file(f) as pf:
            groups = _row_groups_holding(pf.metadata, wanted)
            if not groups:
                continue
            table = pf.read_row_groups(groups, columns=read_columns)
        keep = np.isin(to_numpy(table.column("row_id")), wanted)
        if keep.any():
            table = table if keep.all() else keep_rows(table, keep)
            yield table if columns is None else table.select(columns)


def _row_groups_holding(metadata, wanted: np.ndarray) -> list[int]:
    """Row groups of a shard whose row_id min/max admit one of the sorted `wanted` ids (every
    group whose statistics are missing)."""
    column = metadata.schema.names.index("row_id")
    groups = []
    for g in range(metadata.num_row_groups):
        stats = metadata.row_group(g).column(column).statistics
        if stats is None or not stats.has_min_max:
            groups.append(g)
            continue
        lo = np.searchsorted(wanted, stats.min, side="left")
        if lo < len(wanted) and wanted[lo] <= stats.max:
            groups.append(g)
    return groups


def embeddings_of(table) -> np.ndarray:
    """(N, D) numpy view of a table's embedding column (zero-copy per chunk when possible)."""
    col = table.column("embedding")
    dim = col.type.list_size
    parts = [_chunk_values(c, dim) for c in col.chunks]
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return np.empty((0, dim), dtype=np.float32)
    return np.concatenate(parts)


def _chunk_values(chunk, dim: int) -> np.ndarray:
    values = chunk.values
    if chunk.offset:  # a sliced chunk: values start at the slice
        values = values.slice(chunk.offset * dim, len(chunk) * dim)
    return to_numpy(values).reshape(-1, dim)


def read_features(directory: str | os.PathLike, *, dtype=np.float32) -> FeatureTable:
    """Read a shard directory into one contiguous (N, D) array plus ids, paths and labels.

    Embeddings are copied exactly once, from the Parquet buffers into the final array.

    Args:
        directory: an `embedx extract` output directory.
        dtype: dtype of the returned embeddings (float16 shards are widened to float32 by default).
    """
    files = shard_files(directory)
    if not files:
        raise FeaturesError(f"{directory} holds no feature shards. Run `embedx extract ... --out {directory}` first.")
    with _rerun_advice(directory):
        metas = [_footer(f) for f in files]
    total = sum(m.num_rows for m in metas)
    meta = _metadata_of(metas[0].schema.to_arrow_schema())
    dim = embedding_dim(directory)
    out = np.empty((total, dim), dtype=dtype)
    row_ids = np.empty(total, dtype=np.int64)
    paths: list[str] = []
    labels: list[str | None] = []
    pos = 0
    for f in files:
        with _rerun_advice(directory):
            table = read_table(f)
        n = table.num_rows
        if table.schema.field("embedding").type.list_size != dim:
            raise FeaturesError(f"{f} has another embedding size than the first shard: mixed directories?")
        col = table.column("embedding")
        start = pos
        for chunk in col.chunks:
            vals = _chunk_values(chunk, dim)
            out[start:start + len(vals)] = vals  # the one copy (with widening if needed)
            start += len(vals)
        row_ids[pos:pos + n] = to_numpy(table.column("row_id"))
        paths.extend(table.column("path").to_pylist())
        labels.extend(table.column("label").to_pylist())
        pos += n
    manifest = read_manifest(directory) or {}
    return FeatureTable(row_ids, paths, labels, out, meta, root=manifest.get("root"))
