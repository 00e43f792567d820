"""The guide registry (NumPyro): what each family declares, clear refusals, and
NumPyro's batched guides, families added by one registration each."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import kl_divergence
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer import autoguide as ag
from numpyro.infer.initialization import init_to_value

from numpyro_psvi import GSM, ProximalScoreVI, guide_density, guide_family

COVS = jnp.array([[[1.0, 0.5], [0.5, 2.0]], [[0.3, -0.1], [-0.1, 0.2]], [[4.0, 1.5], [1.5, 1.0]]])
MEANS = jnp.array([[1.0, -1.0], [0.0, 0.5], [2.0, 3.0]])


def block_model():
    """Three independent 2-d Gaussians: the posterior is exactly block diagonal."""
    with numpyro.plate("blocks", 3):
        numpyro.sample("x", dist.MultivariateNormal(MEANS, COVS))


@pytest.mark.parametrize(
    ("guide_cls", "local_latents", "full_covariance"),
    [
        (ag.AutoNormal, True, False),
        (ag.AutoDiagonalNormal, False, False),
        (ag.AutoMultivariateNormal, False, True),
        (ag.AutoLowRankMultivariateNormal, False, False),
        (ag.AutoIAFNormal, False, False),
        (ag.AutoBatchedMultivariateNormal, False, False),
        (ag.AutoBatchedLowRankMultivariateNormal, False, False),
    ],
)
def test_families_declare_what_the_engines_ask(guide_cls, local_latents, full_covariance):
    family = guide_family(guide_cls(block_model))
    assert family.refusal is None and family.name == guide_cls.__name__
    assert (family.local_latents, family.full_covariance) == (local_latents, full_covariance)


def test_lowrank_advice_depends_on_the_dimension_and_the_particles():
    """A low-rank guide with D > min(100, 10 S) stalled or diverged with exact scores
    (docs/lowrank_study.md): the family's advice (warned by ``ProximalScoreVI.init``)."""
    advice = guide_family(ag.AutoLowRankMultivariateNormal(block_model)).advice
    assert "AutoLowRankMultivariateNormal with D=90" in advice(90, 8)
    assert advice(90, 8).endswith("num_particles >= 9.")
    assert advice(101, 16).endswith("SVI for this guide.")
    assert advice(90, 9) is None and advice(100, 10) is None and advice(101, 11) is not None

    def model():
        numpyro.sample("x", dist.Normal(jnp.zeros(11), 1.0).to_event(1))

    svi = ProximalScoreVI(
        model, ag.AutoLowRankMultivariateNormal(model), numpyro.optim.Adam(1e-2), num_particles=1
    )
    with pytest.warns(UserWarning, match="AutoLowRankMultivariateNormal with D=11 latent dimensions"):
        svi.init(jax.random.PRNGKey(0))


@pytest.mark.parametrize(
    ("guide", "match"),
    [
        (ag.AutoDelta(block_model), "AutoDelta: it is a point mass"),
        (ag.AutoLaplaceApproximation(block_model), "AutoLaplaceApproximation: it is a point mass"),
        (ag.AutoBNAFNormal(block_model), "AutoBNAFNormal: block neural autoregressive"),
        (42, "must be an autoguide or a function, got int"),
    ],
)
def test_refused_guides_name_the_reason(guide, match):
    with pytest.raises(TypeError, match=match):
        ProximalScoreVI(block_model, guide, numpyro.optim.Adam(1e-2))


def test_an_autocontinuous_guide_without_a_posterior_is_refused_by_name():
    """A user's AutoContinuous subclass that does not implement ``get_base_dist`` (as
    NumPyro's batched low-rank guide did not, before it had a family of its own): the
    error names the guide and the fix, not NumPyro's bare ``NotImplementedError``."""

    class MyContinuous(ag.AutoContinuous):
        def _get_posterior(self):
            loc = numpyro.param(f"{self.prefix}_loc", jnp.zeros(self.latent_dim))
            return dist.Normal(loc, 1.0).to_event(1)

        def get_base_dist(self):
            raise NotImplementedError

    svi = ProximalScoreVI(block_model, MyContinuous(block_model), numpyro.optim.Adam(1e-2))
    with pytest.raises(TypeError, match="needs the density of MyContinuous, whose get_posterior"):
        jax.eval_shape(svi.update, svi.init(jax.random.PRNGKey(0)))  # traced, not compiled


