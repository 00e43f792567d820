"""Ready-made Pyro models used by the examples, benchmarks and tests, and
:func:`bayesian_module`, which puts priors on a ``torch.nn.Module``'s parameters."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample
from pyro.nn.module import to_pyro_module_
from torch import nn

from psvi.checks import check_same_rows
from psvi.contrib.targets import CONJUGATE_PRIOR


def gaussian_target(mean: np.ndarray, cov: np.ndarray):
    """A model whose posterior is exactly ``N(mean, cov)`` (one latent site ``x``)."""
    mean = torch.as_tensor(mean, dtype=torch.get_default_dtype())
    cov = torch.as_tensor(cov, dtype=torch.get_default_dtype())

    def model():
        pyro.sample("x", dist.MultivariateNormal(mean, cov))

    return model


def linear_regression(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    prior_scale: float = 1.0,
    noise_scale: float = 1.0,
    subsample_size: int | None = None,
) -> None:
    """Bayesian linear regression ``y ~ N(x @ w, noise_scale^2)``, ``w ~ N(0, prior_scale^2)``.

    Broadcast-safe: ``w`` may carry leading particle dimensions.
    """
    w = pyro.sample("w", dist.Normal(x.new_zeros(x.shape[1]), prior_scale).to_event(1))
    check_same_rows(x.shape, None if y is None else y.shape)
    with pyro.plate("data", x.shape[0], subsample_size=subsample_size, device=x.device) as idx:
        mean = (x[idx] * w).sum(-1)  # w: (..., 1, D) under a particle plate
        pyro.sample("y", dist.Normal(mean, noise_scale), obs=None if y is None else y[idx])


def precision_model(y: torch.Tensor, *, subsample_size: int | None = None) -> None:
    """A Normal likelihood's precision, ``tau ~ Gamma(2, 2)``, ``y_n ~ N(0, 1 / tau)``: its
    posterior is Gamma (:func:`psvi.contrib.targets.conjugate_posterior`)."""
    tau = pyro.sample("tau", dist.Gamma(CONJUGATE_PRIOR, CONJUGATE_PRIOR))
    with pyro.plate("data", y.shape[0], subsample_size=subsample_size, device=y.device) as idx:
        pyro.sample("obs", dist.Normal(0.0, tau.rsqrt()), obs=y[idx])


def coin_model(flips: torch.Tensor, *, subsample_size: int | None = None) -> None:
    """A coin's bias, ``p ~ Beta(2, 2)``, ``flips_n ~ Bernoulli(p)``: its posterior is Beta
    (:func:`psvi.contrib.targets.conjugate_posterior`)."""
    p = pyro.sample("p", dist.Beta(CONJUGATE_PRIOR, CONJUGATE_PRIOR))
    with pyro.plate("data", flips.shape[0], subsample_size=subsample_size, device=flips.device) as idx:
        pyro.sample("obs", dist.Bernoulli(p), obs=flips[idx])


def conjugate_guide(target: str, init: float = 5.0) -> Callable:
    """A user-written guide of :func:`precision_model` (``Gamma(a, b)``, ``target =
    "precision"``) or :func:`coin_model` (``Beta(a, b)``), params ``a`` and ``b`` started at
    ``init``: the posterior's own family."""
    site, family = ("tau", dist.Gamma) if target == "precision" else ("p", dist.Beta)

    def guide(data, *, subsample_size=None):
        a = pyro.param("a", torch.tensor(init), constraint=dist.constraints.positive)
        b = pyro.param("b", torch.tensor(init), constraint=dist.constraints.positive)
        pyro.sample(site, family(a, b))

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
            shape = pyro.param("k", torch.tensor(init), constraint=dist.constraints.positive)
            mean = pyro.param("m", torch.tensor(1.0), constraint=dist.constraints.positive)
            pyro.sample(site, dist.Gamma(shape, shape / mean))
        else:
            total = pyro.param("k", torch.tensor(2 * init), constraint=dist.constraints.positive)
            mean = pyro.param("m", torch.tensor(0.5), constraint=dist.constraints.unit_interval)
            pyro.sample(site, dist.Beta(total * mean, total * (1 - mean)))

    return guide


