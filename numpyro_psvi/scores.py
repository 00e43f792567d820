"""Model scores through NumPyro's own tracing and plate subsampling.

The score at a particle ``u`` (flat, unconstrained) is the gradient of

    log p(T(u)) + (N/B) sum_{i in batch} log p(y_i | T(u)) + log|det J_T(u)|

where the N/B scale and the mini-batch come from the model's own
``numpyro.plate(..., subsample_size=B)``, seeded by a per-iteration key so that the
particles of one iteration share one mini-batch. The transform ``T`` is
``biject_to(site.support)`` evaluated inside the model (as
:func:`numpyro.infer.util.potential_energy` does; ``log|det J|`` from
:mod:`numpyro_psvi.jacobians`), so dependent supports work.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import (
    Distribution,
    ExpandedDistribution,
    Independent,
    MaskedDistribution,
    TransformedDistribution,
)
from numpyro.distributions.transforms import biject_to
from numpyro.handlers import seed, substitute, trace
from numpyro.infer.initialization import init_to_uniform
from numpyro.infer.util import log_density

from numpyro_psvi._compat import unconstrain_reparam
from numpyro_psvi.enumeration import enumerated_log_density, enumerated_sites, is_continuous_latent
from psvi.checks import (
    argument_labels,
    discrete_latent_message,
    half_precision_message,
    no_latents_message,
    nonfinite_rows_message,
    support_check_points,
    support_density_message,
)

ScoreFn = Callable[..., tuple[jax.Array, jax.Array]]


class ModelScores(NamedTuple):
    """Mini-batch model scores of ``S`` particles (as ``pyro_psvi.scores.ModelScores``).

    Attributes
    ----------
    log_joints : jax.Array
        ``(S,)``, the plate-scaled mini-batch log joints.
    scores : jax.Array
        ``(S, D)``: unbiased for a global coordinate, exact for a local latent's
        coordinate in the mini-batch, 0 for one outside it.
    param_grads : dict
        The particles' mean log-joint gradient in each ``numpyro.param`` site.
    weights : jax.Array or None
        ``(D,)`` when a local latent's plate is subsampled (:func:`coordinate_weights`).
    active_dim : int
        Coordinates with a non-zero weight (``D`` when ``weights`` is ``None``).
    statistics : FisherStatistics or None
        A diagonal Gaussian guide's per-coordinate sums over the particles
        (:class:`~numpyro_psvi.objective.FisherStatistics`) where a data-parallel engine
        reduced them in place of the ``(S, D)`` scores (then ``None``).
    """

    log_joints: jax.Array
    scores: jax.Array | None
    param_grads: dict
    weights: jax.Array | None
    active_dim: int
    statistics: Any = None


def make_log_joint(
    model: Callable,
    unpack: Callable[[jax.Array], dict[str, jax.Array]],
    model_args: tuple,
    model_kwargs: dict[str, Any],
    local_plates: dict[str, tuple[tuple[str, int], ...]] | None = None,
    enumerate_nesting: int | None = None,
) -> Callable[..., jax.Array]:
    """Return ``log_joint(u, batch_key, indices=None)``: the mini-batch log target in
    unconstrained space.

    Parameters
    ----------
    model : callable
        The NumPyro model.
    unpack : callable
        Maps a flat latent vector to the dict of unconstrained site values.
    model_args, model_kwargs
        Arguments the model is called with.
    local_plates : dict, optional
        ``{site name: ((plate name, dim), ...)}`` of the local latents held over their
        plates' full size (:attr:`GuideDensity.local_plates`). With them, the
        subsampled plates take ``indices`` (:func:`draw_plate_indices`), each local
        latent is sliced by its plates' indices before its transform, and its
        ``log|det J|`` gets the plate's ``N/B`` scale like its log density.
    enumerate_nesting : int, optional
        For a model with enumerated discrete sites: its plate nesting, left of which
        they are enumerated and summed out (:mod:`numpyro_psvi.enumeration`).
    """
    if enumerate_nesting is None:

        def density(model: Callable) -> jax.Array:
            return log_density(model, model_args, model_kwargs, {})[0]

    else:

        def density(model: Callable) -> jax.Array:
            return enumerated_log_density(model, model_args, model_kwargs, enumerate_nesting)

    if not local_plates:

        def log_joint(u: jax.Array, batch_key: jax.Array, indices=None) -> jax.Array:
            seeded = seed(model, batch_key)
            if indices:
                seeded = substitute(seeded, substitute_fn=partial(given_plate_indices, indices))
            return density(substitute(seeded, substitute_fn=partial(unconstrain_reparam, unpack(u))))

        return log_joint

    def log_joint_with_locals(u: jax.Array, batch_key: jax.Array, indices=None) -> jax.Array:
        values, indices = unpack(u), indices or {}

        def unconstrain(site):
            if site["type"] == "plate":
                return given_plate_indices(indices, site)
            name = site["name"]
            if site["type"] != "sample" or name not in values:
                return None
            value = values[name]
            for plate, dim in local_plates.get(name, ()):
                if plate in indices:
                    value = jnp.take(value, indices[plate], axis=dim)
            return unconstrain_reparam({name: value}, site)

        return density(substitute(seed(model, batch_key), substitute_fn=unconstrain))

    return log_joint_with_locals


def given_plate_indices(indices: dict[str, jax.Array], site: dict) -> jax.Array | None:
    """A plate site's given indices (``None`` for a plate not in ``indices``)."""
    return indices.get(site["name"]) if site["type"] == "plate" else None


