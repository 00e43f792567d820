"""Ready-made NumPyro models used by the examples, benchmarks and tests."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from psvi.checks import check_same_rows
from psvi.contrib.targets import CONJUGATE_PRIOR


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


def precision_model(y: jax.Array, *, subsample_size: int | None = None) -> None:
    """A Normal likelihood's precision, ``tau ~ Gamma(2, 2)``, ``y_n ~ N(0, 1 / tau)``: its
    posterior is Gamma (:func:`psvi.contrib.targets.conjugate_posterior`)."""
    tau = numpyro.sample("tau", dist.Gamma(CONJUGATE_PRIOR, CONJUGATE_PRIOR))
    with numpyro.plate("data", y.shape[0], subsample_size=subsample_size) as idx:
        numpyro.sample("obs", dist.Normal(0.0, 1.0 / jnp.sqrt(tau)), obs=y[idx])


def coin_model(flips: jax.Array, *, subsample_size: int | None = None) -> None:
    """A coin's bias, ``p ~ Beta(2, 2)``, ``flips_n ~ Bernoulli(p)``: its posterior is Beta
    (:func:`psvi.contrib.targets.conjugate_posterior`)."""
    p = numpyro.sample("p", dist.Beta(CONJUGATE_PRIOR, CONJUGATE_PRIOR))
    with numpyro.plate("data", flips.shape[0], subsample_size=subsample_size) as idx:
        numpyro.sample("obs", dist.Bernoulli(p), obs=flips[idx])


def conjugate_guide(target: str, init: float = 5.0) -> Callable:
    """A user-written guide of :func:`precision_model` (``Gamma(a, b)``, ``target =
    "precision"``) or :func:`coin_model` (``Beta(a, b)``), params ``a`` and ``b`` started at
    ``init``: the posterior's own family."""
    site, family = ("tau", dist.Gamma) if target == "precision" else ("p", dist.Beta)

    def guide(data, *, subsample_size=None):
        a = numpyro.param("a", init, constraint=dist.constraints.positive)
        b = numpyro.param("b", init, constraint=dist.constraints.positive)
        numpyro.sample(site, family(a, b))

    return guide


def conjugate_mean_guide(target: str, init: float = 5.0) -> Callable:
    """:func:`conjugate_guide`'s family and start parameterized by its mean and its shape:
    ``Gamma(k, k / m)`` (``m`` the mean, ``k`` the shape) or ``Beta(k m, k (1 - m))``
    (``m`` the mean, ``k`` the concentration), started at ``Gamma(init, init)`` and
    ``Beta(init, init)`` as that guide is. In the args' parameterization a narrow posterior
    makes ``log a - log b`` (its location) stiff and ``log a + log b`` (its width) soft,
    which Adam's per-coordinate steps cross slowly; here the two are separate params
    (docs/minibatch.md section 15)."""
    site = "tau" if target == "precision" else "p"

    def guide(data, *, subsample_size=None):
        if target == "precision":
            shape = numpyro.param("k", init, constraint=dist.constraints.positive)
            mean = numpyro.param("m", 1.0, constraint=dist.constraints.positive)
            numpyro.sample(site, dist.Gamma(shape, shape / mean))
        else:
            total = numpyro.param("k", 2 * init, constraint=dist.constraints.positive)
            mean = numpyro.param("m", 0.5, constraint=dist.constraints.unit_interval)
            numpyro.sample(site, dist.Beta(total * mean, total * (1 - mean)))

    return guide


def unconstrained_normal_guide(target: str) -> Callable:
    """A user-written guide of :func:`precision_model` or :func:`coin_model` that is Normal
    on the site's unconstrained value (``LogNormal``; a ``Normal`` pushed through the
    sigmoid), ``loc`` started at 0 and ``scale`` at 0.5: fitted as AutoNormal is."""

    def guide(data, *, subsample_size=None):
        loc = numpyro.param("loc", 0.0)
        scale = numpyro.param("scale", 0.5, constraint=dist.constraints.positive)
        if target == "precision":
            numpyro.sample("tau", dist.LogNormal(loc, scale))
        else:
            logistic = dist.transforms.SigmoidTransform()
            numpyro.sample("p", dist.TransformedDistribution(dist.Normal(loc, scale), logistic))

    return guide