def unconstrained_normal_guide(target: str) -> Callable:
    """A user-written guide of :func:`precision_model` or :func:`coin_model` that is Normal
    on the site's unconstrained value (``LogNormal``; a ``Normal`` pushed through the
    sigmoid), ``loc`` started at 0 and ``scale`` at 0.5: fitted as AutoNormal is."""

    def guide(data, *, subsample_size=None):
        loc = pyro.param("loc", torch.tensor(0.0))
        scale = pyro.param("scale", torch.tensor(0.5), constraint=dist.constraints.positive)
        if target == "precision":
            pyro.sample("tau", dist.LogNormal(loc, scale))
        else:
            logistic = dist.transforms.SigmoidTransform()
            pyro.sample("p", dist.TransformedDistribution(dist.Normal(loc, scale), [logistic]))

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

    def model(y: torch.Tensor) -> None:
        x = pyro.sample("x", dist.Normal(0.0, 1.0).expand([1 + rows + cols]).to_event(1))
        mean = x[..., 0, None, None] + x[..., 1 : 1 + rows, None] + x[..., None, 1 + rows :]
        pyro.sample("y", dist.Normal(mean, 1.0).to_event(2), obs=y)

    return model


def crossed_effects_plates_model(rows: int, cols: int, batch: int | None = None) -> Callable:
    """``model(y)``: :func:`crossed_effects_model` with ``mu`` a global site and ``a_i``,
    ``b_j`` local latents of the plates ``rows`` and ``cols``, each plate subsampled
    ``batch`` at a time (``None``: every member). Data and the best diagonal Gaussian:
    :func:`psvi.contrib.targets.crossed_effects`."""

    def model(y: torch.Tensor) -> None:
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        row_plate = pyro.plate("rows", rows, subsample_size=batch, dim=-2)
        col_plate = pyro.plate("cols", cols, subsample_size=batch, dim=-1)
        with row_plate:
            a = pyro.sample("a", dist.Normal(0.0, 1.0))
        with col_plate:
            b = pyro.sample("b", dist.Normal(0.0, 1.0))
        with row_plate as row_idx, col_plate as col_idx:
            pyro.sample("y", dist.Normal(mu + a + b, 1.0), obs=y[row_idx][:, col_idx])

    return model


def random_intercept_logistic_model(groups: int, batch: int | None = None) -> Callable:
    """``model(x, y)``: ``logit P(y_gj = 1) = mu + tau z_g + beta x_gj`` with ``mu, beta ~
    N(0, 2)``, ``tau ~ HalfNormal(1)`` and non-centred group intercepts ``z_g ~ N(0, 1)``,
    local latents of the plate ``groups`` (subsampled ``batch`` at a time; ``None``: every
    group). Data: :func:`psvi.contrib.targets.random_intercept_logistic_data`."""

    def model(x: torch.Tensor, y: torch.Tensor) -> None:
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        beta = pyro.sample("beta", dist.Normal(0.0, 2.0))
        tau = pyro.sample("tau", dist.HalfNormal(1.0))
        with pyro.plate("groups", groups, subsample_size=batch, dim=-2) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with pyro.plate("obs", x.shape[1], dim=-1):
                pyro.sample("y", dist.Bernoulli(logits=mu + tau * z + beta * x[idx]), obs=y[idx])

    return model


def random_slope_logistic_model(groups: int, batch: int | None = None) -> Callable:
    """``model(x, y)``: ``logit P(y_gj = 1) = mu + tau_a z_g + (beta + tau_b w_g) x_gj``
    with ``mu, beta ~ N(0, 2)``, ``tau_a, tau_b ~ HalfNormal(1)`` and non-centred group
    intercepts ``z_g`` and slopes ``w_g ~ N(0, 1)``: two local latents per member of the
    plate ``groups`` (subsampled ``batch`` at a time; ``None``: every group), four globals
    coupled through them. Data: :func:`psvi.contrib.targets.random_slope_logistic_data`."""

    def model(x: torch.Tensor, y: torch.Tensor) -> None:
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        beta = pyro.sample("beta", dist.Normal(0.0, 2.0))
        tau_a = pyro.sample("tau_a", dist.HalfNormal(1.0))
        tau_b = pyro.sample("tau_b", dist.HalfNormal(1.0))
        with pyro.plate("groups", groups, subsample_size=batch, dim=-2) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            w = pyro.sample("w", dist.Normal(0.0, 1.0))
            with pyro.plate("obs", x.shape[1], dim=-1):
                logits = mu + tau_a * z + (beta + tau_b * w) * x[idx]
                pyro.sample("y", dist.Bernoulli(logits=logits), obs=y[idx])

    return model


