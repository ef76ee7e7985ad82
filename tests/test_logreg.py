"""The L-BFGS logistic-regression solver against scikit-learn and against itself."""

import numpy as np
import pytest
import torch

from embedx.heads import build_l2_grid, predict_proba, train_lbfgs
from embedx.knn import knn_neighbours
from embedx.logreg import array_chunks, fit_logreg
from embedx.train import HeadConfig, train_head

from .conftest import clustered
from .test_index import write_features


def correlated(n=3000, dim=48, classes=4, seed=0):
    """Clustered classes seen through a random mixing: strongly correlated features, as CNN
    features are (what the whitening preconditioner is for)."""
    x, y = clustered(n, 12, classes, seed=seed, spread=2.5)
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((12, dim)).astype(np.float32)
    x = np.maximum(x @ mix + 0.3 * rng.standard_normal((n, dim)).astype(np.float32), 0) + 1.0
    return x.astype(np.float32), y


def objective(x, y, W, b, l2):
    z = x.astype(np.float64) @ W.T.astype(np.float64) + b
    z -= z.max(1, keepdims=True)
    lse = np.log(np.exp(z).sum(1))
    return float((lse - z[np.arange(len(y)), y]).mean() + 0.5 * l2 * (W.astype(np.float64) ** 2).sum())


def test_same_optimum_as_sklearn_at_equal_l2():
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = correlated()
    xs = (x - x.mean(0)) / x.std(0)
    l2 = 1e-3
    r = fit_logreg(array_chunks(torch.from_numpy(xs), torch.from_numpy(y), rows=512), xs.shape[1], 4, [l2],
                   sample=torch.from_numpy(xs[:1000]), tol=1e-6)
    # the exact reference: a Newton solver (scikit-learn 1.9.1's default lbfgs stops after 39
    # iterations here at an objective 3.5e-7 above this optimum, its weights 3e-3 off)
    clf = sklearn.LogisticRegression(C=1 / (l2 * len(y)), tol=1e-8, max_iter=5000, solver="newton-cholesky").fit(xs, y)
    ours = objective(xs, y, r.weight[0], r.bias[0], l2)
    theirs = objective(xs, y, clf.coef_, clf.intercept_, l2)
    assert r.converged[0]
    assert ours == pytest.approx(r.loss[0], rel=1e-5)  # the loss it reports is the loss it reached
    assert ours <= theirs + 1e-6, (ours, theirs)
    np.testing.assert_allclose(r.weight[0], clf.coef_, atol=2e-3)
    assert ((xs @ r.weight[0].T + r.bias[0]).argmax(1) == clf.predict(xs)).mean() > 0.995


def test_heads_fitted_together_equal_heads_fitted_alone():
    x, y = correlated(seed=1)
    xs = torch.from_numpy((x - x.mean(0)) / x.std(0))
    src = array_chunks(xs, torch.from_numpy(y), rows=700)
    l2s = [1e-4, 1e-3, 1e-1]
    together = fit_logreg(src, xs.shape[1], 4, l2s, sample=xs[:800], tol=1e-6)
    assert all(together.converged)
    assert together.n_iter[2] < together.n_iter[0]  # a strong L2 converges sooner and leaves the pass
    for k, l2 in enumerate(l2s):
        alone = fit_logreg(src, xs.shape[1], 4, [l2], sample=xs[:800], tol=1e-6)
        np.testing.assert_allclose(together.weight[k], alone.weight[0], atol=1e-3)
        assert together.loss[k] == pytest.approx(alone.loss[0], rel=1e-6)


def test_whitening_preconditioner_reaches_the_same_optimum_in_fewer_steps():
    x, y = correlated(seed=2)
    xs = torch.from_numpy((x - x.mean(0)) / x.std(0))
    src = array_chunks(xs, torch.from_numpy(y))
    plain = fit_logreg(src, xs.shape[1], 4, [1e-4], tol=1e-5)
    pre = fit_logreg(src, xs.shape[1], 4, [1e-4], sample=xs[:1500], tol=1e-5)
    assert plain.converged[0] and pre.converged[0]
    assert pre.loss[0] == pytest.approx(plain.loss[0], abs=1e-5)
    assert pre.n_iter[0] < plain.n_iter[0], (pre.n_iter, plain.n_iter)


def _near_duplicates(seed=2, rows=7, dim=1280):
    """A handful of rows of one image's features with noise in a third of the columns: hundreds of
    constant features, as when a small class folder holds copies of one photo (seen in use:
    train-head crashed in float32's eigensolver)."""
    rng = np.random.default_rng(seed)
    base = rng.random(dim).astype(np.float32)
    x = np.repeat(base[None], rows, 0)
    cols = rng.choice(dim, 480, replace=False)
    x[:, cols] += rng.normal(0, 0.01, (rows, 480)).astype(np.float32) * (rng.random((rows, 1)) > 0.3)
    return x


