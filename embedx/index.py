"""FAISS indexes over feature shards: the only faiss code (choose, build, tune, save, load).

An index directory holds::

    index.faiss   the FAISS index; its labels are positions 0..N-1
    rows.parquet  position -> row_id, path, label, source (which shard directory)
    index.json    factory, metric, search parameter, measured recall / QPS / memory,
                  and the feature provenance copied from the shards

Vectors stream from the shards in batches, so building needs the index itself plus one
batch of memory. Quality is measured, not assumed: recall@k against exact search on
held-out queries, with the search-time parameter (nprobe / efSearch) raised until the
target recall is reached.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import shards
from ._arrow import numeric_array, string_array, to_numpy
from .errors import DependencyError, FeaturesError, InputError, SearchIndexError

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
ROWS_FILE = "rows.parquet"
INFO_FILE = "index.json"
IVFDATA_FILE = "index.ivfdata"  # inverted lists of an --on-disk index, memory-mapped
METRICS = ("cosine", "ip", "l2")
# FAISS warns below 39 training points per centroid; keep well above it
MIN_POINTS_PER_CENTROID = 39


@dataclass(frozen=True)
class IndexConfig:
    metric: str = "cosine"
    factory: str | None = None  # any faiss index_factory string; None = choose automatically
    max_memory: int | None = None  # bytes the index may take; None = half the machine's RAM
    target_recall: float = 0.95
    k: int = 10  # recall@k
    num_queries: int = 1000  # held-out queries for the recall measurement
    batch_size: int = 65_536
    use_gpu: str = "auto"  # auto | yes | no
    on_disk: bool = False  # IVF only: build per-shard partial indexes, merge lists into one mmap'ed file
    seed: int = 0


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise DependencyError(
            "FAISS is not installed. CPU: pip install 'embedx[faiss]' (faiss-cpu); "
            "GPU: pip install 'embedx[faiss-gpu]' (install only one of them)."
        ) from None
    return faiss


def parse_bytes(text: str | int | None) -> int | None:
    """'4G' -> 4 * 2**30; plain integers are bytes."""
    if text is None or isinstance(text, int):
        return text
    s = text.strip().upper().removesuffix("B")
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    try:
        if s and s[-1] in units:
            return int(float(s[:-1]) * units[s[-1]])
        return int(s)
    except ValueError:
        raise InputError(f"Cannot read the size {text!r}: use e.g. 512M, 4G or a number of bytes.") from None


def default_memory_budget() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.5)
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def choose_factory(n: int, dim: int, max_memory: int) -> str:
    """Pick an index from the collection size, dimension and memory budget.

    Exact search while it is cheap; HNSW while the graph is quick to build and fits;
    IVF beyond, with Flat, SQ8 or (OPQ+)PQ codes as the budget requires.
    """
    flat_bytes = n * dim * 4
    if n <= 20_000 and flat_bytes <= max_memory:
        return "Flat"
    if n <= 200_000 and n * (dim * 4 + 32 * 2 * 4 * 1.2) <= max_memory:
        return "HNSW32,Flat"
    nlist = ivf_nlist(n)
    centroids = nlist * dim * 4
    if flat_bytes + n * 8 + centroids <= max_memory:
        return f"IVF{nlist},Flat"
    if n * (dim + 8) + centroids <= max_memory:
        return f"IVF{nlist},SQ8"
    for m in sorted((m for m in range(4, dim // 2 + 1, 4) if dim % m == 0), reverse=True):
        if n * (m + 8) + centroids + dim * dim * 4 <= max_memory:
            # OPQ rotates the space so that PQ's sub-vectors are balanced: it pays when the
            # codes compress hard (m well below dim)
            base = f"OPQ{m},IVF{nlist},PQ{m}" if m <= dim // 4 else f"IVF{nlist},PQ{m}"
            # PQ distances alone cap recall; re-rank with SQ8 codes when those fit too
            if n * (m + 8 + dim) + centroids + dim * dim * 4 <= max_memory:
                return base + ",Refine(SQ8)"
            return base
    raise SearchIndexError(
        f"{n} vectors of dimension {dim} do not fit a memory budget of {max_memory / 2**20:.0f} MiB "
        "even with the smallest PQ codes. Raise --max-memory."
    )


def ivf_nlist(n: int) -> int:
    """~4·sqrt(n) lists, a power of two, at least 39 training points each."""
    target = 4 * math.sqrt(n)
    nlist = 2 ** max(0, round(math.log2(max(target, 1))))
    while nlist > 1 and n / nlist < MIN_POINTS_PER_CENTROID:
        nlist //= 2
    return max(1, nlist)


def faiss_metric(metric: str):
    faiss = import_faiss()
    if metric not in METRICS:
        raise InputError(f"--metric must be one of {', '.join(METRICS)}, not {metric!r}.")
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def prepare(x: np.ndarray, metric: str) -> np.ndarray:
    """float32, C-contiguous, and L2-normalised for cosine."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.maximum(norms, 1e-12)
    return x