def subsampled_plates(model: Callable, args: tuple, kwargs: dict) -> dict[str, tuple[int, int]]:
    """``{plate name: (size, subsample_size)}`` of the model's subsampled plates (a trace
    of static shapes only: nothing is computed)."""
    plates: dict[str, tuple[int, int]] = {}

    def collect():
        model_trace = trace(at_random_values(model, jax.random.PRNGKey(0))).get_trace(*args, **kwargs)
        plates.update(subsampled_plates_of(model_trace))
        return 0

    jax.eval_shape(collect)
    return plates


def subsampled_plates_of(model_trace: dict) -> dict[str, tuple[int, int]]:
    """``{plate name: (size, subsample_size)}`` of the subsampled plates in a model trace."""
    plates = {}
    for name, site in model_trace.items():
        size, subsample_size = (site["args"] + (None, None))[:2] if site["type"] == "plate" else (0, 0)
        if site["type"] == "plate" and subsample_size is not None and subsample_size < size:
            plates[name] = (size, subsample_size)
    return plates


def batch_ratio(model: Callable, args: tuple, kwargs: dict) -> float:
    """The largest ``N/B`` (a plate's size over its subsample size) of the model; 1 when
    nothing is subsampled."""
    return max((size / batch for size, batch in subsampled_plates(model, args, kwargs).values()), default=1.0)


def draw_plate_indices(plates: dict[str, tuple[int, int]], rng_key: jax.Array) -> dict[str, jax.Array]:
    """A mini-batch of each subsampled plate, drawn without replacement (as NumPyro's plate)."""
    keys = jax.random.split(rng_key, max(len(plates), 1))
    return {
        name: jax.random.choice(key, size, (subsample_size,), replace=False)
        for key, (name, (size, subsample_size)) in zip(keys, sorted(plates.items()), strict=False)
    }


