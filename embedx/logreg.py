"""Multinomial logistic regression by full-batch L-BFGS, a whole grid of L2 strengths at once.

This is the linear probe of CLIP's evaluation (L-BFGS logistic regression over a sweep of
regularisation strengths), fitted without scikit-learn's overheads:

* float32 data, never copied to float64;
* one pass over the features per L-BFGS step serves every head of the sweep: the heads'
  weights are concatenated into one (D, K*C) matrix, and each chunk of rows is used for the
  forward and the backward product while it is still in cache;
* the features arrive as chunks from any `ChunkSource` (an in-memory array or a memory-mapped
  file), so the same solver trains on features that do not fit in memory;
* each head keeps its own L-BFGS history, line search and stopping test, and leaves the pass
  as soon as it has converged.

The objective of head k, for weights W (D, C) and bias b (C), is

    sum_i s_i * CE(x_i W + b, y_i) / sum_i s_i  +  l2_k / 2 * ||W||^2

(s_i are class weights, 1 by default), the same as scikit-learn's LogisticRegression with
C = 1 / (l2 * n) -- so at equal l2 both reach the same optimum.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

log = logging.getLogger(__name__)

# a chunk of standardised features, its labels, and optional per-row weights
Chunk = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
ChunkSource = Callable[[], Iterable[Chunk]]


def array_chunks(x: torch.Tensor, y: torch.Tensor, sample_weight: torch.Tensor | None = None,
                 rows: int = 4096) -> ChunkSource:
    """A ChunkSource over tensors already in memory (views, no copies)."""

    def chunks() -> Iterator[Chunk]:
        for s in range(0, len(x), rows):
            yield x[s:s + rows], y[s:s + rows], None if sample_weight is None else sample_weight[s:s + rows]

    return chunks


@dataclass
class LogRegResult:
    weight: np.ndarray  # (K, C, D), nn.Linear layout
    bias: np.ndarray  # (K, C)
    l2: list[float]
    loss: list[float]  # final objective per head
    n_iter: list[int]
    converged: list[bool]  # stopped by the gradient test (gtol) or a negligible decrease (ftol)
    stop: list[str]  # gtol | ftol | line search | max_iter
    passes: int  # passes over the data, all heads together


def _objective(source: ChunkSource, Wt: torch.Tensor, b: torch.Tensor, num_classes: int):
    """Mean weighted cross-entropy and its gradient for K heads in one pass.

    Wt: (K*C, D), b: (K*C,). Returns loss (K,) float64, gW (K*C, D), gb (K*C,).
    Both products keep X in its row-major layout (X @ Wt.T and G.T @ X): the transposed
    product X.T @ G is several times slower with a skinny G.
    """
    K = Wt.shape[0] // num_classes
    loss = torch.zeros(K, dtype=torch.float64, device=Wt.device)
    gW = torch.zeros_like(Wt)
    gb = torch.zeros_like(b)
    total = 0.0
    for xc, yc, sc in source():
        B = xc.shape[0]
        z = torch.nn.functional.linear(xc, Wt, b).view(B, K, num_classes)
        lse = torch.logsumexp(z, -1)  # (B, K)
        at_y = yc.view(B, 1, 1).expand(B, K, 1)
        nll = lse - z.gather(-1, at_y).squeeze(-1)
        p = torch.softmax(z, -1)
        p.scatter_add_(-1, at_y, torch.full((B, K, 1), -1.0, device=z.device, dtype=z.dtype))
        if sc is None:
            loss += nll.sum(0, dtype=torch.float64)
            total += B
        else:
            loss += (nll * sc[:, None]).sum(0, dtype=torch.float64)
            p *= sc.view(B, 1, 1)
            total += float(sc.sum())
        p = p.view(B, K * num_classes)
        gW.addmm_(p.t(), xc)
        gb += p.sum(0)
    if total <= 0:
        raise ValueError("no rows to fit")
    return loss / total, gW / total, gb / total


class _Lbfgs:
    """One head's L-BFGS state over its flat parameter vector (W then b)."""

    def __init__(self, theta: torch.Tensor, memory: int, first_step: float | None = None):
        self.theta = theta
        self.first_step = first_step
        self.memory = memory
        self.s: list[torch.Tensor] = []
        self.y: list[torch.Tensor] = []
        self.rho: list[float] = []
        self.f = float("inf")
        self.g: torch.Tensor | None = None
        self.n_iter = 0
        self.stop = ""  # why it stopped: gtol | ftol | line search | max_iter ("" while running)

    @property
    def converged(self) -> bool:
        return self.stop in ("gtol", "ftol")

    def direction(self) -> torch.Tensor:
        q = -self.g
        alphas = []
        for s, y, rho in zip(reversed(self.s), reversed(self.y), reversed(self.rho)):
            a = rho * float(s @ q)
            q -= a * y
            alphas.append(a)
        if self.s:
            q *= float(self.s[-1] @ self.y[-1]) / float(self.y[-1] @ self.y[-1])
        elif self.first_step is not None:
            q *= self.first_step
        else:
            q /= max(1.0, float(self.g.abs().sum()))  # first step: small, steepest descent
        for (s, y, rho), a in zip(zip(self.s, self.y, self.rho), reversed(alphas)):
            q += (a - rho * float(y @ q)) * s
        return q

    def update(self, step: torch.Tensor, g_new: torch.Tensor) -> None:
        yv = g_new - self.g
        sy = float(step @ yv)
        if sy > 1e-10 * float(yv @ yv):  # keep the curvature pair only if it is positive
            self.s.append(step)
            self.y.append(yv)
            self.rho.append(1.0 / sy)
            if len(self.s) > self.memory:
                self.s.pop(0), self.y.pop(0), self.rho.pop(0)