def iter_vectors(features_dir, metric: str, batch_size: int, skip_row_ids: np.ndarray | None = None):
    """Yield (embeddings, row_ids, paths, labels) batches streamed shard by shard; rows whose
    id is in `skip_row_ids` are left out (a shard holding only such rows is not read)."""
    for table in shards.iter_shards(features_dir, skip_row_ids=skip_row_ids):
        emb = shards.embeddings_of(table)
        ids = to_numpy(table.column("row_id"))
        paths = table.column("path").to_pylist()
        labels = table.column("label").to_pylist()
        for s in range(0, len(ids), batch_size):
            yield prepare(emb[s:s + batch_size], metric), ids[s:s + batch_size], paths[s:s + batch_size], labels[s:s + batch_size]


def sample_vectors(features_dir, positions: np.ndarray, metric: str, batch_size: int) -> np.ndarray:
    """Vectors at the given (sorted) global positions, read streaming."""
    out = []
    start = 0
    for x, *_ in iter_vectors(features_dir, metric, batch_size):
        lo, hi = np.searchsorted(positions, [start, start + len(x)])
        if hi > lo:
            out.append(x[positions[lo:hi] - start])
        start += len(x)
    dim = out[0].shape[1] if out else 0
    return np.concatenate(out) if out else np.empty((0, dim), np.float32)


def exact_knn(features_dirs: list, xq: np.ndarray, k: int, metric: str, batch_size: int):
    """Exact k-NN of xq over all vectors of the shard directories, streamed (no N x N); ids are
    positions in the directories' vectors one after the other."""

    def batches():
        offset = 0
        for d in features_dirs:
            for x, *_ in iter_vectors(d, metric, batch_size):
                yield x, np.arange(offset, offset + len(x), dtype=np.int64)
                offset += len(x)

    return exact_knn_of(batches(), xq, k, metric)


def exact_knn_of(batches, xq: np.ndarray, k: int, metric: str):
    """Exact k-NN of xq over streamed (vectors, their ids) batches, prepared for `metric`:
    (D, I) with the batches' ids, best first; fewer than k columns when fewer vectors came."""
    faiss = import_faiss()
    fm = faiss_metric(metric)
    best_d = np.full((len(xq), 0), 0, np.float32)
    best_i = np.full((len(xq), 0), 0, np.int64)
    for x, ids in batches:
        if len(x) == 0:
            continue
        D, I = knn(xq, x, min(k, len(x)), metric)
        D_all = np.concatenate([best_d, D], axis=1)
        I_all = np.concatenate([best_i, ids[I]], axis=1)
        order = np.argsort(-D_all if fm == faiss.METRIC_INNER_PRODUCT else D_all, axis=1, kind="stable")[:, :k]
        best_d = np.take_along_axis(D_all, order, 1)
        best_i = np.take_along_axis(I_all, order, 1)
    return best_d, best_i


