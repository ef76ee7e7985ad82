"""Nearest-neighbour queries against an index directory, answered with paths.

Queries come as vectors, as indexed row ids, or as images (embedded with the backbone,
weights and preprocessing the index records). All queries of a call are searched as one
batch; neighbours can be kept to some labels.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import index as fx
from ._arrow import read_table, to_numpy
from .errors import EmbedxError, InputError, SearchIndexError
from .indexer import Rows, load_rows

log = logging.getLogger(__name__)

#: a label filter asks the index for at most this many (query, neighbour) answers at once
FILTER_ENTRIES_MAX = 20_000_000
#: and its exact search over the labelled rows reads back at most this many bytes of vectors
EXACT_SUBSET_MAX_BYTES = 2 * 2**30


@dataclass(frozen=True)
class Neighbor:
    rank: int
    row_id: int
    path: str
    score: float
    label: str | None = None
    position: int = -1  # position in the index (to find the file again)


@dataclass(frozen=True)
class SearchResult:
    query: str
    neighbors: list[Neighbor]

    def to_dict(self) -> dict:
        return {
            "query": self.query,
            "results": [
                {"rank": n.rank, "row_id": n.row_id, "path": n.path, "score": n.score, "label": n.label}
                for n in self.neighbors
            ],
        }


class SearchIndex:
    """A loaded index directory: FAISS index + position->row table + provenance."""

    def __init__(self, directory: str | os.PathLike, *, mmap: bool = True):
        self.directory = Path(directory)
        self.info = fx.read_info(self.directory)
        self.index = fx.load(self.directory / fx.INDEX_FILE, mmap=mmap)
        self.rows: Rows = load_rows(self.directory)
        if self.index.ntotal == 0:
            raise SearchIndexError(f"The index in {self.directory} is empty: build it from shards that hold rows.")
        if self.index.ntotal != len(self.rows):
            raise SearchIndexError(f"{self.directory} is inconsistent ({self.index.ntotal} vectors, {len(self.rows)} rows): rebuild it.")
        fx.set_search_param(self.index, self.info.get("search_param"), self.info.get("search_value"))
        self._by_row_id: dict[int, list[int]] | None = None

    @property
    def metric(self) -> str:
        return self.info["metric"]

    @property
    def provenance(self) -> dict:
        return self.info["provenance"]

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def absolute_path(self, position: int) -> str:
        """The image file behind an indexed row (relative paths hang from their source root)."""
        p = self.rows.paths[position]
        if os.path.isabs(p):
            return p
        root = self.info["sources"][int(self.rows.sources[position])].get("root") or ""
        return str(Path(root) / p)

    def position_of(self, row_id: int) -> int:
        if self._by_row_id is None:
            self._by_row_id = {}
            for pos, rid in enumerate(self.rows.row_ids.tolist()):
                self._by_row_id.setdefault(rid, []).append(pos)
        found = self._by_row_id.get(int(row_id))
        if not found:
            raise SearchIndexError(f"Row id {row_id} is not in this index ({len(self)} rows; `embedx info` lists the shards).")
        if len(found) > 1:
            raise SearchIndexError(f"Row id {row_id} appears in {len(found)} added shard directories; query by --vectors instead.")
        return found[0]

    def positions_in_source(self, source: int, row_ids: np.ndarray) -> np.ndarray:
        """Index positions of row ids of one source (shard directory); -1 for rows not indexed
        (`Rows.positions_in_source`)."""
        return self.rows.positions_in_source(source, row_ids)

    def vectors_for(self, positions: list[int]) -> np.ndarray:
        """Stored vectors of indexed rows: from the index itself where it holds them exactly
        (`fx.stored_vectors`), else read back from their feature shards (only the shards that
        hold them, where the directory says which)."""
        stored = fx.stored_vectors(self.index, positions)
        return stored if stored is not None else self.shard_vectors(positions)

    def shard_vectors(self, positions: list[int]) -> np.ndarray:
        """Vectors of indexed rows read back from their feature shards (only the shards that
        hold them, where the directory says which), prepared for the index's metric."""
        from . import shards

        out = np.empty((len(positions), self.info["dim"]), np.float32)
        found = np.zeros(len(positions), bool)
        want: dict[int, dict[int, list[int]]] = {}
        for i, pos in enumerate(positions):
            want.setdefault(int(self.rows.sources[pos]), {}).setdefault(int(self.rows.row_ids[pos]), []).append(i)
        for source, by_id in want.items():
            features = self.info["sources"][source]["features"]
            for table in shards.read_rows(features, by_id, columns=["row_id", "embedding"]):
                emb = shards.embeddings_of(table)
                for h, row_id in enumerate(to_numpy(table.column("row_id"))):
                    for i in by_id[int(row_id)]:
                        out[i] = emb[h]
                        found[i] = True
        if not found.all():
            missing = [int(self.rows.row_ids[positions[i]]) for i in np.nonzero(~found)[0][:5]]
            raise SearchIndexError(f"Row ids {missing} are no longer in their feature shards (they changed after the "
                                   "index was built): rebuild the index.")
        return fx.prepare(out, self.metric)

    def check_vectors(self, xq: np.ndarray) -> np.ndarray:
        xq = np.atleast_2d(np.asarray(xq, dtype=np.float32))
        if xq.shape[1] != self.info["dim"]:
            raise InputError(f"Query vectors have dimension {xq.shape[1]}, the index {self.info['dim']}.")
        return fx.prepare(xq, self.metric)

    def search(self, xq: np.ndarray, k: int = 10, *, exclude: list[int | None] | None = None,
               names: list[str] | None = None, labels: Collection[str] | None = None) -> list[SearchResult]:
        """Search all queries in one batch.

        Args:
            xq: (nq, D) query vectors (normalised here for cosine indexes).
            k: neighbours per query.
            exclude: per query, an index position to leave out (the query itself).
            names: how each query is named in the results.
            labels: keep only neighbours with one of these labels. The index is asked for more
                neighbours than k (about k / the labels' share of the rows, twice over), then
                four times as many until each query has k. Approximate indexes cannot reach
                every row (an IVF's unprobed lists, the far regions of an HNSW graph): when
                all they return holds fewer than k rows with the labels, or the labels are too
                rare to find that way (FILTER_ENTRIES_MAX), the labelled rows are searched
                exactly, read back from the feature shards (up to EXACT_SUBSET_MAX_BYTES).
        """
        if k < 1:
            raise InputError("-k must be at least 1.")
        xq = self.check_vectors(xq)
        extra = 1 if exclude is not None else 0
        n = len(self)
        skips = [exclude[qi] if exclude is not None else None for qi in range(len(xq))]
        query_names = [names[qi] if names else f"vector:{qi}" for qi in range(len(xq))]

        def answers(D, I, allowed=None, positions=None) -> list[SearchResult]:
            return [self._neighbors(D[qi], I[qi] if positions is None else positions[I[qi]], k, skips[qi], allowed,
                                    query_names[qi]) for qi in range(len(xq))]

        if not labels:
            return answers(*self.index.search(xq, min(k + extra, n)))
        wanted = set(labels)
        allowed = np.fromiter((lab in wanted for lab in self.rows.labels), dtype=bool, count=n)
        share = int(allowed.sum())
        if share == 0:
            known = sorted({lab for lab in self.rows.labels if lab is not None})
            raise InputError(f"No indexed row has the label {' or '.join(sorted(wanted))}; the index has "
                             f"{len(known)} labels: {', '.join(known[:10])}{', …' if len(known) > 10 else ''}.")
        # as many as the labelled rows allow: fewer than k where fewer rows have the labels
        targets = [min(k, share - int(s is not None and bool(allowed[s]))) for s in skips]
        fetch = min(n, max(k + extra, -(-2 * (k + extra) * n // share)))
        fetch_cap = max(k + extra, min(n, FILTER_ENTRIES_MAX // len(xq)))  # bounds the (nq, fetch) answers
        results = None
        while fetch <= fetch_cap:
            results = answers(*self.index.search(xq, fetch), allowed)
            if all(len(r.neighbors) >= t for r, t in zip(results, targets)):
                return results
            if fetch >= n:
                break
            fetch = min(n, fetch * 4)
        # the index cannot reach them (an IVF's unprobed lists, an HNSW graph's far regions), or the
        # labels are too rare to find by asking it for more: the labelled rows, searched exactly
        positions = np.nonzero(allowed)[0]
        why = None
        if share * self.info["dim"] * 4 > EXACT_SUBSET_MAX_BYTES:
            why = f"{share} rows have the labels, too many to search exactly"
        else:
            try:
                xb = self.vectors_for(positions.tolist())
            except (EmbedxError, OSError) as e:
                why = f"their vectors cannot be read back for an exact search ({e})"
        if why is None:
            return answers(*fx.knn(xq, xb, min(k + extra, share), self.metric), positions=positions)
        log.warning("fewer than %d neighbours with the labels for some queries: %s", k, why)
        return results if results is not None else answers(*self.index.search(xq, fetch_cap), allowed)

    def _neighbors(self, D, I, k: int, skip: int | None, allowed, name: str) -> SearchResult:
        neigh = []
        for d, pos in zip(D, I):
            if pos < 0 or pos == skip or (allowed is not None and not allowed[pos]):
                continue
            if len(neigh) == k:
                break
            neigh.append(Neighbor(len(neigh) + 1, int(self.rows.row_ids[pos]), self.rows.paths[pos], float(d),
                                  self.rows.labels[pos], int(pos)))
        return SearchResult(name, neigh)


def search_ids(idx: SearchIndex, row_ids: list[int], k: int = 10, exclude_self: bool = False, *,
               labels: Collection[str] | None = None) -> list[SearchResult]:
    positions = [idx.position_of(r) for r in row_ids]
    xq = idx.vectors_for(positions)
    return idx.search(xq, k, exclude=positions if exclude_self else None, names=[f"row_id:{r}" for r in row_ids],
                      labels=labels)


class QueryEncoder:
    """Embeds query images as an index's features were made: its backbone and weights (sha256
    checked), preprocessing, pooling, precision, normalisation and decode path. Built once, it
    serves many queries (`embedx serve` keeps one).

    Args:
        provenance: the index's (or the shards') `embedx` metadata.
        weights: where the backbone's weights are, if they moved (their sha256 must match).
        device: where to embed the queries.
        backbone: an already-loaded backbone as the provenance records it (tests, notebooks).
        isolate: decode the query images in a process of their own (`_isolated.DecodeProcess`),
            so that one that crashes the decoding library is an error, not the caller's end
            (`embedx serve` does); `close()` ends that process.
    """

    def __init__(self, provenance: dict, *, weights: str | None = None, device: str = "auto", backbone=None,
                 isolate: bool = False):
        from ._isolated import DecodeProcess
        from .backbone import load_backbone_for
        from .extractor import prepare_model

        # started first, so that its imports overlap loading the backbone
        self.decoder = DecodeProcess() if isolate else None
        if self.decoder is not None:
            self.decoder.start()
        try:
            self.provenance = provenance
            self.backbone = backbone if backbone is not None else load_backbone_for(provenance, weights)
            self.device = device
            # once, not per query; the layers the features' extractor kept in fp32 too (none before embedx recorded them)
            self._model = prepare_model(self.backbone, device, _query_precision(provenance, device),
                                        fp32_stem=bool(provenance.get("fp32_modules")))
        except BaseException:
            self.close()  # (no decoder process left behind by an encoder that could not be made)
            raise

    def embed(self, files: list[str]):
        """An `EmbeddedFiles`: the rows of the files that decoded, and why the others did not."""
        from .extractor import embed_files

        prov = self.provenance
        return embed_files(files, self.backbone, device=self.device, precision=_query_precision(prov, self.device),
                           normalize=bool(prov.get("normalized")),
                           fast_decode=prov.get("decode", "pil-draft").startswith("pil-draft"), model=self._model,
                           decoder=self.decoder)

    def close(self) -> None:
        """End the decoder process, if there is one (`isolate`)."""
        if self.decoder is not None:
            self.decoder.close()


def search_images(idx: SearchIndex, inputs: list[str], k: int = 10, exclude_self: bool = False, *,
                  weights: str | None = None, device: str = "auto", labels: Collection[str] | None = None,
                  encoder: QueryEncoder | None = None) -> tuple[list[SearchResult], list[tuple[str, str]]]:
    """Embed query images with the index's own backbone and search them.

    Args:
        encoder: reuse a loaded `QueryEncoder` (else one is built from `weights` and `device`).

    Returns:
        (results, failures): one result per decodable image; (file, reason) per failure.
    """
    from .images import list_images

    files = [r.file for r in list_images(inputs, labels="none").records]
    encoder = encoder or QueryEncoder(idx.provenance, weights=weights, device=device)
    emb = encoder.embed(files)
    ok_files = [f for f, ok in zip(files, emb.ok) if ok]
    failures = [(f, f"{e[0]}: {e[1]}") for f, ok, e in zip(files, emb.ok, emb.errors) if not ok]
    if not ok_files:
        return [], failures
    exclude = None
    if exclude_self:
        by_path = {idx.absolute_path(p): p for p in range(len(idx))} if len(idx) <= 5_000_000 else {}
        exclude = [by_path.get(str(Path(f).resolve())) for f in ok_files]
    return idx.search(emb.embeddings, k, exclude=exclude, names=ok_files, labels=labels), failures


def _query_precision(provenance: dict, device: str) -> str:
    """The precision the features were made with, so queries land in the same space."""
    from .backbone import resolve_device

    p = provenance.get("precision", "fp32")
    return "fp32" if p == "fp16" and resolve_device(device) == "cpu" else p


def load_vectors(path: str | os.PathLike) -> np.ndarray:
    """Query vectors from .npy, or from Parquet (an `embedding` column or a shard)."""
    path = Path(path)
    if path.suffix == ".npy":
        return np.load(path)
    if path.suffix == ".parquet":
        from .shards import embeddings_of

        t = read_table(path)
        if "embedding" not in t.column_names:
            raise InputError(f"{path} has no 'embedding' column.")
        if hasattr(t.schema.field("embedding").type, "list_size") and t.schema.field("embedding").type.list_size > 0:
            return embeddings_of(t)
        return np.asarray(t.column("embedding").to_pylist(), np.float32)
    raise InputError(f"--vectors takes a .npy or .parquet file, not {path.name}.")
