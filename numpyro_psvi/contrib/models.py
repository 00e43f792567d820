"""Ready-made NumPyro models used by the examples, benchmarks and tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from psvi.checks import check_same_rows


def gaussian_target(mean: np.ndarray, cov: np.ndarray):
    """A model whose posterior is exactly ``N(mean, cov)`` (one latent site ``x``)."""
    mean, cov = jnp.asarray(mean), jnp.asarray(cov)

    def model():
        numpyro.sample("x", dist.MultivariateNormal(mean, cov))

    return model


def linear_regression(
    x: jnp.ndarray,
    y: jnp.ndarray | None = None,
    *,
    prior_scale: float = 1.0,
    noise_scale: float = 1.0,
    subsample_size: int | None = None,
) -> None:
    """Bayesian linear regression ``y ~ N(x @ w, noise_scale^2)``, ``w ~ N(0, prior_scale^2)``."""
    w = numpyro.sample("w", dist.Normal(0.0, prior_scale).expand([x.shape[1]]).to_event(1))
    check_same_rows(x.shape, None if y is None else y.shape)
    with numpyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
        numpyro.sample("y", dist.Normal(x[idx] @ w, noise_scale), obs=None if y is None else y[idx])


def earnings_regression(height: jax.Array, earn: jax.Array | None = None) -> None:
    """Earnings on height in dollars (:func:`psvi.contrib.targets.earnings_data`): Normal(0,
    1e6) priors on intercept ``b1`` and slope ``b2``, LogNormal(0, 10) on ``sigma``; a
    regression far from unit scale (the far-start tests and ``benchmarks.far_starts``)."""
    b1 = numpyro.sample("b1", dist.Normal(0.0, 1e6))
    b2 = numpyro.sample("b2", dist.Normal(0.0, 1e6))
    sigma = numpyro.sample("sigma", dist.LogNormal(0.0, 10.0))
    with numpyro.plate("rows", len(height)):
        numpyro.sample("earn", dist.Normal(b1 + b2 * height, sigma), obs=earn)


def mlp_classifier(
    x: jnp.ndarray,
    y: jnp.ndarray | None = None,
    *,
    hidden: int = 50,
    num_classes: int = 10,
    prior_scale: float = 1.0,
    scale_by_fan_in: bool = False,
    subsample_size: int | None = None,
) -> None:
    """One-hidden-layer tanh MLP with ``N(0, prior_scale^2)`` priors on all weights, or
    ``N(0, prior_scale^2 / fan_in)`` on the weight matrices with ``scale_by_fan_in``
    (biases keep ``prior_scale``; as :func:`fan_in_prior`)."""
    num_inputs = x.shape[1]

    def weight(name, shape):
        scale = prior_scale / shape[0] ** 0.5 if scale_by_fan_in and len(shape) > 1 else prior_scale
        return numpyro.sample(name, dist.Normal(0.0, scale).expand(shape).to_event(len(shape)))

    w1, b1 = weight("w1", [num_inputs, hidden]), weight("b1", [hidden])
    w2, b2 = weight("w2", [hidden, num_classes]), weight("b2", [num_classes])
    check_same_rows(x.shape, None if y is None else y.shape)
    with numpyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
        logits = jnp.tanh(x[idx] @ w1 + b1) @ w2 + b2
        numpyro.deterministic("probs", jax.nn.softmax(logits))
        numpyro.sample("y", dist.Categorical(logits=logits), obs=None if y is None else y[idx])


def bnn_regression(
    x: jnp.ndarray,
    y: jnp.ndarray | None = None,
    *,
    hidden: int = 50,
    prior_scale: float = 1.0,
    subsample_size: int | None = None,
) -> None:
    """The UCI protocol's BNN: one hidden layer of ReLU units, ``N(0, prior_scale^2)``
    priors on all weights, Gaussian likelihood with a ``Gamma(6, 6)`` prior on the noise
    precision (Hernandez-Lobato and Adams 2015), on standardized data. The network's
    output is recorded as the deterministic site ``mean``."""
    num_inputs = x.shape[1]

    def weight(name, shape):
        return numpyro.sample(name, dist.Normal(0.0, prior_scale).expand(shape).to_event(len(shape)))

    w1, b1 = weight("w1", [num_inputs, hidden]), weight("b1", [hidden])
    w2, b2 = weight("w2", [hidden]), numpyro.sample("b2", dist.Normal(0.0, prior_scale))
    precision = numpyro.sample("precision", dist.Gamma(6.0, 6.0))
    check_same_rows(x.shape, None if y is None else y.shape)
    with numpyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
        mean = jax.nn.relu(x[idx] @ w1 + b1) @ w2 + b2
        numpyro.deterministic("mean", mean)
        numpyro.sample("y", dist.Normal(mean, precision**-0.5), obs=None if y is None else y[idx])


def mlp_init_values(num_inputs: int, hidden: int = 50, num_classes: int = 10, seed: int = 0):
    """Glorot-uniform initial weights for :func:`mlp_classifier` (for ``init_to_value``)."""
    rng = np.random.default_rng(seed)

    def glorot(fan_in, fan_out):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        return jnp.asarray(rng.uniform(-limit, limit, (fan_in, fan_out)), jnp.float32)

    return {
        "w1": glorot(num_inputs, hidden),
        "b1": jnp.zeros(hidden),
        "w2": glorot(hidden, num_classes),
        "b2": jnp.zeros(num_classes),
    }


def fan_in_prior(scale: float = 1.0):
    """A ``prior`` for ``random_flax_module``: ``Normal(0, scale / sqrt(fan_in))`` on each
    kernel (``fan_in`` = the product of its dims but the last, as in Flax's ``Dense``
    and ``Conv``) and ``Normal(0, scale)`` on vectors (biases); the twin of
    :func:`pyro_psvi.contrib.models.fan_in_prior`."""

    def prior(name: str, shape: tuple[int, ...]) -> dist.Distribution:
        fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        return dist.Normal(0.0, scale / fan_in**0.5)

    return prior