# The guides of the conjugate targets by the names ``benchmarks.minibatch_families`` uses.
CONJUGATE_TARGET_GUIDES = {
    "conjugate": conjugate_guide,
    "conjugate_mean": conjugate_mean_guide,
    "normal": unconstrained_normal_guide,
}


def crossed_effects_model(rows: int, cols: int) -> Callable:
    """``model(y)``: one flat site ``x = (mu, a, b)`` with ``N(0, 1)`` priors and ``y_ij ~
    N(mu + a_i + b_j, 1)`` over ``rows x cols`` cells (vectorizable over particles); data
    and the best diagonal Gaussian: :func:`psvi.contrib.targets.crossed_effects`."""

    def model(y: jax.Array) -> None:
        x = numpyro.sample("x", dist.Normal(0.0, 1.0).expand([1 + rows + cols]).to_event(1))
        mean = x[..., 0, None, None] + x[..., 1 : 1 + rows, None] + x[..., None, 1 + rows :]
        numpyro.sample("y", dist.Normal(mean, 1.0).to_event(2), obs=y)

    return model


def crossed_effects_plates_model(rows: int, cols: int, batch: int | None = None) -> Callable:
    """``model(y)``: :func:`crossed_effects_model` with ``mu`` a global site and ``a_i``,
    ``b_j`` local latents of the plates ``rows`` and ``cols``, each plate subsampled
    ``batch`` at a time (``None``: every member). Data and the best diagonal Gaussian:
    :func:`psvi.contrib.targets.crossed_effects`."""

    def model(y: jax.Array) -> None:
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("rows", rows, subsample_size=batch, dim=-2) as row_idx:
            a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        with numpyro.plate("cols", cols, subsample_size=batch, dim=-1) as col_idx:
            b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        # Re-entered for the likelihood's scale and dims only (a new plate draws new
        # indices): the cells are those of the members sampled above.
        with numpyro.plate("rows", rows, subsample_size=batch, dim=-2):
            with numpyro.plate("cols", cols, subsample_size=batch, dim=-1):
                numpyro.sample("y", dist.Normal(mu + a + b, 1.0), obs=y[row_idx[:, None], col_idx])

    return model


def random_intercept_logistic_model(groups: int, batch: int | None = None) -> Callable:
    """``model(x, y)``: ``logit P(y_gj = 1) = mu + tau z_g + beta x_gj`` with ``mu, beta ~
    N(0, 2)``, ``tau ~ HalfNormal(1)`` and non-centred group intercepts ``z_g ~ N(0, 1)``,
    local latents of the plate ``groups`` (subsampled ``batch`` at a time; ``None``: every
    group). Data: :func:`psvi.contrib.targets.random_intercept_logistic_data`."""

    def model(x: jax.Array, y: jax.Array) -> None:
        mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
        beta = numpyro.sample("beta", dist.Normal(0.0, 2.0))
        tau = numpyro.sample("tau", dist.HalfNormal(1.0))
        with numpyro.plate("groups", groups, subsample_size=batch, dim=-2) as idx:
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            with numpyro.plate("obs", x.shape[1], dim=-1):
                numpyro.sample("y", dist.Bernoulli(logits=mu + tau * z + beta * x[idx]), obs=y[idx])

    return model


def random_slope_logistic_model(groups: int, batch: int | None = None) -> Callable:
    """``model(x, y)``: ``logit P(y_gj = 1) = mu + tau_a z_g + (beta + tau_b w_g) x_gj``
    with ``mu, beta ~ N(0, 2)``, ``tau_a, tau_b ~ HalfNormal(1)`` and non-centred group
    intercepts ``z_g`` and slopes ``w_g ~ N(0, 1)``: two local latents per member of the
    plate ``groups`` (subsampled ``batch`` at a time; ``None``: every group), four globals
    coupled through them. Data: :func:`psvi.contrib.targets.random_slope_logistic_data`."""

    def model(x: jax.Array, y: jax.Array) -> None:
        mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
        beta = numpyro.sample("beta", dist.Normal(0.0, 2.0))
        tau_a = numpyro.sample("tau_a", dist.HalfNormal(1.0))
        tau_b = numpyro.sample("tau_b", dist.HalfNormal(1.0))
        with numpyro.plate("groups", groups, subsample_size=batch, dim=-2) as idx:
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            w = numpyro.sample("w", dist.Normal(0.0, 1.0))
            with numpyro.plate("obs", x.shape[1], dim=-1):
                logits = mu + tau_a * z + (beta + tau_b * w) * x[idx]
                numpyro.sample("y", dist.Bernoulli(logits=logits), obs=y[idx])

    return model


