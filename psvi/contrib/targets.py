"""Test targets with exact posteriors (NumPy only)."""

from __future__ import annotations

import numpy as np


def ill_conditioned_gaussian(
    dim: int, condition: float, seed: int = 0, diagonal: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a Gaussian with eigenvalues log-spaced over ``condition``.

    Eigenvalues run from ``condition**-0.5`` to ``condition**0.5`` (geometric mean 1);
    the eigenvectors are a random rotation unless ``diagonal``.
    """
    rng = np.random.default_rng(seed)
    eig = np.logspace(-0.5, 0.5, dim) ** np.log10(condition)
    rng.shuffle(eig)
    mean = rng.normal(size=dim)
    if diagonal:
        return mean, np.diag(eig)
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    q = q * np.sign(np.diag(r))
    cov = (q * eig) @ q.T
    return mean, 0.5 * (cov + cov.T)


def conjugate_linear_regression(
    x: np.ndarray, y: np.ndarray, prior_scale: float, noise_scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Exact posterior mean and covariance of ``w ~ N(0, prior_scale^2 I)``, ``y ~ N(Xw, noise^2)``."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    precision = x.T @ x / noise_scale**2 + np.eye(x.shape[1]) / prior_scale**2
    cov = np.linalg.inv(precision)
    mean = cov @ x.T @ y / noise_scale**2
    return mean, 0.5 * (cov + cov.T)


def hierarchical_data(num: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Data of a hierarchical target with one local latent per data point whose posterior
    is exact under a mean-field Gaussian guide: ``y`` (the locals' data, ``N(0, 4)``) and
    ``w`` (the global's, ``N(1.5, 1)``), float32. The model: ``mu ~ N(0, 10^2)``; per
    member ``z_i ~ N(0, 1)``, ``s_i ~ LogNormal(0.5, 0.5)``, ``y_i ~ N(z_i, 1)``,
    ``w_i ~ N(mu, 1)`` (:func:`hierarchical_posterior`)."""
    rng = np.random.default_rng(seed)
    return (2 * rng.normal(size=num)).astype(np.float32), (1.5 + rng.normal(size=num)).astype(np.float32)


def hierarchical_posterior(y: np.ndarray, w: np.ndarray) -> dict[str, tuple]:
    """``{site: (loc, sd)}`` in unconstrained space for :func:`hierarchical_data`'s model.
    Independent blocks: ``z_i | y_i ~ N(y_i / 2, 1/2)``; ``log s_i ~ N(0.5, 0.5^2)`` (prior
    only, exact in unconstrained space with the log-Jacobian); ``mu | w ~ N(sum w / P,
    1 / P)`` with ``P = N + 1/100``."""
    num, precision = len(w), len(w) + 0.01
    return {
        "z": (np.asarray(y, np.float64) / 2, np.full(num, 0.5**0.5)),
        "s": (np.full(num, 0.5), np.full(num, 0.5)),
        "mu": (float(np.sum(w, dtype=np.float64)) / precision, precision**-0.5),
    }


CONJUGATE_PRIOR = 2.0


def conjugate_data(num: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Data of the two one-latent conjugate targets (:func:`conjugate_posterior`):
    observations of precision 4 (``N(0, 0.5^2)``) and coin flips of bias 0.3, float32."""
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 0.5, num).astype(np.float32), (rng.random(num) < 0.3).astype(np.float32)


def conjugate_posterior(target: str, data: np.ndarray) -> tuple[float, float]:
    """The exact posterior's ``(a, b)``: ``Gamma(a, b)`` of the precision ``tau`` for
    ``"precision"`` (``tau ~ Gamma(2, 2)``, ``data_n ~ N(0, 1 / tau)``), ``Beta(a, b)`` of
    the bias ``p`` for ``"coin"`` (``p ~ Beta(2, 2)``, ``data_n ~ Bernoulli(p)``)."""
    data = np.asarray(data, np.float64)
    if target == "precision":
        return CONJUGATE_PRIOR + len(data) / 2, CONJUGATE_PRIOR + float(np.sum(data**2)) / 2
    heads = float(np.sum(data))
    return CONJUGATE_PRIOR + heads, CONJUGATE_PRIOR + len(data) - heads


def conjugate_mean_args(target: str, shape: float, mean: float) -> tuple[float, float]:
    """The ``(a, b)`` of the backends' ``conjugate_mean_guide`` with shape ``k`` and mean
    ``m``: ``Gamma(k, k / m)`` (``"precision"``) or ``Beta(k m, k (1 - m))``."""
    return (shape, shape / mean) if target == "precision" else (shape * mean, shape * (1 - mean))


def conjugate_unconstrained_moments(target: str, a: float, b: float) -> tuple[float, float]:
    """Mean and sd of ``log tau`` for ``tau ~ Gamma(a, b)`` (``"precision"``), of ``logit p``
    for ``p ~ Beta(a, b)`` (``"coin"``): the coordinates the engines fit them in."""
    from scipy.special import digamma, polygamma  # scipy comes with either backend (arviz)

    if target == "precision":
        return float(digamma(a) - np.log(b)), float(np.sqrt(polygamma(1, a)))
    return float(digamma(a) - digamma(b)), float(np.sqrt(polygamma(1, a) + polygamma(1, b)))


FACTOR_SCALES = (3.0, 1.0, 0.3)
"""The loadings' column norms of :func:`factor_analysis`: posterior sds 0.32, 0.71, 0.96."""


def factor_analysis(
    num: int, dim: int = 10, scales: tuple[float, ...] = FACTOR_SCALES, seed: int = 0, loadings_seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The loadings ``W`` (``dim x L``, orthogonal columns of norms ``scales``) and ``num``
    draws of ``x = W z + e``, ``z ~ N(0, I_L)``, ``e ~ N(0, I_dim)`` (the draws float32): a linear
    latent model whose posterior :func:`factor_analysis_posterior` is what an amortized
    diagonal-Gaussian guide with a linear encoder can represent exactly."""
    rng = np.random.default_rng(loadings_seed)
    q, r = np.linalg.qr(rng.normal(size=(dim, len(scales))))
    loadings = q * np.sign(np.diag(r)) * np.asarray(scales)
    draws = np.random.default_rng(seed)
    z = draws.normal(size=(num, len(scales)))
    return loadings, (z @ loadings.T + draws.normal(size=(num, dim))).astype(np.float32)


def factor_analysis_posterior(loadings: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact posterior of each ``z_n`` given ``x_n`` under :func:`factor_analysis`'s
    model: means ``(n, L)`` and sds ``(L,)``. The columns are orthogonal, so the posterior
    precision ``I + W^T W`` is diagonal: ``sd_j = (1 + |w_j|^2)^(-1/2)``, mean
    ``sd^2 * W^T x``."""
    variances = 1.0 / (1.0 + np.sum(loadings**2, axis=0))
    return np.asarray(x, np.float64) @ loadings * variances, np.sqrt(variances)


def crossed_effects(rows: int, cols: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Data ``y`` (``rows x cols``, float32) of ``y_ij ~ N(mu + a_i + b_j, 1)`` with ``N(0, 1)``
    priors on ``x = (mu, a, b)``, and the best diagonal Gaussian of its posterior (reverse
    KL to a Gaussian): the posterior mean and the sds ``1 / sqrt(diag P)``. Only the priors
    pin the direction ``mu + c, a_i - c, b_j - c``: a weakly identified direction."""
    rng = np.random.default_rng(seed)
    y = rng.normal(size=rows)[:, None] + rng.normal(size=cols)[None, :] + 0.5 + rng.normal(size=(rows, cols))
    design = _crossed_design(rows, cols)
    precision = np.eye(design.shape[1]) + design.T @ design
    mean = np.linalg.solve(precision, design.T @ y.ravel())
    return y.astype(np.float32), mean, 1 / np.sqrt(np.diag(precision))


def crossed_effects_marginal_sds(rows: int, cols: int) -> np.ndarray:
    """The marginal posterior sds of ``x = (mu, a, b)`` in :func:`crossed_effects`'s model
    (the diagonal of ``P^-1``; the data do not enter): the mission's unit, larger than the
    best diagonal Gaussian's sds along the weakly identified direction."""
    design = _crossed_design(rows, cols)
    return np.sqrt(np.diag(np.linalg.inv(np.eye(design.shape[1]) + design.T @ design)))


def _crossed_design(rows: int, cols: int) -> np.ndarray:
    """The ``(rows * cols, 1 + rows + cols)`` design of ``y_ij ~ N(mu + a_i + b_j, 1)``."""
    design = np.zeros((rows, cols, 1 + rows + cols))
    design[:, :, 0] = 1.0
    design[np.arange(rows), :, 1 + np.arange(rows)] = 1.0
    design[:, np.arange(cols), 1 + rows + np.arange(cols)] = 1.0
    return design.reshape(rows * cols, -1)


def random_intercept_logistic_data(
    groups: int = 100, per_group: int = 20, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Covariate ``x`` and outcomes ``y`` (``groups x per_group``, float32) of a
    random-intercept logistic regression, ``logit P(y_gj = 1) = 0.3 + 0.8 a_g + x_gj`` with
    ``a_g ~ N(0, 1)``. No closed-form posterior: the reference for a guide is that guide's
    exact-score fit (benchmarks/minibatch.py)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(groups, per_group))
    logits = 0.3 + 0.8 * rng.normal(size=groups)[:, None] + x
    y = rng.random((groups, per_group)) < 1 / (1 + np.exp(-logits))
    return x.astype(np.float32), y.astype(np.float32)


def random_slope_logistic_data(
    groups: int = 100, per_group: int = 20, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Covariate ``x`` and outcomes ``y`` (``groups x per_group``, float32) of a logistic
    regression with a random intercept and a random slope per group, ``logit P(y_gj = 1) =
    0.3 + 0.8 a_g + (1 + 0.6 b_g) x_gj`` with ``a_g, b_g ~ N(0, 1)``. No closed-form
    posterior: the reference for a guide is that guide's exact-score fit."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(groups, per_group))
    logits = 0.3 + 0.8 * rng.normal(size=groups)[:, None] + (1.0 + 0.6 * rng.normal(size=groups)[:, None]) * x
    y = rng.random((groups, per_group)) < 1 / (1 + np.exp(-logits))
    return x.astype(np.float32), y.astype(np.float32)


EARNINGS_ROWS = 1059


def earnings_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Heights (inches) and earnings (dollars) of PosteriorDB's earnings size and scale: a
    regression far from unit scale (sds 1e4 and 160 for the coefficients, 0.02 for log sigma)."""
    rng = np.random.default_rng(seed)
    height = rng.normal(66.6, 3.8, EARNINGS_ROWS)
    return height, -61000 + 1300 * height + rng.normal(0, 19000, EARNINGS_ROWS)


def _earnings_least_squares(height: np.ndarray, earn: np.ndarray) -> tuple[np.ndarray, ...]:
    """The earnings regression's design ``X``, least-squares coefficients, ``s^2 = RSS / (N -
    2)`` and degrees of freedom ``N - 2``."""
    design = np.column_stack([np.ones(len(height)), height])
    coef, rss = np.linalg.lstsq(design, earn, rcond=None)[:2]
    dof = len(height) - 2
    return design, coef, rss[0] / dof, dof


def earnings_posterior(height: np.ndarray, earn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Means and sds of (intercept, slope, log sigma) for ``earn ~ N(b1 + b2 height, sigma)``
    under flat priors: the coefficients' Student-t (least-squares mean, covariance
    ``s^2 (X'X)^-1 (N-2)/(N-4)``), and log sigma ~ log s with sd ``1/sqrt(2N)`` (its
    Gaussian limit; the error is O(1/N) of an sd)."""
    design, coef, s2, dof = _earnings_least_squares(height, earn)
    coef_cov = s2 * np.linalg.inv(design.T @ design) * dof / (dof - 2)
    mean = np.append(coef, 0.5 * np.log(s2))
    return mean, np.append(np.sqrt(np.diag(coef_cov)), 1 / np.sqrt(2 * len(height)))


def earnings_diagonal_optimum(height: np.ndarray, earn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Means and sds of the best diagonal Gaussian (reverse KL) to :func:`earnings_posterior`'s
    posterior in its Gaussian form: the least-squares means, the coefficients' conditional
    sds ``1/sqrt(diag(X'X)/s^2)`` (they correlate -0.999), log sigma's ``1/sqrt(2N)``."""
    design, coef, s2, _ = _earnings_least_squares(height, earn)
    conditional_sd = 1 / np.sqrt(np.diag(design.T @ design) / s2)
    return np.append(coef, 0.5 * np.log(s2)), np.append(conditional_sd, 1 / np.sqrt(2 * len(height)))
