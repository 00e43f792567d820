"""Model scores through NumPyro's own tracing and plate subsampling.

The score at a particle ``u`` (flat, unconstrained) is the gradient of

    log p(T(u)) + (N/B) sum_{i in batch} log p(y_i | T(u)) + log|det J_T(u)|

where the N/B scale and the mini-batch come from the model's own
``numpyro.plate(..., subsample_size=B)``, seeded by a per-iteration key so that the
particles of one iteration share one mini-batch. The transform ``T`` is
``biject_to(site.support)`` evaluated inside the model
(:func:`numpyro.infer.util.potential_energy`), so dependent supports work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from numpyro.handlers import seed, substitute, trace
from numpyro.infer.initialization import init_to_uniform
from numpyro.infer.util import potential_energy

ScoreFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def make_log_joint(
    model: Callable,
    unpack: Callable[[jax.Array], dict[str, jax.Array]],
    model_args: tuple,
    model_kwargs: dict[str, Any],
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Return ``log_joint(u, batch_key)``: the mini-batch log target in unconstrained space.

    Parameters
    ----------
    model : callable
        The NumPyro model.
    unpack : callable
        Maps a flat latent vector to the dict of unconstrained site values.
    model_args, model_kwargs
        Arguments the model is called with.
    """

    def log_joint(u: jax.Array, batch_key: jax.Array) -> jax.Array:
        return -potential_energy(seed(model, batch_key), model_args, model_kwargs, unpack(u))

    return log_joint


def make_score_fn(
    model: Callable,
    unpack: Callable[[jax.Array], dict[str, jax.Array]],
    model_args: tuple,
    model_kwargs: dict[str, Any],
) -> ScoreFn:
    """Return ``scores(particles, batch_key) -> (log_joints (S,), scores (S, D))``.

    All particles share the mini-batch drawn from ``batch_key``; one vectorized
    (``vmap``) pass computes the ``S`` score calls.
    """
    value_and_score = jax.value_and_grad(make_log_joint(model, unpack, model_args, model_kwargs))
    return jax.vmap(value_and_score, in_axes=(0, None))


def at_random_values(model: Callable, rng_key: jax.Array) -> Callable:
    """``model`` (seeded) with latent values drawn uniformly in (-2, 2) in unconstrained
    space, not from the prior: also works for improper priors (``ImproperUniform``)."""
    return substitute(seed(model, rng_key), substitute_fn=init_to_uniform)


def latent_shapes(model: Callable, args: tuple, kwargs: dict) -> dict[str, tuple[int, ...]]:
    """``{site name: shape}`` of the model's latent sample sites, traced abstractly
    (``jax.eval_shape``: nothing is computed)."""

    def latent_values():
        model_trace = trace(at_random_values(model, jax.random.PRNGKey(0))).get_trace(*args, **kwargs)
        return {
            name: site["value"]
            for name, site in model_trace.items()
            if site["type"] == "sample" and not site["is_observed"]
        }

    return {name: tuple(value.shape) for name, value in jax.eval_shape(latent_values).items()}


def model_param_names(model: Callable, args: tuple, kwargs: dict) -> tuple[str, ...]:
    """Names of the ``numpyro.param`` sites of the model (traced abstractly)."""

    def names():
        model_trace = trace(at_random_values(model, jax.random.PRNGKey(0))).get_trace(*args, **kwargs)
        return {name: 0 for name, site in model_trace.items() if site["type"] == "param"}

    return tuple(jax.eval_shape(names))


def make_score_and_param_grad_fn(
    model: Callable,
    unpack: Callable[[jax.Array], dict[str, jax.Array]],
    constrain_model_params: Callable[[dict], dict],
    model_args: tuple,
    model_kwargs: dict[str, Any],
):
    """Return ``fn(particles, model_params, batch_key) -> (log_joints, scores, grad)``.

    For a model with ``numpyro.param`` sites: ``model_params`` are their unconstrained
    values, and ``grad`` is the gradient in them of the mean over particles of the
    mini-batch log joint, from the same vectorized pass as the scores.
    """

    def log_joint(u, model_params, batch_key):
        fixed = substitute(model, data=constrain_model_params(model_params))
        return make_log_joint(fixed, unpack, model_args, model_kwargs)(u, batch_key)

    value_and_grads = jax.vmap(jax.value_and_grad(log_joint, argnums=(0, 1)), in_axes=(0, None, None))

    def fn(particles, model_params, batch_key):
        log_joints, (scores, param_grads) = value_and_grads(particles, model_params, batch_key)
        return log_joints, scores, jax.tree.map(lambda g: jnp.mean(g, axis=0), param_grads)

    return fn


def check_model(model: Callable, rng_key: jax.Array, args: tuple, kwargs: dict) -> None:
    """Raise a clear error for models ProximalScoreVI cannot fit.

    Checks: at least one latent site; no discrete latent site; no latent site inside
    a subsampled plate; no plate whose ``subsample_size`` exceeds its size; finite
    observed data. (``numpyro.param`` sites in the model are learned jointly.)
    """
    model_trace = trace(at_random_values(model, rng_key)).get_trace(*args, **kwargs)
    for name, site in model_trace.items():
        if site["type"] == "plate":
            size, subsample_size = site["args"][:2]
            if subsample_size is not None and subsample_size > size:
                raise ValueError(
                    f"Plate {name!r} has subsample_size={subsample_size} larger than its "
                    f"size {size}: the N/B scale would be wrong. Use subsample_size <= {size} "
                    "(or None for the full data)."
                )
    latents = []
    for name, site in model_trace.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        if site["fn"].support.is_discrete:
            raise ValueError(
                f"Latent site {name!r} is discrete ({type(site['fn']).__name__}); score-based "
                "VI needs a differentiable log density in every latent. Marginalize it out "
                "in the model (e.g. a mixture via MixtureSameFamily) or use "
                "numpyro.infer.TraceEnum_ELBO with SVI."
            )
        for frame in site["cond_indep_stack"]:
            full_size = model_trace[frame.name]["args"][0] if frame.name in model_trace else None
            if full_size is not None and frame.size != full_size:
                raise NotImplementedError(
                    f"Latent site {name!r} is local to the subsampled plate {frame.name!r}; "
                    "ProximalScoreVI supports global latents with subsampled likelihoods. "
                    "Use the full plate for local latents, or marginalize them."
                )
        latents.append(name)
    if not latents:
        raise ValueError(
            "The model has no latent sample sites: there is no posterior to fit. "
            "Check that the observed sites carry obs= and that some site has none."
        )
    for name, site in model_trace.items():
        if site["type"] == "sample" and site["is_observed"]:
            value = site["value"]
            if isinstance(value, jax.core.Tracer):  # init under jit/vmap: data not concrete
                continue
            value = jnp.asarray(value)
            if jnp.issubdtype(value.dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(value))):
                raise ValueError(
                    f"Observed site {name!r} holds non-finite values (NaN or inf); remove or "
                    "impute them before fitting (or mask them with numpyro.handlers.mask)."
                )
