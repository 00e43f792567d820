"""PosteriorDB translations: Pyro against NumPyro."""

import numpy as np
import pyro
import pytest
import torch
from numpyro.handlers import seed, substitute, trace
from numpyro.infer.initialization import init_to_uniform
from numpyro.infer.util import log_density

from numpyro_psvi.contrib.posteriordb import MODELS as NUMPYRO_MODELS
from psvi.contrib import posteriordb
from pyro_psvi.contrib.posteriordb import MODELS as PYRO_MODELS


@pytest.mark.parametrize("name", posteriordb.NAMES)
def test_pyro_translation_matches_numpyro(name, load_posterior):
    """Both translations give the same log density at random points (same constants)."""
    data = load_posterior(name).data
    model = NUMPYRO_MODELS[name]
    for draw in range(3):
        # Points as NumPyro's init_to_uniform draws them (uniform on (-2, 2),
        # unconstrained), by one traced run: initialize_model compiles (12 s here).
        points = trace(substitute(seed(model, draw), substitute_fn=init_to_uniform)).get_trace(data)
        latent = {
            name: site["value"]
            for name, site in points.items()
            if site["type"] == "sample" and not site["is_observed"]
        }
        expected, _ = log_density(model, (data,), {}, latent)
        conditioned = {k: torch.as_tensor(np.asarray(v)) for k, v in latent.items()}
        pyro_trace = pyro.poutine.trace(pyro.condition(PYRO_MODELS[name], conditioned)).get_trace(data)
        got = float(pyro_trace.log_prob_sum())
        # float32 sums of up to 5,000 terms: agreement to 1e-5 relative.
        assert got == pytest.approx(float(expected), rel=1e-5, abs=1e-3)
