"""Build an index directory from feature shards, add more shards to it, and load it.

All FAISS calls go through `embedx.index`; this module streams the shards, keeps the
position -> row table and writes the measured quality into `index.json`.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import index as fx
from . import shards
from ._arrow import read_table, to_numpy
from ._progress import progress_bar
from .errors import DamagedFileError, FeaturesError, InputError, SearchIndexError

log = logging.getLogger(__name__)

# provenance keys that must agree between an index and anything added to or searched in it
PROVENANCE_KEYS = ("model", "weights_sha256", "data_config", "pooling", "dim")
#: `index add --measure auto` measures recall again (and re-tunes nprobe / efSearch) once the
#: index holds this much more than when it was last measured: new data may fall where the
#: quantiser has few lists, or the graph grows denser; small catch-ups do not pay a full scan
REMEASURE_GROWTH = 0.10
MEASURE_CHOICES = ("auto", "yes", "no")


@dataclass
class Rows:
    """position -> row_id, path, label, source of an index."""

    row_ids: np.ndarray
    paths: list[str]
    labels: list[str | None]
    sources: np.ndarray
    # per source: its row ids sorted, and their positions (made on first use)
    _by_source: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.row_ids)

    def positions_in_source(self, source: int, row_ids: np.ndarray) -> np.ndarray:
        """Index positions of row ids of one source (shard directory); -1 for rows not indexed
        (rows the directory gained after the index was built or last caught up)."""
        if source not in self._by_source:
            pos = np.nonzero(self.sources == source)[0]
            order = np.argsort(self.row_ids[pos], kind="stable")
            self._by_source[source] = (self.row_ids[pos][order], pos[order])
        ids, pos = self._by_source[source]
        row_ids = np.asarray(row_ids, np.int64)
        if not len(ids):
            return np.full(len(row_ids), -1, np.int64)
        at = np.minimum(np.searchsorted(ids, row_ids), len(ids) - 1)
        return np.where(ids[at] == row_ids, pos[at], -1)


def provenance_mismatch(a: dict, b: dict) -> list[str]:
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in PROVENANCE_KEYS if a.get(k) != b.get(k)]


def build_index(features_dir, out_dir, config: fx.IndexConfig = fx.IndexConfig(), *, overwrite: bool = False,
                progress: bool = False) -> dict:
    """Build, tune and save an index over a shard directory. With `progress`, a bar on stderr
    counts the vectors added, and names the step (train, add, measure recall). One process at
    a time writes an index directory (a lock; `index add` takes it too): a second is refused.

    Returns:
        The `index.json` content: factory, metric, tuned search parameter, recall@k,
        queries/s, index bytes, build seconds, and the feature provenance.
    """
    fx.check_features(Path(features_dir).resolve())  # bad features: said before --out is made
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with shards.DirectoryLock(out_dir):
        return _build_index(features_dir, out_dir, config, overwrite=overwrite, progress=progress)


def _build_index(features_dir, out_dir: Path, config: fx.IndexConfig, *, overwrite: bool, progress: bool) -> dict:
    t0 = time.perf_counter()
    features_dir = Path(features_dir).resolve()
    meta = fx.check_features(features_dir)
    n = shards.count_rows(features_dir)
    if n == 0:
        raise FeaturesError(f"{features_dir} holds no embedded rows: nothing to index.")
    dim = int(meta["dim"])
    if (out_dir / fx.INFO_FILE).exists() and not overwrite:
        raise SearchIndexError(f"{out_dir} already holds an index. Use --overwrite, or `embedx index add` to extend it.")
    budget = config.max_memory or fx.default_memory_budget()
    factory = config.factory or fx.choose_factory(n, dim, budget)
    index = fx.new_index(factory, dim, config.metric)
    ngpu = fx.gpu_count(config.use_gpu)
    rng = np.random.default_rng(config.seed)

    bar = progress_bar(desc=f"index {factory}", unit="vec", enabled=progress, total=n)
    train_positions = np.empty(0, np.int64)
    if not index.is_trained:
        nlist = fx.import_faiss().extract_index_ivf(index).nlist if fx._is_ivf(index) else 256
        size = min(n, max(nlist * 64, 20_000), 500_000)
        train_positions = np.sort(rng.choice(n, size=size, replace=False))
        bar.set_description_str(f"index {factory}: training on {size:,} vectors")
        xt = fx.sample_vectors(features_dir, train_positions, config.metric, config.batch_size)
        log.info("training %s on %d vectors", factory, len(xt))
        index = fx.to_gpu(index, ngpu)
        index.train(xt)
        del xt
    else:
        index = fx.to_gpu(index, ngpu)
    bar.set_description_str(f"index {factory}: adding")

    row_ids, paths, labels = [], [], []
    if config.on_disk:
        if not fx._is_ivf(index):
            raise SearchIndexError(f"--on-disk needs an IVF index, not {factory!r}: use e.g. --factory IVF4096,Flat.")
        index = fx.to_cpu(index)
        blocks = out_dir / ".blocks"
        blocks.mkdir(exist_ok=True)
        fx.save(index, blocks / "trained.index")
        names, start = [], 0
        for s, table in enumerate(shards.iter_shards(features_dir)):
            # one partial index per shard: memory holds one shard's vectors at a time
            part = fx.load(blocks / "trained.index", mmap=False)
            x = fx.prepare(shards.embeddings_of(table), config.metric)
            part.add_with_ids(x, np.arange(start, start + len(x), dtype=np.int64))
            bar.update(len(x))
            names.append(blocks / f"block_{s:05d}.index")
            fx.save(part, names[-1])
            row_ids.append(to_numpy(table.column("row_id")))
            paths.extend(table.column("path").to_pylist())
            labels.extend(table.column("label").to_pylist())
            start += len(x)
            del part, x
        index = fx.merge_on_disk(blocks / "trained.index", names, out_dir / fx.IVFDATA_FILE)
        shutil.rmtree(blocks, ignore_errors=True)
    else:
        for x, ids, p, lab in fx.iter_vectors(features_dir, config.metric, config.batch_size):
            _add(index, x, bar)
            row_ids.append(ids)
            paths.extend(p)
            labels.extend(lab)
    rows = Rows(np.concatenate(row_ids), paths, labels, np.zeros(n, np.int32))
    build_seconds = time.perf_counter() - t0

    k = min(config.k, n)
    bar.set_description_str(f"index {factory}: measuring recall@{k} against exact search")
    # held-out queries: vectors of the collection that the quantiser was not trained on
    candidates = np.setdiff1d(np.arange(n), train_positions) if len(train_positions) < n else np.arange(n)
    q_positions = np.sort(rng.choice(candidates, size=min(config.num_queries, len(candidates)), replace=False))
    xq = fx.sample_vectors(features_dir, q_positions, config.metric, config.batch_size)
    t_exact = time.perf_counter()
    _, gt = fx.exact_knn([features_dir], xq, k, config.metric, config.batch_size)
    exact_qps = len(xq) / max(time.perf_counter() - t_exact, 1e-9)
    quality = fx.tune(index, xq, gt, k, config.target_recall)
    bar.close()

    fx.save(index, out_dir / fx.INDEX_FILE)
    fx.write_rows(out_dir / fx.ROWS_FILE, rows.row_ids, rows.paths, rows.labels, rows.sources)
    info = {
        "factory": factory,
        "metric": config.metric,
        "num_vectors": n,
        "dim": dim,
        "search_param": quality["param"],
        "search_value": quality["value"],
        "recall_at_k": quality["recall"],
        "target_reached": quality["target_reached"],
        "k_factor": quality["k_factor"],
        "k": k,
        "target_recall": config.target_recall,
        "num_queries": len(xq),
        "measured_at_vectors": n,
        "qps": quality["qps"],
        "exact_qps": exact_qps,
        "sweep": quality["sweep"],
        "index_bytes": (out_dir / fx.INDEX_FILE).stat().st_size,
        "memory_budget": budget,
        "build_seconds": build_seconds,
        "gpus": ngpu,
        "on_disk": bool(config.on_disk),
        "provenance": meta,
        "sources": [_source(features_dir, n)],
        "config": fx.config_dict(config),
    }
    fx.write_info(out_dir, info)
    return info


def add_to_index(index_dir, features_dir, *, batch_size: int = 65_536, progress: bool = False,
                 measure: str = "auto") -> dict:
    """Append the rows of another shard directory (same provenance) to an existing index, or
    the rows a directory already in the index has gained since (`extract --update`).

    Args:
        measure: measure recall@k again and re-tune the search parameter (nprobe, efSearch) to
            the index's target, with a sample of the vectors just added as queries against
            exact search over every source: "yes", "no", or "auto" (an approximate index that
            has grown by `REMEASURE_GROWTH` since it was last measured).

    Returns the index's info (recall, search value and sweep as measured last), with "added":
    the vectors added by this call, and "remeasured": None, or, when this call measured again,
    the recall@k and search value from before (`recall_before`, `value_before`). Two adds to one
    index at once would lose one's rows: the second is refused (the lock `embedx index` takes)."""
    if measure not in MEASURE_CHOICES:
        raise InputError(f"--measure must be one of {', '.join(MEASURE_CHOICES)}, not {measure!r}.")
    index_dir = Path(index_dir)
    fx.read_info(index_dir)  # not an index: say so before taking a lock in it
    with shards.DirectoryLock(index_dir):
        return _add_to_index(index_dir, features_dir, batch_size=batch_size, progress=progress, measure=measure)


