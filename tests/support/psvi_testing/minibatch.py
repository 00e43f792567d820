"""A subsampled Bayesian linear regression with a known posterior (issue 19's target).

``y = x @ w + N(0, 1)`` with ``w ~ N(0, I)``: the posterior precision is ``I + x'x``.
A diagonal Gaussian guide's exact optimum (of the ELBO and of score matching alike) has
the posterior mean and the precisions ``diag(I + x'x)``.
"""

import numpy as np

N, B, D = 2000, 100, 5


def regression(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``x`` (N, D) and ``y`` (N,), float32."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D)).astype(np.float32)
    return x, (x @ rng.normal(size=D) + rng.normal(size=N)).astype(np.float32)


def mean_field_optimum(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact optimum of a diagonal Gaussian guide: (mean, sd), float64."""
    precision = np.eye(D) + x.T.astype(np.float64) @ x
    return np.linalg.solve(precision, x.T @ y), 1 / np.sqrt(np.diag(precision))


UPDATES = 6000
INDEPENDENT_UPDATES = 18000


def check_fit(loc: np.ndarray, scale: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """Means within 0.2 posterior sd and sds within 20% of the exact optimum, after
    :data:`UPDATES` updates with reshuffled batches (the default) or
    :data:`INDEPENDENT_UPDATES` with independent ones.

    Why these bounds can be met (and fail when something is wrong): each update's
    location target carries the mini-batch's gradient noise, about sqrt(N/B) = 4.5
    posterior sds, and the engine's average (iterate ``i`` weighted by ``i^5``) keeps
    ``n (2p + 1) / (p + 1)^2 = 0.31 n`` of ``n`` updates. With independent batches its
    error per coordinate was measured at rms 0.117 sd after 6,000 updates (Adam(1e-2),
    6 seeds x 5 coordinates); it falls like ``1/sqrt(n)``, to ~0.068 at 18,000, so 0.2
    is 3 standard errors for the worst of five coordinates. With reshuffled batches an
    epoch's batches cancel at a fixed guide and 3,000 updates already leave 0.02-0.1 sd
    (:func:`check_reshuffled_fit`). The sds come from the curvature averaged over all
    updates, of ``S - 1 = 3`` degrees of freedom each (~1% error), so 20% is far out of
    reach of noise, while the objective of issue 19 ended at 0.6-0.8.
    """
    mean, sd = mean_field_optimum(x, y)
    assert np.max(np.abs(loc - mean) / sd) < 0.2, (loc, mean, sd)
    np.testing.assert_allclose(scale / sd, 1.0, atol=0.2)


LOGISTIC_WEIGHTS, LOGISTIC_BIAS = np.array([1.0, -0.5, 0.25, 0.0, 0.75]), -0.3


def logistic_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A logistic regression's ``x`` (N, D) float32, independent standard normal
    features, and labels ``y`` (N,) int32 drawn from the true weights and bias."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D)).astype(np.float32)
    logits = x @ LOGISTIC_WEIGHTS + LOGISTIC_BIAS
    return x, (rng.uniform(size=N) < 1 / (1 + np.exp(-logits))).astype(np.int32)


def check_against_reference(loc: np.ndarray, scale: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> None:
    """A mean-field fit of the subsampled logistic regression against the NUTS posterior:
    means within 0.2 posterior sd, sds within 20%, after :data:`UPDATES` updates.

    The bounds as in :func:`check_fit`: B=100 of N=2000 puts ~4.5 sds of noise in each
    update's location, the average of 6,000 updates keeps ~0.08 sd of it, so 0.2 is 2.5
    standard errors for the worst of six coordinates. A mean-field guide's sds are the
    conditional ones, 1/sqrt(diag(precision)); with these independent features they are
    within ~7% of NUTS's marginal sds (measured: ratios 0.93-1.03), far inside 20%, while
    the objective before issue 19's fix ended at 0.6-0.8. A full-covariance guide's are
    the marginal ones (the posterior is near-Gaussian: measured 0.98-1.01), where the
    coupled objective ended at 0.77-0.87. NUTS's own Monte Carlo error (2,000 draws, two
    chains) is ~0.02 sd in the means and ~2% in the sds.
    """
    assert np.max(np.abs(loc - mean) / sd) < 0.2, (loc, mean, sd)
    np.testing.assert_allclose(scale / sd, 1.0, atol=0.2)


RESHUFFLED_UPDATES = 3000


def check_reshuffled_fit(loc: np.ndarray, scale: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """Means within 0.1 posterior sd and sds within 20% of the exact optimum after
    :data:`RESHUFFLED_UPDATES` updates with reshuffled batches and Adam(1e-2).

    Why 0.1 can be met here and fails without reshuffling: with independent batches the
    average of 3,000 updates keeps ~0.17 sd of batch noise per coordinate (rms 0.117 at
    6,000, see :func:`check_fit`), and the worst of five coordinates ended 0.10-0.29 sd
    off (docs/minibatch.md, sections 4 and 9). With reshuffling the 20
    batches of an epoch are a partition of the data, so at a fixed guide their location
    targets average to the full-data one exactly; what is left is the guide's own
    movement within an epoch, measured at 0.04, 0.09 and 0.03 sd (seeds 0-2; the test
    runs seed 0): 0.1 is above the worst of those.
    """
    mean, sd = mean_field_optimum(x, y)
    assert np.max(np.abs(loc - mean) / sd) < 0.1, (loc, mean, sd)
    np.testing.assert_allclose(scale / sd, 1.0, atol=0.2)


def correlated_regression(seed: int = 0, correlation: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """The regression of :func:`regression` with AR(1)-correlated features
    (``corr(x_i, x_j) = correlation^|i - j|``), so that the posterior's correlations
    (up to -0.6 between neighbours) matter to a full-covariance guide."""
    rng = np.random.default_rng(seed)
    lags = np.abs(np.subtract.outer(np.arange(D), np.arange(D)))
    x = rng.normal(size=(N, D)) @ np.linalg.cholesky(correlation**lags).T
    return x.astype(np.float32), (x @ rng.normal(size=D) + rng.normal(size=N)).astype(np.float32)


def check_full_covariance_fit(loc: np.ndarray, cov: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """A full-covariance Gaussian fit of the subsampled regression against the exact
    posterior ``N(P^-1 x'y, P^-1)``, ``P = I + x'x``, after :data:`RESHUFFLED_UPDATES`
    updates with reshuffled batches and Adam(1e-2): means within 0.1 posterior sd (the
    bound of :func:`check_reshuffled_fit`; measured 0.04-0.06 over three seeds), sds
    within 10% and correlations within 0.1.

    The covariance is fitted from ``S - 1 = 3`` degrees of freedom per update, averaged
    over thousands of updates: its noise is a few percent (measured: sd ratios
    0.99-1.00, KL 0.002-0.003 over three seeds), so 10% is far out of its reach, while
    the coupled objective, whose precision absorbs the batch's common score shift,
    ended with sd ratios 0.80-0.96 (KL 0.16-0.18; docs/minibatch.md section 11).
    """
    precision = np.eye(D) + x.T.astype(np.float64) @ x
    exact_cov = np.linalg.inv(precision)
    mean, sd = exact_cov @ (x.T @ y), np.sqrt(np.diag(exact_cov))
    assert np.max(np.abs(loc - mean) / sd) < 0.1, (loc, mean, sd)
    fitted_sd = np.sqrt(np.diag(cov))
    np.testing.assert_allclose(fitted_sd / sd, 1.0, atol=0.1)
    np.testing.assert_allclose(cov / np.outer(fitted_sd, fitted_sd), exact_cov / np.outer(sd, sd), atol=0.1)


def check_flow_fit(draws: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """A flow guide's ``(n, D)`` draws against the exact posterior ``N(P^-1 x'y, P^-1)``,
    ``P = I + x'x``, after :data:`RESHUFFLED_UPDATES` updates with the defaults and
    Adam(1e-2): means within 0.2 posterior sd and sds within 20% (issue 19's band).

    Why the band can be met with the defaults (up to five inner steps without the Fisher
    term, stopped once the map has moved past the budget; the averaged iterate, the
    unscaled trust region) and fails without them: each update's optimum follows its
    batch (~sqrt(N/B) = 4.5 posterior sds of noise), and the last iterate's means were
    measured to jitter 0.9-1.9 sds about the right ones (their time average within 0.04
    sd, NumPyro, seed 0). The returned guide averages the flow's network weights, which
    stands for the average of its distributions only while each update moves them
    little: with the trust region scaled by ``N/B`` the averaged flow ended 0.48 sd off,
    with K = 20 and the last iterate 3.0 sds (sds up to 4x); with the defaults 0.08-0.13
    sd and sd ratios 1.01-1.13 over seeds 0-2 in NumPyro, 0.05-0.08 sd and 0.97-1.23 in
    Pyro (seed 1's largest sd still shrinking at 3,000 updates, as with one inner step;
    seed 0, this test's, 1.17; Pyro's AutoIAFNormal diverged on a logistic regression
    with the Fisher term kept: :func:`psvi.objective.transport_fisher_weight`). Draws
    add ``1/sqrt(n)`` sd of Monte Carlo error (0.007 at ``n = 20,000``).
    """
    precision = np.eye(D) + x.T.astype(np.float64) @ x
    cov = np.linalg.inv(precision)
    mean, sd = cov @ (x.T @ y), np.sqrt(np.diag(cov))
    assert np.max(np.abs(draws.mean(0) - mean) / sd) < 0.2, (draws.mean(0), mean, sd)
    np.testing.assert_allclose(draws.std(0) / sd, 1.0, atol=0.2)
