"""Near-duplicate groups: neighbours above a similarity threshold, in bounded memory.

Every indexed vector queries the index for its k nearest neighbours, a batch at a time
(never an N x N matrix); pairs past the threshold are joined with union-find, so groups
larger than k still come together through shared members.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import index as fx
from .errors import InputError
from .query import SearchIndex


@dataclass(frozen=True)
class DuplicateGroups:
    """Members of groups with two or more images; `group` numbers them 0..G-1."""

    group: np.ndarray
    positions: np.ndarray
    row_ids: np.ndarray
    paths: list[str]
    best_score: np.ndarray  # each member's score to its closest duplicate

    @property
    def num_groups(self) -> int:
        return int(self.group.max()) + 1 if len(self.group) else 0


def _find(parent: np.ndarray, i: int) -> int:
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:  # path compression
        parent[i], i = root, parent[i]
    return root


def find_duplicates(idx: SearchIndex, threshold: float, k: int = 10, batch_size: int = 4096,
                    across_sources: bool = False) -> DuplicateGroups:
    """Group indexed vectors whose similarity (cosine/ip) is >= threshold, or whose squared
    L2 distance is <= threshold for l2 indexes. With `across_sources`, only pairs from two
    different shard directories of the index count (a test set's near-copies of training
    images, say: the index built over one, the other added with `embedx index add`)."""
    if k < 2:
        raise InputError("-k must be at least 2 to find duplicates.")
    n = len(idx)
    if across_sources and len(idx.info["sources"]) < 2:
        raise InputError("--across-sources needs an index over two or more shard directories "
                         "(add one with `embedx index add INDEX_DIR FEATURES`).")
    higher_is_closer = idx.metric in ("cosine", "ip")
    parent = np.arange(n, dtype=np.int64)
    best = np.full(n, -np.inf if higher_is_closer else np.inf, dtype=np.float32)
    for s, source in enumerate(idx.info["sources"]):
        for x, ids, *_ in fx.iter_vectors(source["features"], idx.metric, batch_size):
            # where each row sits in the index: a directory's rows are not necessarily one run of
            # positions (rows added by a catch-up `index add` come last), and rows it gained
            # since are not indexed at all
            pos = idx.positions_in_source(s, ids)
            indexed = pos >= 0
            if not indexed.all():
                x, pos = x[indexed], pos[indexed]
            if not len(pos):
                continue
            D, I = idx.index.search(x, min(k, n))
            hit = (I >= 0) & (I != pos[:, None]) & ((D >= threshold) if higher_is_closer else (D <= threshold))
            if across_sources:
                hit &= idx.rows.sources[np.maximum(I, 0)] != s
            for qi, j in zip(*np.nonzero(hit)):  # only the pairs past the threshold
                p, q, d = int(pos[qi]), int(I[qi, j]), D[qi, j]
                a, b = _find(parent, p), _find(parent, q)
                if a != b:
                    parent[max(a, b)] = min(a, b)
                for m in (p, q):
                    best[m] = max(best[m], d) if higher_is_closer else min(best[m], d)
    roots = np.array([_find(parent, i) for i in range(n)], dtype=np.int64)
    counts = np.bincount(roots, minlength=n)
    members = np.nonzero(counts[roots] > 1)[0]
    order = members[np.lexsort((members, roots[members]))]
    _, group = np.unique(roots[order], return_inverse=True)
    return DuplicateGroups(group.astype(np.int64), order, idx.rows.row_ids[order],
                           [idx.rows.paths[p] for p in order], best[order])


def write_groups(groups: DuplicateGroups, out: str | os.PathLike) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "group": pa.array(groups.group, pa.int64()),
        "row_id": pa.array(groups.row_ids, pa.int64()),
        "path": pa.array(groups.paths, pa.string()),
        "score": pa.array(groups.best_score, pa.float32()),
    }), out)
    return out