def _add_to_index(index_dir: Path, features_dir, *, batch_size: int, progress: bool, measure: str) -> dict:
    info = fx.read_info(index_dir)
    features_dir = Path(features_dir).resolve()
    meta = fx.check_features(features_dir)
    diffs = provenance_mismatch(info["provenance"], meta)
    if diffs:
        raise SearchIndexError(
            f"{features_dir} was extracted differently from the index ({'; '.join(diffs)}). "
            "Re-extract with the index's model and weights, or build a new index."
        )
    if info.get("on_disk"):
        raise SearchIndexError(
            "This index keeps its lists on disk (--on-disk), which FAISS cannot extend efficiently: "
            "rebuild it over all the shard directories instead."
        )
    rows = load_rows(index_dir)
    known = [i for i, s in enumerate(info["sources"]) if s["features"] == str(features_dir)]
    if known:  # catch up with what the directory gained since; its rows already in stay as they are
        source = known[0]
        was, now = info["sources"][source].get("fingerprint"), _source(features_dir, 0)["fingerprint"]
        if was and now != was:
            raise SearchIndexError(
                f"{features_dir} was extracted again (--overwrite) since it went into this index: its row ids "
                "may name other images now. Rebuild the index (embedx index ... --overwrite)."
            )
        skip = np.unique(rows.row_ids[rows.sources == source])
    else:
        source, skip = len(info["sources"]), None
    index = fx.load(index_dir / fx.INDEX_FILE, mmap=False)
    new_ids, new_paths, new_labels = [], [], []
    # (the total only for the bar: counting reads every shard's footer)
    total = shards.count_rows(features_dir) - (len(skip) if skip is not None else 0) if progress else None
    bar = progress_bar(desc=f"index add {info['factory']}", unit="vec", enabled=progress, total=total)
    for x, ids, p, lab in fx.iter_vectors(features_dir, info["metric"], batch_size, skip_row_ids=skip):
        _add(index, x, bar)
        new_ids.append(ids)
        new_paths.extend(p)
        new_labels.extend(lab)
    added = sum(len(a) for a in new_ids)
    if added == 0:
        bar.close()
        return {**info, "added": 0}
    grown = Rows(np.concatenate([rows.row_ids, *new_ids]), rows.paths + new_paths, rows.labels + new_labels,
                 np.concatenate([rows.sources, np.full(added, source, np.int32)]))
    remeasured = None
    if _should_measure(measure, info, int(index.ntotal)):
        dirs = [s["features"] for s in info["sources"]] + ([] if known else [str(features_dir)])
        bar.set_description_str(f"index add {info['factory']}: measuring recall@{info['k']} against exact search")
        quality = _measure_again(index, info, dirs, grown, source, np.concatenate(new_ids), batch_size)
        if quality is not None:
            remeasured = {"recall_before": info["recall_at_k"], "value_before": info["search_value"]}
            info.update(search_value=quality["value"], recall_at_k=quality["recall"], qps=quality["qps"],
                        target_reached=quality["target_reached"], k_factor=quality["k_factor"], sweep=quality["sweep"],
                        num_queries=quality["num_queries"], measured_at_vectors=int(index.ntotal))
    bar.close()
    # write to temporaries, then swap both files in: a crash leaves the old index intact
    tmp_index = index_dir / (fx.INDEX_FILE + ".new")
    fx.save(index, tmp_index)
    fx.write_rows(index_dir / (fx.ROWS_FILE + ".new"), grown.row_ids, grown.paths, grown.labels, grown.sources)
    os.replace(tmp_index, index_dir / fx.INDEX_FILE)
    os.replace(index_dir / (fx.ROWS_FILE + ".new"), index_dir / fx.ROWS_FILE)
    if known:
        info["sources"][source]["rows"] += added
    else:
        info["sources"].append(_source(features_dir, added))
    info["num_vectors"] = int(index.ntotal)
    info["index_bytes"] = (index_dir / fx.INDEX_FILE).stat().st_size
    fx.write_info(index_dir, info)
    return {**info, "added": added, "remeasured": remeasured}