def coordinate_weights(
    local_plates: dict[str, tuple[tuple[str, int], ...]],
    shapes: dict[str, tuple[int, ...]],
    indices: dict[str, jax.Array],
) -> tuple[jax.Array | None, int]:
    """``(weights, active_dim)`` of the flat latent for this step's plate indices.

    ``shapes``: the unconstrained site shapes, in the flat layout's order (``unpack``'s:
    sorted by name for one autoguide, part by part for an AutoGuideList). A
    local latent's coordinate gets ``N/B`` (the product over its subsampled plates)
    when its plate members are in the mini-batch and 0 otherwise, a global one 1, so
    that ``sum_d weights_d f_d`` is unbiased for ``sum_d f_d``; ``active_dim`` counts
    the non-zero weights. ``weights`` is ``None`` when no local latent's plate is
    subsampled.
    """
    blocks, active, subsampled = {}, 0, False
    for name, shape in shapes.items():
        block, size = jnp.ones(shape), math.prod(shape)
        for plate, dim in local_plates.get(name, ()):
            full, batch = shape[dim], indices[plate].shape[0] if plate in indices else shape[dim]
            if batch == full:
                continue
            subsampled = True
            member = jnp.zeros(full).at[indices[plate]].set(full / batch)
            block = block * member.reshape((full,) + (1,) * (-dim - 1))
            size = size // full * batch
        blocks[name] = block
        active += size
    if not subsampled:
        return None, active
    return jnp.concatenate([block.ravel() for block in blocks.values()]), active  # shapes' order


def make_score_fn(
    model: Callable,
    unpack: Callable[[jax.Array], dict[str, jax.Array]],
    model_args: tuple,
    model_kwargs: dict[str, Any],
    local_plates: dict[str, tuple[tuple[str, int], ...]] | None = None,
    vectorize: bool = True,
    enumerate_nesting: int | None = None,
) -> ScoreFn:
    """Return ``scores(particles, batch_key, indices=None) -> (log_joints (S,), scores (S, D))``.

    All particles share the mini-batch drawn from ``batch_key`` (or given by
    ``indices``, see :func:`make_log_joint`); one vectorized (``vmap``) pass computes
    the ``S`` score calls, or with ``vectorize=False`` one pass per particle
    (``lax.map``). The scores are those of the plate-scaled log joint: divide a
    local latent's by its ``N/B`` (:func:`coordinate_weights`). ``enumerate_nesting``:
    see :func:`make_log_joint`.
    """
    log_joint = make_log_joint(model, unpack, model_args, model_kwargs, local_plates, enumerate_nesting)
    value_and_scores = _over_particles(jax.value_and_grad(log_joint), vectorize)

    def scores(particles: jax.Array, batch_key: jax.Array, indices=None):
        return value_and_scores(particles, batch_key, indices)

    return scores


def _over_particles(fn: Callable, vectorize: bool) -> Callable:
    """``fn(u, *rest)`` mapped over the leading axis of ``u``: ``vmap`` (one batched
    pass) or ``lax.map`` (one pass per particle, no batched weights)."""
    over = jax.vmap if vectorize else lambda one: partial(jax.lax.map, one)
    return lambda particles, *rest: over(lambda u: fn(u, *rest))(particles)


def at_random_values(model: Callable, rng_key: jax.Array) -> Callable:
    """``model`` (seeded) with latent values drawn uniformly in (-2, 2) in unconstrained
    space, not from the prior: also works for improper priors (``ImproperUniform``)."""
    return substitute(seed(model, rng_key), substitute_fn=init_to_uniform)


