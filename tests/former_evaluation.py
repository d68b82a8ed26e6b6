"""The evaluation's bootstrap as it was before the speed work of issue 18 (commit c6f8e02), kept only as the reference the
tests compare the current implementation with: the weighted logistic fits with scipy's `expit` and fresh arrays at every
Newton step, AUROC/AP with fresh arrays, and one replicate chunk after another in one thread."""
from collections.abc import Callable

import numpy as np
from scipy.special import expit

from healthml.evaluation.discrimination import bootstrap_weights


def weighted_logistic(X, y, W=None, offset=None, start=None, max_iter: int = 100, tol: float = 1e-9) -> np.ndarray:
    "Logistic regression coefficients (B, k) of y on columns X (n, k) for each weight row of W (B, n)."
    X, y = np.asarray(X, float), np.asarray(y, float)
    W = np.ones((1, len(y))) if W is None else np.atleast_2d(W)
    off = 0.0 if offset is None else np.asarray(offset, float)
    k = X.shape[1]
    beta = np.zeros((W.shape[0], k)) if start is None else np.tile(np.asarray(start, float), (W.shape[0], 1))
    XX = np.stack([X[:, i] * X[:, j] for i in range(k) for j in range(k)], axis=1)   # (n, k*k) products
    loglik = lambda eta: (W * (y * eta - np.logaddexp(0, eta))).sum(1)
    eta = beta @ X.T + off
    for _ in range(max_iter):
        mu = expit(eta)
        grad = (W * (y - mu)) @ X
        H = ((W * mu * (1 - mu)) @ XX).reshape(-1, k, k) + 1e-9 * np.eye(k)           # one BLAS product
        step = np.linalg.solve(H, grad[..., None])[..., 0]
        if np.abs(step).max() > 0.5:             # a long step: backtrack (per replicate) until the likelihood does not fall
            ll, size = loglik(eta), np.ones(len(beta))
            for _ in range(40):
                eta_c = (beta + size[:, None] * step) @ X.T + off
                worse = loglik(eta_c) < ll - 1e-12 * np.abs(ll)
                if not worse.any(): break
                size[worse] *= 0.5
            step = size[:, None] * step
        beta = beta + step
        eta = beta @ X.T + off
        if np.abs(step).max() < tol: break
    return beta


def ranking_metrics(sorted_scores, W) -> tuple[np.ndarray, np.ndarray]:
    "AUROC and average precision for each row of weights `W`, from one pass."
    pos, neg = sorted_scores.pos_neg(W)
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    auroc = (pos * (n_neg[:, None] - fp + 0.5 * neg)).sum(1) / (n_pos * n_neg)   # negatives strictly lower + half the ties
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
    return auroc, (pos * precision).sum(1) / n_pos


def bootstrap(statistics: Callable[[np.ndarray], dict], y_true, patients, n_boot: int, seed: int = 0,
              both_outcomes: bool = True, threads=None) -> dict[str, np.ndarray]:
    "Each statistic on every patient-level bootstrap replicate (without a patient of each outcome: dropped)."
    y = np.asarray(y_true, float)
    reps: dict[str, list] = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for W in bootstrap_weights(patients, n_boot, seed):
            if both_outcomes: W = W[((W @ y) > 0) & ((W @ (1 - y)) > 0)]
            for k, v in statistics(W).items(): reps.setdefault(k, []).append(np.asarray(v, float))
    return {k: np.concatenate(v) for k, v in reps.items()}