def _should_measure(measure: str, info: dict, ntotal: int) -> bool:
    if measure != "auto":
        return measure == "yes"
    if info.get("search_param") is None:  # exact search (Flat): recall is 1 whatever the size
        return False
    measured = info.get("measured_at_vectors")  # absent from indexes built before it was recorded
    return measured is None or ntotal >= measured * (1 + REMEASURE_GROWTH)


def _measure_again(index, info: dict, dirs: list[str], rows: Rows, source: int, new_row_ids: np.ndarray,
                   batch_size: int) -> dict | None:
    """`fx.tune` of the grown index (the search parameter left at the chosen value): queries are
    up to `num_queries` of the vectors just added (where the index changed), the truth exact
    search over the vectors of every source that the index holds, by index position. None (and a
    warning) when a source directory is gone."""
    gone = [d for d in dirs if not Path(d).is_dir()]
    if gone:
        log.warning("recall not measured again: %s no longer exists", ", ".join(gone))
        return None
    metric, k = info["metric"], min(int(info["k"]), int(index.ntotal))
    rng = np.random.default_rng(0)
    chosen = np.sort(rng.choice(new_row_ids, size=min(int(info.get("num_queries") or 200), len(new_row_ids)),
                                replace=False))
    # only the row groups that hold the chosen rows (`shards.read_rows`), in row-id order as before
    xq = np.concatenate([fx.prepare(shards.embeddings_of(t), metric)
                         for t in shards.read_rows(dirs[source], chosen, columns=["embedding"])])

    def indexed_vectors():
        # each source's vectors that the index holds, with their index positions
        for s, d in enumerate(dirs):
            for x, ids, *_ in fx.iter_vectors(d, metric, batch_size):
                pos = rows.positions_in_source(s, ids)
                held = pos >= 0
                yield x[held], pos[held]

    _, gt = fx.exact_knn_of(indexed_vectors(), xq, k, metric)
    quality = fx.tune(index, xq, gt, k, float(info["target_recall"]))
    return {**quality, "num_queries": len(xq)}


