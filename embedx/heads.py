"""Classifier heads on fixed features, and a whole learning-rate x weight-decay grid of them
trained in one pass over the data (as DINOv2's linear evaluation does).

`HeadBank` holds G heads. Their first-layer weights are concatenated for the forward pass,
so each batch costs one (B x D) @ (D x G*C) matmul instead of G; every head keeps its own
parameters, so each gets its own optimiser settings and early-stopping state.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

HEAD_KINDS = ("linear", "mlp")


@dataclass(frozen=True)
class HeadSpec:
    kind: str  # linear | mlp
    lr: float
    weight_decay: float
    hidden: int = 0
    dropout: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.kind}_lr{self.lr:g}_wd{self.weight_decay:g}"


class Head(nn.Module):
    """One classifier head with its feature standardisation built in (mean/std buffers)."""

    def __init__(self, kind: str, dim: int, num_classes: int, hidden: int = 1024, dropout: float = 0.5):
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {kind!r}")
        self.kind = kind
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        if kind == "linear":
            self.fc = nn.Linear(dim, num_classes)
        else:
            self.fc1 = nn.Linear(dim, hidden)
            self.drop = nn.Dropout(dropout)
            self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = (x - self.mean) / self.std
        if self.kind == "linear":
            return self.fc(x)
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def make_head(kind: str, dim: int, num_classes: int, hidden: int = 1024, dropout: float = 0.5) -> Head:
    return Head(kind, dim, num_classes, hidden, dropout)


def build_grid(kind: str, lrs: list[float], weight_decays: list[float], hidden: int, dropout: float) -> list[HeadSpec]:
    if kind not in HEAD_KINDS:
        from .errors import InputError

        raise InputError(f"--head must be one of {', '.join(HEAD_KINDS)}, not {kind!r}.")
    return [HeadSpec(kind, lr, wd, hidden if kind == "mlp" else 0, dropout if kind == "mlp" else 0.0)
            for lr in lrs for wd in weight_decays]


def _bank(specs: list[HeadSpec], dim: int, num_classes: int, seed: int):
    heads = []
    for s in specs:
        # every head starts from the same seeded weights: a head's result does not depend
        # on which other heads share the sweep
        torch.manual_seed(seed)
        heads.append(make_head(s.kind, dim, num_classes, s.hidden or 1, s.dropout))
    return nn.ModuleList(heads)


def _bank_forward(heads, specs: list[HeadSpec], x):
    """(B, D) -> (G, B, C) for all heads at once (standardisation already applied to x)."""
    kind = specs[0].kind
    if kind == "linear":
        W = torch.cat([h.fc.weight for h in heads], 0)  # (G*C, D)
        b = torch.cat([h.fc.bias for h in heads], 0)
        G, C = len(heads), heads[0].fc.out_features
        return torch.addmm(b, x, W.t()).view(x.shape[0], G, C).transpose(0, 1)
    W1 = torch.cat([h.fc1.weight for h in heads], 0)  # (G*H, D)
    b1 = torch.cat([h.fc1.bias for h in heads], 0)
    G, H = len(heads), heads[0].fc1.out_features
    hid = torch.relu(torch.addmm(b1, x, W1.t())).view(x.shape[0], G, H).transpose(0, 1)  # (G, B, H)
    hid = torch.stack([h.drop(hid[g]) for g, h in enumerate(heads)])
    W2 = torch.stack([h.fc2.weight for h in heads])  # (G, C, H)
    b2 = torch.stack([h.fc2.bias for h in heads])  # (G, C)
    return torch.baddbmm(b2[:, None, :], hid, W2.transpose(1, 2))


@dataclass
class GridResult:
    specs: list[HeadSpec]
    best_index: int
    best_head: object  # nn.Module with standardisation buffers set
    val_accuracy: list[float]  # best val accuracy per head
    best_epoch: list[int]
    epochs_run: int


def train_grid(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, num_classes: int,
               specs: list[HeadSpec], *, epochs: int = 100, batch_size: int = 1024, patience: int = 10,
               class_weights: np.ndarray | None = None, device: str = "cpu", seed: int = 0,
               progress: bool = False) -> GridResult:
    """Train every head of `specs` together; keep each head's best epoch on validation.

    Features are standardised with statistics of the training split only.
    """
    g = torch.Generator().manual_seed(seed)
    dim = x_train.shape[1]
    mean = torch.from_numpy(x_train.mean(0, dtype=np.float64).astype(np.float32))
    std = torch.from_numpy(x_train.std(0, dtype=np.float64).astype(np.float32)).clamp_min(1e-6)
    xt = ((torch.from_numpy(np.ascontiguousarray(x_train, np.float32)) - mean) / std).to(device)
    xv = ((torch.from_numpy(np.ascontiguousarray(x_val, np.float32)) - mean) / std).to(device)
    yt = torch.from_numpy(y_train.astype(np.int64)).to(device)
    yv = torch.from_numpy(y_val.astype(np.int64)).to(device)
    heads = _bank(specs, dim, num_classes, seed).to(device)
    opt = torch.optim.AdamW([{"params": h.parameters(), "lr": s.lr, "weight_decay": s.weight_decay}
                             for h, s in zip(heads, specs)])
    steps_per_epoch = math.ceil(len(xt) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    cw = torch.from_numpy(class_weights.astype(np.float32)).to(device) if class_weights is not None else None
    loss_fn = nn.CrossEntropyLoss(weight=cw)
    G = len(specs)
    best_acc = [-1.0] * G
    best_epoch = [0] * G
    best_state = [None] * G
    stale = 0
    epoch = 0
    for epoch in range(1, epochs + 1):
        heads.train()
        perm = torch.randperm(len(xt), generator=g).to(device)
        for s in range(0, len(xt), batch_size):
            idx = perm[s:s + batch_size]
            logits = _bank_forward(heads, specs, xt[idx])  # (G, B, C)
            # heads share no parameters: the sum's gradient is each head's own gradient
            loss = loss_fn(logits.reshape(-1, num_classes), yt[idx].repeat(G))
            opt.zero_grad(set_to_none=True)
            (loss * G).backward()
            opt.step()
            sched.step()
        heads.eval()
        with torch.no_grad():
            correct = torch.zeros(G, device=device)
            for s in range(0, len(xv), 8192):
                pred = _bank_forward(heads, specs, xv[s:s + 8192]).argmax(-1)
                correct += (pred == yv[s:s + 8192]).sum(1)
            acc = (correct / max(1, len(xv))).tolist()
        improved = False
        for i, a in enumerate(acc):
            if a > best_acc[i]:
                best_acc[i], best_epoch[i] = a, epoch
                best_state[i] = copy.deepcopy(heads[i].state_dict())
                improved = True
        if progress:
            log.info("epoch %d: best val acc %.4f", epoch, max(acc))
        stale = 0 if improved else stale + 1
        if stale >= patience:
            break
    best = int(np.argmax(best_acc))
    head = make_head(specs[best].kind, dim, num_classes, specs[best].hidden or 1, specs[best].dropout)
    head.load_state_dict(best_state[best])
    head.mean.copy_(mean)
    head.std.copy_(std)
    head.eval()
    return GridResult(specs, best, head.cpu(), best_acc, best_epoch, epoch)


def predict_proba(head, x: np.ndarray, batch_size: int = 8192, device: str = "cpu") -> np.ndarray:
    head = head.to(device).eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x[s:s + batch_size], np.float32)).to(device)
            out.append(torch.softmax(head(xb).float(), -1).cpu().numpy())
    return np.concatenate(out) if out else np.empty((0, 0), np.float32)