def test_a_subclass_inherits_its_family_and_a_registration_overrides_it():
    class MyNormal(ag.AutoNormal):
        pass

    assert guide_family(MyNormal(block_model)).local_latents
    guide_family.register(MyNormal)(lambda guide: guide_family(ag.AutoDelta(block_model)))
    with pytest.raises(TypeError, match="point mass"):
        ProximalScoreVI(block_model, MyNormal(block_model), numpyro.optim.Adam(1e-2))


def batched_params(seed):
    guide = ag.AutoBatchedMultivariateNormal(block_model)
    svi = SVI(block_model, guide, numpyro.optim.Adam(1e-2), Trace_ELBO())
    params = svi.get_params(svi.init(jax.random.PRNGKey(0)))
    key_loc, key_tril = jax.random.split(jax.random.PRNGKey(seed))
    tril = params["auto_scale_tril"] + 0.3 * jnp.tril(jax.random.normal(key_tril, (3, 2, 2)), -1)
    return guide, {**params, "auto_loc": jax.random.normal(key_loc, (3, 2)), "auto_scale_tril": tril}


@pytest.mark.slow  # 17-42 s on the 2-core CI machine: the default suite keeps its budget
def test_batched_mvn_closed_forms_equal_numpyro_distributions():
    """Score, log density, KL and covariance weighting of the block-diagonal guide equal
    those of NumPyro's own batched MultivariateNormal (float32 round-off)."""
    guide, p0 = batched_params(1)
    _, p1 = batched_params(2)
    density = guide_density(guide)
    q0 = dist.MultivariateNormal(p0["auto_loc"], scale_tril=p0["auto_scale_tril"])
    q1 = dist.MultivariateNormal(p1["auto_loc"], scale_tril=p1["auto_scale_tril"])

    def reference_log_prob(u):
        return q0.log_prob(u.reshape(3, 2)).sum()

    u = density.sample(p0, jax.random.PRNGKey(3), 5)
    np.testing.assert_allclose(
        jax.vmap(density.log_prob, (None, 0))(p0, u), jax.vmap(reference_log_prob)(u), rtol=1e-5
    )
    np.testing.assert_allclose(
        jax.vmap(density.score, (None, 0))(p0, u), jax.vmap(jax.grad(reference_log_prob))(u),
        rtol=1e-4, atol=1e-5,
    )  # fmt: skip
    assert float(density.kl(p0, p1)) == pytest.approx(float(kl_divergence(q0, q1).sum()), rel=1e-5)
    r = jax.random.normal(jax.random.PRNGKey(4), (6,))
    cov = jax.scipy.linalg.block_diag(*q0.covariance_matrix)
    assert float(density.cov_quad(p0, r)) == pytest.approx(float(r @ cov @ r), rel=1e-5)
    # 200k draws: the sample covariance's error is about sqrt(2/200k) of its scale.
    draws = density.sample(p0, jax.random.PRNGKey(5), 200_000).reshape(-1, 3, 2)
    np.testing.assert_allclose(np.cov(draws[:, 2].T), q0.covariance_matrix[2], atol=0.02, rtol=0.02)


def test_batched_mvn_fits_a_block_gaussian_exactly():
    """With exact scores the block-diagonal target is in the family and is the fixed point
    (tolerances as the diagonal exact-moment test: float32 and the last particles)."""
    guide = ag.AutoBatchedMultivariateNormal(
        block_model, init_loc_fn=init_to_value(values={"x": jnp.zeros((3, 2))}), init_scale=0.5
    )
    svi = ProximalScoreVI(block_model, guide, numpyro.optim.Adam(1e-2))
    result = svi.run(jax.random.PRNGKey(0), 1500, progress_bar=False)
    assert int(result.state.num_rejected) == 0
    loc, tril = result.params["auto_loc"], result.params["auto_scale_tril"]
    sd = np.sqrt(np.diagonal(COVS, axis1=-2, axis2=-1))
    np.testing.assert_allclose(np.asarray(loc), MEANS, atol=0.02 * sd.min())
    cov = np.asarray(tril @ jnp.swapaxes(tril, -1, -2))
    # 2% of each entry, and of the smallest variance (0.2) for the small off-diagonals.
    np.testing.assert_allclose(cov, COVS, rtol=0.02, atol=0.02 * 0.2)


def test_baselines_refuse_a_family_that_is_not_one_full_covariance():
    with pytest.raises(TypeError, match="GSM fits a full-covariance Gaussian"):
        GSM(block_model, ag.AutoBatchedMultivariateNormal(block_model))


