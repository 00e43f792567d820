"""A Bayesian network built from a plain Flax module, as one flat latent (NumPyro)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import Predictive, init_to_value
from numpyro.infer.autoguide import AutoNormal

from numpyro_psvi import ProximalScoreVI
from numpyro_psvi.contrib.models import FlatBayesianModule, fan_in_prior, module_classifier

linen = pytest.importorskip("flax.linen", reason="flax is not installed")


class SmallConvNet(linen.Module):
    @linen.compact
    def __call__(self, x):
        x = linen.relu(linen.Conv(3, (3, 3), padding=1)(x))
        return linen.Dense(10)(x.reshape(x.shape[0], -1))


class MLP(linen.Module):
    @linen.compact
    def __call__(self, x):
        return linen.Dense(10)(linen.tanh(linen.Dense(50)(x)))


def test_flat_module_is_the_same_model_as_random_flax_module():
    """One flat site or one site per tensor (``random_flax_module``): the same log joint
    at the same weights, priors from fan_in_prior included; the data plate does not
    batch the flat site."""
    from numpyro.contrib.module import random_flax_module

    images = jax.random.normal(jax.random.PRNGKey(1), (7, 8, 8, 1))
    labels = jnp.arange(7) % 10
    flat = FlatBayesianModule(SmallConvNet(), (1, 8, 8, 1), fan_in_prior(0.5))
    assert flat.num_weights == 3 * 9 + 3 + 192 * 10 + 10
    weights = flat.initial_weights + 0.1 * jax.random.normal(jax.random.PRNGKey(2), (flat.num_weights,))
    params = flat.unflatten(weights)
    assert params["Dense_0"]["kernel"].shape == (192, 10)

    def log_joint(model, values):
        conditioned = numpyro.handlers.condition(model, data=values)
        trace = numpyro.handlers.trace(numpyro.handlers.seed(conditioned, 0)).get_trace(images, labels)
        assert all(site["value"].shape == (flat.num_weights,) for name, site in trace.items()
                   if name == "weights")  # fmt: skip
        sites = [site for site in trace.values() if site["type"] == "sample"]
        return sum(site["fn"].log_prob(site["value"]).sum() for site in sites)

    def plain(x, y):
        net = random_flax_module("net", SmallConvNet(), fan_in_prior(0.5), input_shape=(1, 8, 8, 1))
        module_classifier(net, x, y)

    per_tensor = {f"net/{'.'.join(str(k.key) for k in path)}": value
                  for path, value in jax.tree_util.tree_flatten_with_path(params)[0]}  # fmt: skip
    # jitted: one compilation per model, where eager tracing compiles every op
    flat_log_joint = jax.jit(partial(log_joint, partial(module_classifier, flat)))({"weights": weights})
    np.testing.assert_allclose(flat_log_joint, jax.jit(partial(log_joint, plain))(per_tensor), rtol=1e-5)


def test_flat_module_explains_misuse():
    net = FlatBayesianModule(MLP(), (1, 64), prior=1.0)
    with pytest.raises(ValueError, match="one weight vector.*vmap"):
        net.apply(jnp.zeros((2, net.num_weights)), jnp.zeros((3, 64)))
    with pytest.raises(ValueError, match="Normal priors.*random_flax_module"):
        FlatBayesianModule(MLP(), (1, 64), prior=lambda name, shape: dist.Laplace(0.0, 1.0))

    class WithBatchNorm(linen.Module):
        @linen.compact
        def __call__(self, x):
            return linen.BatchNorm(use_running_average=True)(linen.Dense(4)(x))

    with pytest.raises(ValueError, match="batch_stats.*GroupNorm"):
        FlatBayesianModule(WithBatchNorm(), (1, 3))


@pytest.mark.slow  # ~20 s (compiling the engine); the flat module's log joint is tested above
def test_flat_module_fits_digits():
    from psvi.contrib.datasets import load_digits
    from psvi.metrics import classification_report

    data = load_digits()
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    net = FlatBayesianModule(MLP(), (1, 64), prior=1.0)
    model = partial(module_classifier, net, subsample_size=64)
    guide = AutoNormal(model, init_loc_fn=init_to_value(values={"weights": net.initial_weights}),
                       init_scale=0.01)  # fmt: skip
    svi = ProximalScoreVI(model, guide, numpyro.optim.Adam(1e-3))
    result = svi.run(jax.random.PRNGKey(0), 600, x, y, progress_bar=False)
    assert int(result.state.num_rejected) == 0
    predictive = Predictive(partial(module_classifier, net), guide=guide, params=result.params,
                            num_samples=50, return_sites=["probs"])  # fmt: skip
    probs = predictive(jax.random.PRNGKey(1), jnp.asarray(data.x_test))["probs"]
    report = classification_report(np.asarray(probs), data.y_test)
    # 2,400 score calls from a random network (NLL ~ log 10 = 2.3), as Pyro's twin
    # (tests/pyro/test_bnn.py::test_flat_module_fits_digits: NLL 0.16 there).
    assert report["nll"] < 0.5 and report["accuracy"] > 0.9
