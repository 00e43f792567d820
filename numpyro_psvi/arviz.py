"""From a VI fit to ArviZ (NumPyro): ``InferenceData`` (ArviZ 0.x) or ``DataTree``
(ArviZ 1.x) and diagnostics.

``to_inference_data`` draws from the fitted guide and evaluates the model on the
FULL data: every subsampled plate's indices are replaced by ``arange(size)`` (so its
``N/B`` scale is 1), which is what ``az.loo`` and ``az.waic`` need.
``vi_diagnostics`` gives the PSIS k-hat of the guide against the full-data posterior
(Yao et al. 2018), an ELBO estimate and the covariance-weighted Fisher divergence.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.handlers import Messenger, substitute, trace
from numpyro.infer import Predictive
from numpyro.infer.autoguide import AutoGuideList
from numpyro.infer.util import log_likelihood

from numpyro_psvi.enumeration import enumerated_sites
from numpyro_psvi.guides import guide_density
from numpyro_psvi.objective import weighted_fisher
from numpyro_psvi.scores import at_random_values, make_log_joint, make_score_fn
from psvi.checks import enumerated_export_message
from psvi.inference_data import (
    add_fit_stats,
    dim_names,
    from_groups,
    pareto_khat,
    pseudo_chains,
    use_datatree,
)
from psvi.modes import ModeCoverage, search_modes, uncovered_message


def _check_not_enumerated(model: Callable, args: tuple, kwargs: dict) -> None:
    model_trace = trace(at_random_values(model, jax.random.PRNGKey(0))).get_trace(*args, **kwargs)
    enumerated = enumerated_sites(model_trace)
    if enumerated:
        raise NotImplementedError(enumerated_export_message(enumerated))


def full_data(model: Callable) -> Callable:
    """``model`` with every subsampled plate running over all of its data (scale 1)."""

    def all_indices(msg):
        if msg["type"] == "plate":
            return jnp.arange(msg["args"][0])
        return None

    def wrapped(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="subsample_size does not match")
            return substitute(model, substitute_fn=all_indices)(*args, **kwargs)

    return wrapped


class _Unobserve(Messenger):
    """Sample the named observed sites instead of conditioning on them."""

    def __init__(self, fn: Callable, names: set[str]) -> None:
        super().__init__(fn)
        self.names = names

    def process_message(self, msg) -> None:
        if msg["type"] == "sample" and msg["is_observed"] and msg["name"] in self.names:
            msg["value"], msg["is_observed"] = None, False


def _dims(site, name: str) -> list[str]:
    ndim = np.ndim(site["value"])
    plates = {frame.dim: frame.name for frame in site["cond_indep_stack"]}
    # A deterministic site has no distribution to say its event dims: all count as batch.
    event_dim = site["fn"].event_dim if site["type"] == "sample" else 0
    return dim_names(name, ndim, event_dim, plates)


def _autoguide_draws(guide: Any, rng_key: jax.Array, params: dict, num_samples: int) -> dict:
    """``guide.sample_posterior`` draws; an AutoGuideList's part by part, each with its own
    key (its ``sample_posterior`` gives every part the same one, correlating them)."""
    if not isinstance(guide, AutoGuideList):
        return guide.sample_posterior(rng_key, params, sample_shape=(num_samples,))
    keys = jax.random.split(rng_key, len(guide))
    return {
        name: value
        for part, key in zip(guide, keys, strict=True)
        for name, value in part.sample_posterior(key, params, sample_shape=(num_samples,)).items()
    }


def to_inference_data(
    model: Callable,
    guide: Any,
    params: dict,
    *args: Any,
    num_samples: int = 1000,
    rng_key: jax.Array | None = None,
    num_chains: int = 4,
    losses: Any = None,
    num_score_calls: int | None = None,
    diagnostics: bool = True,
    datatree: bool | None = None,
    **kwargs: Any,
) -> Any:
    """An ArviZ export (``InferenceData`` or ``DataTree``) of a fitted guide.

    Parameters
    ----------
    model, guide, params
        The model, its fitted autoguide and the params (``result.params``).
    *args, **kwargs
        The model's arguments, as given to the engine (data included).
    num_samples : int
        Draws from the guide.
    rng_key : jax.Array, optional
        Key for the draws (``PRNGKey(0)`` when omitted).
    num_chains : int
        The iid draws are split into this many pseudo-chains, so that ``az.summary``'s
        ESS and R-hat are defined (R-hat is ~1 by construction; ESS ~ num_samples: they
        carry no information, the posterior group's attrs say so).
    losses, num_score_calls
        The fit's loss trace and score-call count, stored in ``sample_stats``.
    diagnostics : bool
        Also store :func:`vi_diagnostics` (PSIS ``khat``, ``elbo``, ``fisher``, on
        ``num_samples`` draws of their own) in ``sample_stats``: what describes a VI fit,
        where the pseudo-chains' ESS and R-hat describe nothing.
    datatree : bool, optional
        Return ArviZ 1.x's ``xarray.DataTree`` (``arviz-base``; ``True``) or ArviZ 0.x's
        ``InferenceData`` (``False``); by default what the installed ArviZ makes.

    Returns
    -------
    arviz.InferenceData or xarray.DataTree
        ``posterior`` (latent and deterministic sites), ``posterior_predictive`` and ``log_likelihood``
        (observed sites, pointwise over the full data), ``observed_data`` and
        ``sample_stats``; dims named after the model's plates.
    """
    datatree = use_datatree(datatree)  # before the draws: a missing ArviZ loses no work
    _check_not_enumerated(model, args, kwargs)
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    key_draws, key_predict, key_trace, key_diagnostics = jax.random.split(rng_key, 4)
    # The fitted model params (numpyro.param sites learned with the guide) are in params.
    full_model = full_data(substitute(model, data=params))
    if hasattr(guide, "sample_posterior"):  # an autoguide
        posterior = _autoguide_draws(guide, key_draws, params, num_samples)
    else:  # a user-written guide: its sample sites are the latent sites
        posterior = Predictive(guide, params=params, num_samples=num_samples)(key_draws, *args, **kwargs)
    model_trace = trace(at_random_values(full_model, key_trace)).get_trace(*args, **kwargs)
    observed = {
        name: site for name, site in model_trace.items() if site["type"] == "sample" and site["is_observed"]
    }
    deterministic = [name for name, site in model_trace.items() if site["type"] == "deterministic"]
    pointwise = log_likelihood(full_model, posterior, *args, **kwargs)
    predictive = Predictive(
        _Unobserve(full_model, set(observed)), posterior_samples=posterior,
        return_sites=list(observed) + deterministic,
    )(key_predict, *args, **kwargs)  # fmt: skip
    posterior = {**posterior, **{name: predictive.pop(name) for name in deterministic}}
    dims = {
        name: _dims(site, name)
        for name, site in model_trace.items()
        if site["type"] in ("sample", "deterministic")
    }
    coords = {
        frame.name: np.arange(frame.size)
        for site in model_trace.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
    }
    groups = {
        "posterior": pseudo_chains({k: v for k, v in posterior.items() if k in dims}, num_chains),
        "posterior_predictive": pseudo_chains(predictive, num_chains),
        "log_likelihood": pseudo_chains(pointwise, num_chains),
        "observed_data": {name: np.asarray(site["value"]) for name, site in observed.items()},
    }
    idata = from_groups(groups, coords, dims, datatree)
    fit = None
    if diagnostics:
        fit = vi_diagnostics(
            model, guide, params, *args, num_samples=num_samples, rng_key=key_diagnostics, **kwargs
        )
    add_fit_stats(idata, losses, num_score_calls, fit)
    return idata


def vi_diagnostics(
    model: Callable,
    guide: Any,
    params: dict,
    *args: Any,
    num_samples: int = 1000,
    rng_key: jax.Array | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """How far the fitted guide is from the full-data posterior, on one scale for all methods.

    Returns
    -------
    dict
        ``khat``: PSIS Pareto k-hat of the importance weights ``p(z, y) / q(z)``
        (ArviZ's ``psislw``); below 0.7 the importance-sampling-corrected estimates are
        reliable, above it q misses mass of the posterior (Yao et al. 2018); ``-inf``
        when the log weights are constant to within 0.01 nats (an exact fit, whose
        weights have no tail: a Pareto fit would fit their round-off).
        ``elbo``: the mean of ``log p(z, y) - log q(z)`` over the draws.
        ``fisher``: the covariance-weighted Fisher divergence on the draws
        (zero exactly when q's score equals the posterior's).
    """
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    key_draws, key_model = jax.random.split(rng_key)
    _check_not_enumerated(model, args, kwargs)
    density = guide_density(guide, model=substitute(model, data=params), args=args, kwargs=kwargs)
    full_model = full_data(substitute(model, data=params))
    draws = density.sample(params, key_draws, num_samples)
    log_joint = jax.vmap(make_log_joint(full_model, density.unpack, args, kwargs), (0, None))
    log_w = log_joint(draws, key_model) - jax.vmap(density.log_prob, (None, 0))(params, draws)
    log_w = np.asarray(log_w, np.float64)
    _, scores = make_score_fn(full_model, density.unpack, args, kwargs)(draws, key_model)
    fisher = weighted_fisher(density, params, params, draws, scores, "covariance")
    return {"khat": pareto_khat(log_w), "elbo": float(np.mean(log_w)), "fisher": float(fisher)}


def mode_coverage(
    model: Callable,
    guide: Any,
    params: dict,
    *args: Any,
    num_searches: int = 32,
    num_steps: int = 300,
    num_draws: int = 1000,
    rng_key: jax.Array | None = None,
    **kwargs: Any,
) -> ModeCoverage:
    """Search the full-data posterior for mass the fitted guide misses (another mode, a
    funnel's neck) and warn when some is found (:func:`psvi.modes.search_modes`).

    Costs ``num_searches * (num_steps + 1) + num_draws`` full-data score calls; meant
    for models small enough to check, e.g. before NeuTra or after a flow fit.

    Returns
    -------
    psvi.modes.ModeCoverage
        The searches run, how many ended outside the guide, their end points (flat,
        unconstrained; ``density.unpack`` names them) and the thresholds used.
    """
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    key_draws, key_model = jax.random.split(rng_key)
    _check_not_enumerated(model, args, kwargs)
    density = guide_density(guide, model=substitute(model, data=params), args=args, kwargs=kwargs)
    full_model = full_data(substitute(model, data=params))
    draws = density.sample(params, key_draws, num_draws)
    scores = jax.jit(make_score_fn(full_model, density.unpack, args, kwargs))
    log_q = jax.jit(jax.vmap(density.log_prob, (None, 0)))

    def log_p_and_score(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        log_p, score = scores(jnp.asarray(u, draws.dtype), key_model)
        return np.asarray(log_p, np.float64), np.asarray(score, np.float64)

    report = search_modes(
        np.asarray(draws), lambda u: np.asarray(log_q(params, jnp.asarray(u, draws.dtype)), np.float64),
        log_p_and_score, num_searches=num_searches, num_steps=num_steps,
    )  # fmt: skip
    if report.num_uncovered:
        warnings.warn(uncovered_message(report, type(guide).__name__), UserWarning, stacklevel=2)
    return report