@dataclass
class _Problem:
    """What every solve shares: sizes, L2 strengths, and the whitening basis (or None)."""

    dim: int
    num_classes: int
    l2: list[float]
    basis: tuple[torch.Tensor, list[torch.Tensor]] | None  # U (D, D), per-head scale (D,)
    curvature: float
    mean: torch.Tensor | None = None  # standardisation, folded into the weights of each pass
    std: torch.Tensor | None = None

    def weights(self, k: int, theta: torch.Tensor) -> torch.Tensor:
        """Head k's weights (C, D) from its parameters: W = (V * d_k) @ U.T when whitened."""
        V = theta[:self.dim * self.num_classes].view(self.num_classes, self.dim)
        if self.basis is None:
            return V
        U, scale = self.basis
        return (V * scale[k]) @ U.t()


def _solve(source: ChunkSource, pb: _Problem, thetas: list[torch.Tensor], *, max_iter: int, tol: float,
           ftol: float, memory: int, max_line_search: int, progress: bool):
    """L-BFGS for every head from `thetas`; returns (heads, passes over the data)."""
    C, D, l2 = pb.num_classes, pb.dim, pb.l2
    K = len(thetas)
    # whitened coordinates: the Hessian is ~ curvature * I, so the first step can be Newton-sized
    first_step = None if pb.basis is None else 1.0 / pb.curvature
    heads = [_Lbfgs(t, memory, first_step) for t in thetas]
    passes = 0

    def evaluate(idx: list[int], thetas: list[torch.Tensor]):
        nonlocal passes
        Ws = [pb.weights(k, t) for k, t in zip(idx, thetas)]
        Wt, b = torch.cat(Ws).float(), torch.cat([t[D * C:] for t in thetas]).float()
        if pb.mean is None:
            loss, gW, gb = _objective(source, Wt, b, C)
        else:
            # ((x - m) / s) @ W.T + b == x @ (W / s).T + (b - (W / s) @ m): the raw rows are used
            # as they are, with no standardised copy and no per-pass elementwise work on them
            Wr = Wt / pb.std
            loss, gWr, gb = _objective(source, Wr, b - Wr @ pb.mean, C)
            gW = (gWr - gb[:, None] * pb.mean) / pb.std
        passes += 1
        out = []
        for j, (k, W) in enumerate(zip(idx, Ws)):
            f = float(loss[j]) + 0.5 * l2[k] * float((W * W).sum())
            gWk = gW[j * C:(j + 1) * C].double() + l2[k] * W
            gbk = gb[j * C:(j + 1) * C].double()
            gV = gWk if pb.basis is None else (gWk @ pb.basis[0]) * pb.basis[1][k]
            # the stopping test looks at the gradient in the weights, whatever the coordinates
            out.append((f, torch.cat([gV.reshape(-1), gbk]), max(float(gWk.abs().max()), float(gbk.abs().max()))))
        return out

    gmax = [0.0] * K
    for k, (f, g, gm) in enumerate(evaluate(list(range(K)), thetas)):
        heads[k].f, heads[k].g, gmax[k] = f, g, gm
        if gm <= tol:
            heads[k].stop = "gtol"
    active = [k for k in range(K) if not heads[k].stop and max_iter > 0]
    while active:
        dirs, steps, slopes = {}, {}, {}
        for k in active:
            d = heads[k].direction()
            slope = float(heads[k].g @ d)
            if slope >= 0:  # not a descent direction: restart from steepest descent
                heads[k].s.clear(), heads[k].y.clear(), heads[k].rho.clear()
                d = heads[k].direction()
                slope = float(heads[k].g @ d)
            dirs[k], steps[k], slopes[k] = d, 1.0, slope
        searching = list(active)
        accepted: dict[int, tuple[float, torch.Tensor, float]] = {}
        full_step: dict[int, float] = {}  # the objective's relative change at the full step
        for _ in range(max_line_search):
            results = evaluate(searching, [heads[k].theta + steps[k] * dirs[k] for k in searching])
            still = []
            for k, (f, g, gm) in zip(searching, results):
                h, t = heads[k], steps[k]
                full_step.setdefault(k, (f - h.f) / max(abs(h.f), abs(f), 1.0))
                if f <= h.f + 1e-4 * t * slopes[k]:  # Armijo: enough decrease
                    accepted[k] = (f, g, gm)
                else:
                    # minimiser of the quadratic through f(0), f'(0) and f(t), kept in [0.1t, 0.5t]
                    denom = 2.0 * (f - h.f - slopes[k] * t)
                    t_new = -slopes[k] * t * t / denom if denom > 0 else 0.5 * t
                    steps[k] = min(max(t_new, 0.1 * t), 0.5 * t)
                    still.append(k)
            searching = still
            if not searching:
                break
        for k in active:
            h = heads[k]
            h.n_iter += 1
            if k not in accepted:  # no decrease found: at the limit of float32 precision
                # where even the full step moved the objective by no more than ftol, it no longer
                # moves: converged, as a negligible decrease is. (The objective's float32 sums are
                # not bit-reproducible between passes that evaluate other sets of heads: ~5e-9
                # relative, enough to fail every Armijo test once the true decrease is below it.)
                h.stop = "ftol" if abs(full_step[k]) <= ftol else "line search"
                continue
            f, g, gmax[k] = accepted[k]
            step = steps[k] * dirs[k]
            h.update(step, g)
            h.theta = h.theta + step
            decrease = (h.f - f) / max(abs(h.f), abs(f), 1.0)
            h.f, h.g = f, g
            if gmax[k] <= tol:
                h.stop = "gtol"
            elif decrease <= ftol:  # the objective no longer moves (float32 sums: ~1e-8 is noise)
                h.stop = "ftol"
        if progress:
            log.info("lbfgs: %d passes, %d heads still active", passes, sum(not heads[k].stop for k in active))
        active = [k for k in active if not heads[k].stop and heads[k].n_iter < max_iter]
    for h in heads:
        if not h.stop:
            h.stop = "max_iter"
    return heads, passes