def factor_analysis_model(loadings: np.ndarray, subsample_size: int | None = None) -> Callable:
    """``model(x)``: ``z_n ~ N(0, I_L)``, ``x_n ~ N(W z_n, I)`` with known loadings ``W``
    (``dim x L``), the plate over the rows of ``x`` subsampled ``subsample_size`` at a time
    (``None``: every row, as for batches passed as the model's arguments). Each ``z_n``'s
    exact posterior: :func:`psvi.contrib.targets.factor_analysis_posterior`."""
    loadings = jnp.asarray(loadings, jnp.float32)

    def model(x: jax.Array) -> None:
        with numpyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
            z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([loadings.shape[1]]).to_event(1))
            numpyro.sample("x", dist.Normal(z @ loadings.T, 1.0).to_event(1), obs=x[idx])

    return model


def amortized_normal_guide(
    network: tuple[Callable, Callable], latents: int, subsample_size: int | None = None
) -> Callable:
    """``guide(x)`` of :func:`factor_analysis_model` (the same ``subsample_size``): an encoder,
    ``network`` (a stax ``(init, apply)`` pair with ``2 L`` outputs, registered by
    ``numpyro.module("encoder", ...)``), maps each member ``x_n`` of the plate's batch to a
    diagonal Normal's loc and log-scale. With a linear ``network`` the exact posterior is
    in the family."""

    def guide(x: jax.Array) -> None:
        encode = numpyro.module("encoder", network, (subsample_size or x.shape[0], x.shape[-1]))
        with numpyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
            out = encode(x[idx])
            numpyro.sample("z", dist.Normal(out[..., :latents], jnp.exp(out[..., latents:])).to_event(1))

    return guide


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
    student_df: float | None = None,
) -> None:
    """The UCI protocol's BNN: one hidden layer of ReLU units, ``N(0, prior_scale^2)``
    priors on all weights, Gaussian likelihood with a ``Gamma(6, 6)`` prior on the noise
    precision (Hernandez-Lobato and Adams 2015), on standardized data. The network's
    output is recorded as the deterministic site ``mean``. With ``student_df``: a robust
    likelihood, each data point's precision scaled by a local latent ``lam ~
    Gamma(df / 2, df / 2)`` (Student-t noise as a scale mixture)."""
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
        if student_df is not None:
            precision = precision * numpyro.sample("lam", dist.Gamma(student_df / 2, student_df / 2))
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


