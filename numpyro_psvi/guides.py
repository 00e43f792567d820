"""Guide densities over the flat unconstrained latent vector.

A :class:`GuideDensity` turns an autoguide into the handful of pure functions the
proximal score-matching objective needs: draw particles, evaluate the log density
and its score in ``u`` (unconstrained coordinates), the KL divergence between two
parameter values, and the covariance quadratic form ``r' Cov(q) r`` used to weight
residuals. Every function takes the guide's *constrained* params, as
``SVI.get_params`` returns them.

Gaussian guides get closed-form scores and KL divergences; any other guide whose
``get_posterior`` has a tractable ``log_prob``, and any user-written guide (a
function of ``numpyro.param`` and ``numpyro.sample`` sites, one per latent site of
the model), uses nested autodiff for the score and a Monte Carlo KL on extra draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from functools import partial, singledispatch
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.flatten_util import ravel_pytree
from jax.scipy.linalg import cho_solve, solve_triangular
from jax.scipy.special import digamma, gammaln, polygamma
from numpyro.distributions.kl import kl_divergence
from numpyro.distributions.transforms import (
    ComposeTransform,
    ExpTransform,
    IdentityTransform,
    IndependentTransform,
    SigmoidTransform,
    StickBreakingTransform,
    biject_to,
)
from numpyro.handlers import seed, substitute, trace
from numpyro.infer import autoguide

from numpyro_psvi._compat import (
    autonormal_event_dims,
    autonormal_init_locs,
    batched_event_size,
    is_jaxpr_literal,
    unpack_latent,
)
from numpyro_psvi.enumeration import is_continuous_latent
from numpyro_psvi.jacobians import constrained_value, log_abs_det_jacobian
from numpyro_psvi.scores import given_plate_indices, subsampled_plates_of
from psvi.checks import (
    GuideSite,
    check_user_guide_sites,
    drop_leading_ones,
    full_covariance_advice,
    lowrank_advice,
    unbatched_local_guide_message,
)
from psvi.designs import OrthogonalDesign, coordinate_blocks
from psvi.families import (
    GUIDE_LIST_FLOW,
    LAPLACE,
    LOG_VARIANCE_OF_SCALE_FAMILY,
    NO_CLOSED_FORMS,
    POINT_MASS,
    DensityOptions,
    GuideFamily,
    SiteClosedForms,
    autoregressive_family_advice,
    bijection_kind,
    by_family,
    guide_list_part_refusal,
    has_closed_form,
    holds_a_natural_pair_constant,
    refused,
)

Params = dict[str, Any]

SCORE_METHODS = ("closed_form", "autodiff")


class GuideDensity(NamedTuple):
    """Pure functions of a guide's density over the flat unconstrained latent.

    Attributes
    ----------
    latent_dim : int
        Length ``D`` of the flat unconstrained latent vector.
    sample : callable
        ``sample(params, rng_key, num) -> (num, D)`` draws from the guide.
    log_prob : callable
        ``log_prob(params, u) -> ()`` for one flat latent ``u`` of shape ``(D,)``.
    score : callable
        ``score(params, u) -> (D,)``, the gradient of ``log_prob`` in ``u``.
    kl : callable
        ``kl(params_from, params_to, rng_key) -> ()``, ``KL(q_from || q_to)``;
        exact for Gaussian guides (the key is then unused), else a Monte Carlo
        estimate on fresh draws from ``q_from``.
    cov_quad : callable
        ``cov_quad(params, r) -> ()``, ``r' Cov(q) r`` for a residual ``r`` of shape
        ``(D,)``: the covariance weighting of docs/algorithm.md, section 4.
    unpack : callable
        Maps a flat latent ``(D,)`` to the dict of unconstrained site values.
    closed_form : bool
        Whether ``score`` and ``kl`` are closed form.
    loc_scale : callable or None
        ``loc_scale(params) -> (loc, scale)``, each ``(D,)``, for a diagonal Gaussian
        guide with closed-form scores (AutoNormal, AutoDiagonalNormal); ``None``
        otherwise. The objective then needs the particles only through per-coordinate
        sums (:func:`numpyro_psvi.objective.fisher_statistics`).
    local_plates : dict
        AutoNormal only: ``{site name: ((plate name, dim), ...)}`` for the sites inside
        plates, whose params span each plate's full size; ``dim`` counts from the right
        of the site's unconstrained value. The model sees them sliced by the plate's
        indices (:func:`numpyro_psvi.scores.make_log_joint`).
    loc_tril : callable or None
        ``loc_tril(params) -> (loc, scale_tril)``, ``(D,)`` and ``(D, D)``, for a
        full-covariance Gaussian guide with closed-form scores (AutoMultivariateNormal);
        ``None`` otherwise. Its proximal objective is then the split one
        (:func:`numpyro_psvi.objective.split_full_objective`).
    at_indices : callable or None
        A user-written guide with local latents in a subsampled plate draws only the
        mini-batch's members, as under ``SVI``: ``at_indices({plate name: indices})``
        is its density on that mini-batch (the model's pass gets the same indices), in
        which a draw fills the batch's members of the full-size flat latent (the others
        are 0 and carry no weight, :func:`numpyro_psvi.scores.coordinate_weights`).
        ``None`` for other guides, whose functions need no batch.
    elbo_log_prob : callable or None
        ``elbo_log_prob(params, u, weights) -> ()``, ``log q`` as ``Trace_ELBO`` counts it
        on a mini-batch of local latents: the batch's local terms times their plate's
        ``N/B``, the others not at all (``weights``: the update's coordinate weights,
        :func:`numpyro_psvi.scores.coordinate_weights`; a user-written guide knows its
        batch and ignores them). For the guides that take local latents (AutoNormal and
        its diagonal siblings, user-written guides with local latents); ``None`` otherwise.
    loc_lowrank : callable or None
        ``loc_lowrank(params) -> (loc, (cov_factor, scale))``, ``Cov = s (I + F F') s``
        with ``F = cov_factor`` ``(D, R)`` and ``s = diag(scale)``, for
        AutoLowRankMultivariateNormal with closed-form scores; ``None`` otherwise.
    gaussian_params : callable or None
        ``gaussian_params(loc, scale) -> params``: the guide's constrained params holding
        the Gaussian with ``loc`` and ``scale`` (the sds where ``loc_scale`` is set, the
        Cholesky factor where ``loc_tril`` is, the pair ``(cov_factor, scale)`` where
        ``loc_lowrank`` is), for the autoguides whose closed-form proximal step writes
        them (AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal,
        AutoLowRankMultivariateNormal); ``None`` otherwise.
    transport : Transport or None
        For a normalizing flow (AutoIAFNormal): its map from base draws to the latent,
        whose ``kl`` is then the transport displacement
        (:func:`transport_displacement`) and whose proximal objective is
        :func:`numpyro_psvi.objective.transport_objective`; ``None`` otherwise.
    linear_scores : callable or None
        ``linear_scores(params_t, particles, scores) -> LinearScoreStatistics`` for a
        mean-field user guide whose sites' scores in the unconstrained space are linear
        in their args (:class:`LinearScoreRule`) and whose free args are each read from
        one param entry (found once, by :func:`_linear_reads`), without local latents:
        its update then has an exact solve
        (:func:`numpyro_psvi.objective.linear_score_solve`); ``None`` otherwise.
    """

    latent_dim: int
    sample: Callable[[Params, jax.Array, int], jax.Array]
    log_prob: Callable[[Params, jax.Array], jax.Array]
    score: Callable[[Params, jax.Array], jax.Array]
    kl: Callable[[Params, Params, jax.Array], jax.Array]
    cov_quad: Callable[[Params, jax.Array], jax.Array]
    unpack: Callable[[jax.Array], dict[str, jax.Array]]
    closed_form: bool
    loc_scale: Callable[[Params], tuple[jax.Array, jax.Array]] | None = None
    local_plates: dict[str, tuple[tuple[str, int], ...]] = {}
    loc_tril: Callable[[Params], tuple[jax.Array, jax.Array]] | None = None
    at_indices: Callable[[dict[str, jax.Array]], GuideDensity] | None = None
    elbo_log_prob: Callable[[Params, jax.Array, jax.Array | None], jax.Array] | None = None
    loc_lowrank: Callable[[Params], tuple[jax.Array, tuple[jax.Array, jax.Array]]] | None = None
    gaussian_params: Callable[[jax.Array, Any], Params] | None = None
    transport: Transport | None = None
    linear_scores: Callable[..., LinearScoreStatistics] | None = None


class LinearScoreStatistics(NamedTuple):
    """What an update of a guide with linear scores (:attr:`GuideDensity.linear_scores`)
    needs from its particles, the twin of Pyro's: per coordinate ``i`` of the flat latent,
    with ``u_s`` the particles, ``g_s`` the model's scores and ``(phi_a, phi_b)`` the
    coordinate's family's features (:class:`LinearScoreRule`), the sums over the ``S``
    particles of ``phi_a^2, phi_a phi_b, phi_b^2, phi_a g, phi_b g``; ``q_t``'s args and
    variances in the unconstrained space; the rules' ``natural``, ``from_natural``,
    ``log_partition`` and ``log_partition_derivatives`` by coordinate; ``free``, per
    arg, the coordinates a param gives (the others are constants of the guide); and
    ``write(a, b)``, the constrained params that give the args ``(a, b)`` (the entries no
    coordinate reads kept at ``q_t``'s)."""

    args_t: tuple[jax.Array, jax.Array]
    sums: tuple[jax.Array, ...]
    count: int
    variances: jax.Array
    natural: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
    log_partition: Callable[[jax.Array, jax.Array], jax.Array]
    log_partition_derivatives: Callable[[jax.Array, jax.Array], tuple[jax.Array, ...]]
    from_natural: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
    free: tuple[np.ndarray, np.ndarray]
    write: Callable[[jax.Array, jax.Array], Params]


class Transport(NamedTuple):
    """A flow guide as a map ``T_params`` of standard normal base draws.

    Attributes
    ----------
    base_sample : callable
        ``base_sample(rng_key, num) -> (num, D)`` draws from the base distribution.
    push : callable
        ``push(params, z) -> (num, D)``: the latent values ``T_params(z)`` of base
        draws ``z`` of shape ``(num, D)``.
    pull : callable
        ``pull(params, u) -> (num, D)``: the base draws ``T_params^{-1}(u)``.
    """

    base_sample: Callable[[jax.Array, int], jax.Array]
    push: Callable[[Params, jax.Array], jax.Array]
    pull: Callable[[Params, jax.Array], jax.Array]


# ---------------------------------------------------------------------------
# Gaussian building blocks (closed form)
# ---------------------------------------------------------------------------


def local_plate_sizes(density: GuideDensity) -> list[int]:
    """The full size of each subsampled plate a local latent of ``density`` sits in (one
    entry per site and plate)."""
    if not density.local_plates:
        return []
    shapes = {name: jnp.shape(value) for name, value in density.unpack(jnp.zeros(density.latent_dim)).items()}
    return [shapes[name][dim] for name, plates in density.local_plates.items() for _, dim in plates]


def _coordinate_blocks(density: GuideDensity, subsampled: Collection[str]) -> np.ndarray:
    """:func:`psvi.designs.coordinate_blocks` of ``density``'s flat layout (sites in
    ``unpack``'s order): 0 for the globals, one block per slot of a local latent in one of
    the ``subsampled`` plates."""
    if not density.local_plates:
        return np.zeros(density.latent_dim, np.int64)
    sites = density.unpack(jnp.zeros(density.latent_dim))
    layout = [
        (
            jnp.shape(value),
            tuple(dim for plate, dim in density.local_plates.get(name, ()) if plate in subsampled),
        )
        for name, value in sites.items()
    ]
    return coordinate_blocks(layout)


def local_coordinates(density: GuideDensity, subsampled: Collection[str]) -> jax.Array | None:
    """``(D,)`` bool: which coordinates of the flat latent belong to local latents of one
    of the ``subsampled`` plates (sites in ``unpack``'s order, the flat layout's); ``None``
    where there are none (a plate seen whole each update holds no local latent here)."""
    blocks = _coordinate_blocks(density, subsampled)
    return jnp.asarray(blocks > 0) if blocks.max(initial=0) > 0 else None


def particle_blocks(density: GuideDensity, subsampled: Collection[str]) -> np.ndarray | None:
    """Each flat coordinate's block of :func:`psvi.designs.coordinate_blocks` (globals 0,
    then one per slot of a local latent in one of the ``subsampled`` plates); ``None`` for a
    density without a diagonal Gaussian mean or without such local latents."""
    if density.loc_scale is None:
        return None
    blocks = _coordinate_blocks(density, subsampled)
    return blocks if blocks.max(initial=0) > 0 else None


def orthogonal(density: GuideDensity, design: OrthogonalDesign) -> GuideDensity:
    """``density`` (a diagonal Gaussian) drawing its particles from ``design``
    (:class:`psvi.designs.OrthogonalDesign`): each particle a draw of ``q``, the blocks'
    deviations orthogonal across the particles."""
    columns = jnp.asarray(design.columns)
    weights = jnp.asarray(design.weights)

    def sample(params, rng_key, num):
        loc, scale = density.loc_scale(params)
        normals = jax.random.normal(rng_key, (num // design.group_size, *weights.shape), loc.dtype)
        deviations = jnp.einsum("pc,gcd->gpd", columns.astype(loc.dtype), normals * weights.astype(loc.dtype))
        return loc + scale * deviations.reshape(num, -1)

    return density._replace(sample=sample)


def antithetic(density: GuideDensity) -> GuideDensity | None:
    """``density`` drawing antithetic particles: ``ceil(S / 2)`` draws, then the first
    ``floor(S / 2)`` of them reflected about the Gaussian's mean (``2 loc - u``). Each
    particle is still a draw of ``q``; for even ``S`` their mean is ``q``'s mean, so the
    particles' common shift, which a weakly identified direction of the posterior does
    not pull back, is gone. ``None`` for a density without a Gaussian mean (a user guide
    with local latents in a subsampled plate has none: its draws fill only the batch)."""
    gaussian = (density.loc_scale, density.loc_tril, density.loc_lowrank)
    loc_of = next((fn for fn in gaussian if fn is not None), None)
    if loc_of is None:
        return None

    def sample(params, rng_key, num):
        draws = density.sample(params, rng_key, num - num // 2)
        return jnp.concatenate([draws, 2 * loc_of(params)[0] - draws[: num // 2]])

    return density._replace(sample=sample)


def _diag_log_prob(loc: jax.Array, scale: jax.Array, u: jax.Array) -> jax.Array:
    z = (u - loc) / scale
    return jnp.sum(-0.5 * z**2 - jnp.log(scale)) - 0.5 * loc.size * jnp.log(2 * jnp.pi)


def _diag_kl(loc0, scale0, loc1, scale1) -> jax.Array:
    ratio = (scale0 / scale1) ** 2
    return 0.5 * jnp.sum(ratio + ((loc1 - loc0) / scale1) ** 2 - 1.0 - jnp.log(ratio))


def _tril_log_prob(loc: jax.Array, tril: jax.Array, u: jax.Array) -> jax.Array:
    z = solve_triangular(tril, u - loc, lower=True)
    half_logdet = jnp.sum(jnp.log(jnp.abs(jnp.diagonal(tril))))
    return -0.5 * jnp.sum(z**2) - half_logdet - 0.5 * loc.size * jnp.log(2 * jnp.pi)


def _tril_score(loc: jax.Array, tril: jax.Array, u: jax.Array) -> jax.Array:
    return -cho_solve((tril, True), u - loc)


def _tril_kl(loc0, tril0, loc1, tril1) -> jax.Array:
    m = solve_triangular(tril1, tril0, lower=True)
    z = solve_triangular(tril1, loc1 - loc0, lower=True)
    logdet_ratio = jnp.sum(jnp.log(jnp.abs(jnp.diagonal(tril1)))) - jnp.sum(
        jnp.log(jnp.abs(jnp.diagonal(tril0)))
    )
    return 0.5 * (jnp.sum(m**2) + jnp.sum(z**2) - loc0.size) + logdet_ratio


class _LowRank(NamedTuple):
    """``Cov = W W' + diag(d)`` with its Woodbury pieces."""

    loc: jax.Array
    factor: jax.Array  # (D, K)
    diag: jax.Array  # (D,)
    capacitance_tril: jax.Array  # chol(I + W' D^-1 W), (K, K)

    @classmethod
    def build(cls, loc, factor, diag) -> _LowRank:
        wt_dinv = factor.T / diag
        capacitance = jnp.eye(factor.shape[-1]) + wt_dinv @ factor
        return cls(loc, factor, diag, jnp.linalg.cholesky(capacitance))

    def precision_matvec(self, v: jax.Array) -> jax.Array:
        """``Cov^{-1} v`` for ``v`` of shape ``(D,)`` or ``(D, n)``."""
        dinv_v = v / (self.diag if v.ndim == 1 else self.diag[:, None])
        inner = cho_solve((self.capacitance_tril, True), self.factor.T @ dinv_v)
        correction = self.factor @ inner
        return dinv_v - correction / (self.diag if v.ndim == 1 else self.diag[:, None])

    def logdet(self) -> jax.Array:
        return 2 * jnp.sum(jnp.log(jnp.diagonal(self.capacitance_tril))) + jnp.sum(jnp.log(self.diag))

    def precision_diag(self) -> jax.Array:
        a = solve_triangular(self.capacitance_tril, self.factor.T / self.diag, lower=True)
        return 1.0 / self.diag - jnp.sum(a**2, axis=0)


def _lowrank_log_prob(q: _LowRank, u: jax.Array) -> jax.Array:
    r = u - q.loc
    return -0.5 * (r @ q.precision_matvec(r) + q.logdet() + q.loc.size * jnp.log(2 * jnp.pi))


def _lowrank_kl(q0: _LowRank, q1: _LowRank) -> jax.Array:
    delta = q1.loc - q0.loc
    trace = jnp.sum(q1.precision_diag() * q0.diag) + jnp.sum(q0.factor * q1.precision_matvec(q0.factor))
    return 0.5 * (trace + delta @ q1.precision_matvec(delta) - q0.loc.size + q1.logdet() - q0.logdet())


# ---------------------------------------------------------------------------
# Adapters per autoguide
# ---------------------------------------------------------------------------


def _autodiff_score(log_prob: Callable[[Params, jax.Array], jax.Array]):
    return jax.grad(log_prob, argnums=1)


def _finish(
    *,
    latent_dim: int,
    sample,
    log_prob,
    score,
    kl,
    cov_quad,
    unpack,
    score_method: str,
) -> GuideDensity:
    closed = score_method == "closed_form"
    return GuideDensity(
        latent_dim=latent_dim,
        sample=sample,
        log_prob=log_prob,
        score=score if closed else _autodiff_score(log_prob),
        kl=kl,
        cov_quad=cov_quad,
        unpack=unpack,
        closed_form=closed,
    )


def _diagonal_density(get_loc_scale, unpack, latent_dim: int, score_method: str) -> GuideDensity:
    def sample(params, rng_key, num):
        loc, scale = get_loc_scale(params)
        return loc + scale * jax.random.normal(rng_key, (num, latent_dim), loc.dtype)

    def log_prob(params, u):
        return _diag_log_prob(*get_loc_scale(params), u)

    def score(params, u):
        loc, scale = get_loc_scale(params)
        return -(u - loc) / scale**2

    def kl(params0, params1, rng_key=None):
        return _diag_kl(*get_loc_scale(params0), *get_loc_scale(params1))

    def cov_quad(params, r):
        return jnp.sum((get_loc_scale(params)[1] * r) ** 2)

    def elbo_log_prob(params, u, weights):
        loc, scale = get_loc_scale(params)
        return (-0.5 * ((u - loc) / scale) ** 2 - jnp.log(scale) - 0.5 * jnp.log(2 * jnp.pi)) @ weights

    density = _finish(
        latent_dim=latent_dim,
        sample=sample,
        log_prob=log_prob,
        score=score,
        kl=kl,
        cov_quad=cov_quad,
        unpack=unpack,
        score_method=score_method,
    )
    loc_scale = get_loc_scale if density.closed_form else None
    return density._replace(loc_scale=loc_scale, elbo_log_prob=elbo_log_prob)


def _auto_normal(guide: autoguide.AutoNormal, options: DensityOptions) -> GuideDensity:
    init_locs = autonormal_init_locs(guide)
    names = list(init_locs)
    template = {k: init_locs[k] for k in names}
    flat0, unravel = ravel_pytree(template)
    prefix = guide.prefix

    def get_loc_scale(params):
        loc = ravel_pytree({k: params[f"{k}_{prefix}_loc"] for k in names})[0]
        scale = ravel_pytree({k: params[f"{k}_{prefix}_scale"] for k in names})[0]
        return loc, scale

    local_plates = {
        name: tuple(
            (frame.name, frame.dim - autonormal_event_dims(guide)[name])
            for frame in guide.prototype_trace[name]["cond_indep_stack"]
        )
        for name in names
        if guide.prototype_trace[name]["cond_indep_stack"]
    }

    def gaussian_params(loc, scale):
        locs, scales = unravel(loc), unravel(scale)
        return {
            **{f"{k}_{prefix}_loc": locs[k] for k in names},
            **{f"{k}_{prefix}_scale": scales[k] for k in names},
        }

    density = _diagonal_density(get_loc_scale, unravel, flat0.size, options.score_method)
    return density._replace(
        local_plates=local_plates, gaussian_params=gaussian_params if density.closed_form else None
    )


def _auto_diagonal(guide: autoguide.AutoDiagonalNormal, options: DensityOptions) -> GuideDensity:
    prefix = guide.prefix

    def get_loc_scale(params):
        return params[f"{prefix}_loc"], params[f"{prefix}_scale"]

    def gaussian_params(loc, scale):
        return {f"{prefix}_loc": loc, f"{prefix}_scale": scale}

    density = _diagonal_density(get_loc_scale, unpack_latent(guide), guide.latent_dim, options.score_method)
    return density._replace(gaussian_params=gaussian_params if density.closed_form else None)


def _auto_mvn(guide: autoguide.AutoMultivariateNormal, options: DensityOptions) -> GuideDensity:
    prefix = guide.prefix
    dim = guide.latent_dim

    def get(params):
        return params[f"{prefix}_loc"], params[f"{prefix}_scale_tril"]

    def sample(params, rng_key, num):
        loc, tril = get(params)
        return loc + jax.random.normal(rng_key, (num, dim), loc.dtype) @ tril.T

    def log_prob(params, u):
        return _tril_log_prob(*get(params), u)

    def score(params, u):
        return _tril_score(*get(params), u)

    def kl(params0, params1, rng_key=None):
        return _tril_kl(*get(params0), *get(params1))

    def cov_quad(params, r):
        return jnp.sum((r @ get(params)[1]) ** 2)

    density = _finish(
        latent_dim=dim,
        sample=sample,
        log_prob=log_prob,
        score=score,
        kl=kl,
        cov_quad=cov_quad,
        unpack=unpack_latent(guide),
        score_method=options.score_method,
    )

    def gaussian_params(loc, scale_tril):
        return {f"{prefix}_loc": loc, f"{prefix}_scale_tril": scale_tril}

    if not density.closed_form:
        return density
    return density._replace(loc_tril=get, gaussian_params=gaussian_params)


def _auto_lowrank(guide: autoguide.AutoLowRankMultivariateNormal, options: DensityOptions) -> GuideDensity:
    prefix = guide.prefix
    dim = guide.latent_dim

    def pieces(params):
        # As NumPyro's guide: Cov = (F s)(F s)' + diag(s^2), F the raw cov_factor.
        scale = params[f"{prefix}_scale"]
        return params[f"{prefix}_loc"], params[f"{prefix}_cov_factor"] * scale[:, None], scale

    def get(params) -> _LowRank:
        loc, factor, scale = pieces(params)
        return _LowRank.build(loc, factor, scale**2)

    def sample(params, rng_key, num):
        loc, factor, scale = pieces(params)
        k1, k2 = jax.random.split(rng_key)
        eps_w = jax.random.normal(k1, (num, factor.shape[-1]), loc.dtype)
        eps_d = jax.random.normal(k2, (num, dim), loc.dtype)
        return loc + eps_w @ factor.T + eps_d * scale

    def log_prob(params, u):
        return _lowrank_log_prob(get(params), u)

    def score(params, u):
        q = get(params)
        return -q.precision_matvec(u - q.loc)

    def kl(params0, params1, rng_key=None):
        return _lowrank_kl(get(params0), get(params1))

    def cov_quad(params, r):
        _, factor, scale = pieces(params)
        return jnp.sum((r @ factor) ** 2) + jnp.sum((scale * r) ** 2)

    density = _finish(
        latent_dim=dim,
        sample=sample,
        log_prob=log_prob,
        score=score,
        kl=kl,
        cov_quad=cov_quad,
        unpack=unpack_latent(guide),
        score_method=options.score_method,
    )

    def loc_lowrank(params):
        return params[f"{prefix}_loc"], (params[f"{prefix}_cov_factor"], params[f"{prefix}_scale"])

    def gaussian_params(loc, factor_scale):
        factor, scale = factor_scale
        return {f"{prefix}_loc": loc, f"{prefix}_cov_factor": factor, f"{prefix}_scale": scale}

    if not density.closed_form:
        return density
    return density._replace(loc_lowrank=loc_lowrank, gaussian_params=gaussian_params)


def _auto_batched_mvn(
    guide: autoguide.AutoBatchedMultivariateNormal, options: DensityOptions
) -> GuideDensity:
    """Independent full-covariance blocks: the flat latent is ``(*batch_shape, d)`` in row
    order, block ``b`` is ``N(loc[b], L[b] L[b]')``; the closed forms sum over blocks."""
    prefix = guide.prefix
    dim = guide.latent_dim

    def get(params):
        loc, tril = params[f"{prefix}_loc"], params[f"{prefix}_scale_tril"]
        return loc.reshape(-1, loc.shape[-1]), tril.reshape(-1, *tril.shape[-2:])

    size = batched_event_size(guide)

    def blocks(u):
        return u.reshape(dim // size, size)

    def sample(params, rng_key, num):
        loc, tril = get(params)
        eps = jax.random.normal(rng_key, (num, *loc.shape), loc.dtype)
        return (loc + jnp.einsum("bij,nbj->nbi", tril, eps)).reshape(num, dim)

    def log_prob(params, u):
        return jnp.sum(jax.vmap(_tril_log_prob)(*get(params), blocks(u)))

    def score(params, u):
        return jax.vmap(_tril_score)(*get(params), blocks(u)).reshape(dim)

    def kl(params0, params1, rng_key=None):
        return jnp.sum(jax.vmap(_tril_kl)(*get(params0), *get(params1)))

    def cov_quad(params, r):
        return jnp.sum(jnp.einsum("bi,bij->bj", blocks(r), get(params)[1]) ** 2)

    return _finish(
        latent_dim=dim,
        sample=sample,
        log_prob=log_prob,
        score=score,
        kl=kl,
        cov_quad=cov_quad,
        unpack=unpack_latent(guide),
        score_method=options.score_method,
    )


def _auto_batched_lowrank(
    guide: autoguide.AutoBatchedLowRankMultivariateNormal, options: DensityOptions
) -> GuideDensity:
    """Independent low-rank-plus-diagonal blocks, parametrised as NumPyro's guide (block
    ``b``: ``Cov = (F[b] s[b])(F[b] s[b])' + diag(s[b]^2)``); the closed forms sum over
    blocks of ``_LowRank``."""
    prefix = guide.prefix
    dim = guide.latent_dim
    size = batched_event_size(guide)

    def pieces(params):
        scale = params[f"{prefix}_scale"].reshape(-1, size)
        factor = params[f"{prefix}_cov_factor"]
        factor = factor.reshape(-1, size, factor.shape[-1]) * scale[..., None]
        return params[f"{prefix}_loc"].reshape(-1, size), factor, scale

    def get(params) -> _LowRank:
        loc, factor, scale = pieces(params)
        return jax.vmap(_LowRank.build)(loc, factor, scale**2)

    def blocks(u):
        return u.reshape(dim // size, size)

    def sample(params, rng_key, num):
        loc, factor, scale = pieces(params)
        k1, k2 = jax.random.split(rng_key)
        eps_w = jax.random.normal(k1, (num, *loc.shape[:-1], factor.shape[-1]), loc.dtype)
        eps_d = jax.random.normal(k2, (num, *loc.shape), loc.dtype)
        return (loc + jnp.einsum("bik,nbk->nbi", factor, eps_w) + eps_d * scale).reshape(num, dim)

    def log_prob(params, u):
        return jnp.sum(jax.vmap(_lowrank_log_prob)(get(params), blocks(u)))

    def score(params, u):
        q = get(params)
        return jax.vmap(lambda q, r: -q.precision_matvec(r - q.loc))(q, blocks(u)).reshape(dim)

    def kl(params0, params1, rng_key=None):
        return jnp.sum(jax.vmap(_lowrank_kl)(get(params0), get(params1)))

    def cov_quad(params, r):
        _, factor, scale = pieces(params)
        r = blocks(r)
        return jnp.sum(jnp.einsum("bi,bik->bk", r, factor) ** 2) + jnp.sum((scale * r) ** 2)

    return _finish(
        latent_dim=dim,
        sample=sample,
        log_prob=log_prob,
        score=score,
        kl=kl,
        cov_quad=cov_quad,
        unpack=unpack_latent(guide),
        score_method=options.score_method,
    )


def _monte_carlo_kl_and_cov(sample: Callable, log_prob: Callable, num_draws: int):
    """``kl`` and ``cov_quad`` of a guide without closed forms.

    ``kl(params0, params1, rng_key)`` is the Monte Carlo ``mean(log q0(x) - log q1(x))``
    on ``num_draws`` fresh draws ``x ~ q0`` (never the S particles, whose sample KL is
    unbounded below, docs/algorithm.md, section 4), plus the control variate ``<g0, params1 -
    params0>`` with ``g0 = mean grad_params log q_params(x)`` at ``params0``: it has mean
    zero (the score identity) and makes the estimate's gradient vanish exactly at
    ``params1 = params0``, so the proximal term no longer pulls toward the draws' own
    maximum-likelihood fit. ``cov_quad`` weights by the covariance diagonal of
    fixed-seed draws.
    """

    def kl(params0, params1, rng_key):
        params0 = jax.lax.stop_gradient(params0)
        draws = jax.lax.stop_gradient(sample(params0, rng_key, num_draws))

        def mean_log_prob(params):
            return jnp.mean(jax.vmap(log_prob, (None, 0))(params, draws))

        log_q0, grad0 = jax.value_and_grad(mean_log_prob)(params0)
        steps = jax.tree.map(lambda g, p1, p0: jnp.vdot(g, p1 - p0), grad0, params1, params0)
        return log_q0 - mean_log_prob(params1) + sum(jax.tree.leaves(steps))

    def cov_quad(params, r):
        draws = sample(params, jax.random.PRNGKey(0), num_draws)
        return jnp.sum(jnp.var(draws, axis=0) * r**2)

    return kl, cov_quad


def _auto_continuous(guide: autoguide.AutoContinuous, options: DensityOptions) -> GuideDensity:
    """Any AutoContinuous guide whose ``get_posterior`` has a ``log_prob``."""
    dim = guide.latent_dim

    def posterior(params):
        try:
            return guide.get_posterior(params)
        except NotImplementedError as error:
            raise TypeError(
                f"ProximalScoreVI needs the density of {type(guide).__name__}, whose "
                "get_posterior is not implemented. Use AutoMultivariateNormal or "
                "AutoIAFNormal, or register a density for this guide with "
                "numpyro_psvi.guide_family.register (docs/design.md)."
            ) from error

    def sample(params, rng_key, num):
        return posterior(params).sample(rng_key, (num,))

    def log_prob(params, u):
        return jnp.sum(posterior(params).log_prob(u))

    kl, cov_quad = _monte_carlo_kl_and_cov(sample, log_prob, options.num_kl_draws)

    return GuideDensity(
        latent_dim=dim,
        sample=sample,
        log_prob=log_prob,
        score=_autodiff_score(log_prob),
        kl=kl,
        cov_quad=cov_quad,
        unpack=unpack_latent(guide),
        closed_form=False,
    )


def transport_displacement(transport: Transport, num_draws: int) -> Callable:
    """``kl(params0, params1, rng_key)`` of a flow: how far its map moves ``num_draws``
    fresh base draws, in ``q0``'s sds: ``0.5 mean_z sum_d (T1(z) - T0(z))_d^2 / var0_d``.

    For a location shift of a Gaussian this is ``KL(q0 || q1)``; in general it is an
    upper bound on half the squared 2-Wasserstein distance between ``q0`` and ``q1`` in
    ``q0``'s whitened coordinates. It is never negative, and moving mass costs
    displacement wherever the flow sends its draws, where a Monte Carlo KL on ``q0``'s
    draws read -0.14 for the step that grew a far tail (docs/guides.md, "Flows with
    exact scores"). Its gradient vanishes at ``params1 = params0``.
    """

    def displacement(params0, params1, rng_key):
        z = transport.base_sample(rng_key, num_draws)
        start = jax.lax.stop_gradient(transport.push(params0, z))
        variance = jnp.var(start, axis=0)
        return 0.5 * jnp.mean(jnp.sum((transport.push(params1, z) - start) ** 2 / variance, axis=-1))

    return displacement


def _auto_flow(guide: autoguide.AutoContinuous, options: DensityOptions) -> GuideDensity:
    """A normalizing-flow autoguide (``get_posterior``: its flow's transforms of a
    standard normal): as :func:`_auto_continuous`, with the flow's map as its
    :class:`Transport`."""
    transport = Transport(
        base_sample=lambda rng_key, num: guide.get_base_dist().sample(rng_key, (num,)),
        push=lambda params, z: guide.get_transform(params)(z),
        pull=lambda params, u: guide.get_transform(params).inv(u),
    )
    density = _auto_continuous(guide, options)
    return density._replace(kl=transport_displacement(transport, options.num_kl_draws), transport=transport)


def _spread_points(support: Any, shape: tuple[int, ...], key: jax.Array) -> jax.Array:
    """64 points of ``support``: uniform in (-2, 2) in its unconstrained space."""
    transform = biject_to(support)
    return transform(jax.random.uniform(key, (64, *transform.inverse_shape(shape)), minval=-2, maxval=2))


def check_user_guide(guide: Callable, model: Callable, args: tuple, kwargs: dict) -> None:
    """Raise a clear error for a user-written guide whose density cannot be evaluated at
    the model's latent values: its sample sites must be exactly the model's latent
    sites, continuous, not point masses, each on its model site's support."""
    key = jax.random.PRNGKey(0)
    model_trace = trace(seed(model, key)).get_trace(*args, **kwargs)
    latents = {n: s for n, s in model_trace.items() if is_continuous_latent(s)}
    guide_trace = trace(seed(guide, key)).get_trace(*args, **kwargs)
    sites = {n: s for n, s in guide_trace.items() if s["type"] == "sample" and not s["is_observed"]}
    described = {}
    for name, site in sites.items():
        fn, model_support = site["fn"], latents[name]["fn"].support if name in latents else None
        while isinstance(fn, dist.Independent | dist.ExpandedDistribution | dist.MaskedDistribution):
            fn = fn.base_dist
        agree = True
        if model_support is not None and not site["fn"].support.is_discrete:
            # The guide's draws lie in the model's support, and its density is finite at
            # 64 points spread over the model's (uniform in (-2, 2) unconstrained; fixed key).
            draws = site["fn"].sample(key, (64,))
            points = _spread_points(model_support, jnp.shape(site["value"]), key)
            finite = jnp.all(jnp.isfinite(site["fn"].log_prob(points)))
            agree = bool(jnp.all(model_support(draws)) & finite)
        described[name] = GuideSite(
            isinstance(fn, dist.Delta), site["fn"].support.is_discrete, agree,
            str(site["fn"].support), str(model_support),
            jnp.shape(site["value"]), jnp.shape(latents[name]["value"]) if name in latents else (),
            bool((site.get("infer") or {}).get("is_auxiliary")),
        )  # fmt: skip
    check_user_guide_sites(latents, described, "numpyro.distributions.MixtureSameFamily")


def _dependencies(jaxpr: Any) -> list[set[int]]:
    """For each output of ``jaxpr``, the inputs it may depend on (conservatively: an
    equation's outputs depend on all of its inputs)."""
    depends: dict[Any, set[int]] = {var: {i} for i, var in enumerate(jaxpr.invars)}

    def of(var: Any) -> set[int]:
        return set() if is_jaxpr_literal(var) else depends.get(var, set())

    for eqn in jaxpr.eqns:
        inputs = set().union(*map(of, eqn.invars))
        for var in eqn.outvars:
            depends[var] = inputs
    return [of(var) for var in jaxpr.outvars]


def site_closed_forms(
    guide: Callable, args: tuple, kwargs: dict, transforms: dict[str, Any]
) -> SiteClosedForms:
    """Whether a user-written guide is mean field, each site's distribution a function of
    the params alone, never of another site's value (checked on the guide's computation
    graph, not on values), and if so which site-wise closed forms exist: a
    ``kl_divergence`` rule for every site's distribution, for every site the variance of
    its value under the model site's bijection ``transforms[name]``
    (:func:`unconstrained_variance`), and whether every site is Normal there
    (:func:`unconstrained_normal`); all only if every ``TransformedDistribution``'s
    transforms are constants (:func:`_fixed_transforms`)."""
    key = jax.random.PRNGKey(0)
    guide_trace = trace(seed(guide, key)).get_trace(*args, **kwargs)
    sites = {n: s for n, s in guide_trace.items() if s["type"] == "sample" and not s["is_observed"]}
    if not _mean_field(guide, args, kwargs, sites):
        return NO_CLOSED_FORMS
    params = {name: site["value"] for name, site in guide_trace.items() if site["type"] == "param"}
    if not _fixed_transforms(guide, args, kwargs, params, sorted(sites)):  # runs' sites might not compare
        return SiteClosedForms(mean_field=True, kl=False, variance=False)
    fns = {name: site["fn"] for name, site in sites.items()}
    unscaled = all(site["scale"] is None for site in sites.values())  # a mask wraps the fn
    return SiteClosedForms(
        True,
        all(has_closed_form(lambda fn: site_kl_divergence(fn, fn), fn) for fn in fns.values()),
        all(
            has_closed_form(lambda fn, name=name: unconstrained_variance(fn, transforms[name]), fn)
            for name, fn in fns.items()
        ),
        unscaled
        and all(
            has_closed_form(lambda fn, name=name: unconstrained_normal(fn, transforms[name]), fn)
            for name, fn in fns.items()
        ),
        unscaled and all(linear_score_rule(fn, transforms[name]) for name, fn in fns.items()),
    )


def _fixed_transforms(guide: Callable, args: tuple, kwargs: dict, params: dict, names: list[str]) -> bool:
    """Whether the transforms of the guide's ``TransformedDistribution`` sites depend on
    neither the params nor the arguments (on the jaxpr): then they are the same
    constants at every run, inside ``jit`` too, and two runs' sites compare."""
    key = jax.random.PRNGKey(0)
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    arrays = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.Array | np.ndarray)]

    def transform_leaves(params, array_leaves):
        given = list(leaves)
        for i, leaf in zip(arrays, array_leaves, strict=True):
            given[i] = leaf
        call_args, call_kwargs = jax.tree_util.tree_unflatten(treedef, given)
        guide_trace = trace(substitute(seed(guide, key), data=params)).get_trace(*call_args, **call_kwargs)
        return [jnp.asarray(leaf) for name in names for leaf in _transform_leaves(guide_trace[name]["fn"])]

    try:
        jaxpr = jax.make_jaxpr(transform_leaves)(params, [leaves[i] for i in arrays]).jaxpr
    except NotImplementedError:  # a transform that is not a pytree
        return False
    return not any(_dependencies(jaxpr))


def _transform_leaves(fn: dist.Distribution) -> list[Any]:
    """The array leaves of a ``TransformedDistribution``'s transforms (LogNormal's are fixed)."""
    while isinstance(fn, dist.Independent | dist.ExpandedDistribution | dist.MaskedDistribution):
        fn = fn.base_dist
    if not isinstance(fn, dist.TransformedDistribution) or isinstance(fn, dist.LogNormal):
        return []
    return jax.tree_util.tree_leaves(fn.transforms)


def _transform_parts(transform: Any) -> list[Any]:
    """The elementwise bijections ``transform`` applies in turn (compositions and
    ``IndependentTransform`` flattened), less identity maps."""
    if isinstance(transform, list | tuple):
        return [part for item in transform for part in _transform_parts(item)]
    while isinstance(transform, IndependentTransform):
        transform = transform.base_transform
    if isinstance(transform, ComposeTransform):
        return _transform_parts(transform.parts)
    return [] if isinstance(transform, IdentityTransform) else [transform]


def _same_transforms(mine: Any, theirs: Any) -> bool:
    """Whether two transforms are equal part by part: same types, equal concrete params
    (a traced param compares unequal)."""
    mine, theirs = _transform_parts(mine), _transform_parts(theirs)

    def equal(a: Any, b: Any) -> bool:
        a_leaves, b_leaves = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
        if type(a) is not type(b) or len(a_leaves) != len(b_leaves):
            return False
        try:
            return all(np.array_equal(x, y) for x, y in zip(a_leaves, b_leaves, strict=True))
        except jax.errors.TracerArrayConversionError:
            return False

    return len(mine) == len(theirs) and all(map(equal, mine, theirs))


_BIJECTION_KINDS = {ExpTransform: "log", SigmoidTransform: "logit", StickBreakingTransform: "stick_breaking"}


def _transform_kind(transform: Any) -> str | None:
    """``"identity"``, ``"log"``, ``"logit"`` or ``"stick_breaking"`` for the inverse of
    those bijections, else ``None``."""
    return bijection_kind(_transform_parts(transform), _BIJECTION_KINDS)


def _dirichlet_stick_variance(concentration: jax.Array) -> jax.Array:
    """The variances of ``StickBreakingTransform.inv(y)``, ``y ~ Dirichlet(a)``, shape
    ``(..., K - 1)``: its coordinates are ``logit(z_i)`` plus constants, with the stick
    fractions ``z_i = y_i / (1 - sum_{j<i} y_j)`` of a Dirichlet independent and
    ``Beta(a_i, sum_{j>i} a_j)``, so ``trigamma(a_i) + trigamma(sum_{j>i} a_j)`` each, and
    uncorrelated (the tail sums are summed from the end, not as total minus a prefix,
    which loses a small tail in float32)."""
    tails = jnp.flip(jnp.cumsum(jnp.flip(concentration, -1), -1), -1)[..., 1:]
    return polygamma(1, concentration[..., :-1]) + polygamma(1, tails)


_UNCONSTRAINED_VARIANCES: dict[tuple[type, str], Callable[[Any], jax.Array]] = {
    # logit(X) = log G_a - log G_b for X = G_a / (G_a + G_b), G ~ Gamma(., 1) independent.
    (dist.Beta, "logit"): lambda fn: polygamma(1, fn.concentration1) + polygamma(1, fn.concentration0),
    (dist.Gamma, "log"): lambda fn: polygamma(1, fn.concentration),  # log G_a - log rate
    (dist.InverseGamma, "log"): lambda fn: polygamma(1, fn.concentration),  # -log G_a + log rate
    (dist.LogNormal, "log"): lambda fn: fn.base_dist.scale**2,
    (dist.Dirichlet, "stick_breaking"): lambda fn: _dirichlet_stick_variance(fn.concentration),
    **{
        (family, "log"): lambda fn, name=family.__name__: LOG_VARIANCE_OF_SCALE_FAMILY[name]
        for family in (dist.Exponential, dist.HalfNormal, dist.HalfCauchy)
    },
}


def unconstrained_variance(fn: dist.Distribution, transform: Any) -> jax.Array:
    """The elementwise variance of ``transform.inv(x)`` for ``x ~ fn``, in closed form:
    ``fn.variance`` under the identity, and under the log or logit (the bijections of the
    positive reals and the unit interval) for Beta, Gamma, InverseGamma, LogNormal,
    Exponential, HalfNormal and HalfCauchy, and under the stick-breaking bijection of the
    simplex for a Dirichlet (:func:`_dirichlet_stick_variance`), in the
    unconstrained value's shape. Raises ``NotImplementedError`` otherwise (the engine then
    estimates it from draws)."""
    while isinstance(fn, dist.Independent | dist.ExpandedDistribution | dist.MaskedDistribution):
        fn = fn.base_dist  # the variance of one element: a plate's expansion broadcasts it
    kind = _transform_kind(transform)
    if kind == "identity":
        return fn.variance
    rule = _UNCONSTRAINED_VARIANCES.get((type(fn), kind))
    if rule is None and _is_image_under(fn, transform):
        rule = _base_variance  # the value's preimage is a base draw
    if rule is None:
        raise NotImplementedError(f"no closed-form variance of {type(fn).__name__} under {transform}")
    return jnp.broadcast_to(rule(fn), fn.batch_shape + tuple(transform.inverse_shape(fn.event_shape)))


_UNCONSTRAINED_NORMALS: dict[tuple[type, str], Callable[[Any], tuple[jax.Array, jax.Array]]] = {
    (dist.Normal, "identity"): lambda fn: (fn.loc, fn.scale),
    (dist.LogNormal, "log"): lambda fn: (fn.base_dist.loc, fn.base_dist.scale),  # log X ~ Normal
}


def unconstrained_normal(fn: dist.Distribution, transform: Any) -> tuple[jax.Array, jax.Array]:
    """``(loc, scale)``, each of ``fn``'s batch and event shape, when ``transform.inv(x)``
    for ``x ~ fn`` is elementwise Normal: a Normal under the identity, a LogNormal under
    the log, a ``TransformedDistribution`` of a Normal whose transforms are ``transform``.
    Raises ``NotImplementedError`` otherwise. The twin of Pyro's."""
    while isinstance(fn, dist.Independent | dist.ExpandedDistribution):
        fn = fn.base_dist  # a plate's expansion broadcasts it
    rule = _UNCONSTRAINED_NORMALS.get((type(fn), _transform_kind(transform)))
    if rule is None and _is_image_under(fn, transform) and type(fn.base_dist) is dist.Normal:
        rule = _UNCONSTRAINED_NORMALS[dist.Normal, "identity"]
        fn = fn.base_dist
    if rule is None:
        raise NotImplementedError(f"{type(fn).__name__} is not Normal under the inverse of {transform}")
    shape = fn.batch_shape + fn.event_shape
    return tuple(jnp.broadcast_to(value, shape) for value in rule(fn))


class LinearScoreRule(NamedTuple):
    """A family whose score in the unconstrained coordinate ``u`` is linear in two
    functions ``(e_1, e_2)`` of its two args ``(a, b)``: ``e_1 phi_1(u) + e_2 phi_2(u)``;
    the args themselves for Beta, Gamma and InverseGamma, ``(loc / scale^2, 1 / scale^2)``
    for a Normal in the unconstrained coordinate. The twin of Pyro's (the fields the
    exact solve reads).

    Attributes
    ----------
    args : callable
        ``args(fn) -> (a, b)``, the distribution's two args.
    features : callable
        ``features(u) -> (phi_1(u), phi_2(u))``.
    log_partition : callable
        ``log_partition(e_1, e_2) -> A``, elementwise, ``inf`` outside the family's domain:
        the family is an exponential family whose natural parameters are affine in
        ``(e_1, e_2)``, so ``KL(q_t || q) = A(e) - A(e_t) - grad A(e_t) . (e - e_t)``.
    log_partition_derivatives : callable
        ``(e_1, e_2) -> (dA/de_1, dA/de_2, d2A/de_1^2, d2A/de_1 de_2, d2A/de_2^2)``.
    natural, from_natural : callable or None
        ``natural(a, b) -> (e_1, e_2)`` and its inverse; ``None``: the args.
    """

    args: Callable[[Any], tuple[jax.Array, jax.Array]]
    features: Callable[[jax.Array], tuple[jax.Array, jax.Array]]
    log_partition: Callable[..., jax.Array]
    log_partition_derivatives: Callable[..., tuple[jax.Array, ...]]
    natural: Callable[..., tuple[jax.Array, jax.Array]] | None = None
    from_natural: Callable[..., tuple[jax.Array, jax.Array]] | None = None


def _gamma_log_partition(a, b) -> jax.Array:
    """A Gamma's (or, of ``1 / x``, an InverseGamma's) ``lgamma(a) - a log b``."""
    inside = (a > 0) & (b > 0)
    return jnp.where(inside, gammaln(a) - a * jnp.log(jnp.where(inside, b, 1.0)), jnp.inf)


def _gamma_log_partition_derivatives(a, b) -> tuple[jax.Array, ...]:
    return digamma(a) - jnp.log(b), -a / b, polygamma(1, a), -1 / b, a / b**2


def _beta_log_partition(a, b) -> jax.Array:
    """A Beta's ``lgamma(a) + lgamma(b) - lgamma(a + b)``."""
    inside = (a > 0) & (b > 0)
    return jnp.where(inside, gammaln(a) + gammaln(b) - gammaln(a + b), jnp.inf)


def _beta_log_partition_derivatives(a, b) -> tuple[jax.Array, ...]:
    total, curve_total = digamma(a + b), polygamma(1, a + b)
    return (
        digamma(a) - total, digamma(b) - total,
        polygamma(1, a) - curve_total, -curve_total, polygamma(1, b) - curve_total,
    )  # fmt: skip


def _normal_log_partition(e_1, e_2) -> jax.Array:
    """A Normal's ``e_1^2 / (2 e_2) - log(e_2) / 2`` in ``(loc / scale^2, 1 / scale^2)``."""
    inside = e_2 > 0
    return jnp.where(inside, e_1**2 / (2 * e_2) - jnp.log(jnp.where(inside, e_2, 1.0)) / 2, jnp.inf)


def _normal_log_partition_derivatives(e_1, e_2) -> tuple[jax.Array, ...]:
    mean = e_1 / e_2
    return mean, -(mean**2 + 1 / e_2) / 2, 1 / e_2, -mean / e_2, (mean**2 + 0.5 / e_2) / e_2


# The unconstrained score of a Normal there, (loc - u) / scale^2 = e_1 - e_2 u.
_NORMAL_LINEAR_SCORE = LinearScoreRule(
    lambda fn: (fn.loc, fn.scale),
    lambda u: (jnp.ones_like(u), -u),
    _normal_log_partition,
    _normal_log_partition_derivatives,
    lambda loc, scale: (loc / scale**2, scale**-2.0),
    lambda e_1, e_2: (e_1 / e_2, jax.lax.rsqrt(e_2)),
)

_LINEAR_SCORES: dict[tuple[type, str], LinearScoreRule] = {
    (dist.Normal, "identity"): _NORMAL_LINEAR_SCORE,
    (dist.LogNormal, "log"): _NORMAL_LINEAR_SCORE._replace(
        args=lambda fn: (fn.base_dist.loc, fn.base_dist.scale)
    ),
    # Scores a - b e^u (Gamma), -a + b e^-u (InverseGamma), a (1 - sigmoid u) - b sigmoid u (Beta).
    (dist.Gamma, "log"): LinearScoreRule(
        lambda fn: (fn.concentration, fn.rate),
        lambda u: (jnp.ones_like(u), -jnp.exp(u)),
        _gamma_log_partition,
        _gamma_log_partition_derivatives,
    ),
    (dist.InverseGamma, "log"): LinearScoreRule(
        lambda fn: (fn.concentration, fn.rate),
        lambda u: (-jnp.ones_like(u), jnp.exp(-u)),
        _gamma_log_partition,  # 1 / x of an InverseGamma(a, b) is Gamma(a, b)
        _gamma_log_partition_derivatives,
    ),
    (dist.Beta, "logit"): LinearScoreRule(
        lambda fn: (fn.concentration1, fn.concentration0),
        lambda u: (jax.nn.sigmoid(-u), -jax.nn.sigmoid(u)),
        _beta_log_partition,
        _beta_log_partition_derivatives,
    ),
}


def linear_score_rule(fn: dist.Distribution, transform: Any) -> tuple[LinearScoreRule, Any] | None:
    """The :class:`LinearScoreRule` of ``fn`` (its elementwise base) under ``transform`` and
    the distribution its args are read from (a ``TransformedDistribution`` of a Normal by
    ``transform``: its base), or ``None``. The twin of Pyro's."""
    while isinstance(fn, dist.Independent | dist.ExpandedDistribution):
        fn = fn.base_dist
    rule = _LINEAR_SCORES.get((type(fn), _transform_kind(transform)))
    if rule is None and _is_image_under(fn, transform) and type(fn.base_dist) is dist.Normal:
        return _NORMAL_LINEAR_SCORE, fn.base_dist
    return None if rule is None else (rule, fn)


class _LinearReads(NamedTuple):
    """Where a guide with linear scores reads its sites' flat args (:func:`_linear_reads`):
    the rules by family and each coordinate's (``owner``, ``None`` for one family), per
    arg the coordinates a param entry gives (``free``) and those entries' positions in
    the concatenation of the params ``names`` (``slots``, shapes ``shapes``)."""

    rules: dict[str, LinearScoreRule]
    families: list[LinearScoreRule]
    owner: np.ndarray | None
    free: tuple[np.ndarray, np.ndarray]
    slots: tuple[np.ndarray, np.ndarray]
    names: list[str]
    shapes: list[tuple[int, ...]]


def _broadcast_to_block(value: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """A site's ``value`` (a guide's loc, scale, args) broadcast to its block's ``shape``,
    without size-1 dims left of it (:func:`psvi.checks.drop_leading_ones`)."""
    return jnp.broadcast_to(jnp.reshape(value, drop_leading_ones(jnp.shape(value), len(shape))), shape)


def _site_args(rules: dict[str, LinearScoreRule], fns: dict[str, Any], transforms, shapes) -> list:
    """Each site's flat args ``(a, b)`` (sites in sorted order, as the flat latent)."""
    pairs = []
    for name in sorted(rules):
        source = linear_score_rule(fns[name], transforms[name])[1]
        pairs.append([_broadcast_to_block(arg, shapes[name]).reshape(-1) for arg in rules[name].args(source)])
    return [jnp.concatenate(side) for side in zip(*pairs, strict=True)]


def _linear_reads(
    guide: Callable, args: tuple, kwargs: dict, transforms: dict[str, Any], shapes: dict[str, tuple]
) -> _LinearReads | None:
    """How a mean-field guide whose sites all have linear scores reads their args from its
    params, found once, outside ``jit``, by two runs on tagged params (each entry its
    position ``p`` in the concatenated params: ``p + 0.5``, then ``2 p + 1.5``): an arg
    equal in both runs is a constant; one that is the same entry's tag in both, and whose
    tangent is that entry's (a random direction's ``jvp``), reads that entry; anything
    else (computed from the params) is ``None`` for all, as is a param entry read by two
    coordinates (a shared or broadcast param), a constant arg of a Normal (its natural
    coordinates move together), or a run that fails on the tags."""
    key = jax.random.PRNGKey(0)
    guide_trace = trace(seed(guide, key)).get_trace(*args, **kwargs)
    params = {name: site["value"] for name, site in guide_trace.items() if site["type"] == "param"}
    fns = {name: guide_trace[name]["fn"] for name in shapes}
    found = {name: linear_score_rule(fns[name], transforms[name]) for name in shapes}
    arrays = all(isinstance(value, jax.Array | np.ndarray | float) for value in params.values())
    if not (params and arrays) or any(rule is None for rule in found.values()):
        return None  # (a module's params are a network's, which reads them itself)
    rules = {name: rule for name, (rule, _) in found.items()}
    names = sorted(params)
    sizes = [int(np.size(params[name])) for name in names]
    starts = np.cumsum([0, *sizes])[:-1]
    if sum(sizes) >= 2**22:  # tags exact in float32 (2^24), with room for 2 p + 1.5
        return None

    def tagged(scale: float, shift: float) -> dict[str, jax.Array]:
        return {
            name: (scale * (start + jnp.arange(size, dtype=jnp.result_type(float))) + shift).reshape(
                jnp.shape(params[name])
            )
            for name, start, size in zip(names, starts, sizes, strict=True)
        }

    def run(tags: dict[str, jax.Array]) -> list[jax.Array]:
        seeded = trace(substitute(seed(guide, key), data=tags)).get_trace(*args, **kwargs)
        return _site_args(rules, {name: seeded[name]["fn"] for name in shapes}, transforms, shapes)

    try:
        with jax.ensure_compile_time_eval():
            first, second = run(tagged(1.0, 0.5)), run(tagged(2.0, 1.5))
            tangent = {
                name: jax.random.normal(
                    jax.random.fold_in(key, i), jnp.shape(params[name]), jnp.result_type(float)
                )
                for i, name in enumerate(names)
            }
            _, moved = jax.jvp(run, (tagged(1.0, 0.5),), (tangent,))
    except Exception:  # noqa: BLE001 - the guide's code on positions, not values: no fast path
        return None
    joined_tangent = np.concatenate([np.ravel(tangent[name]) for name in names])
    free, slots = [], []
    for one, two, direction in zip(first, second, moved, strict=True):
        one, two, direction = np.asarray(one), np.asarray(two), np.asarray(direction)
        constant = one == two
        slot = np.rint(np.where(np.abs(one) < 2**23, one, -1.0) - 0.5).astype(np.int64)  # -2: none
        read = ~constant & (slot >= 0) & (slot < sum(sizes))
        slot = np.where(read, slot, 0)
        if not np.all(constant | (read & (one == slot + 0.5) & (two == 2 * slot + 1.5))):
            return None
        if not np.allclose(np.where(read, direction, 0), np.where(read, joined_tangent[slot], 0), atol=1e-6):
            return None
        free.append(read)
        slots.append(slot[read])
    every = np.concatenate(slots)
    if np.unique(every).size != every.size:
        return None
    families = list(dict.fromkeys(rules[name] for name in sorted(rules)))
    owner = None
    if len(families) > 1:
        owner = np.concatenate(
            [np.full(math.prod(shapes[name]), families.index(rules[name])) for name in sorted(rules)]
        )
    if holds_a_natural_pair_constant(families, owner, free):
        return None
    shapes_read = [tuple(np.shape(params[name])) for name in names]
    return _LinearReads(rules, families, owner, (free[0], free[1]), (slots[0], slots[1]), names, shapes_read)


def _base_variance(fn: dist.TransformedDistribution) -> jax.Array:
    return fn.base_dist.variance


def _is_elementwise_transformed(fn: dist.Distribution) -> bool:
    return (
        isinstance(fn, dist.TransformedDistribution)
        and not isinstance(fn, dist.LogNormal)
        and fn.base_dist.event_shape == fn.event_shape
    )


def _is_image_under(fn: dist.Distribution, transform: Any) -> bool:
    """Whether ``fn`` is an elementwise ``TransformedDistribution`` whose transforms are
    ``transform``: its values' preimages are its base's draws."""
    return _is_elementwise_transformed(fn) and _same_transforms(fn.transforms, transform)


def site_kl_divergence(p: dist.Distribution, q: dist.Distribution) -> jax.Array:
    """``kl_divergence(p, q)``, and for two LogNormals (whose transform is fixed) the KL of
    their Normals, as torch's rule for equal transforms gives it in Pyro; through matching
    ``Independent`` wrappers (a vector InverseGamma under ``to_event``)."""
    if (
        isinstance(p, dist.Independent)
        and isinstance(q, dist.Independent)
        and p.reinterpreted_batch_ndims == q.reinterpreted_batch_ndims
    ):  # NumPyro's own rule would not reach this function's cases in the bases
        kl = site_kl_divergence(p.base_dist, q.base_dist)
        return jnp.sum(kl, axis=tuple(range(-p.reinterpreted_batch_ndims, 0)))
    if isinstance(p, dist.LogNormal) and isinstance(q, dist.LogNormal):
        return kl_divergence(p.base_dist, q.base_dist)
    if (
        _is_elementwise_transformed(p)
        and _is_elementwise_transformed(q)
        and _same_transforms(p.transforms, q.transforms)
    ):
        return kl_divergence(p.base_dist, q.base_dist)  # a common bijection leaves the KL
    return kl_divergence(p, q)


def _mean_field(guide: Callable, args: tuple, kwargs: dict, sites: dict[str, dict]) -> bool:
    """Whether no site's distribution reads another site's value (on the jaxpr)."""
    key = jax.random.PRNGKey(0)
    points = {name: jax.device_get(site["value"]) for name, site in sites.items()}  # constants

    def site_log_probs(values):
        conditioned = trace(substitute(seed(guide, key), data=values)).get_trace(*args, **kwargs)
        return [jnp.sum(conditioned[name]["fn"].log_prob(points[name])) for name in sorted(values)]

    # A dict flattens in key order, one leaf per site: input i and output i are one site's.
    values = {name: site["value"] for name, site in sites.items()}
    depends = _dependencies(jax.make_jaxpr(site_log_probs)(values).jaxpr)
    return all(read <= {i} for i, read in enumerate(depends))


def _user_guide(
    guide: Callable,
    model: Callable,
    args: tuple,
    kwargs: dict,
    num_kl_draws: int,
    closed_forms: SiteClosedForms = NO_CLOSED_FORMS,
    reads: _LinearReads | None = None,
) -> GuideDensity:
    """A user-written guide, site by site on the model's constrained values.

    ``log q_u(u) = sum_sites log q(T(u)) + log|det J_T(u)|`` with ``T`` each model site's
    ``biject_to(support)``: the Jacobians are those of the model's log joint, so they
    cancel in the residual (docs/algorithm.md, section 3). The guide is run with the
    model's arguments and its ``numpyro.param`` values substituted.

    A local latent in a subsampled plate spans the plate's full size in the flat latent
    (``local_plates``, as AutoNormal's params do); the guide draws the members of a
    mini-batch (``at_indices``), and ``log q`` is that of the globals and the batch's
    members without the plate's ``N/B`` scale (the density, not the ELBO's estimate).

    ``reads`` (:func:`_linear_reads`): where a guide with linear scores reads its args;
    without local latents its density then has ``linear_scores``.
    """
    model_trace = trace(seed(model, jax.random.PRNGKey(0))).get_trace(*args, **kwargs)
    latents = {n: s for n, s in model_trace.items() if is_continuous_latent(s)}
    subsampled = {name: size for name, (size, _) in subsampled_plates_of(model_trace).items()}
    transforms = {name: biject_to(site["fn"].support) for name, site in latents.items()}
    template, local_plates = {}, {}
    for name, site in latents.items():
        shape, event_dim = _block_shape(site, transforms[name])
        shape = list(shape)
        plates = tuple(
            (frame.name, frame.dim - event_dim)
            for frame in site["cond_indep_stack"]
            if frame.name in subsampled
        )
        for plate, dim in plates:
            shape[dim] = subsampled[plate]
        template[name] = jnp.zeros(shape)
        if plates:
            local_plates[name] = plates
    flat, unravel = ravel_pytree(template)

    def on_batch(indices: dict[str, jax.Array]) -> GuideDensity:
        at_plates = partial(given_plate_indices, indices)

        def members(name: str, value: jax.Array, full: jax.Array | None = None) -> jax.Array:
            """A local latent's batch members (or ``value`` put at them in ``full``)."""
            for plate, dim in local_plates.get(name, ()):
                if plate not in indices:
                    raise NotImplementedError(unbatched_local_guide_message(name, plate))
                axis = jnp.ndim(template[name]) + dim
                if full is None:
                    value = jnp.take(value, indices[plate], axis=axis)
                else:
                    value = full.at[(slice(None),) * axis + (indices[plate],)].set(value)
            return value

        def guide_log_prob(params, u, plate_scaled):
            values = {name: members(name, value) for name, value in unravel(u).items()}
            x = {name: constrained_value(transforms[name], value) for name, value in values.items()}
            data = {**params, **x}
            guide_trace = trace(substitute(substitute(guide, data=data), substitute_fn=at_plates))
            total = 0.0
            for name, site in guide_trace.get_trace(*args, **kwargs).items():
                if site["type"] != "sample" or name not in x:
                    continue
                # The guide's plates scale a batch member's term by N/B; the density has it once.
                factor = math.prod(subsampled.get(f.name, f.size) / f.size for f in site["cond_indep_stack"])
                scale = 1.0 if site["scale"] is None else site["scale"]
                log_q = jnp.sum(site["fn"].log_prob(site["value"])) * (
                    scale if plate_scaled else scale / factor
                )
                log_det = log_abs_det_jacobian(transforms[name], values[name], x[name])
                total = total + log_q + jnp.sum(log_det) * (factor if plate_scaled else 1.0)
            return total

        def sample(params, rng_key, num):
            def one(key):
                seeded = seed(substitute(substitute(guide, data=params), substitute_fn=at_plates), key)
                guide_trace = trace(seeded).get_trace(*args, **kwargs)
                values = {
                    name: members(name, transforms[name].inv(guide_trace[name]["value"]), template[name])
                    for name in latents
                }
                return ravel_pytree(values)[0]

            return jax.vmap(one)(jax.random.split(rng_key, num))

        def elbo_log_prob(params, u, weights):
            return guide_log_prob(params, u, plate_scaled=True)

        def site_distributions(params):
            """Each site's distribution and the weight of its terms in the density."""
            seeded = seed(substitute(substitute(guide, data=params), substitute_fn=at_plates), 0)
            guide_trace = trace(seeded).get_trace(*args, **kwargs)
            weighted = {}
            for name in latents:
                site = guide_trace[name]
                factor = math.prod(subsampled.get(f.name, f.size) / f.size for f in site["cond_indep_stack"])
                weighted[name] = (site["fn"], (1.0 if site["scale"] is None else site["scale"]) / factor)
            return weighted

        def site_kl(params0, params1, rng_key=None):
            fns0 = site_distributions(jax.lax.stop_gradient(params0))
            return sum(
                jnp.sum(site_kl_divergence(fns0[name][0], fn1) * weight)
                for name, (fn1, weight) in site_distributions(params1).items()
            )

        def site_cov_quad(params, r):
            variances = {}
            for name, (fn, _) in site_distributions(params).items():
                variance = unconstrained_variance(fn, transforms[name])
                batch = _broadcast_to_block(variance, members(name, template[name]).shape)
                variances[name] = members(name, batch, template[name])
            return jnp.sum(ravel_pytree(variances)[0] * r**2)

        if closed_forms.normal and not local_plates:

            def get_loc_scale(params):
                pairs = {
                    name: [
                        _broadcast_to_block(part, template[name].shape)
                        for part in unconstrained_normal(fn, transforms[name])
                    ]
                    for name, (fn, _) in site_distributions(params).items()
                }
                return tuple(
                    ravel_pytree({name: pair[side] for name, pair in pairs.items()})[0] for side in (0, 1)
                )

            # A diagonal Gaussian in the unconstrained space: AutoNormal's density and fit.
            return _diagonal_density(get_loc_scale, unravel, flat.size, "closed_form")._replace(
                elbo_log_prob=None
            )

        def linear_scores(params_t, particles, scores) -> LinearScoreStatistics:
            fns = {name: fn for name, (fn, _) in site_distributions(params_t).items()}
            shapes = {name: value.shape for name, value in template.items()}
            a_t, b_t = _site_args(reads.rules, fns, transforms, shapes)
            blocks = jax.vmap(unravel)(particles)
            features = [
                reads.rules[name].features(blocks[name].reshape(particles.shape[0], -1))
                for name in sorted(shapes)
            ]
            phi_a, phi_b = (jnp.concatenate(side, axis=-1) for side in zip(*features, strict=True))
            products = (phi_a * phi_a, phi_a * phi_b, phi_b * phi_b, phi_a * scores, phi_b * scores)
            variances = jnp.concatenate([
                _broadcast_to_block(unconstrained_variance(fns[name], transforms[name]), shape).reshape(-1)
                for name, shape in sorted(shapes.items())
            ])  # fmt: skip

            def write(a: jax.Array, b: jax.Array) -> Params:
                joined = jnp.concatenate([jnp.ravel(params_t[name]) for name in reads.names])
                for side, free, slots in zip((a, b), reads.free, reads.slots, strict=True):
                    joined = joined.at[slots].set(side[free].astype(joined.dtype))
                parts = jnp.split(joined, np.cumsum([math.prod(shape) for shape in reads.shapes])[:-1])
                return {
                    name: part.reshape(shape)
                    for name, part, shape in zip(reads.names, parts, reads.shapes, strict=True)
                }

            per_family = partial(by_family, jnp.where, reads.families, reads.owner)
            stop = jax.lax.stop_gradient
            return LinearScoreStatistics(
                (stop(a_t), stop(b_t)), tuple(jnp.sum(product, axis=0) for product in products),
                particles.shape[0], stop(variances), partial(per_family, "natural"),
                partial(per_family, "log_partition"), partial(per_family, "log_partition_derivatives"),
                partial(per_family, "from_natural"), reads.free, write,
            )  # fmt: skip

        log_prob = partial(guide_log_prob, plate_scaled=False)
        kl, cov_quad = _monte_carlo_kl_and_cov(sample, log_prob, num_kl_draws)
        if closed_forms.kl:
            kl = site_kl
        if closed_forms.variance:
            cov_quad = site_cov_quad
        return GuideDensity(
            latent_dim=flat.size, sample=sample, log_prob=log_prob, score=_autodiff_score(log_prob),
            kl=kl, cov_quad=cov_quad, unpack=unravel, closed_form=False, local_plates=local_plates,
            at_indices=on_batch if local_plates else None,
            elbo_log_prob=elbo_log_prob if local_plates else None,
            linear_scores=linear_scores if reads is not None and not local_plates else None,
        )  # fmt: skip

    return on_batch({})


def _break_zero_cov_factor(guide, params: dict, init_params: dict | None, rng_key) -> dict:
    """Replace NumPyro's all-zero initial ``cov_factor`` by a small random one.

    The guide's score depends on the factor ``W`` only through ``W W'``, so
    ``W = 0`` is a stationary point of the score-matching objective: a zero factor
    would never move (the ELBO's reparameterized gradient escapes it; this objective
    does not). Pyro initializes the factor randomly; so do we, with
    ``N(0, 0.25 / rank)`` entries.
    """
    name = f"{guide.prefix}_cov_factor"
    if (init_params and name in init_params) or bool(jnp.any(params[name] != 0)):
        return params
    rank = params[name].shape[-1]
    noise = jax.random.normal(jax.random.fold_in(rng_key, 1), params[name].shape, params[name].dtype)
    return {**params, name: 0.5 / rank**0.5 * noise}


def _autoguide_setup(build: Callable[[Any, DensityOptions], GuideDensity]):
    """``GuideFamily.setup`` of an autoguide: one density for every call, built on the
    first call from the guide's prototype (which ``SVI.init`` sets up)."""

    def setup(guide, model, args, kwargs, options: DensityOptions):
        built: list[GuideDensity] = []

        def density(args, kwargs):
            if not built:
                built.append(build(guide, options))
            return built[0]

        return density

    return setup


def _block_shape(site: dict, transform: Any) -> tuple[tuple[int, ...], int]:
    """A model latent site's block in a user-written guide's flat latent, and its event
    dims: its unconstrained shape without the size-1 dims left of its plates (a guide's
    draws need not have them, :func:`psvi.checks.drop_leading_ones`)."""
    shape = tuple(transform.inverse_shape(jnp.shape(site["value"])))
    event_dim = site["fn"].event_dim + len(shape) - jnp.ndim(site["value"])
    depth = max((-frame.dim for frame in site["cond_indep_stack"] if frame.dim is not None), default=0)
    return drop_leading_ones(shape, event_dim + depth), event_dim


def _user_guide_setup(guide, model, args, kwargs, options: DensityOptions):
    """``GuideFamily.setup`` of a user-written guide: checked once, its density built with
    each call's arguments (the guide is run with them)."""
    if model is None:
        raise ValueError("A user-written guide's density needs the model (model=...).")
    check_user_guide(guide, model, args, kwargs)
    model_trace = trace(seed(model, jax.random.PRNGKey(0))).get_trace(*args, **kwargs)
    latents = {name: site for name, site in model_trace.items() if is_continuous_latent(site)}
    transforms = {name: biject_to(site["fn"].support) for name, site in latents.items()}
    closed_forms = site_closed_forms(guide, args, kwargs, transforms)
    reads = None
    if closed_forms.linear and closed_forms.kl and closed_forms.variance:
        shapes = {
            name: _block_shape(model_trace[name], transform)[0] for name, transform in transforms.items()
        }
        reads = _linear_reads(guide, args, kwargs, transforms, shapes)
    return lambda args, kwargs: _user_guide(
        guide, model, args, kwargs, options.num_kl_draws, closed_forms, reads
    )


def _product_density(parts: list[GuideDensity]) -> GuideDensity:
    """The density of independent guides over consecutive blocks of the flat latent (an
    AutoGuideList's parts): draws and scores side by side, log densities, KLs and
    covariance quadratic forms summed; a diagonal Gaussian (the split objective, the
    closed-form step) when every part is one."""
    bounds = np.cumsum([0] + [part.latent_dim for part in parts]).tolist()
    spans = list(zip(bounds[:-1], bounds[1:], strict=True))

    def blocks(u):
        return [u[..., start:stop] for start, stop in spans]

    def sample(params, rng_key, num):
        keys = jax.random.split(rng_key, len(parts))
        return jnp.concatenate(
            [part.sample(params, key, num) for part, key in zip(parts, keys, strict=True)], -1
        )

    def log_prob(params, u):
        return sum(part.log_prob(params, block) for part, block in zip(parts, blocks(u), strict=True))

    def score(params, u):
        return jnp.concatenate(
            [part.score(params, block) for part, block in zip(parts, blocks(u), strict=True)], -1
        )

    def kl(params0, params1, rng_key):
        keys = jax.random.split(rng_key, len(parts))
        return sum(part.kl(params0, params1, key) for part, key in zip(parts, keys, strict=True))

    def cov_quad(params, r):
        return sum(part.cov_quad(params, block) for part, block in zip(parts, blocks(r), strict=True))

    def unpack(u):
        return {
            name: value
            for part, block in zip(parts, blocks(u), strict=True)
            for name, value in part.unpack(block).items()
        }

    def elbo_log_prob(params, u, weights):  # a part without local latents weighs 1 throughout
        terms = zip(parts, blocks(u), blocks(weights), strict=True)
        return sum(
            part.elbo_log_prob(params, block, block_weights)
            if part.elbo_log_prob is not None
            else part.log_prob(params, block)
            for part, block, block_weights in terms
        )

    local_plates = {name: plates for part in parts for name, plates in part.local_plates.items()}
    density = GuideDensity(
        latent_dim=bounds[-1], sample=sample, log_prob=log_prob, score=score, kl=kl, cov_quad=cov_quad,
        unpack=unpack, closed_form=all(part.closed_form for part in parts), local_plates=local_plates,
        elbo_log_prob=elbo_log_prob if local_plates else None,
    )  # fmt: skip
    if not all(part.loc_scale is not None and part.gaussian_params is not None for part in parts):
        return density

    def loc_scale(params):
        pairs = [part.loc_scale(params) for part in parts]
        return tuple(jnp.concatenate(side) for side in zip(*pairs, strict=True))

    def gaussian_params(loc, scale):
        return {
            name: value
            for part, (start, stop) in zip(parts, spans, strict=True)
            for name, value in part.gaussian_params(loc[start:stop], scale[start:stop]).items()
        }

    return density._replace(loc_scale=loc_scale, gaussian_params=gaussian_params)


def _guide_list_setup(guide: autoguide.AutoGuideList, model, args, kwargs, options: DensityOptions):
    """``GuideFamily.setup`` of an AutoGuideList: each part's own setup, their densities
    multiplied (:func:`_product_density`). A part must be an autoguide with a density of
    its own that is not a flow (a flow's proximal term is not a KL). Local latents in a
    subsampled plate go in an AutoNormal part (NumPyro's other autoguides refuse them
    themselves: "AutoContinuous guide does not support local latent variables")."""
    setups = []
    for index, part in enumerate(guide):
        family = guide_family(part)
        if not isinstance(part, autoguide.AutoGuide) or family.refusal is not None:
            raise TypeError(guide_list_part_refusal(index, family.name, family.refusal))
        setups.append(family.setup(part, model, args, kwargs, options))

    def density(args, kwargs):
        parts = [setup(args, kwargs) for setup in setups]
        for index, part in enumerate(parts):
            if part.transport is not None:
                raise TypeError(guide_list_part_refusal(index, "a normalizing flow", GUIDE_LIST_FLOW))
        return _product_density(parts)

    return density


def _guide_list_init_params(guide: autoguide.AutoGuideList, params: dict, init_params, rng_key) -> dict:
    """Each part's fix-up of the initial params (``GuideFamily.init_params``), in turn."""
    for part in guide:
        fix = guide_family(part).init_params
        if fix is not None:
            params = fix(part, params, init_params, rng_key)
    return params


_GENERIC = GuideFamily("an AutoContinuous guide", _autoguide_setup(_auto_continuous))
_USER_GUIDE = GuideFamily("a user-written guide", _user_guide_setup, local_latents=True)


@singledispatch
def guide_family(guide: Any) -> GuideFamily:
    """The :class:`~psvi.families.GuideFamily` of ``guide``: one registration per autoguide
    class (``guide_family.register``), a user-written guide for any other callable."""
    if not callable(guide):
        raise TypeError(f"The guide must be an autoguide or a function, got {type(guide).__name__}.")
    return _USER_GUIDE


def _register(cls: type, family: GuideFamily) -> None:
    guide_family.register(cls)(lambda guide: family._replace(name=type(guide).__name__))


_register(
    autoguide.AutoGuide,
    refused(
        "AutoGuide",
        "ProximalScoreVI needs the guide's density. Supported: AutoNormal, "
        "AutoDiagonalNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal, "
        "AutoContinuous guides with a tractable log density (e.g. AutoIAFNormal) and "
        "user-written guides (functions).",
    ),
)
_register(autoguide.AutoContinuous, _GENERIC)
# Batched variants subclass the plain ones but lay their params out differently.
_register(autoguide.AutoBatchedMixin, _GENERIC)
_register(
    autoguide.AutoIAFNormal,
    GuideFamily("AutoIAFNormal", _autoguide_setup(_auto_flow), advice=autoregressive_family_advice),
)
_register(autoguide.AutoNormal, GuideFamily("AutoNormal", _autoguide_setup(_auto_normal), local_latents=True))
_register(autoguide.AutoDiagonalNormal, GuideFamily("AutoDiagonalNormal", _autoguide_setup(_auto_diagonal)))
_register(
    autoguide.AutoMultivariateNormal,
    GuideFamily(
        "AutoMultivariateNormal", _autoguide_setup(_auto_mvn), full_covariance=True,
        advice=full_covariance_advice,
    ),
)  # fmt: skip
_register(
    autoguide.AutoLowRankMultivariateNormal,
    GuideFamily(
        "AutoLowRankMultivariateNormal", _autoguide_setup(_auto_lowrank),
        advice=lowrank_advice, init_params=_break_zero_cov_factor,
    ),
)  # fmt: skip
_register(
    autoguide.AutoBatchedMultivariateNormal,
    GuideFamily("AutoBatchedMultivariateNormal", _autoguide_setup(_auto_batched_mvn)),
)
_register(
    autoguide.AutoBatchedLowRankMultivariateNormal,
    GuideFamily(
        "AutoBatchedLowRankMultivariateNormal", _autoguide_setup(_auto_batched_lowrank),
        init_params=_break_zero_cov_factor,
    ),
)  # fmt: skip
_register(autoguide.AutoDelta, refused("AutoDelta", POINT_MASS))
_register(autoguide.AutoLaplaceApproximation, refused("AutoLaplaceApproximation", LAPLACE))
_register(
    autoguide.AutoGuideList,
    GuideFamily("AutoGuideList", _guide_list_setup, local_latents=True, init_params=_guide_list_init_params),
)
_register(
    autoguide.AutoBNAFNormal,
    refused(
        "AutoBNAFNormal",
        "block neural autoregressive flows have no inverse, so the guide density cannot "
        "be evaluated at the particles. Use AutoIAFNormal or AutoMultivariateNormal instead; "
        "if the posterior is multimodal, check the fit with numpyro_psvi.mode_coverage "
        "(docs/guides.md, 'Multimodal posteriors').",
    ),
)
for _dais in (autoguide.AutoDAIS, autoguide.AutoSemiDAIS):
    _register(
        _dais,
        refused(
            _dais.__name__,
            "its density is defined through an annealed importance sampler and is not "
            "tractable. Use AutoMultivariateNormal or AutoIAFNormal instead.",
        ),
    )


def guide_density(
    guide: Any,
    score_method: str = "closed_form",
    num_kl_draws: int = 256,
    model: Callable | None = None,
    args: tuple = (),
    kwargs: dict | None = None,
) -> GuideDensity:
    """Build the :class:`GuideDensity` of a set-up autoguide or a user-written guide.

    Parameters
    ----------
    guide : numpyro.infer.autoguide.AutoGuide or callable
        An autoguide whose prototype has been set up (it has been run once), or a
        user-written guide.
    score_method : {"closed_form", "autodiff"}
        ``"closed_form"`` uses the analytic Gaussian score; ``"autodiff"`` takes
        ``jax.grad`` of the guide's log density (the generic nested-autodiff path).
        Guides without a closed form always use autodiff.
    num_kl_draws : int
        Draws for the Monte Carlo KL of guides without a closed-form KL.
    model, args, kwargs
        For a user-written guide (a plain function): the model (its latent sites and
        supports define the flat layout) and the arguments both are called with.
    """
    if score_method not in SCORE_METHODS:
        raise ValueError(f"score_method must be one of {SCORE_METHODS}, got {score_method!r}.")
    family = guide_family(guide)
    family.check_supported()
    kwargs = kwargs or {}
    options = DensityOptions(score_method, num_kl_draws)
    return family.setup(guide, model, args, kwargs, options)(args, kwargs)
