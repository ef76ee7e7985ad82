"""Arrow arrays built from their buffers, and Parquet files read, without importing pandas.

`pyarrow.array()` asks, on its first call in a process, whether its input is a pandas object,
and so imports pandas when it is installed; every `embedx extract` process paid it at its first
shard, in the writer thread: the write stage of a 512-photo run went from 0.44 to 0.13 s without
it (`ExtractResult.stage_seconds`; `python -X importtime`: pandas alone 0.13-0.15 s). Columns
embedx writes are plain numbers and strings, whose Arrow layout is simple to build from NumPy:
these helpers do that, and the arrays they make are the ones `pa.array` would make (tested).
pyarrow's conversions to NumPy (`to_numpy`) import pandas too, and so does `pq.read_table`
(through `pyarrow.dataset`): `to_numpy` and `read_table` here do without, and `embedx search
--id` went from ~0.48 to 0.27-0.29 s (`/usr/bin/time`; `python -X importtime`: pandas was 0.14 s
of it), `embedx info` from 0.45 to 0.23 s.
"""

from __future__ import annotations

import numpy as np

#: the largest string column (bytes) a 32-bit offset `string` array holds
_MAX_STRING_BYTES = 2**31 - 1


def numeric_array(values, dtype) -> "object":
    """A pyarrow array of `values` (any sequence of numbers) as NumPy `dtype`, no nulls."""
    import pyarrow as pa

    arr = np.ascontiguousarray(values, dtype=dtype)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    return pa.Array.from_buffers(pa.from_numpy_dtype(arr.dtype), len(arr), [None, pa.py_buffer(arr)])


def string_array(values) -> "object":
    """A pyarrow `string` array of `values` (str, or None for a null)."""
    import pyarrow as pa

    values = list(values)
    encoded = [b"" if v is None else str(v).encode("utf-8") for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
    if offsets[-1] > _MAX_STRING_BYTES:
        return pa.array(values, type=pa.string())  # past int32 offsets: pyarrow splits it (and may import pandas)
    valid = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
    nulls = len(values) - int(valid.sum())
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    return pa.Array.from_buffers(pa.string(), len(values), [bitmap, pa.py_buffer(offsets.astype(np.int32)),
                                                            pa.py_buffer(b"".join(encoded))], null_count=nulls)


def read_table(path, columns: list[str] | None = None):
    """One Parquet file as a pyarrow Table (its schema metadata kept), like `pq.read_table` on a
    file: through `ParquetFile`, which does not load `pyarrow.dataset`, whose import brings pandas
    in (0.16 s, `python -X importtime`): `embedx info` on a shard directory 0.45 -> 0.23 s.
    A file that cannot be read raises `DamagedFileError` (see `parquet_file`)."""
    with parquet_file(path) as f, _damaged(path):
        return f.read(columns=columns)


def parquet_file(path):
    """`pq.ParquetFile(path)` (use it as a context manager), or `DamagedFileError` naming the
    file when it is not readable Parquet (truncated, overwritten, another format): pyarrow's own
    ArrowInvalid / OSError names neither the file nor what to do. A missing file stays
    FileNotFoundError, one without read permission PermissionError."""
    import pyarrow.parquet as pq

    with _damaged(path):
        return pq.ParquetFile(path)


class _damaged:
    """Turns pyarrow's errors while reading `path` into DamagedFileError."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        import pyarrow as pa

        from .errors import DamagedFileError

        if isinstance(e, FileNotFoundError) and not e.filename:  # pyarrow's names no file
            import errno
            import os

            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(self.path)) from None
        if (e is None or isinstance(e, (FileNotFoundError, PermissionError))
                or not isinstance(e, (pa.ArrowException, OSError))):
            return False
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DamagedFileError(f"{self.path} cannot be read as Parquet ({reason}): the file is damaged or is "
                               "not Parquet.", str(self.path), reason) from None


def keep_rows(table, keep: np.ndarray):
    """The rows of `table` where the boolean mask `keep` is true, in order: `Table.filter` with
    the mask, without its conversion of the mask through `pa.array` (which imports pandas)."""
    return table.take(numeric_array(np.flatnonzero(keep), np.int64))


def to_numpy(column) -> np.ndarray:
    """A numeric (integer or floating) pyarrow Array or ChunkedArray without nulls as a NumPy array,
    read from its buffers (read-only where it is one chunk, like pyarrow's zero-copy `to_numpy`);
    anything else through pyarrow's own `to_numpy`."""
    import pyarrow as pa

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    kind = column.type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)) or any(c.null_count for c in chunks):
        return column.to_numpy() if isinstance(column, pa.ChunkedArray) else column.to_numpy(zero_copy_only=False)
    dtype = np.dtype(kind.to_pandas_dtype())
    parts = [np.frombuffer(c.buffers()[1], dtype=dtype, count=len(c), offset=c.offset * dtype.itemsize)
             if len(c) else np.empty(0, dtype) for c in chunks]
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.empty(0, dtype)


__all__ = ["keep_rows", "numeric_array", "read_table", "string_array", "to_numpy"]