def _whitening_basis(cov, l2, curvature: float):
    """Eigenvectors of the features' covariance and, per L2 strength, the scales that whiten them.
    float32's eigensolver fails to converge on some degenerate covariances (a handful of near-
    duplicate images: hundreds of constant features and repeated eigenvalues; measured on 7 rows
    x 1280); float64's is then asked, and if it fails too the solve runs unwhitened (the same
    objective and optimum, only more steps), with a warning."""
    import torch

    for dtype in (torch.float32, torch.float64):
        try:
            evals, U = torch.linalg.eigh(cov.to(dtype))
            break
        except torch.linalg.LinAlgError:
            continue
    else:
        log.warning("the features' covariance has no eigendecomposition: L-BFGS runs without whitening")
        return None
    evals, U = evals.double(), U.double()
    return U, [(evals.clamp_min(0) + l2k / curvature).rsqrt() for l2k in l2]


def fit_logreg(source: ChunkSource, dim: int, num_classes: int, l2: list[float], *,
               mean: torch.Tensor | None = None, std: torch.Tensor | None = None, sample: torch.Tensor | None = None,
               curvature: float = 0.1, max_iter: int = 200, tol: float = 1e-4, ftol: float = 1e-8,
               memory: int = 10, max_line_search: int = 10, device: str = "cpu", progress: bool = False) -> LogRegResult:
    """Fit one multinomial logistic regression per L2 strength in `l2`, all in the same passes.

    Args:
        source: the training rows, chunk by chunk.
        mean, std: standardise the rows with these (D,) statistics; the weights returned apply
            to standardised rows.
        sample: a random sample of the rows (a few thousand, as they come from `source`).
            When given, each head is solved in coordinates whitened by (cov + l2/curvature)^(-1/2),
            which makes its Hessian close to `curvature` times the identity: far fewer L-BFGS
            steps on correlated features (measured: 19-22 instead of 58 on 80k x 1280 features).
            (Starting from the sample's own solution was tried and is slower: with weak L2 it
            overfits the sample, and the full solve then needs more steps, not fewer.)
        curvature: the softmax curvature that preconditioner assumes.

    Stops a head when the largest absolute entry of its gradient (in the weights, whatever the
    coordinates) is below `tol` -- scikit-learn's lbfgs test --, when a step decreases the
    objective by less than `ftol` (relative) -- or its line search finds no decrease while the
    full step changes the objective by less than that (float32 noise: converged too) --, when
    its line search cannot decrease it at all (float32 precision), or after `max_iter` steps.
    """
    if not l2 or min(l2) <= 0:
        raise ValueError("every L2 strength must be > 0 (an unregularised fit diverges on separable data)")
    K, C, D = len(l2), num_classes, dim
    basis = None
    if sample is not None:
        xs = sample.to(device=device, dtype=torch.float32)
        if mean is not None:
            xs = (xs - mean.to(device)) / std.to(device)
        basis = _whitening_basis(xs.t() @ xs / len(xs), l2, curvature)
    pb = _Problem(D, C, list(map(float, l2)), basis, curvature,
                  None if mean is None else mean.to(device, torch.float32),
                  None if std is None else std.to(device, torch.float32))
    thetas = [torch.zeros(D * C + C, dtype=torch.float64, device=device) for _ in range(K)]
    opts = dict(max_iter=max_iter, tol=tol, ftol=ftol, memory=memory, max_line_search=max_line_search,
                progress=progress)
    heads, passes = _solve(source, pb, thetas, **opts)
    weight = np.stack([pb.weights(k, h.theta).float().cpu().numpy() for k, h in enumerate(heads)])
    bias = np.stack([h.theta[D * C:].float().cpu().numpy() for h in heads])
    return LogRegResult(weight, bias, pb.l2, [h.f for h in heads], [h.n_iter for h in heads],
                        [h.converged for h in heads], [h.stop for h in heads], passes)
