"""LogME (You, Liu, Wang and Long, "LogME: Practical Assessment of Pre-trained Models for Transfer Learning",
ICML 2021): how well a backbone's features suit a labelled task, without training anything.

For each class ``c``, the one-hot target ``y_c`` is modelled as a Bayesian linear regression on the features
``F`` (``n x d``): weights ``w ~ N(0, alpha^-1 I)``, noise ``N(0, beta^-1)``. The log evidence
``log p(y_c | F, alpha, beta)`` is maximised over ``alpha`` and ``beta`` by the paper's fixed-point iteration
(MacKay's evidence approximation); LogME is the maximum divided by ``n``, averaged over classes. Higher is
better; values compare backbones on the same images and labels, not across datasets.

One eigendecomposition of the smaller Gram matrix (``F^T F`` or ``F F^T``) serves every class and every
iteration, so each step costs ``O(min(n, d))`` (the paper's fast version, written here from its equations).
"""

from __future__ import annotations

import numpy as np

MAX_ITERATIONS = 100
TOLERANCE = 1e-6  # relative change of alpha/beta that ends the iteration


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """The LogME score of ``features`` (``n x d``) for the integer ``labels`` (``n``; classes ``0..C-1``).

    One BLAS thread: on these small products two threads were 5-7x slower on a busy 2-core host."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return _logme(features, labels)


def _logme(features: np.ndarray, labels: np.ndarray) -> float:
    F = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    n, d = F.shape
    if n < 2 or len(y) != n:
        raise ValueError(f"logme: need 2 or more rows with one label each (got {n} rows, {len(y)} labels)")
    if n >= d:  # eigen-pairs of F^T F: sigma (squared singular values) and V
        sigma, V = np.linalg.eigh(F.T @ F)
        keep = sigma > sigma.max() * 1e-12
        sigma, V = sigma[keep], V[:, keep]
        project = lambda t: (V.T @ (F.T @ t)) / np.sqrt(sigma)  # noqa: E731  (U^T t)
    else:  # eigen-pairs of F F^T: the same sigma, and U directly
        sigma, U = np.linalg.eigh(F @ F.T)
        keep = sigma > sigma.max() * 1e-12
        sigma, U = sigma[keep], U[:, keep]
        project = lambda t: U.T @ t  # noqa: E731
    classes = np.unique(y)
    return float(
        np.mean([_evidence(sigma, project((y == c).astype(np.float64)), float((y == c).sum()), n, d) for c in classes])
    )


def _evidence(sigma: np.ndarray, z: np.ndarray, yy: float, n: int, d: int) -> float:
    """Maximised log evidence / n of one target, from the eigenvalues ``sigma`` of ``F^T F`` (the non-zero
    ones), the target's coordinates ``z = U^T y`` and ``yy = y^T y``."""
    outside = max(yy - float(z @ z), 0.0)  # the part of y no weight vector can reach
    alpha, beta = 1.0, 1.0
    for _ in range(MAX_ITERATIONS):
        shrink = beta * sigma / (alpha + beta * sigma)
        gamma = float(shrink.sum())  # effective number of parameters
        m2 = float(((shrink * z) ** 2 / sigma).sum())  # ||m||^2, m = beta A^-1 F^T y
        res2 = float(((1 - shrink) * z) @ ((1 - shrink) * z)) + outside  # ||F m - y||^2
        new_alpha = gamma / max(m2, 1e-300)
        new_beta = (n - gamma) / max(res2, 1e-300)
        done = abs(new_alpha - alpha) / alpha < TOLERANCE and abs(new_beta - beta) / beta < TOLERANCE
        alpha, beta = new_alpha, new_beta
        if done:
            break
    shrink = beta * sigma / (alpha + beta * sigma)
    m2 = float(((shrink * z) ** 2 / sigma).sum())
    res2 = float(((1 - shrink) * z) @ ((1 - shrink) * z)) + outside
    logdet = float(np.log(alpha + beta * sigma).sum()) + (d - len(sigma)) * np.log(alpha)  # log |A|
    evidence = (
        n / 2 * np.log(beta)
        + d / 2 * np.log(alpha)
        - n / 2 * np.log(2 * np.pi)
        - beta / 2 * res2
        - alpha / 2 * m2
        - logdet / 2
    )
    return float(evidence / n)
