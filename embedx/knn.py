"""Weighted k-nearest-neighbour classification on features (the DINO evaluation): each of
the k most cosine-similar training samples votes for its class with weight exp(sim / T).

The training rows are read once, in chunks (they may be a memory-mapped array larger than
memory); every query keeps a running top-k over the chunks seen so far.
"""

from __future__ import annotations

import numpy as np


def knn_neighbours(x_train: np.ndarray, y_train: np.ndarray, x_query: np.ndarray, k: int, *,
                   train_rows: int = 65536, query_rows: int = 1024, device: str = "cpu"):
    """(similarities, labels) of each query's k most cosine-similar training rows, best first."""
    import torch
    from torch.nn.functional import normalize

    from .heads import row_chunks

    k = min(k, len(x_train))
    nq = len(x_query)
    best_sim = torch.full((nq, k), -float("inf"), device=device)
    best_lab = torch.zeros((nq, k), dtype=torch.int64, device=device)

    def normalised_queries():
        return ((s, normalize(q, dim=1)) for s, q in row_chunks(x_query, query_rows, device))

    # up to 1 GiB of queries stay normalised on the device; beyond that they are re-read per chunk
    kept = list(normalised_queries()) if nq * x_query.shape[1] * 4 <= 2**30 else None
    for t, xc in row_chunks(x_train, train_rows, device):
        xt = normalize(xc, dim=1)
        yt = torch.from_numpy(y_train[t:t + len(xc)].astype(np.int64)).to(device)
        kk = min(k, len(xt))
        for s, q in kept if kept is not None else normalised_queries():
            sim, idx = (q @ xt.T).topk(kk, dim=1)
            sims = torch.cat([best_sim[s:s + len(q)], sim], 1)
            labs = torch.cat([best_lab[s:s + len(q)], yt[idx]], 1)
            top, pos = sims.topk(k, dim=1)  # sorted: the first k' columns are the top-k'
            best_sim[s:s + len(q)] = top
            best_lab[s:s + len(q)] = labs.gather(1, pos)
    return best_sim, best_lab


def _votes(sim, lab, num_classes: int, k: int, temperature: float) -> np.ndarray:
    import torch

    w = (sim[:, :k] / temperature).exp()
    votes = torch.zeros(len(sim), num_classes, device=sim.device)
    votes.scatter_add_(1, lab[:, :k], w)
    return (votes / votes.sum(1, keepdim=True)).cpu().numpy()


def knn_predict_proba(x_train: np.ndarray, y_train: np.ndarray, x_query: np.ndarray, num_classes: int,
                      k: int = 20, temperature: float = 0.07, device: str = "cpu") -> np.ndarray:
    """Class scores (rows sum to 1) for each query."""
    if len(x_query) == 0:
        return np.empty((0, num_classes), np.float32)
    sim, lab = knn_neighbours(x_train, y_train, x_query, k, device=device)
    return _votes(sim, lab, num_classes, k, temperature)


def knn_accuracy(x_train, y_train, x_val, y_val, num_classes: int, ks=(10, 20), temperature: float = 0.07,
                 device: str = "cpu") -> dict[str, float]:
    """Accuracy for each k in `ks`, from one pass over the training rows."""
    if len(y_val) == 0:
        return {f"knn_k{k}_accuracy": float("nan") for k in ks}
    sim, lab = knn_neighbours(x_train, y_train, x_val, max(ks), device=device)
    return {f"knn_k{k}_accuracy": float((_votes(sim, lab, num_classes, k, temperature).argmax(1) == y_val).mean())
            for k in ks}