def test_degenerate_features_train_whatever_the_eigensolver_does(monkeypatch, caplog):
    from embedx import logreg
    from embedx.heads import column_stats

    x = _near_duplicates()
    y = np.array([0, 1, 0, 1, 0, 1, 0])
    mean, std = column_stats(x)
    src = array_chunks(torch.from_numpy(x), torch.from_numpy(y))
    fit = lambda: fit_logreg(src, x.shape[1], 2, [1e-2], sample=torch.from_numpy(x), mean=mean, std=std)
    chance = float(np.log(2))  # the loss at zero weights

    def made_progress(r):
        return np.isfinite(r.weight).all() and 0 <= r.loss[0] < 0.5 * chance

    assert made_progress(fit())  # however this machine's float32 eigensolver takes these rows
    real_eigh = torch.linalg.eigh
    calls = []

    def eigh(a, *args, fail_for=(torch.float32,), **kwargs):
        calls.append(a.dtype)
        if a.dtype in fail_for:
            raise torch.linalg.LinAlgError("failed to converge (simulated)")
        return real_eigh(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    assert made_progress(fit())
    assert calls == [torch.float32, torch.float64]  # asked again in float64
    monkeypatch.setattr(torch.linalg, "eigh", lambda a, *r, **k: eigh(a, *r, fail_for=(torch.float32, torch.float64), **k))
    with caplog.at_level("WARNING", logger="embedx.logreg"):
        assert made_progress(fit())  # unwhitened: the same objective, more steps
    assert "without whitening" in caplog.text
    assert logreg._whitening_basis(torch.zeros(3, 3), [1.0], 1.0) is None


def test_standardisation_folded_into_the_weights_equals_standardised_rows():
    x, y = correlated(seed=3)
    mean, std = x.mean(0), x.std(0)
    yt = torch.from_numpy(y)
    raw = fit_logreg(array_chunks(torch.from_numpy(x), yt), x.shape[1], 4, [1e-3], mean=torch.from_numpy(mean),
                     std=torch.from_numpy(std), sample=torch.from_numpy(x[:1000]), tol=1e-6)
    xs = (x - mean) / std
    std_rows = fit_logreg(array_chunks(torch.from_numpy(xs), yt), x.shape[1], 4, [1e-3],
                          sample=torch.from_numpy(xs[:1000]), tol=1e-6)
    np.testing.assert_allclose(raw.weight[0], std_rows.weight[0], atol=1e-3)
    assert raw.loss[0] == pytest.approx(std_rows.loss[0], rel=1e-5)


def test_class_weights_equal_duplicated_rows():
    """A weight of 2 on class 0 is the same objective as every class-0 row seen twice."""
    x, y = correlated(n=1200, seed=4)
    xs = (x - x.mean(0)) / x.std(0)
    w = np.where(y == 0, 2.0, 1.0).astype(np.float32)
    weighted = fit_logreg(array_chunks(torch.from_numpy(xs), torch.from_numpy(y), torch.from_numpy(w)),
                          xs.shape[1], 4, [1e-3], tol=1e-6)
    dup = np.concatenate([np.arange(len(y)), np.nonzero(y == 0)[0]])
    twice = fit_logreg(array_chunks(torch.from_numpy(xs[dup]), torch.from_numpy(y[dup])), xs.shape[1], 4, [1e-3],
                       tol=1e-6)
    np.testing.assert_allclose(weighted.weight[0], twice.weight[0], atol=1e-3)


def test_train_lbfgs_picks_the_best_l2_on_validation_and_builds_a_head():
    x, y = correlated(n=2000, seed=5)
    specs = build_l2_grid([1e-5, 1e-3, 10.0])
    r = train_lbfgs(x[:1500], y[:1500], x[1500:], y[1500:], 4, specs)
    assert len(r.val_accuracy) == 3
    assert r.val_accuracy[2] < max(r.val_accuracy)  # l2 = 10 underfits
    assert r.best_index == int(np.argmax(r.val_accuracy))
    # the head standardises raw rows itself and reproduces the validation accuracy
    acc = (predict_proba(r.best_head, x[1500:]).argmax(1) == y[1500:]).mean()
    assert acc == pytest.approx(r.val_accuracy[r.best_index], abs=1e-9)


@pytest.mark.parametrize("head,solver", [("linear", "lbfgs"), ("mlp", "adamw")])
def test_streamed_features_train_like_features_in_memory(tmp_path, head, solver):
    """--stream yes reads the rows through memory-mapped files chunk by chunk; L-BFGS then
    reaches the same head as from memory, AdamW (chunk-shuffled) a head as good."""
    x, c = clustered(3000, 24, 4, seed=6, spread=1.6)
    feats = write_features(tmp_path / "f", x, labels=[f"c{i}" for i in c], shard_size=700)
    cfg = dict(head=head, solver=solver, hidden=32, epochs=15, lrs=(3e-3,), weight_decays=(1e-4,))
    mem = train_head(feats, tmp_path / "mem", HeadConfig(stream="no", **cfg))
    disk = train_head(feats, tmp_path / "disk", HeadConfig(stream="yes", **cfg))
    assert disk["streamed"] and not mem["streamed"]
    assert not (tmp_path / "disk" / "_stream").exists()  # the memory-mapped copies are removed
    assert disk["num_train"] == mem["num_train"] and disk["num_val"] == mem["num_val"]
    assert disk["knn_k20_accuracy"] == pytest.approx(mem["knn_k20_accuracy"])
    if solver == "lbfgs":
        assert all(row["stop"] in ("gtol", "ftol", "line search", "max_iter") for row in mem["sweep"])
        assert disk["val_accuracy"] == pytest.approx(mem["val_accuracy"], abs=1e-9)
        assert disk["best"] == mem["best"]
    else:
        assert disk["val_accuracy"] > 0.9 and abs(disk["val_accuracy"] - mem["val_accuracy"]) < 0.05


def test_chunked_knn_equals_one_chunk():
    x, y = clustered(500, 16, 3, seed=7)
    q = x[::7] + 0.05
    sim1, lab1 = knn_neighbours(x, y, q, 20)
    sim2, lab2 = knn_neighbours(x, y, q, 20, train_rows=37, query_rows=11)
    np.testing.assert_allclose(sim1.numpy(), sim2.numpy(), atol=1e-6)
    assert (lab1 == lab2).float().mean() > 0.99  # ties may swap
