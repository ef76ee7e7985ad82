"""Classifier heads on fixed features, a whole sweep of them trained in the same passes.

Two solvers:

* ``lbfgs`` (linear heads): full-batch L-BFGS logistic regression over a grid of L2 strengths
  (`logreg.fit_logreg`), the linear probe of CLIP's evaluation -- converges to the optimum,
  no learning rate to tune;
* ``adamw`` (linear or MLP heads): mini-batch AdamW over a learning-rate x weight-decay grid
  trained in one pass over the data, as DINOv2's linear evaluation does. The heads' first-layer
  weights are concatenated, so each batch costs one (B x D) @ (D x G*C) matmul instead of G;
  every head keeps its own parameters, optimiser settings and early-stopping state.

Features stay raw everywhere (an in-memory array or a `numpy.memmap` of rows that do not fit
in memory); standardisation statistics come from the training rows and are applied per batch
(AdamW) or folded into the weights (L-BFGS). Rows are read in chunks, never all at once.
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
SOLVERS = ("lbfgs", "adamw")


@dataclass(frozen=True)
class HeadSpec:
    kind: str  # linear | mlp
    lr: float  # adamw only
    weight_decay: float  # adamw: decoupled weight decay; lbfgs: the L2 strength
    hidden: int = 0
    dropout: float = 0.0
    solver: str = "adamw"

    @property
    def name(self) -> str:
        if self.solver == "lbfgs":
            return f"{self.kind}_l2{self.weight_decay:g}"
        return f"{self.kind}_lr{self.lr:g}_wd{self.weight_decay:g}"

    def hyperparameters(self) -> dict:
        if self.solver == "lbfgs":
            return {"solver": "lbfgs", "l2": self.weight_decay}
        return {"solver": "adamw", "lr": self.lr, "weight_decay": self.weight_decay}


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
    """The AdamW sweep: every learning rate with every weight decay."""
    if kind not in HEAD_KINDS:
        from .errors import InputError

        raise InputError(f"--head must be one of {', '.join(HEAD_KINDS)}, not {kind!r}.")
    return [HeadSpec(kind, lr, wd, hidden if kind == "mlp" else 0, dropout if kind == "mlp" else 0.0)
            for lr in lrs for wd in weight_decays]


def build_l2_grid(l2s: list[float]) -> list[HeadSpec]:
    """The L-BFGS sweep of linear heads: one per L2 strength."""
    if not l2s or min(l2s) <= 0:
        from .errors import InputError

        raise InputError("--l2 strengths must all be > 0 (e.g. 1e-6,1e-5,1e-4,1e-3).")
    return [HeadSpec("linear", 0.0, l2, solver="lbfgs") for l2 in l2s]


def column_stats(x: np.ndarray, rows: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std (float32 tensors) of `x` in one chunked pass: sums in float32
    within a chunk, float64 across chunks (features are O(1), so E[x^2] - E[x]^2 keeps ample
    precision for standardising)."""
    n, dim = x.shape
    total = torch.zeros(dim, dtype=torch.float64)
    sq = torch.zeros(dim, dtype=torch.float64)
    for s in range(0, n, rows):
        xc = as_tensor(x[s:s + rows])
        total += xc.sum(0).double()
        sq += (xc * xc).sum(0).double()
    mean = total / max(n, 1)
    var = (sq / max(n, 1) - mean * mean).clamp_min(0)
    return mean.float(), var.sqrt().float().clamp_min(1e-6)


def as_tensor(a: np.ndarray) -> torch.Tensor:
    """float32 tensor over `a`: a view when possible, a copy for read-only (memory-mapped) rows."""
    if a.dtype != np.float32 or not a.flags.c_contiguous or not a.flags.writeable:
        a = np.array(a, dtype=np.float32, order="C")
    return torch.from_numpy(a)