def factor_analysis_model(loadings: np.ndarray, subsample_size: int | None = None) -> Callable:
    """``model(x)``: ``z_n ~ N(0, I_L)``, ``x_n ~ N(W z_n, I)`` with known loadings ``W``
    (``dim x L``), the plate over the rows of ``x`` subsampled ``subsample_size`` at a time
    (``None``: every row, as for batches passed as the model's arguments). Each ``z_n``'s
    exact posterior: :func:`psvi.contrib.targets.factor_analysis_posterior`."""
    loadings = torch.as_tensor(loadings, dtype=torch.get_default_dtype())

    def model(x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([loadings.shape[1]]).to_event(1))
            pyro.sample("x", dist.Normal(z @ loadings.T, 1.0).to_event(1), obs=x[idx])

    return model


def amortized_normal_guide(network: nn.Module, latents: int, subsample_size: int | None = None) -> Callable:
    """``guide(x)`` of :func:`factor_analysis_model` (the same ``subsample_size``): an encoder,
    ``network`` (``2 L`` outputs, registered by ``pyro.module("encoder", ...)``), maps each
    member ``x_n`` of the plate's batch to a diagonal Normal's loc and log-scale. With a
    linear ``network`` the exact posterior is in the family."""

    def guide(x: torch.Tensor) -> None:
        pyro.module("encoder", network)
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
            out = network(x[idx])
            pyro.sample("z", dist.Normal(out[..., :latents], out[..., latents:].exp()).to_event(1))

    return guide


def earnings_regression(height: torch.Tensor, earn: torch.Tensor | None = None) -> None:
    """Earnings on height in dollars (:func:`psvi.contrib.targets.earnings_data`): Normal(0,
    1e6) priors on intercept ``b1`` and slope ``b2``, LogNormal(0, 10) on ``sigma``; a
    regression far from unit scale (the far-start tests and ``benchmarks.far_starts``)."""
    b1 = pyro.sample("b1", dist.Normal(0.0, 1e6))
    b2 = pyro.sample("b2", dist.Normal(0.0, 1e6))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 10.0))
    with pyro.plate("rows", len(height)):
        pyro.sample("earn", dist.Normal(b1 + b2 * height, sigma), obs=earn)


def mlp_classifier(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    hidden: int = 50,
    num_classes: int = 10,
    prior_scale: float = 1.0,
    scale_by_fan_in: bool = False,
    subsample_size: int | None = None,
) -> None:
    """One-hidden-layer tanh MLP with ``N(0, prior_scale^2)`` priors on all weights, or
    ``N(0, prior_scale^2 / fan_in)`` on the weight matrices with ``scale_by_fan_in``.

    The twin of ``numpyro_psvi.contrib.models.mlp_classifier``; broadcast-safe (weights may
    carry leading particle dimensions), so its particles vectorize.
    """
    num_inputs = x.shape[1]

    def weight(name, shape):
        scale = prior_scale / shape[0] ** 0.5 if scale_by_fan_in and len(shape) > 1 else prior_scale
        return pyro.sample(name, dist.Normal(x.new_zeros(shape), scale).to_event(len(shape)))

    w1, b1 = weight("w1", (num_inputs, hidden)), weight("b1", (hidden,))
    w2, b2 = weight("w2", (hidden, num_classes)), weight("b2", (num_classes,))
    check_same_rows(x.shape, None if y is None else y.shape)
    with pyro.plate("data", x.shape[0], subsample_size=subsample_size, device=x.device) as idx:
        hidden_units = torch.tanh(_linear(x[idx], w1) + b1)
        logits = _linear(hidden_units, w2) + b2
        pyro.deterministic("probs", torch.softmax(logits, -1))
        pyro.sample("y", dist.Categorical(logits=logits), obs=None if y is None else y[idx])


def bnn_regression(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    hidden: int = 50,
    prior_scale: float = 1.0,
    subsample_size: int | None = None,
    student_df: float | None = None,
) -> None:
    """The twin of ``numpyro_psvi.contrib.models.bnn_regression`` (one hidden ReLU layer,
    ``Gamma(6, 6)`` noise precision, with ``student_df`` a local ``lam ~ Gamma(df / 2,
    df / 2)`` scaling each point's precision); broadcast-safe, so its particles vectorize."""
    num_inputs = x.shape[1]

    def weight(name, shape):
        return pyro.sample(name, dist.Normal(x.new_zeros(shape), prior_scale).to_event(len(shape)))

    w1, b1 = weight("w1", (num_inputs, hidden)), weight("b1", (hidden,))
    w2, b2 = weight("w2", (hidden, 1)), weight("b2", (1,))
    precision = pyro.sample("precision", dist.Gamma(x.new_tensor(6.0), 6.0))
    check_same_rows(x.shape, None if y is None else y.shape)
    with pyro.plate("data", x.shape[0], subsample_size=subsample_size, device=x.device) as idx:
        mean = (_linear(torch.relu(_linear(x[idx], w1) + b1), w2) + b2).squeeze(-1)
        pyro.deterministic("mean", mean)
        if student_df is not None:
            half = x.new_tensor(student_df / 2)
            precision = precision * pyro.sample("lam", dist.Gamma(half, half))
        pyro.sample("y", dist.Normal(mean, precision**-0.5), obs=None if y is None else y[idx])