def knn(xq: np.ndarray, xb: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN of xq among the in-memory rows xb (both prepared for `metric`): (D, I)."""
    faiss = import_faiss()
    return faiss.knn(xq, xb, k, metric=faiss_metric(metric))


def recall_at_k(I: np.ndarray, gt: np.ndarray, k: int) -> float:
    """Fraction of the true k nearest neighbours found in the first k results."""
    hits = sum(len(set(a[:k]) & set(b[:k])) for a, b in zip(I, gt))
    return hits / (len(gt) * min(k, gt.shape[1])) if len(gt) else 1.0


def search_param_name(index) -> str | None:
    faiss = import_faiss()
    base = faiss.extract_index_ivf(index) if _is_ivf(index) else None
    if base is not None:
        return "nprobe"
    if "HNSW" in type(faiss.downcast_index(_unwrap(index))).__name__:
        return "efSearch"
    return None


def _unwrap(index):
    faiss = import_faiss()
    index = faiss.downcast_index(index)
    while hasattr(index, "index") and not hasattr(index, "hnsw"):
        index = faiss.downcast_index(index.index)
    return index


def _is_ivf(index) -> bool:
    faiss = import_faiss()
    try:
        faiss.extract_index_ivf(index)
        return True
    except (RuntimeError, AttributeError):
        return False


def set_search_param(index, name: str | None, value: int | None) -> None:
    if name is None or value is None:
        return
    faiss = import_faiss()
    faiss.ParameterSpace().set_index_parameter(index, name, int(value))


def tune(index, xq: np.ndarray, gt: np.ndarray, k: int, target: float) -> dict:
    """Raise nprobe / efSearch until recall@k reaches `target`; returns the whole sweep."""
    name = search_param_name(index)
    if name == "nprobe":
        nlist = import_faiss().extract_index_ivf(index).nlist
        values = [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if v <= nlist] or [nlist]
    elif name == "efSearch":
        values = [16, 32, 64, 128, 256, 512, 1024]
    else:
        values = [None]
    refine = _refine_of(index)
    if refine is not None:
        # re-rank 8x more candidates with the stored vectors: PQ distances alone cap recall
        refine.k_factor = 8
    sweep = []
    chosen = None
    for v in values:
        set_search_param(index, name, v)
        t0 = time.perf_counter()
        _, I = index.search(xq, k)
        seconds = time.perf_counter() - t0
        r = recall_at_k(I, gt, k)
        sweep.append({"value": v, "recall": r, "qps": len(xq) / max(seconds, 1e-9)})
        if r >= target:
            chosen = sweep[-1]
            break
    if chosen is None:
        chosen = max(sweep, key=lambda s: s["recall"])
        log.warning("target recall %.3f not reached; best %.3f with %s=%s", target, chosen["recall"], name, chosen["value"])
    set_search_param(index, name, chosen["value"])
    return {"param": name, "value": chosen["value"], "recall": chosen["recall"], "qps": chosen["qps"], "sweep": sweep,
            "target_reached": chosen["recall"] >= target, "k_factor": refine.k_factor if refine is not None else None}


def _refine_of(index):
    faiss = import_faiss()
    index = faiss.downcast_index(index)
    return index if isinstance(index, faiss.IndexRefine) else None


def gpu_count(use_gpu: str) -> int:
    faiss = import_faiss()
    if use_gpu == "no" or not hasattr(faiss, "StandardGpuResources"):
        if use_gpu == "yes":
            raise DependencyError("--gpu yes needs faiss-gpu: pip install 'embedx[faiss-gpu]'.")
        return 0
    n = faiss.get_num_gpus()
    if use_gpu == "yes" and n == 0:
        raise DependencyError("--gpu yes was asked for but FAISS sees no GPU.")
    return n


def to_gpu(index, ngpu: int):
    """Move an index to all GPUs (sharded across several); HNSW stays on the CPU."""
    if ngpu == 0 or "HNSW" in type(_unwrap(index)).__name__:
        return index
    faiss = import_faiss()
    co = faiss.GpuMultipleClonerOptions()
    co.shard = ngpu > 1
    co.useFloat16 = False
    return faiss.index_cpu_to_all_gpus(index, co=co, ngpu=ngpu)


def to_cpu(index):
    faiss = import_faiss()
    return faiss.index_gpu_to_cpu(index) if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__ else index


def write_rows(path: Path, row_ids, paths, labels, sources) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "row_id": numeric_array(row_ids, np.int64),
        "path": string_array(paths),
        "label": string_array(labels),
        "source": numeric_array(sources, np.int32),
    })
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_info(directory: Path, info: dict) -> None:
    shards.atomic_write_bytes(directory / INFO_FILE, json.dumps(info, indent=2, sort_keys=True).encode())


def read_info(directory) -> dict:
    path = Path(directory) / INFO_FILE
    if not path.exists():
        raise SearchIndexError(f"{directory} is not an embedx index (no {INFO_FILE}). Build one with `embedx index FEATURES --out DIR`.")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise SearchIndexError(f"{path} is damaged ({e}). Rebuild the index: embedx index FEATURES --out "
                               f"{directory} --overwrite") from None


def config_dict(config: IndexConfig) -> dict:
    return asdict(config)


def check_features(features_dir) -> dict:
    files = shards.shard_files(features_dir)
    if not files:
        raise FeaturesError(f"{features_dir} holds no feature shards. Run `embedx extract ... --out {features_dir}` first.")
    return shards.read_metadata(features_dir)


def new_index(factory: str, dim: int, metric: str):
    faiss = import_faiss()
    try:
        return faiss.index_factory(dim, factory, faiss_metric(metric))
    except RuntimeError as e:
        raise InputError(f"FAISS cannot build the factory string {factory!r}: {str(e).splitlines()[-1]}") from None


def save(index, path: Path) -> None:
    faiss = import_faiss()
    tmp = path.with_suffix(".tmp")
    faiss.write_index(to_cpu(index), str(tmp))
    os.replace(tmp, path)


_DIRECT_MAP_LOCK = threading.Lock()


def stored_vectors(index, positions) -> np.ndarray | None:
    """The vectors at these index positions as the index holds them, where it holds them
    exactly — Flat, HNSW over Flat storage, a Flat refinement (IndexRefine) — so that a query by
    row id reads no feature shard (~120 ms for a row of a 10,000-row shard of 1280-d vectors,
    ad hoc), IVF over Flat lists too (through a direct map); None for indexes that keep only
    codes (PQ, SQ)."""
    faiss = import_faiss()
    base = faiss.downcast_index(index)
    if isinstance(base, faiss.IndexRefine):
        base = faiss.downcast_index(base.refine_index)
    if isinstance(base, faiss.IndexIVFFlat):
        # vectors in their lists as given: a direct map (position -> list, offset; 8 bytes a
        # vector, built once from the lists' ids) finds them
        with _DIRECT_MAP_LOCK:
            if base.direct_map.type == faiss.DirectMap.NoMap:
                base.make_direct_map()
    elif not (isinstance(base, faiss.IndexFlat) or (
            isinstance(base, faiss.IndexHNSW) and isinstance(faiss.downcast_index(base.storage), faiss.IndexFlat))):
        return None
    keys = np.asarray(positions, dtype=np.int64)
    if len(keys) == 0:
        return np.empty((0, base.d), np.float32)
    return base.reconstruct_batch(keys)


def load(path: Path, mmap: bool):
    """Read an index; IVF indexes are memory-mapped read-only when `mmap` is set. A file FAISS
    cannot read (truncated, overwritten) raises SearchIndexError with the command that rebuilds it."""
    try:
        return _load(path, mmap)
    except RuntimeError as e:  # FAISS's read errors: "Error: 'ret == (size)' failed: read error in ..."
        why = " ".join(str(e).rsplit("Error: ", 1)[-1].split())
        raise SearchIndexError(f"{path} cannot be read by FAISS ({why[:200]}): the file is damaged. "
                               f"{rebuild_advice(Path(path).parent)}") from None


def rebuild_advice(index_dir: Path) -> str:
    """'Rebuild it: embedx index FEATS... --out DIR --overwrite' with the index's own sources."""
    try:
        sources = [s["features"] for s in read_info(index_dir).get("sources", [])]
    except Exception:  # noqa: BLE001 - advice only: index.json may be what is damaged
        sources = []
    first = sources[0] if sources else "FEATURES"
    adds = "".join(f"; embedx index add {index_dir} {s}" for s in sources[1:])
    return f"Rebuild it: embedx index {first} --out {index_dir} --overwrite{adds}"


def _load(path: Path, mmap: bool):
    faiss = import_faiss()
    if (Path(path).parent / IVFDATA_FILE).exists():
        # an --on-disk index: its lists live in the .ivfdata file beside it, wherever the folder moved
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR | (faiss.IO_FLAG_READ_ONLY if mmap else 0)
        return faiss.read_index(str(path), flags)
    if mmap:
        try:
            return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:
            log.info("%s cannot be memory-mapped (only IVF indexes can); reading it into memory", path)
    return faiss.read_index(str(path))


def merge_on_disk(trained: Path, blocks: list[Path], ivfdata: Path):
    """Merge partial IVF indexes into `trained`'s structure with inverted lists in one file
    (FAISS contrib.ondisk): the index then searches memory-mapped, larger than RAM."""
    faiss = import_faiss()
    from faiss.contrib.ondisk import merge_ondisk

    index = faiss.read_index(str(trained))
    if ivfdata.exists():
        ivfdata.unlink()
    merge_ondisk(index, [str(b) for b in blocks], str(ivfdata))
    return index
