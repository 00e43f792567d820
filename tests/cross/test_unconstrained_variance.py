"""Closed-form variances of constrained sites in their unconstrained space (the covariance
weighting of mean-field user-written guides), both backends."""

import math

import numpyro.distributions as ndist
import pyro.distributions as pdist
import pytest
import torch
from numpyro.distributions.transforms import biject_to as nbiject_to
from torch.distributions import biject_to as pbiject_to

from numpyro_psvi.guides import unconstrained_variance as n_variance
from pyro_psvi.guides import unconstrained_score as p_score
from pyro_psvi.guides import unconstrained_variance as p_variance

CASES = [
    ("Beta", (2.5, 0.7)),
    ("Gamma", (3.0, 2.0)),
    ("InverseGamma", (2.5, 1.5)),
    ("LogNormal", (0.3, 0.6)),
    ("Exponential", (2.0,)),
    ("HalfNormal", (1.7,)),
    ("HalfCauchy", (0.4,)),
    ("Normal", (0.3, 1.4)),
]


@pytest.mark.parametrize("name, args", CASES, ids=[name for name, _ in CASES])
def test_closed_form_is_the_variance_of_the_unconstrained_draws_in_both_backends(name, args):
    p_fn = getattr(pdist, name)(*map(torch.tensor, args))
    exact = p_variance(p_fn, pbiject_to(p_fn.support))
    n_fn = getattr(ndist, name)(*args)
    torch.testing.assert_close(
        torch.as_tensor(float(n_variance(n_fn, nbiject_to(n_fn.support)))), exact, rtol=1e-6, atol=0.0
    )
    # The sample variance of 200,000 unconstrained draws has the standard error
    # sqrt((m4 - var^2) / n) (fourth central moment m4): 4 of them.
    torch.manual_seed(0)
    draws = 200_000
    unconstrained = pbiject_to(p_fn.support).inv(p_fn.sample((draws,))).double()
    centred = unconstrained - unconstrained.mean()
    variance = (centred**2).mean()
    standard_error = math.sqrt(float((centred**4).mean() - variance**2) / draws)
    assert abs(float(variance) - float(exact)) < 4 * standard_error


def test_a_family_under_another_bijection_has_no_closed_form():
    # A Beta's values under the log (a site on the positive reals): not known, so drawn.
    with pytest.raises(NotImplementedError, match="Beta"):
        p_variance(pdist.Beta(2.0, 3.0), pbiject_to(pdist.Gamma(1.0, 1.0).support))
    with pytest.raises(NotImplementedError, match="Beta"):
        n_variance(ndist.Beta(2.0, 3.0), nbiject_to(ndist.Gamma(1.0, 1.0).support))


def test_batched_and_independent_sites_keep_their_shapes():
    fn = pdist.Gamma(torch.tensor([1.0, 2.0, 3.0]), 1.0).to_event(1)
    variance = p_variance(fn, pbiject_to(fn.support))
    torch.testing.assert_close(variance, torch.polygamma(1, torch.tensor([1.0, 2.0, 3.0])))
    n_fn = ndist.HalfCauchy(torch.ones(2, 3).numpy()).to_event(1)
    assert n_variance(n_fn, nbiject_to(n_fn.support)).shape == (2, 3)


