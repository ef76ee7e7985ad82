"""Weighted k-nearest-neighbour classification on features (the DINO evaluation): each of
the k most cosine-similar training samples votes for its class with weight exp(sim / T)."""

from __future__ import annotations

import numpy as np


def knn_predict_proba(x_train: np.ndarray, y_train: np.ndarray, x_query: np.ndarray, num_classes: int,
                      k: int = 20, temperature: float = 0.07, chunk: int = 1024, device: str = "cpu") -> np.ndarray:
    """Class scores (rows sum to 1) for each query; memory bounded by chunk x N_train."""
    import torch

    xt = torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(x_train, np.float32)).to(device), dim=1)
    yt = torch.from_numpy(y_train.astype(np.int64)).to(device)
    k = min(k, len(xt))
    out = []
    for s in range(0, len(x_query), chunk):
        q = torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(x_query[s:s + chunk], np.float32)).to(device), dim=1)
        sim, idx = (q @ xt.T).topk(k, dim=1)
        w = (sim / temperature).exp()
        votes = torch.zeros(len(q), num_classes, device=device)
        votes.scatter_add_(1, yt[idx], w)
        out.append((votes / votes.sum(1, keepdim=True)).cpu().numpy())
    return np.concatenate(out) if out else np.empty((0, num_classes), np.float32)


def knn_accuracy(x_train, y_train, x_val, y_val, num_classes: int, ks=(10, 20), temperature: float = 0.07,
                 device: str = "cpu") -> dict[str, float]:
    res = {}
    for k in ks:
        p = knn_predict_proba(x_train, y_train, x_val, num_classes, k=k, temperature=temperature, device=device)
        res[f"knn_k{k}_accuracy"] = float((p.argmax(1) == y_val).mean()) if len(y_val) else float("nan")
    return res
