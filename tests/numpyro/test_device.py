"""The NumPyro engine on a GPU (skipped without one): the CPU tests' fit, on the GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer.autoguide import AutoNormal
from psvi_testing import minibatch

from numpyro_psvi import ProximalScoreVI

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU backend for JAX")


def regression_model(x, y):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([minibatch.D]).to_event(1))
    with numpyro.plate("data", minibatch.N, subsample_size=minibatch.B):
        batch_x = numpyro.subsample(x, event_dim=1)
        numpyro.sample("y", dist.Normal(batch_x @ w, 1.0), obs=numpyro.subsample(y, event_dim=0))


def test_subsampled_regression_on_the_gpu_has_the_exact_mean_field_posterior():
    """tests/numpyro/test_minibatch.py's default fit (bounds derived in
    ``minibatch.check_fit``) with the data and the state on the GPU."""
    x, y = minibatch.regression(seed=0)
    svi = ProximalScoreVI(regression_model, AutoNormal(regression_model), numpyro.optim.Adam(1e-2))
    data = [jax.device_put(jnp.asarray(a), jax.devices("gpu")[0]) for a in (x, y)]
    result = svi.run(jax.random.PRNGKey(0), minibatch.UPDATES, *data, progress_bar=False)
    loc, scale = (result.params[f"w_auto_{name}"] for name in ("loc", "scale"))
    assert loc.devices() == {jax.devices("gpu")[0]} and int(result.state.num_rejected) == 0
    minibatch.check_fit(np.asarray(loc, np.float64), np.asarray(scale, np.float64), x, y)