def test_expanded_and_masked_sites_take_their_base_distributions_variance():
    # A plate expands a guide's scalar-parameter site; a mask leaves its draws alone.
    exact = torch.polygamma(1, torch.tensor(2.0))
    p_fn = pdist.Gamma(2.0, 1.0).expand([3]).mask(False)
    torch.testing.assert_close(p_variance(p_fn, pbiject_to(p_fn.support)).expand(3), exact.expand(3))
    n_fn = ndist.Gamma(2.0, 1.0).expand([3]).mask(False)
    n_value = torch.as_tensor(float(n_variance(n_fn, nbiject_to(n_fn.support))))
    torch.testing.assert_close(n_value, exact, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("name, args", CASES, ids=[name for name, _ in CASES])
def test_closed_form_score_is_the_gradient_of_the_unconstrained_log_density(name, args):
    """Pyro's ``unconstrained_score`` (the mean-field guides' inner-step score) against
    autograd of ``log fn(T(u)) + log|T'(u)|`` at points spread over the unconstrained
    line, in float64 (an exact identity: round-off only)."""
    fn = getattr(pdist, name)(*(torch.tensor(arg, dtype=torch.float64) for arg in args))
    transform = pbiject_to(fn.support)
    u = torch.linspace(-3.0, 3.0, 13, dtype=torch.float64, requires_grad=True)
    x = transform(u)
    log_density = fn.log_prob(x) + transform.log_abs_det_jacobian(u, x)
    (expected,) = torch.autograd.grad(log_density.sum(), u)
    torch.testing.assert_close(p_score(fn, transform, u.detach()), expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(NotImplementedError, match="Beta"):  # another bijection's: none
        p_score(pdist.Beta(2.0, 3.0), pbiject_to(pdist.Gamma(1.0, 1.0).support), u.detach())


def test_closed_form_score_of_a_normal_mapped_by_the_sites_bijection():
    support = torch.distributions.constraints.interval(0.0, 10.0)
    transform = pbiject_to(support)
    base = pdist.Normal(torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64))
    fn = pdist.TransformedDistribution(base, list(transform.parts))
    u = torch.linspace(-3.0, 3.0, 13, dtype=torch.float64, requires_grad=True)
    x = transform(u)
    (expected,) = torch.autograd.grad((fn.log_prob(x) + transform.log_abs_det_jacobian(u, x)).sum(), u)
    torch.testing.assert_close(p_score(fn, transform, u.detach()), expected, rtol=1e-10, atol=1e-12)


def test_a_dirichlets_stick_breaking_coordinates_have_closed_form_variances():
    """Under the simplex's stick-breaking bijection a Dirichlet's coordinates are
    logit-Betas of its independent stick fractions: the closed form against the sample
    variances of 200,000 draws (4 standard errors each, as above) and their correlations
    (independent: a sample correlation's standard error is 1/sqrt(n); 4 of them), both
    backends equal, and a tail of 1e-3 after a concentration of 1e6 kept in float32
    (summed from the end, not as a total minus a prefix, which rounds it to 0)."""
    concentration = torch.tensor([0.5, 2.0, 1.2, 5.0])
    p_fn = pdist.Dirichlet(concentration)
    exact = p_variance(p_fn, pbiject_to(p_fn.support))
    assert exact.shape == (3,)
    n_fn = ndist.Dirichlet(concentration.numpy())
    n_exact = torch.as_tensor(n_variance(n_fn, nbiject_to(n_fn.support)))
    torch.testing.assert_close(n_exact, exact, rtol=1e-5, atol=0)
    torch.manual_seed(0)
    draws = 200_000
    unconstrained = pbiject_to(p_fn.support).inv(p_fn.sample((draws,))).double()
    centred = unconstrained - unconstrained.mean(0)
    variance = (centred**2).mean(0)
    standard_error = (((centred**4).mean(0) - variance**2) / draws).sqrt()
    assert torch.all((variance - exact.double()).abs() < 4 * standard_error)
    correlation = torch.corrcoef(unconstrained.T)
    assert (correlation - torch.eye(3, dtype=torch.float64)).abs().max() < 4 / math.sqrt(draws)
    skewed = [1e6, 1e-3]  # trigamma(1e-3) ~ 1e6; a tail rounded to 0 (ulp of 1e6: 0.06) gives inf
    p_skewed, n_skewed = pdist.Dirichlet(torch.tensor(skewed)), ndist.Dirichlet(torch.tensor(skewed).numpy())
    for value in (
        p_variance(p_skewed, pbiject_to(p_skewed.support)),
        n_variance(n_skewed, nbiject_to(n_skewed.support)),
    ):
        assert math.isfinite(float(value[0])) and float(value[0]) > 1e5
