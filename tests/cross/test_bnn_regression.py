"""The BNN regression model: its log joints agree between the backends at the same weights."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pyro
import pytest
import torch
from numpyro.infer.util import log_density

from numpyro_psvi.contrib.models import bnn_regression as n_bnn_regression
from pyro_psvi.contrib.models import bnn_regression as p_bnn_regression


@pytest.mark.parametrize("student_df", [None, 4.0])
def test_bnn_regression_log_joint_agrees_between_backends(student_df):
    """With ``student_df`` also the local ``lam`` of each point (a robust likelihood)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)).astype(np.float32), rng.normal(size=7).astype(np.float32)
    values = {
        "w1": rng.normal(size=(3, 5)).astype(np.float32), "b1": rng.normal(size=5).astype(np.float32),
        "w2": rng.normal(size=5).astype(np.float32), "b2": np.float32(0.3), "precision": np.float32(1.7),
    }  # fmt: skip
    if student_df is not None:
        values["lam"] = rng.gamma(2.0, 0.5, size=7).astype(np.float32)
    options = {"hidden": 5, "student_df": student_df}
    n_log_joint, _ = log_density(
        lambda: n_bnn_regression(jnp.asarray(x), jnp.asarray(y), **options), (), {},
        {k: jnp.asarray(v) for k, v in values.items()},
    )  # fmt: skip
    p_values = {k: torch.as_tensor(v) for k, v in values.items()}
    p_values["w2"], p_values["b2"] = p_values["w2"][:, None], p_values["b2"].reshape(1)
    conditioned = pyro.poutine.condition(p_bnn_regression, data=p_values)
    trace = pyro.poutine.trace(conditioned).get_trace(torch.as_tensor(x), torch.as_tensor(y), **options)
    assert math.isclose(float(trace.log_prob_sum()), float(n_log_joint), rel_tol=1e-5)
    assert jax.numpy.isfinite(n_log_joint)