def row_chunks(x, rows: int, device: str = "cpu"):
    """Yield (start, float32 tensor on `device`) chunks of x: views of a tensor already there,
    or copies of an array's rows (memory-mapped rows are read per chunk)."""
    for s in range(0, len(x), rows):
        if isinstance(x, torch.Tensor):
            yield s, x[s:s + rows]
        else:
            yield s, as_tensor(x[s:s + rows]).to(device, non_blocking=True)


def resident_on(device: str, x: np.ndarray) -> bool:
    """Whether to hold all of x on `device` once (views per batch) rather than copy it chunk by
    chunk every pass: in-memory rows that fit in half of the accelerator's free memory."""
    if isinstance(x, np.memmap):
        return False
    if torch.device(device).type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return 2 * x.nbytes < free


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
    best_epoch: list[int]  # adamw: epoch of each head's best; lbfgs: each head's L-BFGS steps
    epochs_run: int
    stops: list[str] | None = None  # lbfgs: why each head stopped (gtol | ftol | line search | max_iter)


def _accuracies(logits_fn, x: np.ndarray, y: np.ndarray, mean, std, device: str) -> list[float]:
    """Top-1 accuracy of every head: logits_fn maps standardised rows (B, D) to (G, B, C)."""
    correct = None
    with torch.no_grad():
        for s, xb in row_chunks(x, 8192, device):
            pred = logits_fn((xb - mean) / std).argmax(-1)
            hits = (pred == torch.from_numpy(y[s:s + len(xb)]).to(device)).sum(1)
            correct = hits if correct is None else correct + hits
    if correct is None:
        return []
    return (correct.double() / max(1, len(y))).tolist()


