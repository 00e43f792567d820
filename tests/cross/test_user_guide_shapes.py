"""User-written guides whose draws lack (or add) a model site's size-1 dims, both backends.

A model's arithmetic can give a latent's own draws a size-1 dim left of its plates (Pyro's
sparse gamma DEF example: ``z_top @ w_top.reshape(-1, k, m)`` makes ``(1, n, m)`` from
``(n, k)``), and a guide may draw ``loc[None]``; ``SVI`` replays the guide's values into
the model, where they broadcast. Such a pair holds the same values as the pair without
the size-1 dims, so the engine must fit it identically: same flat layout, same draws, same
arithmetic (equal to float rounding). Before, of the six pairs with size-1 dims below
(three layouts, Normal and Gamma guides), Pyro crashed on four and ran two one particle
at a time; NumPyro refused four as "built for another model". A guide site of another
shape is refused by name.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as ndist
import pyro
import pyro.distributions as pdist
import pytest
import torch

import numpyro_psvi
import pyro_psvi
from psvi.checks import drop_leading_ones

N, K, UPDATES = 30, 3, 20
LAYOUTS = [(False, False), (True, False), (True, True), (False, True)]  # (model, guide) add (1, ...)
Y = np.random.default_rng(0).normal(1.0, 2.0, size=N)


def test_drop_leading_ones_keeps_the_dims_asked_for():
    assert drop_leading_ones((1, 1, 30, 3)) == (30, 3)
    assert drop_leading_ones((1, 30, 1)) == (30, 1)
    assert drop_leading_ones((1, 1), keep=1) == (1,)
    assert drop_leading_ones((2, 1, 3), keep=0) == (2, 1, 3)


def _pyro_pair(model_lead: bool, guide_lead: bool, family: str, z_shape=(N, K)):
    def model(y):
        w = pyro.sample("w", pdist.Normal(0.0, 1.0))
        with pyro.plate("data", N):
            mean = w[..., None] * torch.ones((1, N, K) if model_lead else (N, K))
            fn = pdist.Normal(mean, 1.0) if family == "normal" else pdist.Gamma(mean.exp(), 1.0)
            z = pyro.sample("z", fn.to_event(1))
            pyro.sample("y", pdist.Normal(z.sum(-1), 1.0), obs=y)

    def guide(y):
        loc = pyro.param("loc", torch.zeros(z_shape))
        scale = pyro.param("scale", torch.ones(z_shape), constraint=pdist.constraints.positive)
        w_loc = pyro.param("w_loc", torch.tensor(0.0))
        w_scale = pyro.param("w_scale", torch.tensor(1.0), constraint=pdist.constraints.positive)
        pyro.sample("w", pdist.Normal(w_loc, w_scale))
        with pyro.plate("data", N):
            loc, scale = (loc[None], scale[None]) if guide_lead else (loc, scale)
            fn = pdist.Normal(loc, scale) if family == "normal" else pdist.Gamma(loc.exp() + 1, 1 / scale)
            pyro.sample("z", fn.to_event(len(z_shape) - 1))

    return model, guide


def _numpyro_pair(model_lead: bool, guide_lead: bool, family: str, z_shape=(N, K)):
    def model(y):
        w = numpyro.sample("w", ndist.Normal(0.0, 1.0))
        with numpyro.plate("data", N):
            mean = w[..., None] * jnp.ones((1, N, K) if model_lead else (N, K))
            fn = ndist.Normal(mean, 1.0) if family == "normal" else ndist.Gamma(jnp.exp(mean), 1.0)
            z = numpyro.sample("z", fn.to_event(1))
            numpyro.sample("y", ndist.Normal(z.sum(-1), 1.0), obs=y)

    def guide(y):
        loc = numpyro.param("loc", jnp.zeros(z_shape))
        scale = numpyro.param("scale", jnp.ones(z_shape), constraint=ndist.constraints.positive)
        w_loc = numpyro.param("w_loc", 0.0)
        w_scale = numpyro.param("w_scale", 1.0, constraint=ndist.constraints.positive)
        numpyro.sample("w", ndist.Normal(w_loc, w_scale))
        with numpyro.plate("data", N):
            loc, scale = (loc[None], scale[None]) if guide_lead else (loc, scale)
            fn = ndist.Normal(loc, scale) if family == "normal" else ndist.Gamma(jnp.exp(loc) + 1, 1 / scale)
            numpyro.sample("z", fn.to_event(len(z_shape) - 1))

    return model, guide


def _pyro_fit(pair) -> dict[str, np.ndarray]:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, guide = pair
    engine = pyro_psvi.ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 0.05}))
    y = torch.tensor(Y, dtype=torch.float32)
    for _ in range(UPDATES):
        engine.step(y)
    assert engine.vectorize_particles  # these models vectorize: the layouts must not stop it
    return {name: pyro.param(name).detach().numpy() for name in ("loc", "scale", "w_loc", "w_scale")}


def _numpyro_fit(pair) -> dict[str, np.ndarray]:
    model, guide = pair
    engine = numpyro_psvi.ProximalScoreVI(model, guide, numpyro.optim.Adam(0.05))
    result = engine.run(jax.random.PRNGKey(0), UPDATES, jnp.asarray(Y, jnp.float32), progress_bar=False)
    return {name: np.asarray(value) for name, value in result.params.items()}


FITS = {"pyro": (_pyro_pair, _pyro_fit), "numpyro": (_numpyro_pair, _numpyro_fit)}


@pytest.mark.filterwarnings("ignore:The guide's density dominates the step")
@pytest.mark.parametrize(
    ("backend", "family"),  # the closed-form and the autodiff density paths
    [
        ("pyro", "normal"),
        ("pyro", "gamma"),
        ("numpyro", "normal"),
        pytest.param("numpyro", "gamma", marks=pytest.mark.slow),  # ~35 s of compiling; Pyro's runs
    ],
)
def test_size_one_dims_left_of_the_plates_change_no_update(backend, family):
    make_pair, fit = FITS[backend]
    fits = [fit(make_pair(model_lead, guide_lead, family)) for model_lead, guide_lead in LAYOUTS]
    for other in fits[1:]:
        for name, value in fits[0].items():
            # The same values and draws through the same arithmetic: float32 rounding apart.
            np.testing.assert_allclose(other[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
    assert np.abs(fits[0]["loc"] - np.zeros((N, K))).max() > 0.1  # the fits moved


@pytest.mark.parametrize("backend", ["pyro", "numpyro"])
def test_a_guide_site_of_another_shape_is_refused_by_name(backend):
    make_pair, fit = FITS[backend]
    with pytest.raises(ValueError, match=r"site 'z' draws values of shape \(30,\), the model's \(30, 3\)"):
        fit(make_pair(False, False, "normal", z_shape=(N,)))
