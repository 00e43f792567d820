"""The simplex bijection's log|det J| computed from x alone (``numpyro_psvi.jacobians``,
``pyro_psvi.jacobians``): the transforms' own value, and a finite gradient at the float32
edge where their own formula's is not."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as ndist
import pytest
import torch
from numpyro.distributions import constraints as nconstraints
from numpyro.distributions.transforms import biject_to as nbiject_to
from torch.distributions import biject_to as tbiject_to
from torch.distributions import constraints as tconstraints

import numpyro_psvi
from numpyro_psvi.jacobians import constrained_value
from numpyro_psvi.jacobians import log_abs_det_jacobian as n_log_det
from pyro_psvi.jacobians import log_abs_det_jacobian as p_log_det

# A particle of NumPyro's ProdLDA example (a Dirichlet user guide clipped at concentration
# e^-5): its first coordinate maps to float32's smallest normal, 1.18e-38.
EDGE = np.array([-85.95026, -1.3124332, -0.82119465, 16.350798], np.float32)


def _torch_log_det_and_grad(x: np.ndarray, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """torch's own log|det J| of the simplex bijection and its gradient, in float64 (no
    underflow on these points: the reference for both backends, whose maps are the same)."""
    t = tbiject_to(tconstraints.simplex)
    x64 = torch.as_tensor(x, dtype=torch.float64).requires_grad_(True)
    value = t.log_abs_det_jacobian(x64, t(x64))
    (scale * value.sum()).backward()
    return value.detach().numpy(), x64.grad.numpy()


def test_the_stable_simplex_log_det_is_the_transforms_own():
    """Against the float64 reference: torch's in float64 to 1e-10 relative, NumPyro's in
    float32 to its round-off (terms up to ~80 nats, float32 eps 1.2e-7: 1e-4)."""
    x = np.random.default_rng(0).normal(size=(200, 5)) * 4
    expected, _ = _torch_log_det_and_grad(x)
    t = tbiject_to(tconstraints.simplex)
    xt = torch.as_tensor(x)
    np.testing.assert_allclose(p_log_det(t, xt, t(xt)).numpy(), expected, rtol=1e-10)
    tn = nbiject_to(nconstraints.simplex)
    xn = jnp.asarray(x, jnp.float32)
    np.testing.assert_allclose(n_log_det(tn, xn, tn(xn)), expected, rtol=1e-5, atol=1e-4)


def test_its_gradient_at_the_float32_edge_is_finite_and_right():
    """At EDGE under a plate's N/B = 10 the transforms' own float32 gradient is wrong (its
    ``1/y = 8.5e37``, times 10, overflows: NumPyro's comes out NaN, torch's clamp gives 0
    for the edge coordinate, where the float64 reference is 10); the stable one's equals
    the reference to float32 round-off."""
    _, exact = _torch_log_det_and_grad(EDGE, scale=10.0)
    t = nbiject_to(nconstraints.simplex)
    x = jnp.asarray(EDGE)
    own = jax.grad(lambda x: 10 * t.log_abs_det_jacobian(x, t(x)))(x)
    assert not np.allclose(own, exact, rtol=1e-3, equal_nan=False)
    np.testing.assert_allclose(jax.grad(lambda x: 10 * n_log_det(t, x, t(x)))(x), exact, rtol=1e-5, atol=1e-5)
    tt = tbiject_to(tconstraints.simplex)
    xt = torch.as_tensor(EDGE).requires_grad_(True)
    (10 * tt.log_abs_det_jacobian(xt, tt(xt))).backward()
    assert not np.allclose(xt.grad.numpy(), exact, rtol=1e-3)
    xt = torch.as_tensor(EDGE).requires_grad_(True)
    (10 * p_log_det(tt, xt, tt(xt))).backward()
    np.testing.assert_allclose(xt.grad.numpy(), exact, rtol=1e-5, atol=1e-5)


def test_numpyros_simplex_point_stays_inside_the_simplex_at_the_float32_edge():
    """A draw of Dirichlet(0.05) over four coordinates whose third stick is at the clip: the
    transform's own image has an exact 0 there (the clipped fraction times the stick left
    is subnormal, which XLA's CPU flushes), where the Dirichlet density is NaN; the kept
    one is at float32's smallest normal, the density finite; elsewhere the two agree exactly."""
    t = nbiject_to(nconstraints.simplex)
    x = jnp.asarray([-4.453146, -6.91487, -87.33218])
    assert float(t(x)[2]) == 0.0 and not np.isfinite(ndist.Dirichlet(jnp.ones(4)).log_prob(t(x)))
    kept = constrained_value(t, x)
    assert float(kept.min()) == np.finfo(np.float32).tiny
    assert np.isfinite(ndist.Dirichlet(jnp.ones(4)).log_prob(kept))
    inside = jnp.asarray(np.random.default_rng(0).normal(size=(100, 4)) * 5, jnp.float32)
    np.testing.assert_array_equal(constrained_value(t, inside), t(inside))


def _dirichlet_model(y, num, batch, size):
    with numpyro.plate("docs", num, subsample_size=batch) as idx:
        theta = numpyro.sample("theta", ndist.Dirichlet(jnp.ones(size)))
        numpyro.sample("obs", ndist.Normal(theta @ jnp.arange(float(size)), 0.5), obs=y[idx])


def _dirichlet_guide(y, num, batch, size):
    concentration = numpyro.param("conc", jnp.full((num, size), 0.05), constraint=nconstraints.positive)
    with numpyro.plate("docs", num, subsample_size=batch) as idx:
        numpyro.sample("theta", ndist.Dirichlet(concentration[idx]))


@pytest.mark.slow  # 19 s each (compiling a user-guide engine); the pieces are tested above
@pytest.mark.parametrize("size", [2, 4])
def test_a_dirichlet_user_guide_at_small_concentrations_is_not_rejected(size):
    """A local Dirichlet(0.05) user guide in a plate subsampled 20 of 200: about 1.3% of its
    draws' coordinates underflow to 1.18e-38 (Gamma(0.05) below float32's smallest normal),
    so most updates hold such a particle. With the transform's own log|det J| its score was
    NaN (2 coordinates: 7 of 30 updates rejected), and with more coordinates a later one
    mapped back to an exact 0 (4 coordinates: 21 rejected, 8 with the log|det J| fixed);
    now none is."""
    y = jnp.asarray(np.random.default_rng(0).normal(0.5, 0.5, size=200), jnp.float32)
    model = partial(_dirichlet_model, num=200, batch=20, size=size)
    guide = partial(_dirichlet_guide, num=200, batch=20, size=size)
    engine = numpyro_psvi.ProximalScoreVI(model, guide, numpyro.optim.Adam(1e-2))
    result = engine.run(jax.random.PRNGKey(0), 30, y, progress_bar=False)
    assert int(result.state.num_rejected) == 0