def _linear(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``h @ w`` for one plate dim: ``h (..., B, i)``, ``w (i, o)`` or ``(P, 1, i, o)``
    (a latent under a particle plate, its plate slot of size 1) -> ``(..., B, o)``."""
    if w.dim() == 2:
        return h @ w
    return (h.unsqueeze(-3) @ w).squeeze(-3)


def mlp_init_values(num_inputs: int, hidden: int = 50, num_classes: int = 10, seed: int = 0):
    """Glorot-uniform initial weights for :func:`mlp_classifier` (for ``init_to_value``)."""
    rng = np.random.default_rng(seed)

    def glorot(fan_in, fan_out):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        return torch.as_tensor(rng.uniform(-limit, limit, (fan_in, fan_out)), dtype=torch.float32)

    return {
        "w1": glorot(num_inputs, hidden),
        "b1": torch.zeros(hidden),
        "w2": glorot(hidden, num_classes),
        "b2": torch.zeros(num_classes),
    }


def bayesian_module(
    module: nn.Module,
    prior: float | Callable[[str, torch.Tensor], dist.Distribution] = 1.0,
    *,
    include: Callable[[str], bool] | None = None,
) -> PyroModule:
    """Turn ``module`` (in place) into a PyroModule with priors on its parameters.

    Parameters
    ----------
    module : torch.nn.Module
        The network, already on its device (priors are built there).
    prior : float or callable
        A scale ``s`` for ``Normal(0, s)`` priors on every weight, or
        ``prior(name, param) -> Distribution`` whose event shape is ``param.shape``.
    include : callable, optional
        ``include(name) -> bool`` selects the parameters (dotted names, as in
        ``module.named_parameters()``) that get priors; the others stay
        ``nn.Parameter`` and ``ProximalScoreVI`` learns them jointly (variational EM):
        a partly Bayesian network, e.g. a Bayesian last layer.

    Returns
    -------
    pyro.nn.PyroModule
        The same object: its sample sites are named like its parameters
        (``"fc1.weight"``), so its current weights make a natural
        ``init_to_value(values=...)`` for an autoguide.
    """
    to_pyro_module_(module)
    for module_name, submodule in list(module.named_modules()):
        for param_name, param in list(submodule.named_parameters(recurse=False)):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if include is not None and not include(name):
                continue
            if callable(prior):
                site_prior = prior(name, param)
            else:
                site_prior = dist.Normal(torch.zeros_like(param.detach()), prior).to_event(param.dim())
            setattr(submodule, param_name, PyroSample(site_prior))
    return module


def fan_in_prior(scale: float = 1.0) -> Callable[[str, torch.Tensor], dist.Distribution]:
    """A ``prior`` for :func:`bayesian_module`: ``Normal(0, scale / sqrt(fan_in))`` on each
    weight matrix (``fan_in`` = the product of its dims after the first, as in
    ``nn.Linear`` and ``nn.Conv*``) and ``Normal(0, scale)`` on vectors (biases), so that
    the prior's pre-activations keep unit scale in every layer of a wide network."""

    def prior(name: str, param: torch.Tensor) -> dist.Distribution:
        fan_in = param[0].numel() if param.dim() > 1 else 1
        return dist.Normal(torch.zeros_like(param.detach()), scale / fan_in**0.5).to_event(param.dim())

    return prior


class FlatBayesianModule:
    """A ``torch.nn.Module`` whose parameters are one flat latent vector (the fast path).

    Calling it samples the site ``name`` (default ``"weights"``), of shape ``(D,)`` with
    a ``Normal(loc, scale).to_event(1)`` prior assembled from per-parameter Normal
    priors, and runs the module on those weights with
    ``torch.func.functional_call`` (the weights enter as views of the flat vector, no
    copies). Against :func:`bayesian_module`, whose network has one sample site per
    parameter tensor, a model and an autoguide see one site, so the per-site Python
    work of Pyro and of the guide stays constant as the network grows (a ResNet has
    hundreds of parameter tensors). Particles run one forward pass each
    (``vectorize_particles=False``), exactly as ``S`` SGD steps would.

    Parameters
    ----------
    module : torch.nn.Module
        The network, on its device; its current parameters are the natural initial
        guide location (:attr:`initial_weights`).
    prior : float or callable
        A scale ``s`` for ``Normal(0, s)`` on every weight, or ``prior(name, param)``
        returning a Normal (e.g. :func:`fan_in_prior`), whose loc and scale are used.
    name : str
        The sample site's name.

    Examples
    --------
    >>> net = FlatBayesianModule(resnet, fan_in_prior())
    >>> model = partial(module_classifier, net, subsample_size=128)
    >>> guide = AutoNormal(model, init_loc_fn=init_to_value(values={"weights": net.initial_weights}))
    >>> ProximalScoreVI(model, guide, Adam({"lr": 1e-3}), vectorize_particles=False)
    >>> net.unflatten(guide.median()["weights"])  # {"conv1.weight": ..., ...}
    """

    def __init__(
        self,
        module: nn.Module,
        prior: float | Callable[[str, torch.Tensor], dist.Distribution] = 1.0,
        *,
        name: str = "weights",
    ) -> None:
        self.module, self.name = module, name
        named = dict(module.named_parameters())
        self.param_names = list(named)
        self.shapes = [named[n].shape for n in self.param_names]
        self.sizes = [named[n].numel() for n in self.param_names]
        locs, scales = [], []
        for param_name, param in named.items():
            loc, scale = _normal_loc_scale(param_name, param, prior)
            locs.append(torch.broadcast_to(loc, param.shape).reshape(-1))
            scales.append(torch.broadcast_to(scale, param.shape).reshape(-1))
        self.prior_loc = torch.cat(locs).detach()
        self.prior_scale = torch.cat(scales).detach()
        self.initial_weights = torch.cat([p.detach().reshape(-1) for p in named.values()])
        for param in named.values():  # the weights come from the site: no gradients kept here
            param.requires_grad_(False)

    @property
    def num_weights(self) -> int:
        """``D``, the length of the flat weight vector."""
        return len(self.initial_weights)

    def unflatten(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{parameter name: view of weights}`` for a flat ``weights (D,)``."""
        parts = torch.split(weights, self.sizes)
        pairs = zip(self.param_names, parts, self.shapes, strict=True)
        return {name: part.view(shape) for name, part, shape in pairs}

    def apply(self, weights: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        """The module's output at flat ``weights (D,)``."""
        if weights.dim() != 1:
            raise ValueError(
                f"FlatBayesianModule runs one particle at a time: got weights of shape "
                f"{tuple(weights.shape)}; pass vectorize_particles=False to ProximalScoreVI "
                "(and num_particles without vectorize_particles to Trace_ELBO)."
            )
        return torch.func.functional_call(self.module, self.unflatten(weights), inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        weights = pyro.sample(self.name, dist.Normal(self.prior_loc, self.prior_scale).to_event(1))
        return self.apply(weights, *inputs)


def _normal_loc_scale(name: str, param: torch.Tensor, prior) -> tuple[torch.Tensor, torch.Tensor]:
    """The loc and scale of a parameter's Normal prior (a float scale or a callable)."""
    if not callable(prior):
        return torch.zeros((), device=param.device), torch.full((), float(prior), device=param.device)
    site_prior = prior(name, param)
    base = site_prior.base_dist if isinstance(site_prior, dist.Independent) else site_prior
    if not isinstance(base, dist.Normal):
        raise ValueError(
            f"FlatBayesianModule needs Normal priors; the prior of {name!r} is "
            f"{type(base).__name__}. Use bayesian_module for other priors."
        )
    return base.loc.detach(), base.scale.detach()


def module_classifier(
    net: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    subsample_size: int | None = None,
) -> None:
    """Categorical likelihood on the logits of ``net`` (e.g. a :func:`bayesian_module`).

    The network runs outside the data plate: its weights are global latents.
    """
    check_same_rows(x.shape, None if y is None else y.shape)
    data = pyro.plate("data", x.shape[0], subsample_size=subsample_size, device=x.device)
    idx = data.indices
    logits = net(x[idx])
    with data:
        pyro.deterministic("probs", torch.softmax(logits, -1))
        pyro.sample("y", dist.Categorical(logits=logits), obs=None if y is None else y[idx])