def latent_shapes(model: Callable, args: tuple, kwargs: dict) -> dict[str, tuple[int, ...]]:
    """``{site name: shape}`` of the model's continuous latent sites, traced abstractly
    (``jax.eval_shape``: nothing is computed)."""

    def latent_values():
        model_trace = trace(at_random_values(model, jax.random.PRNGKey(0))).get_trace(*args, **kwargs)
        return {name: site["value"] for name, site in model_trace.items() if is_continuous_latent(site)}

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
    local_plates: dict[str, tuple[tuple[str, int], ...]] | None = None,
    vectorize: bool = True,
    enumerate_nesting: int | None = None,
):
    """Return ``fn(particles, model_params, batch_key, indices=None) -> (log_joints,
    scores, grad)``.

    For a model with ``numpyro.param`` sites: ``model_params`` are their unconstrained
    values, and ``grad`` is the gradient in them of the mean over particles of the
    mini-batch log joint, from the same pass as the scores (``vectorize`` and
    ``enumerate_nesting`` as in :func:`make_score_fn`).
    """

    def log_joint(u, model_params, batch_key, indices):
        fixed = substitute(model, data=constrain_model_params(model_params))
        log_joint = make_log_joint(fixed, unpack, model_args, model_kwargs, local_plates, enumerate_nesting)
        return log_joint(u, batch_key, indices)

    value_and_grads = _over_particles(jax.value_and_grad(log_joint, argnums=(0, 1)), vectorize)

    def fn(particles, model_params, batch_key, indices=None):
        log_joints, (scores, param_grads) = value_and_grads(particles, model_params, batch_key, indices)
        return log_joints, scores, jax.tree.map(lambda g: jnp.mean(g, axis=0), param_grads)

    return fn


