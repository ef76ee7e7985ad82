"""Arrow arrays from buffers (embedx._arrow): the same arrays as pyarrow.array makes, and the
shard writer no longer imports pandas (pyarrow.array does, ~0.4 s a process)."""

import importlib.util
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from embedx import shards
from embedx._arrow import keep_rows, numeric_array, read_table, string_array, to_numpy


@pytest.mark.parametrize("values", [
    ["a/b.jpg", "ç/猫.jpeg", "", None, "x" * 300],
    [None, None],
    [],
    ["only"],
])
def test_string_array_equals_pyarrows(values):
    got = string_array(values)
    want = pa.array(values, type=pa.string())
    assert got.type == pa.string() and got.equals(want) and got.null_count == want.null_count
    got.validate(full=True)
    assert got.to_pylist() == values


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.float32, np.float16])
def test_numeric_array_equals_pyarrows(dtype):
    values = np.arange(-3, 7).astype(dtype)
    got = numeric_array(list(values), dtype)
    assert got.equals(pa.array(values)) and got.null_count == 0
    got.validate(full=True)
    assert numeric_array(values.reshape(2, 5), dtype).equals(pa.array(values))  # flattened, row-major


@pytest.mark.skipif(importlib.util.find_spec("pandas") is None, reason="pandas is not installed here")
def test_writing_and_reading_shards_does_not_import_pandas(tmp_path):
    code = f"""
import sys
from pathlib import Path
import numpy as np
from embedx import shards
rows = shards.ShardRows(row_ids=[0, 1], paths=["a.jpg", "b.jpg"], labels=["cat", None],
                        embeddings=np.ones((2, 4), np.float32), widths=[5, 6], heights=[7, 8])
shards.write_shard(Path({str(tmp_path)!r}), 0, rows, 4, "float32", {{"model": "m"}})
shards.write_errors(Path({str(tmp_path)!r}), [shards.ErrorRow(2, "c.jpg", "decode_error", "bad")])
feats = shards.read_features(Path({str(tmp_path)!r}))  # and read back
assert feats.row_ids.tolist() == [0, 1] and feats.embeddings.shape == (2, 4), feats
(part,) = shards.read_rows(Path({str(tmp_path)!r}), [1])  # one row of the shard: a mask applied
assert part.column("row_id").to_pylist() == [1] and part.column("label").to_pylist() == [None]
(rest,) = shards.iter_shards(Path({str(tmp_path)!r}), skip_row_ids=np.array([0]))
assert rest.column("row_id").to_pylist() == [1]
print("pandas" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    import pyarrow.parquet as pq

    (shard,) = tmp_path.glob("part-*.parquet")
    t = pq.read_table(shard)
    assert t.column("path").to_pylist() == ["a.jpg", "b.jpg"] and t.column("label").to_pylist() == ["cat", None]
    assert t.column("embedding").to_pylist() == [[1.0] * 4] * 2 and t.column("height").to_pylist() == [7, 8]
    assert pq.read_table(tmp_path / shards.ERRORS).to_pylist() == [
        {"row_id": 2, "path": "c.jpg", "error": "decode_error", "message": "bad"}]


def test_read_table_is_pyarrows_without_the_dataset_module(tmp_path):
    import pyarrow.parquet as pq

    table = pa.table({"a": numeric_array([1, 2, 3], np.int64), "b": string_array(["x", None, "z"])},
                     metadata={b"embedx": b'{"model": "m"}'})
    pq.write_table(table, tmp_path / "t.parquet")
    got = read_table(tmp_path / "t.parquet")
    assert got.equals(pq.read_table(tmp_path / "t.parquet")) and got.schema.metadata[b"embedx"] == b'{"model": "m"}'
    assert read_table(tmp_path / "t.parquet", columns=["b"]).column_names == ["b"]
    code = (f"import sys; from embedx._arrow import read_table; read_table({str(tmp_path / 't.parquet')!r}); "
            "print('pyarrow.dataset' in sys.modules, 'pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False False", out.stderr


def test_to_numpy_reads_numeric_columns_from_their_buffers():
    a = numeric_array(np.arange(10), np.int64)
    np.testing.assert_array_equal(to_numpy(a.slice(3, 4)), [3, 4, 5, 6])  # a slice: its offset
    chunked = pa.chunked_array([a.slice(1, 2), a.slice(5, 3)])
    np.testing.assert_array_equal(to_numpy(chunked), chunked.to_numpy())
    assert to_numpy(pa.chunked_array([], type=pa.float32())).dtype == np.float32
    half = to_numpy(numeric_array(np.linspace(0, 1, 5), np.float16))
    assert half.dtype == np.float16 and half.tolist() == np.linspace(0, 1, 5).astype(np.float16).tolist()
    # nulls and non-numeric types: pyarrow's own conversion
    assert np.isnan(to_numpy(pa.array([1.0, None]))[1]) and to_numpy(pa.array([True, False])).tolist() == [True, False]


def test_keep_rows_is_filter_by_mask():
    table = pa.table({"a": numeric_array(np.arange(6), np.int64), "b": string_array(list("abcdef"))})
    for keep in (np.array([True, False, True, True, False, True]), np.zeros(6, bool), np.ones(6, bool)):
        assert keep_rows(table, keep).equals(table.filter(pa.array(keep)))
