"""Property tests (hypothesis, fixed derivation): random targets, the NumPyro engine."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from numpyro.infer.initialization import init_to_value

from numpyro_psvi import ProximalScoreVI
from numpyro_psvi.contrib.models import gaussian_target
from psvi.contrib.targets import ill_conditioned_gaussian
from psvi.metrics import gaussian_kl

# derandomize: the examples are a fixed function of the test, so CI is reproducible.
PROPERTY = settings(max_examples=8, deadline=None, derandomize=True)


def scan_run(svi, num_updates, *args):
    state = svi.init(jax.random.PRNGKey(0), *args)
    return jax.jit(lambda s: jax.lax.scan(lambda s, _: svi.update(s, *args), s, None, length=num_updates))(
        state
    )


@pytest.mark.slow  # 17-42 s on the 2-core CI machine: the default suite keeps its budget
@PROPERTY
@given(dim=st.integers(2, 6), log10_condition=st.floats(0.0, 2.0), seed=st.integers(0, 10**6))
def test_random_gaussian_targets_converge(dim, log10_condition, seed):
    """D <= 6, condition <= 100, from N(0, 0.1^2 I): KL < 0.05 within 4,000 score calls.

    The study (docs/gaussian_study.md) reaches KL < 0.01 at D=10 and condition 10 in
    200 to 1,100 calls; 4,000 calls and 0.05 leave room for constant-step jitter.
    """
    mean, cov = ill_conditioned_gaussian(dim, 10.0**log10_condition, seed=seed)
    model = gaussian_target(mean, cov)
    guide = AutoMultivariateNormal(model, init_loc_fn=init_to_value(values={"x": jnp.zeros(dim)}))
    svi = ProximalScoreVI(model, guide, numpyro.optim.Adam(1e-2))
    state, losses = scan_run(svi, 1000)
    params = svi.get_params(state)
    tril = np.asarray(params["auto_scale_tril"], np.float64)
    assert int(state.num_rejected) == 0
    assert gaussian_kl(mean, cov, np.asarray(params["auto_loc"], np.float64), tril @ tril.T) < 0.05


@pytest.mark.slow  # 17-42 s on the 2-core CI machine: the default suite keeps its budget
@PROPERTY
@given(
    rate=st.floats(0.1, 10.0),
    a=st.floats(0.5, 5.0),
    b=st.floats(0.5, 5.0),
    alpha=st.lists(st.floats(0.5, 5.0), min_size=2, max_size=4),
    sigma=st.floats(0.2, 2.0),
)
def test_random_constrained_supports_stay_finite_and_fit(rate, a, b, alpha, sigma):
    """Positive, unit-interval, simplex and log-normal latents (the prior is the target):
    every update accepted, finite params, and the loss, -ELBO = KL(q || p) (the target is
    normalized), falls by half."""

    def model():
        numpyro.sample("pos", dist.Exponential(rate))
        numpyro.sample("unit", dist.Beta(a, b))
        numpyro.sample("simplex", dist.Dirichlet(jnp.asarray(alpha)))
        numpyro.sample("lognormal", dist.LogNormal(0.0, sigma))

    svi = ProximalScoreVI(model, AutoNormal(model), numpyro.optim.Adam(1e-2))
    state, losses = scan_run(svi, 1500)
    losses = np.asarray(losses)
    assert int(state.num_rejected) == 0 and np.isfinite(losses).all()
    flat = np.concatenate([np.ravel(v) for v in svi.get_params(state).values()])
    assert np.isfinite(flat).all()
    assert np.median(losses[-100:]) < 0.5 * np.median(losses[:10])
