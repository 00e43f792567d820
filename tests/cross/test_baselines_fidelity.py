"""GSM and BaM updates: our two backends against each other and GSM against the
reference ``gsmvi`` package, on the same particles and scores."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import numpyro_psvi.baselines as numpyro_baselines
import pyro_psvi.baselines as pyro_baselines


def batch(dim=6, num=5, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(dim, dim))
    cov = a @ a.T / dim + 0.5 * np.eye(dim)
    loc = rng.normal(size=dim)
    particles = loc + rng.normal(size=(num, dim)) @ np.linalg.cholesky(cov).T
    scores = -(particles - 0.3) @ np.linalg.inv(2 * cov)  # a Gaussian target's scores
    return [x.astype(np.float32) for x in (loc, cov, particles, scores)]


def both(fn_name, *args):
    ours_jax = getattr(numpyro_baselines, fn_name)(*map(jnp.asarray, args[:4]), *args[4:])
    ours_torch = getattr(pyro_baselines, fn_name)(*map(torch.as_tensor, args[:4]), *args[4:])
    return [np.asarray(x) for x in ours_jax], [x.numpy() for x in ours_torch]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gsm_update_matches_gsmvi_reference(seed):
    gsm = pytest.importorskip("gsmvi.gsm", reason="gsmvi (PyPI) could not be installed")
    loc, cov, particles, scores = batch(seed=seed)
    ref_loc, ref_cov = gsm.gsm_update(
        jnp.asarray(particles), jnp.asarray(scores), jnp.asarray(loc), jnp.asarray(cov)
    )
    (jax_loc, jax_cov), (torch_loc, torch_cov) = both("gsm_step", loc, cov, particles, scores)
    # float32 throughout: agreement to a few ulps of the entries' scale.
    for ours_loc, ours_cov in ((jax_loc, jax_cov), (torch_loc, torch_cov)):
        np.testing.assert_allclose(ours_loc, np.asarray(ref_loc), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ours_cov, np.asarray(ref_cov), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("learning_rate", [0.1, 1.0, 30.0])
def test_bam_update_agrees_across_backends(learning_rate):
    loc, cov, particles, scores = batch(seed=3)
    (jax_loc, jax_cov), (torch_loc, torch_cov) = both("bam_step", loc, cov, particles, scores, learning_rate)
    np.testing.assert_allclose(jax_loc, torch_loc, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(jax_cov, torch_cov, rtol=1e-4, atol=1e-5)