class FlatBayesianModule:
    """A Flax module whose parameters are one flat latent vector (the fast path); the twin
    of :class:`pyro_psvi.contrib.models.FlatBayesianModule`.

    Calling it samples the site ``name`` (default ``"weights"``), of shape ``(D,)`` with
    a ``Normal(loc, scale).to_event(1)`` prior assembled from per-parameter Normal
    priors, and applies the module to those weights (``jax.flatten_util.ravel_pytree``'s
    unravel: slices and reshapes the compiler fuses). Against ``random_flax_module``,
    whose network has one sample site per parameter tensor, a model and an autoguide
    see one site whatever the network's size, so tracing and compiling them stay
    constant as the network grows.

    Parameters
    ----------
    module : flax.linen.Module
        The network; its only variable collection must be ``"params"`` (no batch
        statistics: use GroupNorm or LayerNorm).
    input_shape : tuple of int
        The shape of an example input (as ``random_flax_module``'s), for ``module.init``.
    prior : float or callable
        A scale ``s`` for ``Normal(0, s)`` on every weight, or ``prior(name, shape)``
        returning a Normal (e.g. :func:`fan_in_prior`; names as ``random_flax_module``
        gives them, ``"Dense_0.kernel"``), whose loc and scale are used.
    name : str
        The sample site's name.
    rng_key : jax.Array, optional
        For ``module.init`` (default ``PRNGKey(0)``): the :attr:`initial_weights`.

    Examples
    --------
    >>> net = FlatBayesianModule(resnet, (1, 28, 28, 1), fan_in_prior())
    >>> model = partial(module_classifier, net, subsample_size=128)
    >>> guide = AutoNormal(model, init_loc_fn=init_to_value(values={"weights": net.initial_weights}))
    >>> ProximalScoreVI(model, guide, numpyro.optim.Adam(1e-3))
    >>> net.unflatten(guide.median(params)["weights"])  # {"Dense_0": {"kernel": ...}, ...}
    """

    def __init__(
        self,
        module,
        input_shape: tuple[int, ...],
        prior: float | Callable[[str, tuple[int, ...]], dist.Distribution] = 1.0,
        *,
        name: str = "weights",
        rng_key: jax.Array | None = None,
    ) -> None:
        key = jax.random.PRNGKey(0) if rng_key is None else rng_key
        variables = module.init(key, jnp.ones(input_shape))
        others = sorted(set(variables) - {"params"})
        if others:
            raise ValueError(
                f"FlatBayesianModule needs a module whose only variables are 'params'; this one "
                f"also has {others} (e.g. BatchNorm's batch statistics). Use GroupNorm or LayerNorm, "
                "or random_flax_module(..., mutable=[...]) with one site per tensor."
            )
        self.module, self.name = module, name
        self.initial_weights, self.unflatten = jax.flatten_util.ravel_pytree(variables["params"])
        locs, scales = [], []
        for path, param in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
            param_name = ".".join(str(entry.key) for entry in path)
            loc, scale = _normal_loc_scale(param_name, param.shape, prior)
            locs.append(jnp.broadcast_to(loc, param.shape).reshape(-1))
            scales.append(jnp.broadcast_to(scale, param.shape).reshape(-1))
        self.prior_loc, self.prior_scale = jnp.concatenate(locs), jnp.concatenate(scales)

    @property
    def num_weights(self) -> int:
        """``D``, the length of the flat weight vector."""
        return len(self.initial_weights)

    def apply(self, weights: jax.Array, *inputs: jax.Array) -> jax.Array:
        """The module's output at flat ``weights (D,)``."""
        if jnp.ndim(weights) != 1:
            raise ValueError(
                f"FlatBayesianModule applies one weight vector: got weights of shape "
                f"{jnp.shape(weights)}; vmap over particles (as ProximalScoreVI and Trace_ELBO's "
                "vectorize_particles do) instead of passing a batch."
            )
        return self.module.apply({"params": self.unflatten(weights)}, *inputs)

    def __call__(self, *inputs: jax.Array) -> jax.Array:
        weights = numpyro.sample(self.name, dist.Normal(self.prior_loc, self.prior_scale).to_event(1))
        return self.apply(weights, *inputs)


def _normal_loc_scale(name: str, shape: tuple[int, ...], prior) -> tuple[jax.Array, jax.Array]:
    """The loc and scale of a parameter's Normal prior (a float scale or a callable)."""
    if not callable(prior):
        return jnp.zeros(()), jnp.full((), float(prior))
    site_prior = prior(name, shape)
    base = site_prior.base_dist if isinstance(site_prior, dist.Independent) else site_prior
    if not isinstance(base, dist.Normal):
        raise ValueError(
            f"FlatBayesianModule needs Normal priors; the prior of {name!r} is "
            f"{type(base).__name__}. Use random_flax_module for other priors."
        )
    return base.loc, base.scale


def module_classifier(
    net: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    y: jax.Array | None = None,
    *,
    subsample_size: int | None = None,
) -> None:
    """Categorical likelihood on the logits of ``net`` (e.g. a :class:`FlatBayesianModule`);
    the twin of :func:`pyro_psvi.contrib.models.module_classifier`.

    The network runs outside the data plate: its weights are global latents.
    """
    check_same_rows(x.shape, None if y is None else y.shape)
    data = numpyro.plate("data", x.shape[0], subsample_size=subsample_size)  # draws the rows once
    with data as idx:
        pass
    logits = net(x[idx])  # outside the plate, which would otherwise batch the weights' site
    with data:
        numpyro.deterministic("probs", jax.nn.softmax(logits))
        numpyro.sample("y", dist.Categorical(logits=logits), obs=None if y is None else y[idx])