def check_model(model: Callable, rng_key: jax.Array, args: tuple, kwargs: dict) -> dict:
    """Raise a clear error for models ProximalScoreVI cannot fit; return the model's trace
    (at random values of its latents).

    Checks: at least one continuous latent site; no discrete latent site that is not
    marked for parallel enumeration (:mod:`numpyro_psvi.enumeration`); no plate whose
    ``subsample_size`` exceeds its size; finite observed data. (``numpyro.param``
    sites in the model are learned jointly.)
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
    latents, enumerated = [], enumerated_sites(model_trace)
    for name, site in model_trace.items():
        if site["type"] != "sample" or site["is_observed"] or name in enumerated:
            continue
        if site["fn"].support.is_discrete:
            how = site["infer"].get("enumerate")
            raise ValueError(discrete_latent_message(name, type(site["fn"]).__name__, how, "numpyro"))
        _check_density_on_support(name, site, rng_key)
        latents.append(name)
    if not latents:
        raise ValueError(no_latents_message(enumerated))
    _check_data_arguments(model_trace, args, kwargs)
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
    return model_trace


def guess_max_plate_nesting(model_trace: dict) -> int:
    """Deepest plate dim used by any sample site of a model trace."""
    dims = [
        -frame.dim
        for site in model_trace.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.dim is not None
    ]
    return max(dims, default=0)


def _latents(model_trace: dict) -> dict[str, dict]:
    return {name: site for name, site in model_trace.items() if is_continuous_latent(site)}


def local_latents(model_trace: dict) -> dict[str, str]:
    """``{site name: plate name}`` of the continuous latent sites inside a subsampled plate."""
    local = {}
    for name, site in _latents(model_trace).items():
        for frame in site["cond_indep_stack"]:
            full_size = model_trace[frame.name]["args"][0] if frame.name in model_trace else None
            if full_size is not None and frame.size != full_size:
                local[name] = frame.name
    return local


def masked_latents(model_trace: dict) -> tuple[str, ...]:
    """The latent sites whose own log density the model masks (``handlers.mask``, a
    ``MaskedDistribution``, and so ``obs=..., obs_mask=...``'s ``{name}_unobserved``):
    some of their entries may have no density in the model at all
    (:func:`unmodelled_scores`)."""
    return tuple(
        name
        for name, site in _latents(model_trace).items()
        if site.get("mask") is not None or has_masked_density(site["fn"])
    )


def unmodelled_scores(scores: jax.Array, guide_scores: jax.Array, masked: jax.Array) -> jax.Array:
    """``scores`` ``(S, D)`` with each coordinate of a masked site (``masked``, ``(D,)``)
    whose model score is exactly 0 at every particle, i.e. on which the model puts no
    density, given ``q_t``'s own scores ``guide_scores`` instead: with no density the
    score-matching target for it is a flat one, to which the guide's scale would grow
    without bound (as the ELBO's entropy term grows it under SVI); with ``q_t``'s own
    score it has no pull of its own and stays bounded, as the entries of ``obs_mask``'s
    ``{name}_unobserved`` that are observed are never read."""
    unmodelled = masked & jnp.all(scores == 0, axis=0)
    return jnp.where(unmodelled, guide_scores, scores)


def _check_density_on_support(name: str, site: dict, rng_key: jax.Array) -> None:
    """Raise :func:`psvi.checks.support_density_message` when the site's log density is
    NaN at any of 64 points (:func:`psvi.checks.support_check_points`) of its declared
    support, uniform in (-2, 2) in the space of ``biject_to(support)``, the space its
    autoguide lives in; ``-inf`` (a density that underflows) passes. Skipped under a
    caller's jit, where the values are not concrete; and for NumPyro's own distributions
    (:func:`_declares_its_domain`), whose compiled check costs seconds in a fresh process."""
    if _declares_its_domain(site["fn"]):
        return
    support = site["fn"].support
    try:
        transform = biject_to(support)
    except NotImplementedError:  # no bijection: the guides refuse the site with their own error
        return
    shape = transform.inverse_shape(jnp.shape(site["value"]))
    count = support_check_points(math.prod(shape))
    points = transform(jax.random.uniform(rng_key, (count, *shape), minval=-2, maxval=2))
    try:
        log_prob = site["fn"].log_prob(points)
    except Exception:  # noqa: BLE001 - a distribution these points do not suit: nothing to say
        return
    if isinstance(log_prob, jax.core.Tracer):
        return
    if np.isnan(np.asarray(log_prob)).any():
        raise ValueError(
            support_density_message(name, support, "biject_to(positive_ordered_vector) declares positive")
        )


def has_masked_density(fn: Distribution) -> bool:
    """Whether ``fn`` is a ``MaskedDistribution`` (through ``Independent`` and
    ``ExpandedDistribution``)."""
    while isinstance(fn, Independent | ExpandedDistribution):
        fn = fn.base_dist
    return isinstance(fn, MaskedDistribution)


def _declares_its_domain(fn: Distribution) -> bool:
    """Whether ``fn`` is one of NumPyro's distributions other than a bare
    ``TransformedDistribution`` (judged through ``Independent``, ``ExpandedDistribution``
    and ``MaskedDistribution``): its density is defined on all of the support it declares.
    A bare ``TransformedDistribution`` declares its last transform's codomain, whatever
    its base's values; a user's own distribution declares what its author wrote."""
    while isinstance(fn, Independent | ExpandedDistribution | MaskedDistribution):
        fn = fn.base_dist
    return (
        type(fn).__module__.startswith("numpyro.distributions.") and type(fn) is not TransformedDistribution
    )


def _check_data_arguments(model_trace, args: tuple, kwargs: dict) -> None:
    """Half precision data are refused; so are non-finite rows of a data argument that a
    subsampled plate indexes (the observed-site check sees only one mini-batch)."""
    plate_sizes = set()
    for site in model_trace.values():
        if site["type"] == "plate":
            size, subsample_size = site["args"][:2]
            if subsample_size is not None and subsample_size < size:
                plate_sizes.add(size)
    for label, value in argument_labels(args, kwargs):
        if isinstance(value, jax.core.Tracer) or not hasattr(value, "dtype"):
            continue
        if not jnp.issubdtype(value.dtype, jnp.floating):
            continue
        if value.dtype in (jnp.float16, jnp.bfloat16):
            raise TypeError(half_precision_message(label, str(value.dtype)))
        if jnp.ndim(value) and value.shape[0] in plate_sizes:
            # NumPy, not jnp: set-up may run inside a caller's jit, where jnp would trace.
            finite_rows = np.isfinite(np.asarray(value).reshape(value.shape[0], -1)).all(-1)
            if not finite_rows.all():
                rows = np.flatnonzero(~finite_rows).tolist()
                raise ValueError(nonfinite_rows_message(label, tuple(value.shape), rows, value.shape[0]))
