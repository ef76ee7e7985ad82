"""Arrow arrays built from their buffers, without pyarrow's pandas check.

`pyarrow.array()` asks, on its first call in a process, whether its input is a pandas object,
and so imports pandas when it is installed: ~0.4 s on the 2-core machine here, paid by every
`embedx extract` process at its first shard (nearly 10 % of a 512-photo run; measured with
cProfile around the shard writer). Columns embedx writes are plain numbers and strings, whose
Arrow layout is simple to build from NumPy: these helpers do that, and the tables they make are
the ones `pa.array` would make (tested).
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


__all__ = ["numeric_array", "string_array"]
