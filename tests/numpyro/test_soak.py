"""Soak (slow): the digits BNN for 20,000 mini-batch steps, NumPyro engine."""

import resource
from functools import partial

import jax
import numpy as np
import numpyro
import pytest
from numpyro.infer.autoguide import AutoNormal
from numpyro.infer.initialization import init_to_value

from numpyro_psvi import ProximalScoreVI
from numpyro_psvi.contrib.models import mlp_classifier, mlp_init_values
from psvi.contrib.datasets import load_digits


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


@pytest.mark.slow
def test_digits_bnn_soak():
    data = load_digits()
    x, y = jax.numpy.asarray(data.x_train), jax.numpy.asarray(data.y_train)
    model = partial(mlp_classifier, subsample_size=64)
    guide = AutoNormal(model, init_loc_fn=init_to_value(values=mlp_init_values(64)), init_scale=0.01)
    svi = ProximalScoreVI(model, guide, numpyro.optim.Adam(1e-3), inner_steps=5)
    state = svi.init(jax.random.PRNGKey(0), x, y)
    chunk = jax.jit(lambda s: jax.lax.scan(lambda s, _: svi.update(s, x, y), s, None, length=2000))
    rss = []
    for _ in range(10):
        state, losses = chunk(state)
        assert np.isfinite(np.asarray(losses)).all()
        rss.append(current_rss_mb())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"RSS after 2,000 steps {rss[0]:.0f} MB, after 20,000 {rss[-1]:.0f} MB, peak {peak:.0f} MB")
    assert int(state.num_rejected) == 0 and int(state.num_score_calls) == 80000
    flat = np.concatenate([np.ravel(v) for v in svi.get_params(state).values()])
    assert np.isfinite(flat).all()
    # Flat memory: no growth beyond allocator noise between the 1st and 10th chunk.
    assert rss[-1] - rss[0] < 50.0
