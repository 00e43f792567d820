"""Guide densities over the flat unconstrained latent vector.

A :class:`GuideDensity` turns a set-up Pyro autoguide into the handful of functions
the proximal score-matching objective needs: draw particles, evaluate the log
density and its score in ``u`` (unconstrained coordinates), the KL divergence
between two parameter values, and the covariance quadratic form ``r' Cov(q) r``
used to weight residuals. Every function takes the guide's *constrained* params as
a dict keyed by their param-store names (what ``pyro.param(name)`` returns), and is
batched over a leading particle dimension: ``u`` and ``r`` have shape ``(S, D)``.

Gaussian guides get closed-form scores and KL divergences; ``score_method="autodiff"``
differentiates the log density instead (the generic nested-autograd path). Flow
guides (AutoIAFNormal, AutoNormalizingFlow) use that path, a Monte Carlo KL and a
Monte Carlo covariance diagonal.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Callable, Collection, Iterator
from functools import lru_cache, partial, singledispatch
from operator import attrgetter
from typing import Any, NamedTuple

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.transforms import AffineAutoregressive, SplineAutoregressive
from pyro.distributions.util import scale_and_mask
from pyro.infer import autoguide
from pyro.infer.autoguide.gaussian import AutoGaussianDense
from pyro.params import param_with_module_name, user_param_name
from pyro.poutine.util import site_is_subsample
from torch.distributions import ComposeTransform, IndependentTransform, biject_to, kl_divergence
from torch.distributions.transforms import (
    AffineTransform,
    ExpTransform,
    SigmoidTransform,
    StickBreakingTransform,
)

from psvi.checks import (
    GuideSite,
    check_user_guide_sites,
    drop_leading_ones,
    full_covariance_advice,
    local_latent_message,
    lowrank_advice,
)
from psvi.designs import OrthogonalDesign, coordinate_blocks
from psvi.families import (
    GUIDE_LIST_FLOW,
    GUIDE_LIST_FUNCTION,
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
from pyro_psvi._compat import (
    apply,
    dense_gaussian_layout,
    inverse,
    is_block_autoregressive,
    param_prefix,
    structured_layout,
    tensor_version,
)
from pyro_psvi.batches import SharedSubsample
from pyro_psvi.enumeration import is_continuous_latent
from pyro_psvi.jacobians import log_abs_det_jacobian

Params = dict[str, torch.Tensor]

SCORE_METHODS = ("closed_form", "autodiff")


class LatentSite(NamedTuple):
    """One latent site's block of the flat unconstrained vector.

    Attributes
    ----------
    name : str
        The model's sample-site name.
    shape : torch.Size
        Shape of the site's unconstrained value (one particle).
    event_dim : int
        Event dimensions of the unconstrained value (the rest are plate dims).
    plates : tuple of (str, int)
        For a site inside plates whose guide params span each plate's full size
        (AutoNormal): ``(plate name, dim)`` per plate, ``dim`` counted from the right
        of the unconstrained value; the model sees the value sliced by the plate's
        indices. Empty for other sites.
    """

    name: str
    shape: torch.Size
    event_dim: int
    plates: tuple[tuple[str, int], ...] = ()


class FlatRead(NamedTuple):
    """Where each coordinate of a guide's flat ``loc`` (or ``scale``) reads one flat
    vector of its constrained params (each param's entries contiguous, row-major, from
    its offset).

    Attributes
    ----------
    index : torch.Tensor or slice
        ``(D,)`` long: the entry of the flat params each coordinate equals; ``-1`` for a
        coordinate no param gives. A ``slice`` when the coordinates read one run of
        entries in order (no index tensor: at D weights a long index is 2 D floats).
    constants : torch.Tensor or None
        ``(D,)``: the value of each ``-1`` coordinate (other entries unused); ``None``
        when there is none.
    """

    index: torch.Tensor | slice
    constants: torch.Tensor | None


class LinearScoreStatistics(NamedTuple):
    """What an update of a guide with linear scores (:attr:`GuideDensity.linear_scores`)
    needs from its particles: per coordinate ``i`` of the flat latent, with ``u_s`` the
    particles, ``g_s`` the model's scores and ``(phi_a, phi_b)`` the coordinate's family's
    features (:class:`LinearScoreRule`), the sums over the ``S`` particles of
    ``phi_a^2, phi_a phi_b, phi_b^2, phi_a g, phi_b g``; ``q_t``'s args and variances in
    the unconstrained space; ``kl_gradient(a, b)``, the gradient of ``KL(q_t || q)``
    in the flat args ``(a, b)`` of ``q``; ``natural(a, b)``, the functions of the args the
    scores are linear in (:class:`LinearScoreRule`), ``natural_pullback(a, b, g_1,
    g_2)``, a gradient in those taken to the args, ``log_partition(e_1, e_2)``,
    ``log_partition_derivatives(e_1, e_2)`` and ``from_natural(e_1, e_2)``
    (:class:`LinearScoreRule`); ``free``, per arg, the
    coordinates a param gives (the others are constants of the guide); and
    ``write(a, b)``, the constrained params that give the args ``(a, b)`` (those the
    args read, the entries no coordinate reads kept at ``q_t``'s), or ``None`` where
    a param entry gives more than one coordinate (a shared or broadcast param), or a
    constant arg of a Normal (its natural coordinates then move together)."""

    args_t: tuple[torch.Tensor, torch.Tensor]
    sums: tuple[torch.Tensor, ...]
    count: int
    variances: torch.Tensor
    kl_gradient: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    natural: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    natural_pullback: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    log_partition: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    log_partition_derivatives: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]
    from_natural: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    free: tuple[torch.Tensor, torch.Tensor]
    write: Callable[[torch.Tensor, torch.Tensor], Params] | None


def _contiguous_read(offsets: dict[str, int], sizes: dict[str, int], device: torch.device) -> FlatRead:
    """The :class:`FlatRead` of a flat side that concatenates whole params (``sizes``:
    their entries, in order): a slice where they lie in that order, one after another."""
    runs = [(offsets[name], offsets[name] + size) for name, size in sizes.items()]
    if all(stop == start for (_, stop), (start, _) in itertools.pairwise(runs)):
        return FlatRead(slice(runs[0][0], runs[-1][1]), None)
    return FlatRead(torch.cat([torch.arange(*run, device=device) for run in runs]), None)


def _contiguous_loc_scale_index(loc_sizes: dict[str, int], scale_sizes: dict[str, int]) -> Callable:
    """:attr:`GuideDensity.loc_scale_index` of a guide whose flat loc and scale each
    concatenate whole params (``*_sizes``: their entries, in order), as AutoNormal's and
    AutoDiagonalNormal's do: the same :class:`FlatRead` objects for the same layout."""

    @lru_cache(maxsize=1)
    def reads_for(layout: tuple, device: torch.device) -> tuple[FlatRead, FlatRead]:
        offsets = dict(layout)
        return _contiguous_read(offsets, loc_sizes, device), _contiguous_read(offsets, scale_sizes, device)

    return lambda offsets, device: reads_for(tuple(offsets.items()), device)


class GuideDensity(NamedTuple):
    """Batched functions of a guide's density over the flat unconstrained latent.

    Attributes
    ----------
    latent_dim : int
        Length ``D`` of the flat unconstrained latent vector.
    sites : tuple of LatentSite
        The latent sites in the order they occupy the flat vector.
    param_names : tuple of str
        Param-store names of the guide's params (the keys of ``params``).
    sample : callable
        ``sample(params, num) -> (num, D)`` draws from the guide (torch's RNG).
    log_prob : callable
        ``log_prob(params, u) -> (S,)`` for flat latents ``u`` of shape ``(S, D)``.
    score : callable
        ``score(params, u) -> (S, D)``, the gradient of ``log_prob`` in ``u``.
    kl : callable
        ``kl(params_from, params_to, seed=None) -> ()``, ``KL(q_from || q_to)``: exact
        for Gaussian guides (``seed`` unused), else a Monte Carlo estimate on fresh
        draws from ``q_from`` made with a generator seeded by ``seed`` (one seed per
        step gives common random numbers across the step's evaluations).
    cov_quad : callable
        ``cov_quad(params, r) -> (S,)``, ``r' Cov(q) r`` for residuals ``(S, D)``:
        the covariance weighting of docs/algorithm.md, section 4.
    closed_form : bool
        Whether ``score`` is closed form.
    loc_scale : callable or None
        ``loc_scale(params) -> (loc, scale)``, each ``(D,)``, for a diagonal Gaussian
        guide with closed-form scores (AutoNormal, AutoDiagonalNormal); ``None``
        otherwise. The objective then needs the particles only through per-coordinate
        sums (:func:`pyro_psvi.objective.fisher_statistics`).
    loc_tril : callable or None
        ``loc_tril(params) -> (loc, scale_tril)``, ``(D,)`` and ``(D, D)``, for a
        full-covariance Gaussian guide with closed-form scores (AutoMultivariateNormal);
        ``None`` otherwise. Its proximal objective is then the split one
        (:func:`pyro_psvi.objective.split_full_objective`).
    loc_lowrank : callable or None
        ``loc_lowrank(params) -> (loc, (cov_factor, scale))``, ``Cov = s (I + F F') s``
        with ``F = cov_factor`` ``(D, R)`` and ``s = diag(scale)``, for
        AutoLowRankMultivariateNormal with closed-form scores; ``None`` otherwise.
    plate_indices : dict or None
        A user-written guide runs its plates on the step's mini-batch, as under ``SVI``
        (with local latents in a subsampled plate it draws only the batch's members):
        the ``{plate name: indices}`` of its step, filled by its first draw
        (:class:`~pyro_psvi.batches.SharedSubsample`) and replayed by every later pass,
        the model's included. ``None`` for autoguides (their draws run no plate).
    elbo_log_prob : callable or None
        ``elbo_log_prob(params, u, weights) -> (S,)``, ``log q`` as ``Trace_ELBO`` counts
        it on a mini-batch of local latents: the batch's local terms times their plate's
        ``N/B``, the others not at all (``weights``: the step's coordinate weights,
        :func:`pyro_psvi.scores.coordinate_weights`; a user-written guide knows its batch
        and ignores them). For the guides that take local latents (AutoNormal and its
        diagonal siblings, user-written guides with local latents); ``None`` otherwise.
    module_param_names : tuple of str
        A user-written guide's ``pyro.module`` parameters: the module reads its own
        tensors, so a gradient reaches them only at those tensors (the inner steps').
    runs_guide : bool
        Whether evaluating the density runs a user-written guide (whose cost is the
        user's: the engine times its inner steps).
    gaussian_params : callable or None
        ``gaussian_params(loc, scale) -> params``: the guide's constrained params holding
        the Gaussian with ``loc`` and ``scale`` (the sds where ``loc_scale`` is set, the
        Cholesky factor where ``loc_tril`` is, the pair ``(cov_factor, scale)`` where
        ``loc_lowrank`` is), for the autoguides whose closed-form proximal step writes
        them (AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal,
        AutoLowRankMultivariateNormal); ``None`` otherwise.
    loc_scale_vjp : callable or None
        ``loc_scale_vjp(params) -> (loc, scale, pullback)`` or ``None``: ``loc_scale``
        without an autograd graph, and ``pullback(loc_grad, scale_grad) -> {name:
        grad}``, the gradients of the constrained params it read; for AutoNormal,
        AutoDiagonalNormal and a user-written guide whose sites' locs and scales are its
        params (or views of them, or constants), where it saves the inner steps an
        autograd pass. ``None`` (the field, or its result): differentiate ``loc_scale``.
    loc_scale_index : callable or None
        ``loc_scale_index(offsets, device) -> (loc_read, scale_read)`` or ``None``: for the
        guide's constrained params laid out in one flat vector on ``device`` (``offsets``:
        by param name, its first entry), the :class:`FlatRead` of the flat loc and
        scale; for the densities with ``loc_scale_vjp`` (the same gather, read by the
        engine from its flat optimizer state).
    linear_scores : callable or None
        ``linear_scores(params_t, particles, scores) -> LinearScoreStatistics | None`` for
        a mean-field user guide whose every site is of a family with a score linear in
        (functions of) its two args (:data:`_LINEAR_SCORES`: Gamma, InverseGamma, Beta,
        Normal-like sites beside them) read from its
        params as they are (or views of them) or constants: the per-coordinate sums of an
        update, which make the inner steps' gradient closed form in the two args
        (:func:`pyro_psvi.objective.linear_score_gradient`); ``loc_scale_vjp`` and
        ``loc_scale_index`` then gather those args (its two sides) instead of a loc and
        a scale. ``None`` (the field, or its result): the inner steps run the guide.
    transport : Transport or None
        For a normalizing flow (AutoIAFNormal, AutoNormalizingFlow): its map from base
        draws to the latent, whose ``kl`` is then the transport displacement
        (:func:`transport_displacement`) and whose proximal objective is
        :func:`pyro_psvi.objective.transport_objective`; ``None`` otherwise.
    """

    latent_dim: int
    sites: tuple[LatentSite, ...]
    param_names: tuple[str, ...]
    sample: Callable[[Params, int], torch.Tensor]
    log_prob: Callable[[Params, torch.Tensor], torch.Tensor]
    score: Callable[[Params, torch.Tensor], torch.Tensor]
    kl: Callable[..., torch.Tensor]
    cov_quad: Callable[[Params, torch.Tensor], torch.Tensor]
    closed_form: bool
    loc_scale: Callable[[Params], tuple[torch.Tensor, torch.Tensor]] | None = None
    loc_tril: Callable[[Params], tuple[torch.Tensor, torch.Tensor]] | None = None
    loc_lowrank: Callable[[Params], tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] | None = None
    plate_indices: dict[str, torch.Tensor] | None = None
    module_param_names: tuple[str, ...] = ()
    elbo_log_prob: Callable[[Params, torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None
    runs_guide: bool = False
    gaussian_params: Callable[[torch.Tensor, Any], Params] | None = None
    loc_scale_vjp: Callable[[Params], tuple | None] | None = None
    loc_scale_index: Callable[[dict[str, int], torch.device], tuple[FlatRead, FlatRead] | None] | None = None
    linear_scores: Callable[..., LinearScoreStatistics | None] | None = None
    transport: Transport | None = None

    def unpack(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split flat latents ``(..., D)`` into unconstrained site values ``(..., *shape)``."""
        return unpack_sites(self.sites, u)


class Transport(NamedTuple):
    """A flow guide as a map ``T_params`` of standard normal base draws.

    Attributes
    ----------
    base_sample : callable
        ``base_sample(params, num, generator=None) -> (num, D)`` draws from the base
        distribution (the params' dtype and device).
    push : callable
        ``push(params, z) -> (num, D)``: the latent values ``T_params(z)`` of base draws
        ``z`` of shape ``(num, D)``.
    pull : callable
        ``pull(params, u) -> (num, D)``: the base draws ``T_params^{-1}(u)``.
    """

    base_sample: Callable[..., torch.Tensor]
    push: Callable[[Params, torch.Tensor], torch.Tensor]
    pull: Callable[[Params, torch.Tensor], torch.Tensor]


def unpack_sites(sites: tuple[LatentSite, ...], u: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split flat latents ``(..., D)`` laid out as ``sites`` into site values ``(..., *shape)``."""
    values, pos = {}, 0
    for site in sites:
        size = math.prod(site.shape)
        values[site.name] = u[..., pos : pos + size].reshape(u.shape[:-1] + site.shape)
        pos += size
    return values


# ---------------------------------------------------------------------------
# Gaussian building blocks (closed form, batched over the leading dim of u)
# ---------------------------------------------------------------------------

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def local_plate_sizes(density: GuideDensity) -> list[int]:
    """The full size of each subsampled plate a local latent of ``density`` sits in (one
    entry per site and plate)."""
    return [site.shape[dim] for site in density.sites for _, dim in site.plates]


def _coordinate_blocks(density: GuideDensity, subsampled: Collection[str]) -> np.ndarray:
    """:func:`psvi.designs.coordinate_blocks` of ``density``'s flat layout: 0 for the
    globals, one block per slot of a local latent in one of the ``subsampled`` plates."""
    layout = [
        (tuple(site.shape), tuple(dim for plate, dim in site.plates if plate in subsampled))
        for site in density.sites
    ]
    return coordinate_blocks(layout)


def local_coordinates(density: GuideDensity, subsampled: Collection[str]) -> torch.Tensor | None:
    """``(D,)`` bool: which coordinates of the flat latent belong to local latents of one
    of the ``subsampled`` plates; ``None`` where there are none (a plate seen whole each
    step holds no local latent here)."""
    blocks = _coordinate_blocks(density, subsampled)
    return torch.as_tensor(blocks > 0) if blocks.max(initial=0) > 0 else None


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
    tensors: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # the design's, by dtype and device

    def sample(params, num):
        loc, scale = density.loc_scale(params)
        where = (loc.dtype, loc.device)
        if where not in tensors:
            tensors[where] = tuple(
                torch.as_tensor(array, dtype=loc.dtype, device=loc.device)
                for array in (design.columns, design.weights)
            )
        columns, weights = tensors[where]
        normals = torch.randn((num // design.group_size, *weights.shape), dtype=loc.dtype, device=loc.device)
        deviations = torch.einsum("pc,gcd->gpd", columns, normals * weights)
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

    def sample(params, num):
        draws = density.sample(params, num - num // 2)
        return torch.cat([draws, 2 * loc_of(params)[0] - draws[: num // 2]])

    return density._replace(sample=sample)


def _diag_kl(loc0, scale0, loc1, scale1) -> torch.Tensor:
    ratio = (scale0 / scale1) ** 2
    return 0.5 * torch.sum(ratio + ((loc1 - loc0) / scale1) ** 2 - 1.0 - torch.log(ratio), dim=-1)


def _tril_solve(tril: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``L^{-1} v`` for a batch of row vectors ``v`` of shape ``(S, D)``."""
    return torch.linalg.solve_triangular(tril, v.mT, upper=False).mT


def _tril_kl(loc0, tril0, loc1, tril1) -> torch.Tensor:
    m = torch.linalg.solve_triangular(tril1, tril0, upper=False)
    z = torch.linalg.solve_triangular(tril1, (loc1 - loc0).unsqueeze(-1), upper=False)
    logdet_ratio = torch.log(torch.diagonal(tril1, dim1=-2, dim2=-1).abs()).sum(-1) - torch.log(
        torch.diagonal(tril0, dim1=-2, dim2=-1).abs()
    ).sum(-1)
    return 0.5 * (m.pow(2).sum((-2, -1)) + z.pow(2).sum((-2, -1)) - loc0.shape[-1]) + logdet_ratio


class _LowRank(NamedTuple):
    """``Cov = W W' + diag(d)`` with its Woodbury pieces."""

    loc: torch.Tensor
    factor: torch.Tensor  # (D, K)
    diag: torch.Tensor  # (D,)
    capacitance_tril: torch.Tensor  # chol(I + W' D^-1 W), (K, K)

    @classmethod
    def build(cls, loc, factor, diag) -> _LowRank:
        capacitance = torch.eye(factor.shape[-1], dtype=loc.dtype, device=loc.device)
        capacitance = capacitance + (factor.mT / diag) @ factor
        # Not positive definite (params past float's range): NaN, whose step the engine
        # rejects, as NumPyro's Cholesky gives, not an exception from inside the update.
        tril, info = torch.linalg.cholesky_ex(capacitance)
        return cls(loc, factor, diag, torch.where(info == 0, tril, torch.nan))

    def precision_rows(self, v: torch.Tensor) -> torch.Tensor:
        """``v Cov^{-1}`` for row vectors ``v`` of shape ``(S, D)`` (Cov is symmetric)."""
        dinv_v = v / self.diag
        inner = torch.cholesky_solve((dinv_v @ self.factor).mT, self.capacitance_tril).mT
        return dinv_v - (inner @ self.factor.mT) / self.diag

    def logdet(self) -> torch.Tensor:
        half = torch.log(torch.diagonal(self.capacitance_tril)).sum()
        return 2 * half + torch.log(self.diag).sum()

    def precision_diag(self) -> torch.Tensor:
        a = torch.linalg.solve_triangular(self.capacitance_tril, self.factor.mT / self.diag, upper=False)
        return 1.0 / self.diag - a.pow(2).sum(0)


def _lowrank_kl(q0: _LowRank, q1: _LowRank) -> torch.Tensor:
    delta = (q1.loc - q0.loc).unsqueeze(0)
    trace = torch.sum(q1.precision_diag() * q0.diag) + torch.sum(
        q0.factor.mT * q1.precision_rows(q0.factor.mT)
    )
    mahalanobis = torch.sum(delta * q1.precision_rows(delta))
    return 0.5 * (trace + mahalanobis - q0.loc.shape[-1] + q1.logdet() - q0.logdet())


# ---------------------------------------------------------------------------
# Adapters per autoguide
# ---------------------------------------------------------------------------


def _autodiff_score(log_prob: Callable[[Params, torch.Tensor], torch.Tensor]):
    """Score by autograd, keeping the graph so the objective can be differentiated in params."""

    def score(params: Params, u: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            u = u.detach().requires_grad_(True)
            return torch.autograd.grad(log_prob(params, u).sum(), u, create_graph=True)[0]

    return score


def _latent_sites(guide: autoguide.AutoGuide) -> tuple[LatentSite, ...]:
    """The latent sites of the guide's prototype trace, in flat-vector order."""
    sites = []
    for name, site in guide.prototype_trace.iter_stochastic_nodes():
        value = site["value"].detach()
        shape = biject_to(site["fn"].support).inv(value).shape
        sites.append(LatentSite(name, shape, site["fn"].event_dim + len(shape) - value.dim()))
    return tuple(sites)


def _diagonal_density(get_loc_scale, sites, names, score_method: str) -> GuideDensity:
    dim = sum(math.prod(s.shape) for s in sites)

    # (num, D) temporaries are updated in place: at large D, allocations cost more than ops.
    def sample(params, num):
        loc, scale = get_loc_scale(params)
        return torch.randn((num, dim), dtype=loc.dtype, device=loc.device).mul_(scale).add_(loc)

    def log_prob(params, u):
        loc, scale = get_loc_scale(params)
        z_sq = (u - loc).div_(scale).square_()
        return -0.5 * z_sq.sum(-1) - (torch.log(scale).sum() + dim * _HALF_LOG_2PI)

    def score(params, u):
        loc, scale = get_loc_scale(params)
        return -(u - loc) / scale**2

    def kl(params0, params1, seed=None):
        return _diag_kl(*get_loc_scale(params0), *get_loc_scale(params1))

    def cov_quad(params, r):
        return torch.sum((get_loc_scale(params)[1] * r) ** 2, dim=-1)

    def elbo_log_prob(params, u, weights):
        loc, scale = get_loc_scale(params)
        z = (u - loc) / scale
        return (-0.5 * z**2 - torch.log(scale) - _HALF_LOG_2PI) @ weights

    closed = score_method == "closed_form"
    return GuideDensity(
        latent_dim=dim, sites=sites, param_names=names, sample=sample, log_prob=log_prob,
        score=score if closed else _autodiff_score(log_prob), kl=kl, cov_quad=cov_quad,
        closed_form=closed, loc_scale=get_loc_scale if closed else None,
        elbo_log_prob=elbo_log_prob,
    )  # fmt: skip


def _full_size_sites(guide: autoguide.AutoNormal) -> tuple[LatentSite, ...]:
    """AutoNormal's sites with the shapes of its params: a site inside a subsampled
    plate spans the plate's full size (its params are sliced by the plate's indices)."""
    sites = []
    for site in _latent_sites(guide):
        shape = attrgetter(site.name)(guide.locs).shape  # as AutoNormal reads its params
        frames = guide.prototype_trace.nodes[site.name]["cond_indep_stack"]
        plates = tuple(
            (frame.name, frame.dim - site.event_dim)
            for frame in frames
            if frame.vectorized and frame.dim is not None
        )
        sites.append(site._replace(shape=shape, plates=plates))
    return tuple(sites)


def _auto_normal(guide: autoguide.AutoNormal, options: DensityOptions) -> GuideDensity:
    score_method = options.score_method
    sites = _full_size_sites(guide)
    prefix = param_prefix(guide)
    loc_names = [f"{prefix}.locs.{s.name}" for s in sites]
    scale_names = [f"{prefix}.scales.{s.name}" for s in sites]

    def flat(params, names):  # one site (a FlatBayesianModule's): a view, no copy
        parts = [params[n].reshape(-1) for n in names]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def get_loc_scale(params):
        return flat(params, loc_names), flat(params, scale_names)

    def gaussian_params(loc, scale):
        locs, scales = unpack_sites(sites, loc), unpack_sites(sites, scale)
        return {
            **{name: locs[s.name] for name, s in zip(loc_names, sites, strict=True)},
            **{name: scales[s.name] for name, s in zip(scale_names, sites, strict=True)},
        }

    def loc_scale_vjp(params):
        shapes = {name: params[name].shape for name in loc_names + scale_names}

        def pullback(loc_grad, scale_grad):
            grads = {}
            for names, grad in ((loc_names, loc_grad), (scale_names, scale_grad)):
                parts = grad.split([math.prod(shapes[name]) for name in names])
                grads.update({name: part.view(shapes[name]) for name, part in zip(names, parts, strict=True)})
            return grads

        with torch.no_grad():
            return (*get_loc_scale(params), pullback)

    sizes = [math.prod(s.shape) for s in sites]
    loc_scale_index = _contiguous_loc_scale_index(
        dict(zip(loc_names, sizes, strict=True)), dict(zip(scale_names, sizes, strict=True))
    )
    density = _diagonal_density(get_loc_scale, sites, tuple(loc_names + scale_names), score_method)
    return density._replace(
        gaussian_params=gaussian_params if density.closed_form else None,
        loc_scale_vjp=loc_scale_vjp if density.closed_form else None,
        loc_scale_index=loc_scale_index if density.closed_form else None,
    )


def _auto_diagonal(guide: autoguide.AutoDiagonalNormal, options: DensityOptions) -> GuideDensity:
    score_method = options.score_method
    names = (f"{param_prefix(guide)}.loc", f"{param_prefix(guide)}.scale")

    def get_loc_scale(params):
        return params[names[0]], params[names[1]]

    def gaussian_params(loc, scale):
        return dict(zip(names, (loc, scale), strict=True))

    def loc_scale_vjp(params):
        def pullback(loc_grad, scale_grad):
            return {names[0]: loc_grad, names[1]: scale_grad}

        with torch.no_grad():
            return (*get_loc_scale(params), pullback)

    density = _diagonal_density(get_loc_scale, _latent_sites(guide), names, score_method)
    dim = density.latent_dim
    loc_scale_index = _contiguous_loc_scale_index({names[0]: dim}, {names[1]: dim})
    return density._replace(
        gaussian_params=gaussian_params if density.closed_form else None,
        loc_scale_vjp=loc_scale_vjp if density.closed_form else None,
        loc_scale_index=loc_scale_index if density.closed_form else None,
    )


def _tril_density(
    get: Callable[[Params], tuple[torch.Tensor, torch.Tensor]],
    sites: tuple[LatentSite, ...],
    names: tuple[str, ...],
    score_method: str,
) -> GuideDensity:
    """The :class:`GuideDensity` of ``N(loc, L L')`` with ``(loc, L) = get(params)``, ``L``
    lower triangular, over the flat latent laid out as ``sites``, its params ``names``."""
    dim = sum(math.prod(site.shape) for site in sites)

    def sample(params, num):
        loc, tril = get(params)
        return loc + torch.randn((num, dim), dtype=loc.dtype, device=loc.device) @ tril.mT

    def log_prob(params, u):
        loc, tril = get(params)
        z = _tril_solve(tril, u - loc)
        half_logdet = torch.log(torch.diagonal(tril).abs()).sum()
        return -0.5 * z.pow(2).sum(-1) - half_logdet - dim * _HALF_LOG_2PI

    def score(params, u):
        loc, tril = get(params)
        return -torch.cholesky_solve((u - loc).mT, tril).mT

    def kl(params0, params1, seed=None):
        return _tril_kl(*get(params0), *get(params1))

    def cov_quad(params, r):
        return torch.sum((r @ get(params)[1]) ** 2, dim=-1)

    closed = score_method == "closed_form"
    return GuideDensity(
        latent_dim=dim, sites=sites, param_names=names, sample=sample, log_prob=log_prob,
        score=score if closed else _autodiff_score(log_prob), kl=kl, cov_quad=cov_quad,
        closed_form=closed,
    )  # fmt: skip


def _auto_mvn(guide: autoguide.AutoMultivariateNormal, options: DensityOptions) -> GuideDensity:
    names = tuple(f"{param_prefix(guide)}.{p}" for p in ("loc", "scale", "scale_tril"))

    def get(params):
        # As Pyro's guide: L = diag(scale) @ scale_tril, scale_tril unit lower triangular.
        return params[names[0]], params[names[1]][..., None] * params[names[2]]

    def gaussian_params(loc, scale_tril):
        scale = torch.diagonal(scale_tril)
        return dict(zip(names, (loc, scale, scale_tril / scale[:, None]), strict=True))

    density = _tril_density(get, _latent_sites(guide), names, options.score_method)
    if not density.closed_form:
        return density
    return density._replace(loc_tril=get, gaussian_params=gaussian_params)


def _auto_gaussian_dense(guide: autoguide.AutoGaussian, options: DensityOptions) -> GuideDensity:
    """Pyro's ``AutoGaussian`` (dense backend): per site ``u = loc + scale * a``, the
    auxiliary ``a`` jointly Gaussian with the precision ``P = sum_f P_f`` and
    information vector ``h = sum_f h_f`` its factors scatter into the flat latent (one
    factor per model site, over the latents it depends on), so ``u ~ N(loc + scale *
    P^-1 h, diag(scale) P^-1 diag(scale))``; the closed forms are the full-covariance
    Gaussian's at that mean and Cholesky factor. The general inner steps fit it (the
    closed-form step would leave the sparsity of ``P``)."""
    prefix = param_prefix(guide)
    layout = dense_gaussian_layout(guide)
    loc_names = tuple(f"{prefix}.locs.{n}" for n in layout.site_shapes)
    scale_names = tuple(f"{prefix}.scales.{n}" for n in layout.site_shapes)
    factor_names = {f: (f"{prefix}.white_vecs.{f}", f"{prefix}.prec_sqrts.{f}") for f in layout.scatter}
    size = layout.size

    def get(params):
        ref = params[loc_names[0]]
        info = ref.new_zeros(size)
        precision = ref.new_zeros(size * size)
        for factor, (info_index, precision_index) in layout.scatter.items():
            white_vec, prec_sqrt = (params[n] for n in factor_names[factor])
            info = info.scatter_add(0, info_index, (prec_sqrt @ white_vec[..., None]).reshape(-1))
            precision = precision.scatter_add(0, precision_index, (prec_sqrt @ prec_sqrt.mT).reshape(-1))
        aux_tril = _precision_to_scale_tril(precision.reshape(size, size))
        aux_mean = aux_tril @ (aux_tril.mT @ info)
        loc = torch.cat([params[n].reshape(-1) for n in loc_names])
        scale = torch.cat([params[n].reshape(-1) for n in scale_names])
        return loc + scale * aux_mean, scale[:, None] * aux_tril

    names = loc_names + scale_names + tuple(itertools.chain.from_iterable(factor_names.values()))
    return _tril_density(_remember_last(get), _layout_sites(layout.site_shapes), names, options.score_method)


def _auto_structured(guide: autoguide.AutoStructured, options: DensityOptions) -> GuideDensity:
    """Pyro's ``AutoStructured`` with ``"normal"`` or ``"mvn"`` conditionals and linear
    dependencies: in its sampling order each site's ``u_d = loc_d + B_d e_d + sum_u W_du
    (u_u - loc_u)``, ``e_d`` standard normal, ``B_d = diag(scale_d) L_d`` (``L_d = I`` for
    ``"normal"``), so ``u ~ N(loc, M M')`` with ``M = (I - W)^-1 B`` lower triangular
    (``W`` strictly block lower triangular, ``B`` block diagonal): the full-covariance
    closed forms at ``(loc, M)``, evaluated once per params dict. Fitted by the
    optimizer's inner steps (the closed-form step would leave the structure)."""
    prefix = param_prefix(guide)
    layout = structured_layout(guide)
    order = list(layout.site_shapes)
    sizes = {name: math.prod(batch + event) for name, (batch, event) in layout.site_shapes.items()}
    mvn = {name for name in order if layout.conditionals[name] == "mvn"}
    weight_names = {
        (d, u): param_with_module_name(f"{prefix}.deps.{d}.{u}", "weight")
        for d, upstreams in layout.dependencies.items()
        for u in upstreams
    }

    def get(params):
        ref = params[f"{prefix}.locs.{order[0]}"]
        blocks = []
        for name in order:
            scale = params[f"{prefix}.scales.{name}"]
            blocks.append(
                scale[:, None] * params[f"{prefix}.scale_trils.{name}"] if name in mvn else torch.diag(scale)
            )
        rows = []
        for d in order:
            row = []
            for u in order:
                if u == d:
                    row.append(torch.eye(sizes[d], dtype=ref.dtype, device=ref.device))
                elif (d, u) in weight_names:
                    row.append(-params[weight_names[d, u]])
                else:
                    row.append(ref.new_zeros(sizes[d], sizes[u]))
            rows.append(torch.cat(row, dim=1))
        shear = torch.cat(rows, dim=0)  # I - W
        tril = torch.linalg.solve_triangular(
            shear, torch.block_diag(*blocks), upper=False, unitriangular=True
        )
        return torch.cat([params[f"{prefix}.locs.{name}"] for name in order]), tril

    names = (
        tuple(f"{prefix}.locs.{name}" for name in order)
        + tuple(f"{prefix}.scales.{name}" for name in order)
        + tuple(f"{prefix}.scale_trils.{name}" for name in order if name in mvn)
        + tuple(weight_names.values())
    )
    return _tril_density(_remember_last(get), _layout_sites(layout.site_shapes), names, options.score_method)


def _layout_sites(site_shapes: dict[str, tuple[torch.Size, torch.Size]]) -> tuple[LatentSite, ...]:
    """The :class:`LatentSite` of each ``{name: (batch_shape, unconstrained event_shape)}``,
    in that order."""
    return tuple(LatentSite(name, batch + event, len(event)) for name, (batch, event) in site_shapes.items())


def _remember_last(fn: Callable[[Params], Any]) -> Callable[[Params], Any]:
    """``fn(params)``, remembered for the last params dict without an autograd graph (an
    update's ``params_t``) and the last one with it (an inner step's params), each while
    it holds the same tensors unchanged in place: an inner step's score, KL and
    covariance weighting then share one evaluation at its params, and the update's steps
    one at ``params_t``."""
    last: dict[bool, tuple[Params, tuple, Any]] = {}

    def remembered(params: Params) -> Any:
        tracked = torch.is_grad_enabled() and any(v.requires_grad for v in params.values())
        key = tuple((id(v), tensor_version(v)) for v in params.values())
        held = last.get(tracked)
        if held is None or held[0] is not params or held[1] != key:
            held = last[tracked] = (params, key, fn(params))
        return held[2]

    return remembered


def _precision_to_scale_tril(precision: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor of ``precision``'s inverse, from the Cholesky factor of
    ``precision`` with its rows and columns reversed (as Pyro's AutoGaussian takes it);
    NaN where ``precision`` is not positive definite, which the engine rejects."""
    flipped, info = torch.linalg.cholesky_ex(torch.flip(precision, (-2, -1)))
    inverse_tril = torch.flip(flipped, (-2, -1)).mT
    eye = torch.eye(precision.shape[-1], dtype=precision.dtype, device=precision.device)
    tril = torch.linalg.solve_triangular(inverse_tril, eye, upper=False)
    return torch.where(info == 0, tril, torch.nan)


def _auto_lowrank(guide: autoguide.AutoLowRankMultivariateNormal, options: DensityOptions) -> GuideDensity:
    score_method = options.score_method
    sites = _latent_sites(guide)
    names = tuple(f"{param_prefix(guide)}.{p}" for p in ("loc", "scale", "cov_factor"))
    dim = guide.latent_dim

    def pieces(params):
        # As Pyro's guide: Cov = (F s)(F s)' + diag(s^2), F the raw cov_factor.
        loc, scale, factor = (params[n] for n in names)
        return loc, factor * scale[:, None], scale

    def get(params) -> _LowRank:
        loc, factor, scale = pieces(params)
        return _LowRank.build(loc, factor, scale**2)

    def sample(params, num):
        loc, factor, scale = pieces(params)
        eps_w = torch.randn((num, factor.shape[-1]), dtype=loc.dtype, device=loc.device)
        eps_d = torch.randn((num, dim), dtype=loc.dtype, device=loc.device)
        return loc + eps_w @ factor.mT + eps_d * scale

    def log_prob(params, u):
        q = get(params)
        r = u - q.loc
        quad = torch.sum(r * q.precision_rows(r), dim=-1)
        return -0.5 * (quad + q.logdet()) - dim * _HALF_LOG_2PI

    def score(params, u):
        q = get(params)
        return -q.precision_rows(u - q.loc)

    def kl(params0, params1, seed=None):
        return _lowrank_kl(get(params0), get(params1))

    def cov_quad(params, r):
        _, factor, scale = pieces(params)
        return torch.sum((r @ factor) ** 2, dim=-1) + torch.sum((scale * r) ** 2, dim=-1)

    def loc_lowrank(params):
        loc, scale, factor = (params[n] for n in names)
        return loc, (factor, scale)

    def gaussian_params(loc, factor_scale):
        factor, scale = factor_scale
        return dict(zip(names, (loc, scale, factor), strict=True))

    closed = score_method == "closed_form"
    return GuideDensity(
        latent_dim=dim, sites=sites, param_names=names, sample=sample, log_prob=log_prob,
        score=score if closed else _autodiff_score(log_prob), kl=kl, cov_quad=cov_quad,
        closed_form=closed, loc_lowrank=loc_lowrank if closed else None,
        gaussian_params=gaussian_params if closed else None,
    )  # fmt: skip


class _Through(torch.nn.Module):
    """Holds a flow so that ``torch.func.functional_call`` can run any function of it
    with the flow's params replaced by given tensors."""

    def __init__(self, flow: torch.nn.Module) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, fn: Callable, *args: torch.Tensor):
        return fn(*args)


def _event_sum(log_det: torch.Tensor, batch_ndim: int) -> torch.Tensor:
    """Sum a transform's ``log|det J|`` down to the batch shape."""
    if log_det.dim() <= batch_ndim:
        return log_det
    return log_det.reshape(log_det.shape[:batch_ndim] + (-1,)).sum(-1)


def _detached_call(fn: Callable[..., Any], params: Params, *extra: Any) -> Any:
    """``fn`` on ``params`` detached, without a graph."""
    with torch.no_grad():
        return fn({k: v.detach() for k, v in params.items()}, *extra)


def _cache_by_params(fn: Callable[..., Any], size: int = 1) -> Callable[..., Any]:
    """``fn(params, *extra)`` on detached params, remembering its results for the last
    ``size`` params dicts whose tensors are unchanged in place, each with the same
    ``extra`` (one step's ``params_t`` and seed, and with ``size=2`` a trust region's
    candidate beside them: the dicts are held, so their identities cannot be recycled,
    and the tensors' versions catch in-place changes)."""
    memo: list[tuple[Params, tuple, Any]] = []  # the most recent last

    def cached(params: Params, *extra: Any) -> Any:
        key = (extra, tuple(tensor_version(value) for value in params.values()))
        for i, (held, held_key, value) in enumerate(memo):
            if held is params and held_key == key:
                memo.append(memo.pop(i))
                return value
        memo.append((params, key, _detached_call(fn, params, *extra)))
        del memo[:-size]
        return memo[-1][2]

    return cached


def _seeded_generator(ref: torch.Tensor, seed: int | None) -> torch.Generator | None:
    """A generator on ``ref``'s device seeded by ``seed`` (``None``: torch's global RNG)."""
    return None if seed is None else torch.Generator(ref.device).manual_seed(int(seed))


def _monte_carlo_kl(draws_with_log_prob: Callable, log_prob: Callable, num_draws: int) -> Callable:
    """``kl`` of a guide without a closed form.

    ``kl(params0, params1, seed)`` is the Monte Carlo ``mean(log q0(x) - log q1(x))`` on
    ``num_draws`` fresh draws ``x ~ q0`` (never the S particles, whose sample KL is
    unbounded below, docs/algorithm.md, section 4), plus the control variate ``<g0, params1 -
    params0>`` with ``g0 = mean grad_params log q_params(x)`` at ``params0``: it has mean
    zero (the score identity) and makes the estimate's gradient vanish exactly at
    ``params1 = params0``, so the proximal term no longer pulls toward the draws' own
    maximum-likelihood fit. With a seed, the draws (and ``g0``) are computed once per
    ``(params dict, seed)`` (:func:`_cache_by_params`): one step's inner iterations share them.
    """

    def draws_and_mean_score(params, seed):
        kl_draws, log_q0 = draws_with_log_prob(params, num_draws, seed)
        with torch.enable_grad():
            leaves = {k: v.requires_grad_(v.is_floating_point()) for k, v in params.items()}
            inputs = [v for v in leaves.values() if v.requires_grad]
            found = torch.autograd.grad(log_prob(leaves, kl_draws).mean(), inputs, allow_unused=True)
        names = [k for k, v in leaves.items() if v.requires_grad]
        return kl_draws, log_q0, {k: g for k, g in zip(names, found, strict=True) if g is not None}

    seeded_kl_terms = _cache_by_params(draws_and_mean_score)

    def kl(params0, params1, seed=None):
        if seed is None:  # fresh draws
            kl_draws, log_q0, grads = _detached_call(draws_and_mean_score, params0, None)
        else:
            kl_draws, log_q0, grads = seeded_kl_terms(params0, seed)
        correction = sum(
            torch.sum(grad * (params1[name] - params0[name].detach())) for name, grad in grads.items()
        )
        return torch.mean(log_q0 - log_prob(params1, kl_draws)) + correction

    return kl


def _draws_cov_quad(draws: Callable, num_draws: int) -> Callable:
    """``cov_quad`` of a guide without closed forms: weighted by the covariance diagonal of
    ``num_draws`` fixed-seed ``draws(params, num, seed)``, computed once per params dict
    (:func:`_cache_by_params`)."""
    seeded_draws = _cache_by_params(lambda params: draws(params, num_draws, 0))

    def cov_quad(params, r):
        return torch.sum(seeded_draws(params).var(0) * r**2, dim=-1)

    return cov_quad


def transport_displacement(transport: Transport, num_draws: int) -> Callable[..., torch.Tensor]:
    """``kl(params0, params1, seed=None)`` of a flow: how far its map moves ``num_draws``
    base draws, in ``q0``'s sds: ``0.5 mean_z sum_d (T1(z) - T0(z))_d^2 / var0_d``.

    For a location shift of a Gaussian this is ``KL(q0 || q1)``; in general it is an
    upper bound on half the squared 2-Wasserstein distance between ``q0`` and ``q1`` in
    ``q0``'s whitened coordinates. It is never negative, and moving mass costs
    displacement wherever the flow sends its draws, where a Monte Carlo KL on ``q0``'s
    draws read -0.14 for the step that grew a far tail (docs/guides.md, "Flows with
    exact scores"). Its gradient vanishes at ``params1 = params0``. With a seed, the base
    draws and ``T0(z)`` are computed once per ``(params dict, seed)``, as the Monte Carlo
    KL's draws are.
    """

    def start(params0: Params, seed: int | None):
        z = transport.base_sample(params0, num_draws, _seeded_generator(next(iter(params0.values())), seed))
        moved = transport.push(params0, z)
        return z, moved, moved.var(0, correction=0)

    seeded_start = _cache_by_params(start)

    def displacement(params0, params1, seed=None):
        if seed is None:  # fresh draws
            z, start0, variance = _detached_call(start, params0, None)
        else:
            z, start0, variance = seeded_start(params0, seed)
        return 0.5 * ((transport.push(params1, z) - start0).pow(2) / variance).sum(-1).mean()

    return displacement


def _flow(guide: autoguide.AutoNormalizingFlow, options: DensityOptions) -> GuideDensity:
    """AutoNormalizingFlow / AutoIAFNormal: ``u = T(z)``, ``z ~ N(0, I)``.

    The density at a given ``u`` inverts the flow transform by transform with the
    transforms' own ``_inverse`` (one pass for coupling layers, ``D`` sequential passes
    for autoregressive ones), never through ``Transform.inv``: Pyro's transforms cache
    their last ``(x, y)`` pair, and a cached inverse computed with other params would
    be silently wrong here, where the params change between evaluations.
    """
    flow = guide.transform
    parts = list(flow.parts) if isinstance(flow, ComposeTransform) else [flow]
    local_names = [name for name, _ in flow.named_parameters()]
    names = tuple(f"{param_prefix(guide)}.transform$$${name}" for name in local_names)
    holder = _Through(flow)
    dim = guide.latent_dim

    def run(params: Params, fn: Callable, *args: torch.Tensor):
        values = {f"flow.{local}": params[name] for local, name in zip(local_names, names, strict=True)}
        return torch.func.functional_call(holder, values, (fn, *args), strict=False)

    def base_log_prob(z):
        return -0.5 * z.pow(2).sum(-1) - dim * _HALF_LOG_2PI

    def inverse_log_prob(u):
        log_det = u.new_zeros(u.shape[:-1])
        for part in reversed(parts):
            x = inverse(part, u)
            log_det = log_det + _event_sum(part.log_abs_det_jacobian(x, u), u.dim() - 1)
            u = x
        return base_log_prob(u) - log_det

    def forward_map(z):
        for part in parts:
            z = apply(part, z)
        return z

    def inverse_map(u):
        for part in reversed(parts):
            u = inverse(part, u)
        return u

    def base_sample(params, num, generator=None):
        ref = params[names[0]]
        return torch.randn((num, dim), dtype=ref.dtype, device=ref.device, generator=generator)

    def push(params, z):
        return run(params, forward_map, z)

    def seeded_draws(params, num, seed):
        return push(params, base_sample(params, num, _seeded_generator(params[names[0]], seed)))

    def log_prob(params, u):
        return run(params, inverse_log_prob, u)

    transport = Transport(
        base_sample=base_sample, push=push, pull=lambda params, u: run(params, inverse_map, u)
    )
    return GuideDensity(
        latent_dim=dim, sites=_latent_sites(guide), param_names=names,
        sample=lambda params, num: seeded_draws(params, num, None), log_prob=log_prob,
        score=_autodiff_score(log_prob), kl=transport_displacement(transport, options.num_kl_draws),
        cov_quad=_draws_cov_quad(seeded_draws, options.num_kl_draws), closed_form=False,
        transport=transport,
    )  # fmt: skip


_DRAWS_PLATE = "_psvi_guide_draws"


def check_user_guide(guide: Callable, model_trace, guide_trace) -> None:
    """Raise a clear error for a user-written guide whose density cannot be evaluated at
    the model's latent values: its sample sites must be exactly the model's latent
    sites, continuous, not point masses, each on its model site's support."""
    latents = {name: site for name, site in model_trace.nodes.items() if is_continuous_latent(site)}
    sites = {
        name: site
        for name, site in guide_trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    }
    described = {}
    for name, site in sites.items():
        fn, model_support = site["fn"], latents[name]["fn"].support if name in latents else None
        while isinstance(fn, dist.Independent | dist.ExpandedDistribution | dist.MaskedDistribution):
            fn = fn.base_dist
        agree = True
        if model_support is not None and not site["fn"].support.is_discrete:
            # The guide's draws lie in the model's support, and its density is finite at
            # 64 points spread over the model's (uniform in (-2, 2) unconstrained; fixed
            # seeds). Declared supports are not compared: Pyro's composed transforms
            # declare Real() for positive values.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                draws = site["fn"].sample((64,))
                points = _spread_points(model_support, site["value"].shape)
                try:
                    finite = bool(torch.isfinite(site["fn"].log_prob(points)).all())
                except ValueError:  # a distribution validating its support
                    finite = False
            agree = bool(model_support.check(draws).all()) and finite
        described[name] = GuideSite(
            isinstance(fn, dist.Delta), site["fn"].support.is_discrete, agree,
            str(site["fn"].support), str(model_support),
            tuple(site["value"].shape), tuple(latents[name]["value"].shape) if name in latents else (),
            bool(site["infer"].get("is_auxiliary")),
        )  # fmt: skip
    check_user_guide_sites(latents, described, "pyro.distributions.MixtureSameFamily")


def _spread_points(support, shape: torch.Size) -> torch.Tensor:
    """64 points of ``support``: uniform in (-2, 2) in its unconstrained space."""
    transform = biject_to(support)
    return transform(4 * torch.rand((64, *transform.inverse_shape(shape))) - 2)


def _broadcast_to_block(value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A site's ``value`` (a guide's loc, scale, args) broadcast to its block's ``shape``,
    without size-1 dims left of it (:func:`psvi.checks.drop_leading_ones`)."""
    return torch.broadcast_to(value.reshape(drop_leading_ones(value.shape, len(shape))), shape)


class _SiteDistribution(NamedTuple):
    """A user-written guide's site as one run of the guide gives it."""

    fn: torch.distributions.Distribution
    weight: Any  # its scale in the density: the trace's, without its plates' N/B
    mask: Any
    shape: torch.Size  # its value's
    plate_factor: float  # the N/B its subsampled plates scale it by (the ELBO's count)


class UserGuideLayout(NamedTuple):
    """The flat layout of a user-written guide: the model's latent sites (unconstrained
    shapes), each site's support, and the param-store names of the guide's params."""

    sites: tuple[LatentSite, ...]
    supports: dict[str, Any]
    param_names: tuple[str, ...]
    module_params: dict[str, torch.Tensor]  # pyro.module's, by store name: the module's own


def user_guide_layout(guide: Callable, model_trace, guide_trace) -> UserGuideLayout:
    """Check a user-written guide (:func:`check_user_guide`) against traces of the model
    and of the guide (which created the guide's params) and return its layout.

    A local latent in a subsampled plate spans the plate's full size in the flat latent
    (as AutoNormal's params do; ``LatentSite.plates`` names the subsampled plates), of
    which a step's guide draws fill the mini-batch's members."""
    check_user_guide(guide, model_trace, guide_trace)
    sites, supports = [], {}
    for name, site in model_trace.nodes.items():
        if not is_continuous_latent(site):
            continue
        support = site["fn"].support
        shape = biject_to(support).inverse_shape(site["value"].shape)
        event_dim = site["fn"].event_dim + len(shape) - site["value"].dim()
        frames = [frame for frame in site["cond_indep_stack"] if frame.vectorized and frame.dim is not None]
        # The guide's draws need not have the model's size-1 dims left of its plates.
        shape = list(drop_leading_ones(shape, event_dim + max((-frame.dim for frame in frames), default=0)))
        plates = []
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and frame.dim is not None and frame.full_size not in (None, frame.size):
                plates.append((frame.name, frame.dim - event_dim))
                shape[frame.dim - event_dim] = frame.full_size
        sites.append(LatentSite(name, torch.Size(shape), event_dim, tuple(plates)))
        supports[name] = support
    params = {name: site for name, site in guide_trace.nodes.items() if site["type"] == "param"}
    # pyro.module registers a module's own parameters (the site's init tensor) under
    # "module$$$name"; its forward reads them, never a substituted value.
    modules = {name: site["args"][1] for name, site in params.items() if user_param_name(name) != name}
    return UserGuideLayout(tuple(sites), supports, tuple(params), modules)


def user_guide_density(
    guide: Callable,
    layout: UserGuideLayout,
    args: tuple,
    kwargs: dict,
    max_plate_nesting: int,
    num_kl_draws: int = 256,
    closed_forms: SiteClosedForms = NO_CLOSED_FORMS,
    recipe_memory: dict | None = None,
) -> GuideDensity:
    """The :class:`GuideDensity` of a user-written guide (a function of ``pyro.param`` and
    ``pyro.sample`` sites, one per latent site of the model), run with ``args, kwargs``.

    Site by site on the model's constrained values:
    ``log q_u(u) = sum_sites log q(T(u)) + log|det J_T(u)|`` with ``T`` each model site's
    ``biject_to(support)``: the Jacobians are those of the model's log joint, so they
    cancel in the residual (docs/algorithm.md, section 3). The guide runs with the model's
    arguments and its ``pyro.param`` values substituted, vectorized over draws under a
    plate left of its own plates (write it broadcast-safe, as for vectorized ELBOs).

    With local latents in a subsampled plate (sites with ``plates``), the guide runs its
    plate on the step's mini-batch (``plate_indices``, shared with the model's pass), as
    under ``SVI``: a draw fills the batch's members of the full-size flat latent (the
    others are 0 and carry no weight, see :func:`pyro_psvi.scores.coordinate_weights`)
    and ``log q`` is that of the globals and the batch's members, without the plate's
    ``N/B`` scale (the density, not the ELBO's estimate of its sum).

    ``recipe_memory``: a dict kept across the densities of one fit (one per step, built
    with each step's arguments), holding the last recipes of a Normal guide's locs and
    scales and their gather, reused while the recipes repeat.
    """
    sites = layout.sites
    dim = sum(math.prod(site.shape) for site in sites)
    transforms = {site.name: biject_to(layout.supports[site.name]) for site in sites}
    draws_dim = -(max_plate_nesting + 1)
    plate_indices: dict[str, torch.Tensor] = {}

    def batched(site: LatentSite, value: torch.Tensor) -> torch.Tensor:
        """``(num, *shape)`` to ``(num, 1, ..., *shape)`` under the draws plate."""
        batch_ndim = len(site.shape) - site.event_dim
        return value.reshape(value.shape[:1] + (1,) * (max_plate_nesting - batch_ndim) + value.shape[1:])

    def run(params, num, values=None):
        """A trace of the guide with ``params``, vectorized over ``num`` draws (one
        draw of its own batch shape: ``num=None``, no draws plate)."""
        conditioned = poutine.condition(guide, data=values) if values else guide
        # Its own params (not the model's); pyro.module's take the values in place.
        own = {name: params[name] for name in layout.param_names if name not in layout.module_params}
        draws = contextlib.nullcontext() if num is None else pyro.plate(_DRAWS_PLATE, num, dim=draws_dim)
        with poutine.trace() as tracer, poutine.substitute(data=own):
            with _module_values(layout.module_params, params), draws, SharedSubsample(plate_indices):
                conditioned(*args, **kwargs)
        return tracer.trace

    def to_full_size(site: LatentSite, value: torch.Tensor) -> torch.Tensor:
        """A draw of the batch's members ``(num, ...)`` in the site's full-size block."""
        for plate, dim in site.plates:
            full = value.new_zeros(value.shape[:dim] + (site.shape[dim],) + value.shape[dim:][1:])
            value = full.index_copy(dim, plate_indices[plate], value)
        return value

    def to_batch(site: LatentSite, value: torch.Tensor) -> torch.Tensor:
        for plate, dim in site.plates:
            value = value.index_select(dim, plate_indices[plate])
        return value

    def sample(params, num):
        guide_trace = run(params, num)
        flat = []
        for site in sites:
            value = transforms[site.name].inv(guide_trace.nodes[site.name]["value"])
            value = value.reshape((num,) + value.shape[value.dim() - len(site.shape) :])
            flat.append(to_full_size(site, value).reshape(num, -1))
        return torch.cat(flat, dim=-1)

    def log_prob(params, u, plate_scaled=False):
        if closed_forms.mean_field and not torch.is_grad_enabled():  # no run of its own
            return mean_field_log_prob(cached(params), u, plate_scaled)
        num = u.shape[0]
        flat = unpack_sites(sites, u)
        unconstrained = {site.name: batched(site, to_batch(site, flat[site.name])) for site in sites}
        values = {name: transforms[name](value) for name, value in unconstrained.items()}
        total = u.new_zeros(num)
        for name, site in run(params, num, values).nodes.items():
            if site["type"] == "sample" and name in values:
                # The guide's plates scale a batch member's term by N/B; the density has it once.
                factor = _plate_factor(site) if plate_scaled else 1.0
                scale = site["scale"] if plate_scaled else site["scale"] / _plate_factor(site)
                log_q = scale_and_mask(site["fn"].log_prob(site["value"]), scale, site["mask"])
                log_det = factor * log_abs_det_jacobian(transforms[name], unconstrained[name], values[name])
                total = total + log_q.reshape(num, -1).sum(-1) + log_det.reshape(num, -1).sum(-1)
        return total

    def elbo_log_prob(params, u, weights):
        return log_prob(params, u, plate_scaled=True)

    def seeded_sample(params, num, seed):
        if seed is None:
            return sample(params, num)
        with _seeded(next(iter(params.values())).device, int(seed)):
            return sample(params, num)

    def draws_with_log_prob(params, num, seed):
        draws = seeded_sample(params, num, seed)
        return draws, log_prob(params, draws)

    def site_distributions(params) -> dict[str, _SiteDistribution]:
        """Each site's distribution and how the density counts it (one run, no draws
        plate: a mean-field site's distribution broadcasts against any draws; its draws
        from a seeded generator, leaving the global stream, the particles', as it was)."""
        with _seeded(next(iter(params.values())).device, 0):
            guide_trace = run(params, None)
        return {
            site.name: _SiteDistribution(
                node["fn"], node["scale"] / _plate_factor(node), node["mask"], node["value"].shape,
                _plate_factor(node),
            )
            for site in sites
            for node in (guide_trace.nodes[site.name],)
        }  # fmt: skip

    # q_t's (its draws' density, score and variances, the KL's first side) and a trust
    # region's candidate: one run each per update.
    cached = _cache_by_params(site_distributions, size=2)
    fitted: dict[str, Any] = {}  # the last score's site distributions, for its KL

    def fitted_distributions(params, keep: bool) -> dict[str, _SiteDistribution]:
        """``site_distributions(params)``, reusing the run of the score at the same
        ``params`` dict (unchanged in place) once: an inner step's KL. Without a graph to
        build, :func:`cached`'s: q_t's or a candidate's."""
        if not torch.is_grad_enabled():
            return cached(params)
        key = tuple(tensor_version(value) for value in params.values())
        reusable = fitted.get("params") is params and fitted.get("key") == key
        fns = fitted["fns"] if reusable else site_distributions(params)
        fitted.clear()
        if keep:
            fitted.update(params=params, key=key, fns=fns)
        return fns

    def mean_field_log_prob(fns, u, plate_scaled=False):
        """``log_prob`` of a mean-field guide from its sites' distributions ``fns``."""
        num, flat, total = u.shape[0], unpack_sites(sites, u), u.new_zeros(u.shape[0])
        for site in sites:
            fn = fns[site.name]
            unconstrained = batched(site, to_batch(site, flat[site.name]))
            value = transforms[site.name](unconstrained)
            weight = fn.weight * fn.plate_factor if plate_scaled else fn.weight
            log_q = scale_and_mask(fn.fn.log_prob(value), weight, fn.mask)
            log_det = log_abs_det_jacobian(transforms[site.name], unconstrained, value)
            if plate_scaled:
                log_det = fn.plate_factor * log_det
            total = total + log_q.reshape(num, -1).sum(-1) + log_det.reshape(num, -1).sum(-1)
        return total

    def closed_form_score(fns, u) -> torch.Tensor | None:
        """The score site by site by :func:`unconstrained_score`; ``None`` if a site has
        no rule or is scaled or masked (its log density's weight is not its Jacobian's)."""
        num, flat, blocks = u.shape[0], unpack_sites(sites, u), []
        for site in sites:
            fn = fns[site.name]
            if not (isinstance(fn.weight, int | float) and fn.weight == 1 and fn.mask is None):
                return None
            unconstrained = batched(site, to_batch(site, flat[site.name]))
            try:
                score = unconstrained_score(fn.fn, transforms[site.name], unconstrained)
            except NotImplementedError:
                return None
            score = torch.broadcast_to(score, unconstrained.shape)
            score = score.reshape((num,) + score.shape[score.dim() - len(site.shape) :])
            blocks.append(to_full_size(site, score).reshape(num, -1))
        return torch.cat(blocks, dim=-1)

    def mean_field_score(params, u):
        # One guide run, kept for the KL of the same inner step; the score is the sites'
        # in closed form, or differentiates the sites' log densities only, not the run.
        fns = fitted_distributions(params, keep=closed_forms.kl)
        score = closed_form_score(fns, u)
        if score is not None:
            return score
        with torch.enable_grad():
            u = u.detach().requires_grad_(True)
            return torch.autograd.grad(mean_field_log_prob(fns, u).sum(), u, create_graph=True)[0]

    def site_kl(params0, params1, seed=None):
        kl_t = made.get("kl_t")
        if kl_t is not None and kl_t[0] is params0 and not torch.is_grad_enabled():
            # The trust region's candidate of an update with linear-score steps: read by
            # the recipes, as the inner steps read it (no run of the guide).
            return kl_t[1](*made["gather"](params1))
        fns0 = cached(params0)
        return sum(
            scale_and_mask(kl_divergence(fns0[name].fn, fn1.fn), fn1.weight, fn1.mask).sum()
            for name, fn1 in fitted_distributions(params1, keep=False).items()
        )

    def site_variances(fns):
        """The flat latent's variances in the unconstrained space, from the sites' ``fns``."""
        variances = []
        for site in sites:
            fn = fns[site.name]
            transform = transforms[site.name]  # the unconstrained shape (a simplex's has one coordinate less)
            variance = torch.broadcast_to(
                unconstrained_variance(fn.fn, transform), transform.inverse_shape(fn.shape)
            )
            variance = variance.reshape((1,) + variance.shape[variance.dim() - len(site.shape) :])
            variances.append(to_full_size(site, variance).reshape(-1))
        return torch.cat(variances).detach()

    variances_of: dict[str, Any] = {}  # q_t's, kept while its cached fns are: once per step

    def site_cov_quad(params, r):
        fns = cached(params)
        if variances_of.get("fns") is not fns:
            variances_of.update(fns=fns, variances=site_variances(fns))
        return (variances_of["variances"] * r**2).sum(-1)

    # The last probe's "recipes", their "gather" and the params' "shapes" they were found at.
    made: dict[str, Any] = {} if recipe_memory is None else recipe_memory

    def loc_scale_vjp(params):
        # The inner steps' (params read as they are, the recipes of this step's q_t):
        # the flat sides and their pullback, without an autograd graph.
        gather = made.get("gather")
        if gather is None:
            return None
        with torch.no_grad():
            return (*gather(params), gather.pullback)

    def loc_scale_index(offsets, device):
        gather = made.get("gather")
        return None if gather is None else gather.flat_reads(offsets, device)

    def kept_recipes(recipes, params, flat) -> None:
        """Keep the gather of ``recipes`` (rebuilt unless they repeat the last ones)."""
        if not _same_recipes(made.get("recipes"), recipes, made.get("shapes"), params):
            made.update(recipes=recipes, gather=_RecipeGather(recipes, params, flat))
            made["shapes"] = {name: value.shape for name, value in params.items()}

    if closed_forms.normal and not any(site.plates for site in sites):

        def flat(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
            """The flat ``(loc, scale)`` from each site's (a site its plate broadcasts)."""
            blocks = [
                [_broadcast_to_block(part, site.shape).reshape(-1) for part in pair]
                for site, pair in zip(sites, parts, strict=True)
            ]
            return tuple(torch.cat(side) for side in zip(*blocks, strict=True))

        def normal_parts(fns) -> list[tuple[torch.Tensor, torch.Tensor]]:
            """Each site's unconstrained ``(loc, scale)`` from its distribution."""
            return [unconstrained_normal(fns[site.name].fn, transforms[site.name]) for site in sites]

        def probe(params):
            """One run of the guide on ``params`` as leaves of a graph: each site's ``(loc,
            scale)`` (detached) and how it was made (:func:`_part_recipe`), or ``None``
            for the recipes when some part is computed from the params."""
            leaves = {name: value.detach().requires_grad_(True) for name, value in params.items()}
            with torch.enable_grad():
                parts = normal_parts(site_distributions(leaves))
            recipes = [tuple(_part_recipe(part, leaves) for part in pair) for pair in parts]
            complete = all(recipe is not None for pair in recipes for recipe in pair)
            return [tuple(part.detach() for part in pair) for pair in parts], recipes if complete else None

        probed = _cache_by_params(probe)

        def get_loc_scale(params):
            # The inner steps' calls (params that carry gradients) skip the guide's run
            # when each site's loc and scale are a view of a param (what a distribution
            # makes of ``pyro.param`` values passed as they are, or indexed) or a constant:
            # a run through Pyro's handlers costs about an SVI step's guide pass. Every
            # other call (q_t's draws, objective, trust region) runs it, once per params
            # dict, as leaves of a graph, and finds the recipes again. (A constant made from
            # a param's value without its gradient, ``param.detach()``, keeps q_t's value
            # in the inner steps.)
            differentiated = any(value.requires_grad for value in params.values())
            if differentiated and made.get("gather") is not None:
                return made["gather"](params)
            if differentiated:
                return flat(normal_parts(site_distributions(params)))
            parts, recipes = probed(params)
            if recipes is None:
                made.clear()
            else:
                kept_recipes(recipes, params, flat)
            return flat(parts)

        def kl(params_t, params, seed=None):
            # q_t's params are probed (this step's recipes); a moved guide's, the trust
            # region's candidate, are read by those recipes, as the inner steps read them:
            # no second run of the guide per update.
            loc_scale_t = get_loc_scale(params_t)
            gather = made.get("gather")
            return _diag_kl(*loc_scale_t, *(get_loc_scale if gather is None else gather)(params))

        # A diagonal Gaussian in the unconstrained space: AutoNormal's density and fit.
        diagonal = _diagonal_density(get_loc_scale, sites, layout.param_names, "closed_form")
        return diagonal._replace(
            module_param_names=tuple(layout.module_params), elbo_log_prob=None, runs_guide=True,
            loc_scale_vjp=loc_scale_vjp, loc_scale_index=loc_scale_index, kl=kl,
        )  # fmt: skip

    def site_args(fns) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Each site's two args (its shape) where every site has a linear score
        (:func:`linear_score_rule`) and is unscaled and unmasked; else ``None``."""
        pairs = []
        for site in sites:
            fn = fns[site.name]
            found = linear_score_rule(fn.fn, transforms[site.name])
            if found is None or not (
                isinstance(fn.weight, int | float) and fn.weight == 1 and fn.mask is None
            ):
                return None
            rule, source = found
            pairs.append(tuple(_broadcast_to_block(arg, site.shape) for arg in rule.args(source)))
        return pairs

    def flat_args(pairs) -> tuple[torch.Tensor, ...]:
        return tuple(torch.cat([part.reshape(-1) for part in side]) for side in zip(*pairs, strict=True))

    def reads_args(params_t, args_t) -> bool:
        """Whether the kept recipes read ``args_t``, q_t's flat args, from ``params_t``."""
        shapes = {name: value.shape for name, value in params_t.items()}
        if made.get("gather") is None or made.get("shapes") != shapes:
            return False
        return all(map(torch.equal, made["gather"](params_t), args_t))

    def linear_scores(params_t, particles, scores) -> LinearScoreStatistics | None:
        # q_t's args, and the recipes that read them from the params: the inner steps then
        # gather the args from the optimizer's flat tensor and take the objective's
        # gradient in closed form. The recipes are found by a tagged run of the guide and
        # kept while they read each update's q_t args; where they do not (a condition on
        # a param's value took another branch of the guide), a new tagged run, whose
        # recipes must read them (the tags, too, may take another branch than q_t's values).
        fns = cached(params_t)
        pairs = site_args(fns)
        if pairs is None:
            made.clear()
            return None
        args_t = tuple(side.detach() for side in flat_args(pairs))
        if not reads_args(params_t, args_t):
            recipes = _tagged_recipes(lambda tags: site_args(site_distributions(tags)) or [], params_t)
            if recipes:
                kept_recipes(recipes, params_t, flat_args)
            if not (recipes and reads_args(params_t, args_t)):
                made.clear()
                return None
        a_t, b_t = args_t
        rules = [linear_score_rule(fns[site.name].fn, transforms[site.name])[0] for site in sites]
        blocks = unpack_sites(sites, particles)
        features = [
            rule.features(blocks[site.name].reshape(particles.shape[0], -1))
            for site, rule in zip(sites, rules, strict=True)
        ]
        phi_a, phi_b = (torch.cat(side, dim=-1) for side in zip(*features, strict=True))
        sums = tuple(
            product.sum(0)
            for product in (phi_a * phi_a, phi_a * phi_b, phi_b * phi_b, phi_a * scores, phi_b * scores)
        )
        families, owner = list(dict.fromkeys(rules)), None
        if len(families) > 1:  # each family's rule on its own coordinates
            owner = torch.repeat_interleave(
                torch.tensor([families.index(rule) for rule in rules]),
                torch.tensor([math.prod(site.shape) for site in sites]),
            ).to(a_t.device)
        made["kl_t"] = (params_t, partial(_linear_kl, families, owner, a_t, b_t))
        gather = made["gather"]
        free = gather.free
        write = None
        if gather.one_to_one and gather.names and not holds_a_natural_pair_constant(families, owner, free):
            write = partial(gather.scatter, params_t)
        per_family = partial(by_family, torch.where, families, owner)
        return LinearScoreStatistics(
            (a_t, b_t), sums, particles.shape[0], site_variances(fns),
            partial(per_family, "kl_gradient", a_t, b_t), partial(per_family, "natural"),
            partial(per_family, "natural_pullback"), partial(per_family, "log_partition"),
            partial(per_family, "log_partition_derivatives"), partial(per_family, "from_natural"),
            free, write,
        )  # fmt: skip

    kl = site_kl if closed_forms.kl else _monte_carlo_kl(draws_with_log_prob, log_prob, num_kl_draws)
    cov_quad = site_cov_quad if closed_forms.variance else _draws_cov_quad(seeded_sample, num_kl_draws)
    score = mean_field_score if closed_forms.mean_field else _autodiff_score(log_prob)
    # Linear scores: a mean-field guide whose sites' scores are linear in their args and
    # whose KLs and variances have closed forms, without local latents in a subsampled
    # plate or networks (a module reads its own weights, not the gathered ones).
    linear = closed_forms.linear and closed_forms.kl and closed_forms.variance
    linear = linear and not any(site.plates for site in sites)
    linear = linear and not layout.module_params
    return GuideDensity(
        latent_dim=dim, sites=sites, param_names=layout.param_names, sample=sample,
        log_prob=log_prob, score=score, kl=kl, cov_quad=cov_quad,
        closed_form=False, plate_indices=plate_indices, module_param_names=tuple(layout.module_params),
        elbo_log_prob=elbo_log_prob if any(site.plates for site in sites) else None, runs_guide=True,
        loc_scale_vjp=loc_scale_vjp if linear else None, loc_scale_index=loc_scale_index if linear else None,
        linear_scores=linear_scores if linear else None,
    )  # fmt: skip


def site_closed_forms(
    guide: Callable, guide_trace, args: tuple, kwargs: dict, supports: dict[str, Any]
) -> SiteClosedForms:
    """Whether a user-written guide is mean field, each site's distribution a function of
    the params alone, never of another site's value (checked on the autograd graph, not
    on values), and if so which site-wise closed forms exist: a ``kl_divergence`` rule
    for every site's distribution, for every site the variance of its value under the
    bijection of the model site's support ``supports[name]`` (:func:`unconstrained_variance`),
    and whether every site is Normal there (:func:`unconstrained_normal`); all only if
    every ``TransformedDistribution``'s transforms are constants (:func:`_fixed_transforms`)."""
    fns = {
        name: site["fn"]
        for name, site in guide_trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    }
    values = {name: guide_trace.nodes[name]["value"].detach().requires_grad_() for name in fns}
    with poutine.block(), poutine.trace() as tracer, torch.random.fork_rng(devices=[]):
        poutine.condition(guide, data=values)(*args, **kwargs)
    for name in fns:
        log_prob = tracer.trace.nodes[name]["fn"].log_prob(values[name].detach()).sum()
        others = [value for other, value in values.items() if other != name]
        if log_prob.requires_grad and others:
            if any(grad is not None for grad in torch.autograd.grad(log_prob, others, allow_unused=True)):
                return NO_CLOSED_FORMS
    unscaled = all(
        isinstance(site["scale"], int | float) and site["scale"] == 1 and site["mask"] is None
        for name, site in guide_trace.nodes.items()
        if name in fns
    )
    if not all(map(_fixed_transforms, fns.values())):  # two runs' sites might not compare
        return SiteClosedForms(mean_field=True, kl=False, variance=False)
    return SiteClosedForms(
        True,
        all(has_closed_form(lambda fn: kl_divergence(fn, fn), fn) for fn in fns.values()),
        all(
            has_closed_form(lambda fn, name=name: unconstrained_variance(fn, biject_to(supports[name])), fn)
            for name, fn in fns.items()
        ),
        unscaled
        and all(
            has_closed_form(lambda fn, name=name: unconstrained_normal(fn, biject_to(supports[name])), fn)
            for name, fn in fns.items()
        ),
        unscaled
        and all(linear_score_rule(fn, biject_to(supports[name])) is not None for name, fn in fns.items()),
    )


def _flat_parts(transform: Any) -> list[Any]:
    """The transforms ``transform`` (one, or a list) applies in turn, compositions and
    ``IndependentTransform`` flattened."""
    if isinstance(transform, list | tuple):
        return [part for item in transform for part in _flat_parts(item)]
    while isinstance(transform, IndependentTransform):
        transform = transform.base_transform
    if isinstance(transform, ComposeTransform):
        return _flat_parts(transform.parts)
    return [transform]


def _transform_parts(transform: Any) -> list[Any]:
    """:func:`_flat_parts` less identity affine maps (torch writes the positive reals'
    bijection as ``exp`` then ``AffineTransform(0, 1)``)."""

    def identity(part: Any) -> bool:
        if not isinstance(part, AffineTransform):
            return False
        if isinstance(part.loc, int | float) and isinstance(part.scale, int | float):
            return part.loc == 0 and part.scale == 1  # biject_to's: no tensors to build
        return bool(torch.as_tensor(part.loc).eq(0).all() & torch.as_tensor(part.scale).eq(1).all())

    return [part for part in _flat_parts(transform) if not identity(part)]


_BIJECTION_KINDS = {ExpTransform: "log", SigmoidTransform: "logit", StickBreakingTransform: "stick_breaking"}


def _transform_kind(transform: Any) -> str | None:
    """``"identity"``, ``"log"`` or ``"logit"`` for the inverse of those bijections, else ``None``."""
    return bijection_kind(_transform_parts(transform), _BIJECTION_KINDS)


def _dirichlet_stick_variance(concentration: torch.Tensor) -> torch.Tensor:
    """The variances of ``StickBreakingTransform.inv(y)``, ``y ~ Dirichlet(a)``, shape
    ``(..., K - 1)``: ``trigamma(a_i) + trigamma(sum_{j>i} a_j)`` (the twin of NumPyro's,
    whose docstring derives it)."""
    tails = concentration.flip(-1).cumsum(-1).flip(-1)[..., 1:]
    return torch.polygamma(1, concentration[..., :-1]) + torch.polygamma(1, tails)


_UNCONSTRAINED_VARIANCES: dict[tuple[type, str], Callable[[Any], torch.Tensor]] = {
    # logit(X) = log G_a - log G_b for X = G_a / (G_a + G_b), G ~ Gamma(., 1) independent.
    (dist.Beta, "logit"): lambda fn: (
        torch.polygamma(1, fn.concentration1) + torch.polygamma(1, fn.concentration0)
    ),
    (dist.Gamma, "log"): lambda fn: torch.polygamma(1, fn.concentration),  # log G_a - log rate
    (dist.InverseGamma, "log"): lambda fn: torch.polygamma(1, fn.concentration),  # -log G_a + log rate
    (dist.Dirichlet, "stick_breaking"): lambda fn: _dirichlet_stick_variance(fn.concentration),
    (dist.LogNormal, "log"): lambda fn: fn.scale**2,
    **{
        (family, "log"): lambda fn, name=family.__name__: torch.full_like(  # its dtype, device
            fn.mean, LOG_VARIANCE_OF_SCALE_FAMILY[name]
        )
        for family in (dist.Exponential, dist.HalfNormal, dist.HalfCauchy)
    },
}


def unconstrained_variance(fn: torch.distributions.Distribution, transform: Any) -> torch.Tensor:
    """The elementwise variance of ``transform.inv(x)`` for ``x ~ fn``, in closed form:
    ``fn.variance`` under the identity, and under the log or logit (the bijections of the
    positive reals and the unit interval) for Beta, Gamma, InverseGamma, LogNormal,
    Exponential, HalfNormal and HalfCauchy, under the stick-breaking bijection of the
    simplex for a Dirichlet (:func:`_dirichlet_stick_variance`; these in the
    unconstrained value's shape), and the base's variance for a
    ``TransformedDistribution`` whose elementwise transforms are ``transform`` itself.
    Raises ``NotImplementedError`` otherwise (the engine then estimates it from draws).
    The twin of NumPyro's."""
    wrappers = (torch.distributions.Independent, dist.ExpandedDistribution, dist.MaskedDistribution)
    while isinstance(fn, wrappers):
        fn = fn.base_dist  # the variance of one element: a plate's expansion broadcasts it
    kind = _transform_kind(transform)
    if kind == "identity":
        return fn.variance
    rule = _UNCONSTRAINED_VARIANCES.get((type(fn), kind))
    if rule is None and _is_image_under(fn, transform):
        rule = attrgetter("base_dist.variance")  # the value's preimage is a base draw
    if rule is None:
        raise NotImplementedError(f"no closed-form variance of {type(fn).__name__} under {transform}")
    return torch.broadcast_to(rule(fn), fn.batch_shape + transform.inverse_shape(fn.event_shape))


_UNCONSTRAINED_NORMALS: dict[tuple[type, str], Callable[[Any], tuple[torch.Tensor, torch.Tensor]]] = {
    (dist.Normal, "identity"): attrgetter("loc", "scale"),
    (dist.LogNormal, "log"): attrgetter("loc", "scale"),  # log X ~ Normal(loc, scale)
}


def unconstrained_normal(
    fn: torch.distributions.Distribution, transform: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loc, scale)``, each of ``fn``'s batch and event shape, when ``transform.inv(x)``
    for ``x ~ fn`` is elementwise Normal: a Normal under the identity, a LogNormal under
    the log, a ``TransformedDistribution`` of a Normal whose transforms are ``transform``.
    Raises ``NotImplementedError`` otherwise. The twin of NumPyro's."""
    fn = _elementwise(fn)  # a plate's expansion broadcasts it
    rule = _UNCONSTRAINED_NORMALS.get((type(fn), _transform_kind(transform)))
    if rule is None and _is_image_under(fn, transform) and type(fn.base_dist) is dist.Normal:
        rule = attrgetter("base_dist.loc", "base_dist.scale")
    if rule is None:
        raise NotImplementedError(f"{type(fn).__name__} is not Normal under the inverse of {transform}")
    shape = fn.batch_shape + fn.event_shape
    return tuple(torch.broadcast_to(value, shape) for value in rule(fn))


_UNCONSTRAINED_SCORES: dict[tuple[type, str], Callable[[Any, torch.Tensor], torch.Tensor]] = {
    # d/du [log fn(T(u)) + log|T'(u)|], T the bijection: for x = sigmoid(u), the Beta's
    # a log x + b log(1 - x); for x = exp(u), the Gamma's a u - rate x, and so on.
    (dist.Normal, "identity"): lambda fn, u: (fn.loc - u) / fn.scale**2,
    (dist.LogNormal, "log"): lambda fn, u: (fn.loc - u) / fn.scale**2,
    (dist.Beta, "logit"): lambda fn, u: (
        fn.concentration1 - (fn.concentration1 + fn.concentration0) * torch.sigmoid(u)
    ),
    (dist.Gamma, "log"): lambda fn, u: fn.concentration - fn.rate * u.exp(),
    (dist.InverseGamma, "log"): lambda fn, u: fn.rate * (-u).exp() - fn.concentration,
    (dist.Exponential, "log"): lambda fn, u: 1.0 - fn.rate * u.exp(),
    (dist.HalfNormal, "log"): lambda fn, u: 1.0 - (2.0 * u).exp() / fn.scale**2,
    (dist.HalfCauchy, "log"): lambda fn, u: 1.0 - 2.0 / (1.0 + fn.scale**2 * (-2.0 * u).exp()),
}


class LinearScoreRule(NamedTuple):
    """A family whose score in the unconstrained coordinate ``u`` (its log density at
    ``T(u)`` plus ``log|T'(u)|``, ``T`` the support's bijection) is linear in two functions
    ``(e_1, e_2)`` of its two args ``(a, b)``: ``e_1 phi_1(u) + e_2 phi_2(u)``
    (:data:`_UNCONSTRAINED_SCORES`); the args themselves for Beta, Gamma and InverseGamma,
    ``(loc / scale^2, 1 / scale^2)`` for a Normal in the unconstrained coordinate.

    Attributes
    ----------
    args : callable
        ``args(fn) -> (a, b)``, the distribution's two args.
    features : callable
        ``features(u) -> (phi_1(u), phi_2(u))``.
    kl_gradient : callable
        ``kl_gradient(a_t, b_t, a, b) -> (d/da, d/db) KL(q_t || q)``, elementwise.
    family : callable
        ``family(a, b)``, an elementwise distribution whose KLs are the family's in the
        unconstrained coordinate (the base Normal of a LogNormal, a Gamma for an
        InverseGamma: a bijection keeps a KL).
    log_partition : callable
        ``log_partition(e_1, e_2) -> A``, elementwise, ``inf`` outside the family's domain:
        the family is an exponential family whose natural parameters are affine in
        ``(e_1, e_2)``, so ``KL(q_t || q) = A(e) - A(e_t) - grad A(e_t) . (e - e_t)``,
        convex in ``e``.
    log_partition_derivatives : callable
        ``(e_1, e_2) -> (dA/de_1, dA/de_2, d2A/de_1^2, d2A/de_1 de_2, d2A/de_2^2)``.
    natural : callable or None
        ``natural(a, b) -> (e_1, e_2)``; ``None``: the args.
    natural_pullback : callable or None
        ``natural_pullback(a, b, g_1, g_2) -> (g_a, g_b)``, a gradient in ``(e_1, e_2)``
        taken to the args; ``None``: the args.
    from_natural : callable or None
        ``from_natural(e_1, e_2) -> (a, b)``, the inverse of ``natural``; ``None``: the args.
    """

    args: Callable[[Any], tuple[torch.Tensor, torch.Tensor]]
    features: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    kl_gradient: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    family: Callable[[torch.Tensor, torch.Tensor], torch.distributions.Distribution]
    log_partition: Callable[..., torch.Tensor]
    log_partition_derivatives: Callable[..., tuple[torch.Tensor, ...]]
    natural: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    natural_pullback: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    from_natural: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None


def _gamma_kl_gradient(a_t, b_t, a, b) -> tuple[torch.Tensor, torch.Tensor]:
    """``KL(Gamma(a_t, b_t) || Gamma(a, b))``'s gradient in the concentration ``a`` and the
    rate ``b``: ``psi(a) - log b - E_t[log x]`` and ``E_t[x] - a / b`` (an InverseGamma's
    KL is its reciprocal Gamma's)."""
    return torch.digamma(a) - b.log() - torch.digamma(a_t) + b_t.log(), a_t / b_t - a / b


def _beta_kl_gradient(a_t, b_t, a, b) -> tuple[torch.Tensor, torch.Tensor]:
    """``KL(Beta(a_t, b_t) || Beta(a, b))``'s gradient in ``a`` and ``b``:
    ``psi(a) - psi(a + b) - E_t[log x]`` and ``psi(b) - psi(a + b) - E_t[log(1 - x)]``."""
    total, total_t = torch.digamma(a + b), torch.digamma(a_t + b_t)
    grad_a = torch.digamma(a) - total - torch.digamma(a_t) + total_t
    return grad_a, torch.digamma(b) - total - torch.digamma(b_t) + total_t


def _normal_kl_gradient(loc_t, scale_t, loc, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """``KL(N(loc_t, scale_t^2) || N(loc, scale^2))``'s gradient in ``loc`` and ``scale``."""
    return (loc - loc_t) / scale**2, 1 / scale - (scale_t**2 + (loc - loc_t) ** 2) / scale**3


def _normal_pullback(loc, scale, grad_1, grad_2) -> tuple[torch.Tensor, torch.Tensor]:
    """A gradient in ``(loc / scale^2, 1 / scale^2)`` taken to ``(loc, scale)``."""
    return grad_1 / scale**2, -2 * (loc * grad_1 + grad_2) / scale**3


def _gamma_log_partition(a, b) -> torch.Tensor:
    """A Gamma's (or, of ``1 / x``, an InverseGamma's) ``lgamma(a) - a log b`` in its args,
    the natural parameters of the statistics ``(log x, -x)``; ``inf`` outside ``a, b > 0``."""
    inside = (a > 0) & (b > 0)
    return torch.where(inside, torch.lgamma(a) - a * torch.where(inside, b, 1.0).log(), torch.inf)


def _gamma_log_partition_derivatives(a, b) -> tuple[torch.Tensor, ...]:
    return torch.digamma(a) - b.log(), -a / b, torch.polygamma(1, a), -1 / b, a / b**2


def _beta_log_partition(a, b) -> torch.Tensor:
    """A Beta's ``lgamma(a) + lgamma(b) - lgamma(a + b)`` in its args, the natural
    parameters of ``(log x, log(1 - x))``; ``inf`` outside ``a, b > 0``."""
    inside = (a > 0) & (b > 0)
    return torch.where(inside, torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b), torch.inf)


def _beta_log_partition_derivatives(a, b) -> tuple[torch.Tensor, ...]:
    total, curve_total = torch.digamma(a + b), torch.polygamma(1, a + b)
    return (
        torch.digamma(a) - total, torch.digamma(b) - total,
        torch.polygamma(1, a) - curve_total, -curve_total, torch.polygamma(1, b) - curve_total,
    )  # fmt: skip


def _normal_log_partition(e_1, e_2) -> torch.Tensor:
    """A Normal's ``e_1^2 / (2 e_2) - log(e_2) / 2`` in ``(loc / scale^2, 1 / scale^2)``,
    the natural parameters of ``(u, -u^2 / 2)``; ``inf`` outside ``e_2 > 0``."""
    inside = e_2 > 0
    return torch.where(inside, e_1**2 / (2 * e_2) - torch.where(inside, e_2, 1.0).log() / 2, torch.inf)


def _normal_log_partition_derivatives(e_1, e_2) -> tuple[torch.Tensor, ...]:
    mean = e_1 / e_2
    return mean, -(mean**2 + 1 / e_2) / 2, 1 / e_2, -mean / e_2, (mean**2 + 0.5 / e_2) / e_2


# The unconstrained score of a Normal there, (loc - u) / scale^2 = e_1 - e_2 u.
_NORMAL_LINEAR_SCORE = LinearScoreRule(
    attrgetter("loc", "scale"),
    lambda u: (torch.ones_like(u), -u),
    _normal_kl_gradient,
    dist.Normal,
    _normal_log_partition,
    _normal_log_partition_derivatives,
    lambda loc, scale: (loc / scale**2, scale**-2),
    _normal_pullback,
    lambda e_1, e_2: (e_1 / e_2, e_2.rsqrt()),
)

_LINEAR_SCORES: dict[tuple[type, str], LinearScoreRule] = {
    (dist.Normal, "identity"): _NORMAL_LINEAR_SCORE,
    (dist.LogNormal, "log"): _NORMAL_LINEAR_SCORE,  # log X ~ Normal(loc, scale)
    # The scores of _UNCONSTRAINED_SCORES: a - b e^u (Gamma), -a + b e^-u (InverseGamma),
    # a (1 - sigmoid(u)) - b sigmoid(u) (Beta).
    (dist.Gamma, "log"): LinearScoreRule(
        attrgetter("concentration", "rate"),
        lambda u: (torch.ones_like(u), -u.exp()),
        _gamma_kl_gradient,
        dist.Gamma,
        _gamma_log_partition,
        _gamma_log_partition_derivatives,
    ),
    (dist.InverseGamma, "log"): LinearScoreRule(
        attrgetter("concentration", "rate"),
        lambda u: (-torch.ones_like(u), (-u).exp()),
        _gamma_kl_gradient,
        dist.Gamma,  # 1 / x of an InverseGamma(a, b) is Gamma(a, b)
        _gamma_log_partition,
        _gamma_log_partition_derivatives,
    ),
    (dist.Beta, "logit"): LinearScoreRule(
        attrgetter("concentration1", "concentration0"),
        lambda u: (torch.sigmoid(-u), -torch.sigmoid(u)),
        _beta_kl_gradient,
        dist.Beta,
        _beta_log_partition,
        _beta_log_partition_derivatives,
    ),
}


def linear_score_rule(
    fn: torch.distributions.Distribution, transform: Any
) -> tuple[LinearScoreRule, torch.distributions.Distribution] | None:
    """The :class:`LinearScoreRule` of ``fn`` (its elementwise base) under ``transform`` and
    the distribution its args are read from (a ``TransformedDistribution`` of a Normal by
    ``transform``: its base), or ``None``."""
    fn = _elementwise(fn)
    rule = _LINEAR_SCORES.get((type(fn), _transform_kind(transform)))
    if rule is None and _is_image_under(fn, transform) and type(fn.base_dist) is dist.Normal:
        return _NORMAL_LINEAR_SCORE, fn.base_dist
    return None if rule is None else (rule, fn)


def _linear_kl(
    rules: list[LinearScoreRule],
    owner: torch.Tensor | None,
    a_t: torch.Tensor,
    b_t: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
) -> torch.Tensor:
    """``KL(q_t || q)`` summed over the flat coordinates from the flat args of ``q_t``
    and ``q``, coordinate ``i`` in ``rules[owner[i]]``'s family (``owner`` ``None``: one)."""
    if owner is None:
        return kl_divergence(rules[0].family(a_t, b_t), rules[0].family(a, b)).sum()
    total = a.new_zeros(())
    for position, rule in enumerate(rules):
        mine = owner == position
        total = total + kl_divergence(rule.family(a_t[mine], b_t[mine]), rule.family(a[mine], b[mine])).sum()
    return total


def _elementwise(fn: torch.distributions.Distribution) -> torch.distributions.Distribution:
    """``fn`` without the ``Independent`` and expansion wrappers of its elementwise base."""
    while isinstance(fn, torch.distributions.Independent | dist.ExpandedDistribution):
        fn = fn.base_dist
    return fn


def _tagged_recipes(
    run_args: Callable[[Params], list[tuple[torch.Tensor, ...]]], params: Params
) -> list[tuple[tuple, ...]] | None:
    """How a guide reads each site's args from ``params``, in :func:`_part_recipe`'s form,
    found where the args are not views of the params' storage (a Beta stacks its two):
    ``run_args`` runs the guide on params whose entries are tagged with their positions
    (1, 2, ... across all params: exact below 2^24 in float32, 2^53 in float64; other
    dtypes are not probed), as leaves of a graph. An arg that no leaf's gradient reaches is
    a constant; one that holds tags, whose tags lie on a strided view of one param and
    whose gradient is that view's (a random cotangent's pullback), reads that view;
    anything else (computed from the params) is ``None`` for all. Also ``None`` where the
    tagged run fails (the guide's own arithmetic on positions that are no valid values)."""
    tags, start = {}, 1
    for name, value in params.items():
        positions = torch.arange(start, start + value.numel(), dtype=value.dtype, device=value.device)
        tags[name] = positions.reshape(value.shape).requires_grad_(True)
        start += value.numel()
    exact = {torch.float32: 2**24, torch.float64: 2**53}  # the integers each dtype holds exactly
    if not all(start < exact.get(value.dtype, 0) for value in params.values()):
        return None
    try:  # the guide's own warnings come from its runs on values, not from this probe
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parts = run_args(tags)
    except Exception:  # noqa: BLE001 - the guide's code on positions, not values: no fast path
        return None
    recipes = [tuple(_tagged_recipe(part, tags) for part in pair) for pair in parts]
    return recipes if all(recipe is not None for pair in recipes for recipe in pair) else None


def _tagged_recipe(part: torch.Tensor, tags: Params) -> tuple | None:
    """One arg's recipe in :func:`_tagged_recipes`."""
    if not part.requires_grad or not part.numel():
        return ("constant", part.detach())
    values = part.detach()
    low, high = values.min(), values.max()
    for name, tag in tags.items():
        first = tag.detach().reshape(-1)[0]
        if not (first <= low and high < first + tag.numel()):
            continue
        index = (values - first).round().long()
        if not torch.equal(index.to(values.dtype) + first, values):
            return None
        size = tuple(part.shape)
        stride = tuple(
            int(index[tuple(1 if d == k else 0 for d in range(index.dim()))] - index.reshape(-1)[0])
            if size[k] > 1 else 0
            for k in range(index.dim())
        )  # fmt: skip
        offset = int(index.reshape(-1)[0]) if index.numel() else 0
        try:
            strided = torch.arange(tag.numel(), device=index.device).as_strided(size, stride, offset)
        except RuntimeError:  # a negative stride, or out of the param's bounds
            return None
        if not torch.equal(strided, index):
            return None
        cotangent = torch.randn(
            part.shape, generator=torch.Generator(part.device).manual_seed(0), device=part.device
        )
        grads = torch.autograd.grad(
            part, list(tags.values()), cotangent, retain_graph=True, allow_unused=True
        )
        expected = torch.zeros(tag.numel(), dtype=part.dtype, device=part.device)
        expected.index_add_(0, index.reshape(-1), cotangent.reshape(-1).to(part.dtype))
        for other, grad in zip(tags, grads, strict=True):
            want = expected.reshape(tag.shape) if other == name else None
            if want is None and grad is not None and bool(grad.ne(0).any()):
                return None
            if want is not None and (grad is None or not torch.allclose(grad, want)):
                return None
        return ("view", name, size, stride, offset)
    return None


def unconstrained_score(
    fn: torch.distributions.Distribution, transform: Any, u: torch.Tensor
) -> torch.Tensor:
    """The elementwise score in ``u`` of the density of ``u = transform.inv(x)``, ``x ~ fn``
    (``fn``'s log density at ``transform(u)`` plus the Jacobian's), in closed form for the
    families of :func:`unconstrained_variance` under the same bijections, and a
    ``TransformedDistribution`` of a Normal by ``transform``. Raises
    ``NotImplementedError`` otherwise."""
    fn = _elementwise(fn)  # the batch broadcasts
    rule = _UNCONSTRAINED_SCORES.get((type(fn), _transform_kind(transform)))
    if rule is None and _is_image_under(fn, transform) and type(fn.base_dist) is dist.Normal:
        fn, rule = fn.base_dist, _UNCONSTRAINED_SCORES[dist.Normal, "identity"]
    if rule is None:
        raise NotImplementedError(f"no closed-form score of {type(fn).__name__} under {transform}")
    return rule(fn, u)


def _is_image_under(fn: torch.distributions.Distribution, transform: Any) -> bool:
    """Whether ``fn`` is an elementwise ``TransformedDistribution`` whose transforms are
    ``transform`` (equal parts in turn): its values' preimages are its base's draws."""
    if not isinstance(fn, torch.distributions.TransformedDistribution):
        return False
    if fn.base_dist.event_shape != fn.event_shape:
        return False
    mine, theirs = _transform_parts(fn.transforms), _transform_parts(transform)
    return len(mine) == len(theirs) and all(a == b for a, b in zip(mine, theirs, strict=True))


def _fixed_transforms(fn: torch.distributions.Distribution) -> bool:
    """Whether ``fn`` has no transform its params could move: torch's KL rule for two
    transformed distributions needs equal transforms and fails for unequal ones.
    LogNormal's is fixed; a ``TransformedDistribution``'s is when no part is a module
    and no tensor of a part is on the params' autograd graph (``fn`` from a trace of
    the guide with the param store's params, which require grad)."""
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    if not isinstance(fn, torch.distributions.TransformedDistribution) or isinstance(
        fn, torch.distributions.LogNormal
    ):
        return True
    for part in _flat_parts(fn.transforms):
        if isinstance(part, torch.nn.Module):
            return False
        if any(isinstance(value, torch.Tensor) and value.requires_grad for value in vars(part).values()):
            return False
    return True


def _part_recipe(part: torch.Tensor, leaves: Params) -> tuple | None:
    """How a guide made ``part`` from the ``leaves`` its run read: ``("view", name, size,
    stride, offset)`` for a view of a leaf (a distribution's ``broadcast_all`` of a param,
    or an element of one: reached by the graph, its elements within the leaf's, ``offset``
    counted from the leaf's first), ``("constant", part)`` for one no leaf's gradient
    reaches, ``None`` for one computed from them."""
    if not part.requires_grad:
        return ("constant", part.detach())
    storage = part.untyped_storage().data_ptr()
    last = sum((size - 1) * stride for size, stride in zip(part.shape, part.stride(), strict=True))
    for name, leaf in leaves.items():
        offset = part.storage_offset() - leaf.storage_offset()
        same = leaf.untyped_storage().data_ptr() == storage and leaf.is_contiguous()
        if same and part.numel() and 0 <= offset and offset + last < leaf.numel():
            return ("view", name, tuple(part.shape), part.stride(), offset)
    return None


def _same_recipes(
    old: list[tuple[tuple, tuple]] | None,
    new: list[tuple[tuple, tuple]],
    old_shapes: dict[str, torch.Size] | None,
    params: Params,
) -> bool:
    """Whether a probe found the recipes of the last one (the same views of params of the
    same shapes, and equal constants: compared on a CPU only, where reading them is free),
    so that its :class:`_RecipeGather` serves again."""
    if old is None or old_shapes is None or len(old) != len(new):
        return False
    if any(params[name].shape != shape for name, shape in old_shapes.items() if name in params):
        return False
    for before, after in zip(itertools.chain(*old), itertools.chain(*new), strict=True):
        if before[0] != after[0]:
            return False
        if before[0] == "view" and before != after:
            return False
        if before[0] == "constant":
            kept, found = before[1], after[1]
            same_kind = (kept.shape, kept.dtype, kept.device) == (found.shape, found.dtype, found.device)
            if not (same_kind and found.device.type == "cpu" and torch.equal(kept, found)):
                return False
    return True


class _RecipeGather:
    """The flat ``(loc, scale)`` the parts ``recipes`` (:func:`_part_recipe`) make from
    params, as one gather from the concatenated params (and a select of the constants):
    the same numbers as following each recipe, in a handful of ops; and the pullback of
    their gradients to the params (an index-add), so that an inner step needs no autograd
    graph through the guide's sites. ``params`` gives the params' shapes."""

    def __init__(self, recipes: list[tuple[tuple, tuple]], params: Params, flat: Callable) -> None:
        self.names = sorted({recipe[1] for pair in recipes for recipe in pair if recipe[0] == "view"})
        self.shapes = [params[name].shape for name in self.names]
        self.sizes = [params[name].numel() for name in self.names]
        device = next(iter(params.values())).device
        starts = [0, *itertools.accumulate(self.sizes)]
        positions = {
            name: torch.arange(start, start + size, device=device).reshape(shape)
            for name, start, size, shape in zip(self.names, starts[:-1], self.sizes, self.shapes, strict=True)
        }
        indices = flat([
            tuple(_follow(r, positions) if r[0] == "view" else torch.full_like(r[1], -1, dtype=torch.long)
                  for r in pair)
            for pair in recipes
        ])  # fmt: skip
        constants = flat([
            tuple(r[1] if r[0] == "constant" else params[r[1]].new_zeros(r[2]) for r in pair)
            for pair in recipes
        ])  # fmt: skip
        self.total = starts[-1]
        self._reads: tuple[tuple, tuple[FlatRead, ...]] | None = None  # flat_reads' last layout
        # Per side (loc, scale): (index, None), or (index, (kept, constant, kept's positions)).
        self.sides = []
        for index, constant in zip(indices, constants, strict=True):
            kept = index >= 0
            if bool(kept.all()):
                self.sides.append((index, None))
            else:
                self.sides.append((index.clamp(min=0), (kept, constant, kept.nonzero().squeeze(-1))))
        read = torch.cat([index if fixed is None else index[fixed[2]] for index, fixed in self.sides])
        self.one_to_one = bool(torch.unique(read).numel() == read.numel())
        # Per side, the coordinates a param gives (the others are constants).
        self.free = tuple(
            torch.ones_like(index, dtype=torch.bool) if fixed is None else fixed[0]
            for index, fixed in self.sides
        )

    def scatter(self, values: Params, *sides: torch.Tensor) -> Params:
        """The constrained ``values`` of the params the recipes read, with the entries that
        give the flat ``sides`` set to them (each entry gives at most one coordinate:
        :attr:`one_to_one`); the constant coordinates of ``sides`` are not read."""
        joined = torch.cat([values[name].reshape(-1) for name in self.names])
        for (index, fixed), side in zip(self.sides, sides, strict=True):
            if fixed is None:
                joined = joined.index_copy(0, index, side.to(joined.dtype))
            else:
                joined = joined.index_copy(0, index[fixed[2]], side[fixed[2]].to(joined.dtype))
        parts = zip(self.names, joined.split(self.sizes), self.shapes, strict=True)
        return {name: part.view(shape) for name, part, shape in parts}

    def __call__(self, values: Params) -> tuple[torch.Tensor, ...]:
        """The flat ``(loc, scale)`` from the constrained ``values`` (differentiable)."""
        if not self.names:
            return tuple(fixed[1] for _, fixed in self.sides)
        joined = torch.cat([values[name].reshape(-1) for name in self.names])
        return tuple(
            joined[index] if fixed is None else torch.where(fixed[0], joined[index], fixed[1])
            for index, fixed in self.sides
        )

    def flat_reads(self, offsets: dict[str, int], device: torch.device) -> tuple[FlatRead, ...] | None:
        """The gather as :class:`FlatRead` s of the params laid out from ``offsets``
        (``None`` when it reads no param); the same objects for the same layout."""
        if not self.names:
            return None
        key = (tuple(offsets[name] for name in self.names), device)
        if self._reads is None or self._reads[0] != key:
            moved = _contiguous_read(offsets, dict(zip(self.names, self.sizes, strict=True)), device).index
            if isinstance(moved, slice):  # the recipes index into it
                moved = torch.arange(moved.start, moved.stop, device=device)
            reads = tuple(
                FlatRead(moved[index], None) if fixed is None
                else FlatRead(torch.where(fixed[0], moved[index], -1), fixed[1])
                for index, fixed in self.sides
            )  # fmt: skip
            self._reads = (key, reads)
        return self._reads[1]

    def pullback(self, *grads: torch.Tensor) -> dict[str, torch.Tensor]:
        """The gradients of the params named in the recipes, from those of the flat
        ``(loc, scale)`` (a constant part passes none)."""
        total = grads[0].new_zeros(self.total)
        for (index, fixed), grad in zip(self.sides, grads, strict=True):
            if fixed is None:
                total.index_add_(0, index, grad)
            else:
                total.index_add_(0, index[fixed[2]], grad[fixed[2]])
        parts = zip(self.names, total.split(self.sizes), self.shapes, strict=True)
        return {name: part.view(shape) for name, part, shape in parts}


def _follow(recipe: tuple, params: Params) -> torch.Tensor:
    """The part ``recipe`` (:func:`_part_recipe`) makes from ``params``."""
    if recipe[0] == "constant":
        return recipe[1]
    _, name, size, stride, offset = recipe
    param = params[name].contiguous()  # as the probe's leaf was (an inner step's may be a flat view)
    return param.as_strided(size, stride, param.storage_offset() + offset)


class _seeded:
    """Draw from the global RNG of ``device`` seeded with ``seed``, its state restored
    after (``torch.random.fork_rng`` with ``torch.manual_seed`` costs about a millisecond
    a call on a CPU, seeding every accelerator backend)."""

    def __init__(self, device: torch.device, seed: int) -> None:
        if device.type == "cuda":
            index = torch.cuda.current_device() if device.index is None else device.index
            self.generator = torch.cuda.default_generators[index]
        else:
            self.generator = torch.default_generator
        self.seed = seed

    def __enter__(self) -> None:
        self.state = self.generator.get_state()
        self.generator.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        self.generator.set_state(self.state)


@contextlib.contextmanager
def _module_values(modules: dict[str, torch.Tensor], params: Params) -> Iterator[None]:
    """Give ``pyro.module`` parameters the values in ``params`` for the block.

    A module's forward reads its own parameters, so values other than those tensors
    themselves (``q_t``'s, the trust region's steps) are swapped into their data and
    swapped back after: exact for the values, but no gradient flows to such a value
    (the inner steps differentiate the module's own tensors, which need no swap).
    """
    swapped = {name: module for name, module in modules.items() if params[name] is not module}
    saved = {name: module.data for name, module in swapped.items()}
    try:
        for name, module in swapped.items():
            module.data = params[name].detach()
        yield
    finally:
        for name, module in swapped.items():
            module.data = saved[name]


def _plate_factor(site) -> float:
    """The ``N/B`` (product over a site's subsampled plates) its plates scale it by."""
    factor = 1.0
    for frame in site["cond_indep_stack"]:
        if frame.full_size not in (None, frame.size):
            factor *= frame.full_size / frame.size
    return factor


def _autoguide_setup(build: Callable[[Any, DensityOptions], GuideDensity]):
    """``GuideFamily.setup`` of an autoguide: one density for every call, built from the
    guide's prototype (the guide must have been run once)."""

    def setup(guide, model_trace, guide_trace, args, kwargs, options: DensityOptions):
        if guide.prototype_trace is None:
            raise RuntimeError("Run the guide once (guide(*args)) before building its density.")
        density = build(guide, options)
        return lambda args, kwargs: density

    return setup


def _user_guide_setup(guide, model_trace, guide_trace, args, kwargs, options: DensityOptions):
    """``GuideFamily.setup`` of a user-written guide: its layout, checked once against
    traces of the model and of the guide; its density built with each call's arguments."""
    if model_trace is None:
        raise ValueError(
            "A user-written guide's density needs traces of the model and the guide: use "
            "user_guide_layout and user_guide_density."
        )
    layout = user_guide_layout(guide, model_trace, guide_trace)
    closed_forms = site_closed_forms(guide, guide_trace, args, kwargs, layout.supports)
    recipe_memory: dict[str, Any] = {}
    return lambda args, kwargs: user_guide_density(
        guide, layout, args, kwargs, options.max_plate_nesting, options.num_kl_draws, closed_forms,
        recipe_memory,
    )  # fmt: skip


def _product_density(parts: list[GuideDensity]) -> GuideDensity:
    """The density of independent guides over consecutive blocks of the flat latent (an
    AutoGuideList's parts): draws and scores side by side, log densities, KLs and
    covariance quadratic forms summed; a diagonal Gaussian (the split objective, the
    closed-form step) when every part is one."""
    sizes = [part.latent_dim for part in parts]

    def blocks(u):
        return u.split(sizes, dim=-1)

    def sample(params, num):
        return torch.cat([part.sample(params, num) for part in parts], dim=-1)

    def log_prob(params, u):
        return sum(part.log_prob(params, block) for part, block in zip(parts, blocks(u), strict=True))

    def score(params, u):
        return torch.cat(
            [part.score(params, block) for part, block in zip(parts, blocks(u), strict=True)], -1
        )

    def kl(params0, params1, seed=None):
        return sum(part.kl(params0, params1, seed) for part in parts)

    def cov_quad(params, r):
        return sum(part.cov_quad(params, block) for part, block in zip(parts, blocks(r), strict=True))

    def elbo_log_prob(params, u, weights):  # a part without local latents weighs 1 throughout
        terms = zip(parts, blocks(u), weights.split(sizes), strict=True)
        return sum(
            part.elbo_log_prob(params, block, block_weights)
            if part.elbo_log_prob is not None
            else part.log_prob(params, block)
            for part, block, block_weights in terms
        )

    local = any(site.plates for part in parts for site in part.sites)
    density = GuideDensity(
        latent_dim=sum(sizes), sites=tuple(site for part in parts for site in part.sites),
        param_names=tuple(name for part in parts for name in part.param_names), sample=sample,
        log_prob=log_prob, score=score, kl=kl, cov_quad=cov_quad,
        closed_form=all(part.closed_form for part in parts), elbo_log_prob=elbo_log_prob if local else None,
    )  # fmt: skip
    if not all(part.loc_scale is not None and part.gaussian_params is not None for part in parts):
        return density

    def loc_scale(params):
        pairs = [part.loc_scale(params) for part in parts]
        return tuple(torch.cat(side) for side in zip(*pairs, strict=True))

    def gaussian_params(loc, scale):
        pairs = zip(loc.split(sizes), scale.split(sizes), strict=True)
        return {
            name: value
            for part, (part_loc, part_scale) in zip(parts, pairs, strict=True)
            for name, value in part.gaussian_params(part_loc, part_scale).items()
        }

    return density._replace(loc_scale=loc_scale, gaussian_params=gaussian_params)


def _guide_list_setup(guide, model_trace, guide_trace, args, kwargs, options: DensityOptions):
    """``GuideFamily.setup`` of an AutoGuideList: each part's own setup, their densities
    multiplied (:func:`_product_density`). A part must be an autoguide with a density of
    its own that is not a flow (a flow's proximal term is not a KL); local latents in a
    subsampled plate only in a part whose family holds them (AutoNormal)."""
    from pyro_psvi.scores import local_latents  # pyro_psvi.scores imports this module

    setups = []
    for index, part in enumerate(guide):
        family = guide_family(part)
        if not isinstance(part, autoguide.AutoGuide) or family.refusal is not None:
            raise TypeError(guide_list_part_refusal(index, family.name, family.refusal))
        setups.append(family.setup(part, model_trace, guide_trace, args, kwargs, options))

    def density(args, kwargs):
        parts = [setup(args, kwargs) for setup in setups]  # each part traced by now
        for index, (part, density) in enumerate(zip(guide, parts, strict=True)):
            if density.transport is not None:
                raise TypeError(guide_list_part_refusal(index, "a normalizing flow", GUIDE_LIST_FLOW))
            family = guide_family(part)
            local = {} if family.local_latents else local_latents(part.prototype_trace)
            if local:
                name, plate = next(iter(local.items()))
                where = f"the AutoGuideList's part {index} ({family.name})"
                raise NotImplementedError(local_latent_message(name, plate, where))
        return _product_density(parts)

    return density


def _has_autoregressive_layers(guide: autoguide.AutoNormalizingFlow) -> bool:
    """Whether a flow guide has layers that invert in D sequential passes."""
    flow = guide.transform
    parts = flow.parts if isinstance(flow, ComposeTransform) else [flow]
    return any(isinstance(part, AffineAutoregressive | SplineAutoregressive) for part in parts)


@singledispatch
def guide_family(guide: Any) -> GuideFamily:
    """The :class:`~psvi.families.GuideFamily` of ``guide``: one registration per autoguide
    class (``guide_family.register``), a user-written guide for any other callable."""
    if not callable(guide):
        raise TypeError(f"The guide must be an autoguide or a function, got {type(guide).__name__}.")
    return GuideFamily("a user-written guide", _user_guide_setup, local_latents=True)


def _register(cls: type, family: GuideFamily) -> None:
    guide_family.register(cls)(lambda guide: family._replace(name=type(guide).__name__))


@guide_family.register(autoguide.AutoNormalizingFlow)
def _flow_family(guide: autoguide.AutoNormalizingFlow) -> GuideFamily:
    if is_block_autoregressive(guide):
        return refused(
            type(guide).__name__,
            "a block-autoregressive flow has no inverse, so the guide density cannot be "
            "evaluated at the particles. Use AutoIAFNormal or AutoMultivariateNormal "
            "instead; if the posterior is multimodal, check the fit with "
            "pyro_psvi.mode_coverage (docs/guides.md, 'Multimodal posteriors').",
        )

    def advice(latent_dim: int, num_particles: int) -> str | None:
        # Asked at set-up, once the guide has been run and its transform built.
        if not _has_autoregressive_layers(guide):
            return None
        return autoregressive_family_advice(latent_dim, num_particles)

    return GuideFamily(type(guide).__name__, _autoguide_setup(_flow), advice=advice)


@guide_family.register(autoguide.AutoStructured)
def _structured_family(guide: autoguide.AutoStructured) -> GuideFamily:
    # Either a dict per site or one value for every site (until the guide is set up).
    conditionals = (
        guide.conditionals.values() if isinstance(guide.conditionals, dict) else [guide.conditionals]
    )
    dependencies = guide.dependencies
    if any(not isinstance(c, str) or c not in ("normal", "mvn") for c in conditionals):
        return refused(
            type(guide).__name__,
            "its conditionals must be 'normal' or 'mvn': a 'delta' site is a point mass and a "
            "callable one has no density to evaluate. Use conditionals='mvn' or 'normal', or "
            "AutoMultivariateNormal.",
        )
    deps = dependencies.values() if isinstance(dependencies, dict) else [{"": dependencies}]
    if any(dep != "linear" for upstreams in deps for dep in upstreams.values()):
        return refused(
            type(guide).__name__,
            "its dependencies must be 'linear' (a callable dependency's parameters are not read "
            "by ProximalScoreVI). Use dependencies='linear', or AutoMultivariateNormal.",
        )
    return GuideFamily(type(guide).__name__, _autoguide_setup(_auto_structured))


_register(
    autoguide.AutoGuide,
    refused(
        "AutoGuide",
        "ProximalScoreVI needs the guide's density. Supported: AutoNormal, "
        "AutoDiagonalNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal, "
        "AutoGaussian (dense), AutoStructured ('normal' or 'mvn' conditionals, linear "
        "dependencies), AutoIAFNormal, AutoNormalizingFlow and user-written guides (functions).",
    ),
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
    GuideFamily("AutoLowRankMultivariateNormal", _autoguide_setup(_auto_lowrank), advice=lowrank_advice),
)
_register(AutoGaussianDense, GuideFamily("AutoGaussianDense", _autoguide_setup(_auto_gaussian_dense)))
_register(
    autoguide.AutoGaussian,
    refused(
        "AutoGaussian",
        "its funsor backend's density is not read by ProximalScoreVI. Use "
        "AutoGaussian(model, backend='dense') (the same Gaussian) or AutoMultivariateNormal.",
    ),
)
_register(autoguide.AutoDelta, refused("AutoDelta", POINT_MASS))
_register(autoguide.AutoLaplaceApproximation, refused("AutoLaplaceApproximation", LAPLACE))
_register(autoguide.AutoGuideList, GuideFamily("AutoGuideList", _guide_list_setup, local_latents=True))
_register(autoguide.AutoCallable, refused("AutoCallable", GUIDE_LIST_FUNCTION))


def guide_density(
    guide: autoguide.AutoGuide, score_method: str = "closed_form", num_kl_draws: int = 256
) -> GuideDensity:
    """Build the :class:`GuideDensity` of a set-up autoguide.

    Parameters
    ----------
    guide : pyro.infer.autoguide.AutoGuide
        An autoguide that has been run once (so its prototype and params exist).
    score_method : {"closed_form", "autodiff"}
        ``"closed_form"`` uses the analytic Gaussian score; ``"autodiff"`` takes the
        autograd gradient of the guide's log density (the generic path). Flow guides
        always use autodiff.
    num_kl_draws : int
        Draws for the Monte Carlo KL (and the covariance diagonal) of flow guides.
    """
    if score_method not in SCORE_METHODS:
        raise ValueError(f"score_method must be one of {SCORE_METHODS}, got {score_method!r}.")
    family = guide_family(guide)
    family.check_supported()
    options = DensityOptions(score_method, num_kl_draws)
    return family.setup(guide, None, None, (), {}, options)((), {})