def _batches(x: np.ndarray, y: np.ndarray, batch_size: int, g: torch.Generator, device: str, resident):
    """One epoch of shuffled (x, y) batches.

    In memory, `resident` holds the whole training set on the device and batches are drawn
    from one permutation of all rows. Otherwise (memory-mapped rows, or rows too large for the
    accelerator) they are read in large chunks, in a random
    chunk order, and shuffled within each chunk: sequential reads, bounded memory.
    """
    if resident is not None:
        xt, yt = resident
        perm = torch.randperm(len(xt), generator=g).to(device)
        for s in range(0, len(xt), batch_size):
            idx = perm[s:s + batch_size]
            yield xt[idx], yt[idx]
        return
    chunk = max(batch_size, 65536 // batch_size * batch_size)
    starts = torch.randperm((len(x) + chunk - 1) // chunk, generator=g).tolist()
    for c in starts:
        xc = as_tensor(x[c * chunk:(c + 1) * chunk]).to(device)
        yc = torch.from_numpy(y[c * chunk:(c + 1) * chunk].astype(np.int64)).to(device)
        perm = torch.randperm(len(xc), generator=g).to(device)
        for s in range(0, len(xc), batch_size):
            idx = perm[s:s + batch_size]
            yield xc[idx], yc[idx]


def _finish(spec: HeadSpec, dim: int, num_classes: int, state: dict, mean, std):
    head = make_head(spec.kind, dim, num_classes, spec.hidden or 1, spec.dropout)
    head.load_state_dict(state)
    head.mean.copy_(mean)
    head.std.copy_(std)
    return head.eval()


def train_grid(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, num_classes: int,
               specs: list[HeadSpec], *, epochs: int = 100, batch_size: int = 1024, patience: int = 10,
               class_weights: np.ndarray | None = None, device: str = "cpu", seed: int = 0,
               progress: bool = False) -> GridResult:
    """AdamW: train every head of `specs` together; keep each head's best epoch on validation.

    Features are standardised with statistics of the training split only. Rows held in memory
    are moved to the device once; memory-mapped rows are streamed in chunks every epoch.
    """
    g = torch.Generator().manual_seed(seed)
    dim = x_train.shape[1]
    mean, std = column_stats(x_train)
    md, sd = mean.to(device), std.to(device)
    resident = None
    if resident_on(device, x_train):
        resident = (as_tensor(x_train).to(device),
                    torch.from_numpy(y_train.astype(np.int64)).to(device))
    heads = _bank(specs, dim, num_classes, seed).to(device)
    opt = torch.optim.AdamW([{"params": h.parameters(), "lr": s.lr, "weight_decay": s.weight_decay}
                             for h, s in zip(heads, specs)])
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
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
        for xb, yb in _batches(x_train, y_train, batch_size, g, device, resident):
            logits = _bank_forward(heads, specs, (xb - md) / sd)  # (G, B, C)
            # heads share no parameters: the sum's gradient is each head's own gradient
            loss = loss_fn(logits.reshape(-1, num_classes), yb.repeat(G))
            opt.zero_grad(set_to_none=True)
            (loss * G).backward()
            opt.step()
            sched.step()
        heads.eval()
        acc = _accuracies(lambda xb: _bank_forward(heads, specs, xb), x_val, y_val, md, sd, device)
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
    head = _finish(specs[best], dim, num_classes, {k: v.cpu() for k, v in best_state[best].items()}, mean, std)
    return GridResult(specs, best, head, best_acc, best_epoch, epoch)


def train_lbfgs(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, num_classes: int,
                specs: list[HeadSpec], *, max_iter: int = 200, tol: float = 1e-4,
                class_weights: np.ndarray | None = None, device: str = "cpu", seed: int = 0,
                sample_rows: int = 8192, chunk_rows: int = 4096, progress: bool = False) -> GridResult:
    """L-BFGS: one linear head per L2 strength of `specs`, all fitted in the same passes.

    GridResult.best_epoch holds each head's number of L-BFGS steps.
    """
    from .logreg import fit_logreg

    dim = x_train.shape[1]
    mean, std = column_stats(x_train)
    xs = as_tensor(x_train).to(device) if resident_on(device, x_train) else x_train  # on the device once, or streamed
    ys = torch.from_numpy(y_train.astype(np.int64)).to(device)  # labels are small: always on the device
    ws = None if class_weights is None else torch.from_numpy(class_weights.astype(np.float32)).to(device)[ys]

    def source():
        for s, xc in row_chunks(xs, chunk_rows, device):
            yield xc, ys[s:s + len(xc)], None if ws is None else ws[s:s + len(xc)]
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(x_train), size=min(sample_rows, len(x_train)), replace=False))
    sample = as_tensor(x_train[pick])
    res = fit_logreg(source, dim, num_classes, [s.weight_decay for s in specs], mean=mean, std=std, sample=sample,
                     max_iter=max_iter, tol=tol, device=device, progress=progress)
    if not all(res.converged):
        log.warning("L-BFGS stopped before its tolerance for l2 %s (after %s steps)",
                    [s.weight_decay for s, c in zip(specs, res.converged) if not c], max(res.n_iter))
    Wt = torch.from_numpy(res.weight).to(device)  # (K, C, D)
    bt = torch.from_numpy(res.bias).to(device)
    acc = _accuracies(lambda xb: torch.einsum("bd,kcd->kbc", xb, Wt) + bt[:, None, :], x_val, y_val,
                      mean.to(device), std.to(device), device)
    best = int(np.argmax(acc))
    state = {"mean": mean, "std": std, "fc.weight": torch.from_numpy(res.weight[best]),
             "fc.bias": torch.from_numpy(res.bias[best])}
    head = _finish(specs[best], dim, num_classes, state, mean, std)
    return GridResult(specs, best, head, acc, res.n_iter, max(res.n_iter), res.stop)


def predict_proba(head, x: np.ndarray, batch_size: int = 8192, device: str = "cpu") -> np.ndarray:
    head = head.to(device).eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            xb = as_tensor(x[s:s + batch_size]).to(device)
            out.append(torch.softmax(head(xb).float(), -1).cpu().numpy())
    return np.concatenate(out) if out else np.empty((0, 0), np.float32)
