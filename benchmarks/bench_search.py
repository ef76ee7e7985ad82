"""Index quality and speed: the index embedx chooses vs exact search, in one run.

For each size (default 100k and 1M) of clustered 512-d vectors (structure, not pure noise:
an ANN index cannot be judged on Gaussian noise), writes them as shards, runs
`build_index` with its automatic choice, and reports build seconds, index bytes, process
peak RSS, recall@10 on held-out queries, queries/s at the tuned setting, and the exact
search baselines (in-memory IndexFlat and embedx's streamed exact search). Then the cost of
finding a row's vector for a query by row id, one row at a time: from the index itself (where
it holds vectors exactly: `SearchIndex.vectors_for`) vs read back from its feature shard
(`shard_vectors`, embedx extract's default 10,000-row shards).

    python benchmarks/bench_search.py                 # 100k and 1M
    python benchmarks/bench_search.py --sizes 100000
    python benchmarks/bench_search.py --quick
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from _results import write_result

import numpy as np



def clustered(n: int, dim: int, n_clusters: int, seed: int = 0, spread: float = 0.35) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    x = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        m = min(n, s + 100_000) - s
        x[s:s + m] = centres[rng.integers(0, n_clusters, m)] + spread * rng.standard_normal((m, dim)).astype(np.float32)
    return x


def write_shards(directory: Path, x: np.ndarray, shard_size: int = 10_000, labels: list[str] | None = None) -> None:
    """A shard directory in embedx's format for synthetic vectors (no model involved)."""
    from embedx import shards

    directory.mkdir(parents=True, exist_ok=True)
    n, dim = x.shape
    meta = {"model": "synthetic", "weights_sha256": None, "data_config": {}, "pooling": "avg", "dim": dim,
            "dtype": "float32", "normalized": False}
    manifest = {"shards": [], "root": None, "complete": True, "num_images": n}
    for s, lo in enumerate(range(0, n, shard_size)):
        hi = min(n, lo + shard_size)
        rows = shards.ShardRows(np.arange(lo, hi), [f"v/{i}" for i in range(lo, hi)],
                                [None] * (hi - lo) if labels is None else labels[lo:hi],
                                x[lo:hi], np.zeros(hi - lo), np.zeros(hi - lo))
        shards.write_shard(directory, s, rows, dim, "float32", meta)
        manifest["shards"].append({"index": s, "file": shards.shard_name(s), "rows": hi - lo, "errors": []})
    shards.write_manifest(directory, manifest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--points-per-cluster", type=int, default=100)
    ap.add_argument("--spread", type=float, default=0.35, help="noise std around the cluster centres (unit-normal)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import faiss

    from embedx.index import IndexConfig, prepare
    from embedx.indexer import build_index
    from embedx.query import SearchIndex

    sizes = [5000] if args.quick else [int(s) for s in args.sizes.split(",")]
    dim = 32 if args.quick else args.dim
    runs = []
    for n in sizes:
        tmp = Path(tempfile.mkdtemp(prefix="embedx-search-"))
        try:
            x = clustered(n, dim, n_clusters=max(10, n // args.points_per_cluster), spread=args.spread)
            write_shards(tmp / "f", x)
            t0 = time.perf_counter()
            info = build_index(tmp / "f", tmp / "i", IndexConfig(num_queries=args.queries, target_recall=args.target_recall))
            wall = time.perf_counter() - t0
            # in-memory exact baseline on the same held-out style queries
            rng = np.random.default_rng(5)
            xn = prepare(x, "cosine")
            xq = xn[rng.choice(n, min(args.queries, n), replace=False)]
            flat = faiss.IndexFlatIP(dim)
            flat.add(xn)
            t0 = time.perf_counter()
            flat.search(xq, 10)
            flat_qps = len(xq) / (time.perf_counter() - t0)
            del flat, xn
            idx = SearchIndex(tmp / "i")
            picks = np.random.default_rng(6).choice(n, 5 if args.quick else 30, replace=False).tolist()
            id_ms = {}
            for name, fn in (("index", idx.vectors_for), ("shard", idx.shard_vectors)):
                fn(picks[:1])  # warm-up (a direct map, where IVF needs one; the Parquet reader)
                times = []
                for p in picks:
                    t0 = time.perf_counter()
                    fn([p])
                    times.append((time.perf_counter() - t0) * 1e3)
                id_ms[name] = float(np.median(times))
            del idx
            run = {
                "n": n, "dim": dim, "factory": info["factory"], "search_param": info["search_param"],
                "search_value": info["search_value"], "recall_at_10": info["recall_at_k"],
                "target_reached": info["target_reached"], "qps": info["qps"],
                "exact_flat_in_memory_qps": flat_qps, "exact_streamed_qps": info["exact_qps"],
                "speedup_vs_exact_flat": info["qps"] / flat_qps, "build_seconds": info["build_seconds"],
                "wall_seconds_incl_tuning": wall, "index_bytes": info["index_bytes"],
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "id_vector_ms": id_ms, "id_vector_shard_over_index": id_ms["shard"] / max(id_ms["index"], 1e-9),
            }
            runs.append(run)
            print(f"{n:>9} x {dim}: {run['factory']:<16} recall@10 {run['recall_at_10']:.3f} at "
                  f"{run['search_param']}={run['search_value']}, {run['qps']:9.0f} q/s vs exact {flat_qps:7.0f} q/s "
                  f"({run['speedup_vs_exact_flat']:.1f}x), build {run['build_seconds']:.1f} s, "
                  f"{run['index_bytes'] / 2**20:.0f} MiB index, peak RSS {run['peak_rss_mib']:.0f} MiB")
            print(f"{'':>13} a row's vector for an id query: {id_ms['index']:.2f} ms from the index vs "
                  f"{id_ms['shard']:.1f} ms from its shard ({run['id_vector_shard_over_index']:.0f}x)")
            del x
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    result = {"benchmark": "search", "metric": "cosine", "points_per_cluster": args.points_per_cluster,
              "spread": args.spread, "queries": args.queries, "threads": faiss.omp_get_max_threads(),
              "cpu_count": os.cpu_count(), "faiss": faiss.__version__, "runs": runs}
    write_result(result, "search", args.quick, args.out)


if __name__ == "__main__":
    main()