def batched_lowrank_params(seed):
    guide = ag.AutoBatchedLowRankMultivariateNormal(block_model, rank=2)
    svi = SVI(block_model, guide, numpyro.optim.Adam(1e-2), Trace_ELBO())
    params = svi.get_params(svi.init(jax.random.PRNGKey(0)))
    key_loc, key_factor = jax.random.split(jax.random.PRNGKey(seed))
    factor = jax.random.normal(key_factor, params["auto_cov_factor"].shape)
    return guide, {**params, "auto_loc": jax.random.normal(key_loc, (3, 2)), "auto_cov_factor": factor}


@pytest.mark.slow  # 8 s on the 2-core CI machine, as its full-covariance sibling
def test_batched_lowrank_closed_forms_equal_numpyro_distributions():
    """Score, log density, KL and covariance weighting of the blocks of low-rank-plus-
    diagonal Gaussians equal those of NumPyro's own batched LowRankMultivariateNormal,
    built as the guide builds it (float32 round-off)."""
    guide, p0 = batched_lowrank_params(1)
    _, p1 = batched_lowrank_params(2)
    density = guide_density(guide)

    def reference(p):
        scale = p["auto_scale"]
        factor = p["auto_cov_factor"] * scale[..., None]
        return dist.LowRankMultivariateNormal(p["auto_loc"], factor, scale**2)

    q0, q1 = reference(p0), reference(p1)

    def reference_log_prob(u):
        return q0.log_prob(u.reshape(3, 2)).sum()

    u = density.sample(p0, jax.random.PRNGKey(3), 5)
    np.testing.assert_allclose(
        jax.vmap(density.log_prob, (None, 0))(p0, u), jax.vmap(reference_log_prob)(u),
        rtol=1e-5, atol=1e-5,  # a sum of terms of size ~1 in float32: absolute round-off ~1e-6
    )  # fmt: skip
    np.testing.assert_allclose(
        jax.vmap(density.score, (None, 0))(p0, u), jax.vmap(jax.grad(reference_log_prob))(u),
        rtol=1e-4, atol=1e-5,
    )  # fmt: skip
    full0 = dist.MultivariateNormal(q0.loc, q0.covariance_matrix)
    full1 = dist.MultivariateNormal(q1.loc, q1.covariance_matrix)
    assert float(density.kl(p0, p1)) == pytest.approx(float(kl_divergence(full0, full1).sum()), rel=1e-4)
    r = jax.random.normal(jax.random.PRNGKey(4), (6,))
    cov = jax.scipy.linalg.block_diag(*q0.covariance_matrix)
    assert float(density.cov_quad(p0, r)) == pytest.approx(float(r @ cov @ r), rel=1e-5)
    # 100k draws: the sample covariance's error is about sqrt(2/100k) = 0.5% of its scale.
    draws = density.sample(p0, jax.random.PRNGKey(5), 100_000).reshape(-1, 3, 2)
    for b in range(3):
        np.testing.assert_allclose(np.cov(draws[:, b].T), q0.covariance_matrix[b], atol=0.03, rtol=0.03)


def test_batched_lowrank_fits_a_block_gaussian_exactly():
    """Rank one plus a diagonal holds any 2 x 2 covariance (off-diagonal ``c = w_1 w_2``
    with ``w_i^2`` below each variance, possible since ``c^2 < Sigma_11 Sigma_22``), so
    the block target is in the family and, with exact scores, the fixed point; the
    guide's all-zero initial factor is replaced by a random one (tolerances as the
    batched full-covariance test)."""
    guide = ag.AutoBatchedLowRankMultivariateNormal(
        block_model, init_loc_fn=init_to_value(values={"x": jnp.zeros((3, 2))}), init_scale=0.5
    )
    svi = ProximalScoreVI(block_model, guide, numpyro.optim.Adam(1e-2))
    result = svi.run(jax.random.PRNGKey(0), 1500, progress_bar=False)
    assert int(result.state.num_rejected) == 0
    params = result.params
    scale = params["auto_scale"]
    factor = params["auto_cov_factor"] * scale[..., None]
    cov = np.asarray(factor @ jnp.swapaxes(factor, -1, -2) + jax.vmap(jnp.diag)(scale**2))
    sd = np.sqrt(np.diagonal(COVS, axis1=-2, axis2=-1))
    np.testing.assert_allclose(np.asarray(params["auto_loc"]), MEANS, atol=0.02 * sd.min())
    np.testing.assert_allclose(cov, COVS, rtol=0.02, atol=0.02 * 0.2)