def _source(features_dir: Path, rows: int) -> dict:
    """A shard directory as an index records it; `fingerprint` (the first run's: --update keeps
    it, a re-extraction with other input or settings changes it) tells a catch-up whether the
    row ids it holds still mean what they meant."""
    manifest = shards.read_manifest(features_dir) or {}
    return {"features": str(features_dir), "root": manifest.get("root"), "rows": rows,
            "fingerprint": manifest.get("fingerprint")}


def _add(index, x: np.ndarray, bar, step: int = 16_384) -> None:
    """index.add in steps, so that the bar moves during long adds (HNSW: ~10k vectors/s here)."""
    for i in range(0, len(x), step):
        chunk = x[i:i + step]
        index.add(chunk)
        bar.update(len(chunk))


def load_rows(index_dir) -> Rows:
    try:
        t = read_table(Path(index_dir) / fx.ROWS_FILE)
    except (DamagedFileError, FileNotFoundError) as e:
        what = str(e) if isinstance(e, DamagedFileError) else f"{Path(index_dir) / fx.ROWS_FILE} is missing."
        raise SearchIndexError(f"{what} {fx.rebuild_advice(Path(index_dir))}") from None
    return Rows(to_numpy(t.column("row_id")), t.column("path").to_pylist(), t.column("label").to_pylist(),
                to_numpy(t.column("source")))

