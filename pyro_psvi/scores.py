"""Model scores through Pyro's own tracing and plate subsampling.

The score at a particle ``u`` (flat, unconstrained) is the gradient of

    log p(T(u)) + (N/B) sum_{i in batch} log p(y_i | T(u)) + log|det J_T(u)|

where the N/B scale and the mini-batch come from the model's own
``pyro.plate(..., subsample_size=B)``. Two effect handlers do the work, one thing
each: :class:`SharedSubsample` draws each subsampled plate's indices once per
iteration and replays them, so all particles see one mini-batch (Pyro's
``initialize_model`` refuses subsample sites, so the score path does not use it);
:class:`UnconstrainedValues` puts ``T(u) = biject_to(support)(u)`` at each latent
site, with the support the site has when it is sampled (dependent supports work),
and records ``log|det J|``.

Particles are evaluated in one pass under an outer particle plate (as
``Trace_ELBO(vectorize_particles=True)`` does) or one model call each.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.distributions import ExpandedDistribution, MaskedDistribution, TransformedDistribution, constraints
from pyro.distributions.transforms import biject_to
from pyro.distributions.util import scale_and_mask
from pyro.infer.autoguide.initialization import InitMessenger, init_to_sample, init_to_uniform
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from psvi.checks import (
    argument_labels,
    discrete_latent_message,
    half_precision_message,
    no_latents_message,
    nonfinite_rows_message,
    support_check_points,
    support_density_message,
)
from pyro_psvi.batches import SharedSubsample
from pyro_psvi.enumeration import enumerated_sites, is_continuous_latent, sum_out_enumerated
from pyro_psvi.guides import GuideDensity
from pyro_psvi.jacobians import log_abs_det_jacobian

PARTICLE_PLATE = "_psvi_particles"


class VectorizationError(ValueError):
    """The model cannot be evaluated for all particles in one vectorized pass."""


class UnconstrainedValues(Messenger):
    """Set each latent site to ``biject_to(site support)(u)`` and record ``log|det J|``.

    A local latent (one value per member of a plate) is given over the plate's full
    size and sliced by the plate's indices of this pass, as Pyro's AutoNormal slices its
    params; :attr:`jacobian_scales` records the plate's ``N/B`` for its ``log|det J|``,
    which the log joint scales like the site's log density.

    Parameters
    ----------
    values : dict
        Unconstrained values by site name.
    plates : dict, optional
        ``{site name: ((plate name, dim), ...)}``: the plates along which a site's value
        holds the plate's full size, ``dim`` counted from the right of the value.
    indices : dict, optional
        ``{plate name: indices}`` of this pass (filled by :class:`SharedSubsample`).
    """

    def __init__(
        self,
        values: dict[str, torch.Tensor],
        plates: dict[str, tuple[tuple[str, int], ...]] | None = None,
        indices: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.values = values
        self.plates = plates or {}
        self.indices = indices
        self.log_abs_det_jacobians: dict[str, torch.Tensor] = {}
        self.jacobian_scales: dict[str, float] = {}
        self.outside: dict[str, torch.Tensor] = {}

    def _pyro_sample(self, msg) -> None:
        name = msg["name"]
        if msg["is_observed"] or name not in self.values:
            return
        unconstrained, scale = self.values[name], 1.0
        for plate, dim in self.plates.get(name, ()):
            indices = self.indices[plate]
            scale *= unconstrained.shape[dim] / len(indices)
            unconstrained = unconstrained.index_select(dim, indices)
        support = msg["fn"].support
        transform = torch.distributions.biject_to(support)
        value = transform(unconstrained)
        if not _unbounded(support):
            # A float overflow of the bijection (exp(800) = inf, exp(-800) = 0) leaves its
            # image, where the model's distributions may raise under validation (a
            # HalfNormal's support holds 0, a Normal's scale may not be 0): such a value
            # does not map back to a finite one. The site gets T(0) there, its particle is marked.
            outside = ~(
                _all_event(torch.isfinite(value), support.event_dim)
                & _all_event(torch.isfinite(transform.inv(value)), transform.domain.event_dim)
            )
            self.outside[name] = outside
            fill = transform(torch.zeros_like(unconstrained))
            value = torch.where(outside.reshape(outside.shape + (1,) * support.event_dim), fill, value)
        msg["value"] = value
        self.log_abs_det_jacobians[name] = log_abs_det_jacobian(transform, unconstrained, value)
        self.jacobian_scales[name] = scale

    def particles_outside(self, num: int) -> torch.Tensor:
        """``(num,)``: whether each particle's value left a site's support (see
        :meth:`_pyro_sample`); the particle dim leads every value's batch shape (``num=1``
        for one particle's pass)."""
        return torch.stack([flag.reshape(num, -1).any(-1) for flag in self.outside.values()]).any(0)

    def scaled_log_abs_det_jacobians(self) -> dict[str, torch.Tensor]:
        """``log|det J|`` of each site times its plates' ``N/B``."""
        return {
            name: term if self.jacobian_scales[name] == 1.0 else self.jacobian_scales[name] * term
            for name, term in self.log_abs_det_jacobians.items()
        }


def _unbounded(support) -> bool:
    """Whether ``support`` is the real line (per coordinate): its bijection cannot overflow."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def _all_event(flags: torch.Tensor, event_dim: int) -> torch.Tensor:
    """``flags`` reduced with ``all`` over its ``event_dim`` rightmost dims."""
    return flags.flatten(-event_dim).all(-1) if event_dim else flags


def _site_log_probs(model_trace, skip: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Scaled and masked ``log_prob`` of every sample site but those in ``skip`` (plate
    indices excluded; the trace's own where ``Trace.compute_log_prob`` computed it)."""
    out = {}
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site) and name not in skip:
            if "log_prob" in site:
                out[name] = site["log_prob"]
                continue
            log_prob = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
            out[name] = scale_and_mask(log_prob, site["scale"], site["mask"])
    return out


def per_particle(name: str, term: torch.Tensor, num: int, particle_dim: int) -> torch.Tensor:
    """Sum ``term`` over all dims but the particle dim; shape ``(num,)``."""
    if not torch.is_tensor(term) or term.dim() < -particle_dim:
        return torch.as_tensor(term).sum().expand(num)  # does not vary over particles
    k = term.dim() + particle_dim
    if any(size != 1 for size in term.shape[:k]) or term.shape[k] not in (1, num):
        raise VectorizationError(
            f"Site {name!r} has log-density shape {tuple(term.shape)} under the particle "
            f"plate of size {num} at dim {particle_dim}: the model broadcasts a latent's "
            "particle dimension against data or another latent (e.g. `x @ W` or adding a "
            "bias of shape (P, 1, H)), which would count the data once per particle pair."
        )
    per = term.sum(dim=tuple(range(k + 1, term.dim()))) if term.dim() > k + 1 else term
    return per.reshape(-1).expand(num)


def _check_plate_shape(name: str, site, log_prob: torch.Tensor, particle_dim: int) -> None:
    """Each batch dim right of the particle dim is 1 or the size of the plate at that dim."""
    sizes = {f.dim: f.size for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None}
    for dim in range(particle_dim + 1, 0):
        if -dim > log_prob.dim():
            break
        if log_prob.shape[dim] not in (1, sizes.get(dim, 1)):
            raise VectorizationError(
                f"Site {name!r} has log-density shape {tuple(log_prob.shape)}: its dim {dim} "
                f"should be 1 or the size of the plate there ({sizes.get(dim, 1)})."
            )


def log_joints(
    model: Callable,
    density: GuideDensity,
    u: torch.Tensor,
    args: tuple,
    kwargs: dict[str, Any],
    *,
    subsample: dict[str, torch.Tensor],
    max_plate_nesting: int,
    vectorize: bool,
    check_shapes: bool = False,
) -> torch.Tensor:
    """Mini-batch log joints in unconstrained space, shape ``(S,)``, for flat latents ``u (S, D)``.

    Parameters
    ----------
    model : callable
        The Pyro model.
    density : GuideDensity
        Gives the site layout of the flat latent.
    u : torch.Tensor
        Flat unconstrained latents, shape ``(S, D)``.
    args, kwargs
        Model arguments.
    subsample : dict
        Plate indices shared across passes (see :class:`SharedSubsample`).
    max_plate_nesting : int
        The model's plate nesting; the particle plate goes at ``-(max_plate_nesting + 1)``.
    vectorize : bool
        One pass under a particle plate, or one model call per particle.
    check_shapes : bool
        Check every site's log-density shape against its plates (vectorized only).
    """
    num = u.shape[0]
    if not vectorize:
        return torch.stack(
            [_log_joint_once(model, density, u[i], args, kwargs, subsample) for i in range(num)]
        )
    particle_dim = -(max_plate_nesting + 1)
    values = particle_values(density, u, max_plate_nesting)
    handler = UnconstrainedValues(values, local_plates(density), subsample)
    with SharedSubsample(subsample), handler:
        with poutine.trace() as tracer, pyro.plate(PARTICLE_PLATE, num, dim=particle_dim):
            model(*args, **kwargs)
    model_trace = tracer.trace
    marginal, covered = sum_out_enumerated(model_trace, PARTICLE_PLATE)
    total = u.new_zeros(num) + marginal
    for name, term in _site_log_probs(model_trace, skip=covered).items():
        if check_shapes:
            _check_plate_shape(name, model_trace.nodes[name], term, particle_dim)
        total = total + per_particle(name, term, num, particle_dim)
    for name, term in handler.scaled_log_abs_det_jacobians().items():
        total = total + per_particle(name, term, num, particle_dim)
    if handler.outside:  # an update with such a particle is rejected
        total = torch.where(handler.particles_outside(num), torch.nan, total)
    return total


def particle_values(
    density: GuideDensity, u: torch.Tensor, max_plate_nesting: int
) -> dict[str, torch.Tensor]:
    """Each site's values of the flat latents ``u (S, D)``, shaped for a particle plate at
    ``-(max_plate_nesting + 1)``: ``(S, 1, ..., *site shape)``."""
    values = {}
    for site, value in zip(density.sites, density.unpack(u).values(), strict=True):
        batch_ndim = len(site.shape) - site.event_dim
        if batch_ndim > max_plate_nesting:
            raise VectorizationError(
                f"Latent site {site.name!r} has {batch_ndim} batch dims but the model nests "
                f"{max_plate_nesting} plates; pass max_plate_nesting."
            )
        shape = (len(u),) + (1,) * (max_plate_nesting - batch_ndim) + site.shape
        values[site.name] = value.reshape(shape)
    return values


def same_log_joints(vectorized: torch.Tensor, one_at_a_time: torch.Tensor) -> bool:
    """Whether a vectorized pass's log joints are those of one model call per particle, to
    1e-4 of their magnitude (a particle outside the model's support is NaN both ways)."""
    magnitude = torch.where(torch.isfinite(one_at_a_time), one_at_a_time.abs(), 0.0)
    atol = 1e-4 * float(magnitude.max().clamp(min=1.0))
    return torch.allclose(vectorized, one_at_a_time, rtol=1e-4, atol=atol, equal_nan=True)


def _log_joint_once(model, density, u, args, kwargs, subsample) -> torch.Tensor:
    handler = UnconstrainedValues(density.unpack(u), local_plates(density), subsample)
    with SharedSubsample(subsample), handler, poutine.trace() as tracer:
        model(*args, **kwargs)
    marginal, covered = sum_out_enumerated(tracer.trace, None)
    terms = [marginal, *_site_log_probs(tracer.trace, skip=covered).values()]
    terms += list(handler.scaled_log_abs_det_jacobians().values())
    total = sum(torch.as_tensor(t).sum() for t in terms)
    return torch.where(handler.particles_outside(1)[0], torch.nan, total) if handler.outside else total


def local_plates(density: GuideDensity) -> dict[str, tuple[tuple[str, int], ...]]:
    """``{site name: ((plate name, dim), ...)}`` for the sites held over a plate's full size."""
    return {site.name: site.plates for site in density.sites if site.plates}


class ModelScores(NamedTuple):
    """Mini-batch model scores of ``S`` particles (see :func:`model_scores`).

    Attributes
    ----------
    log_joints : torch.Tensor
        ``(S,)``, the plate-scaled mini-batch log joints.
    scores : torch.Tensor
        ``(S, D)``: unbiased for a global coordinate, exact for a local latent's
        coordinate in the mini-batch, 0 for one outside it.
    param_grads : list of torch.Tensor
        The particles' mean log-joint gradient in each tensor of ``model_params``.
    weights : torch.Tensor or None
        ``(D,)`` when a local latent's plate is subsampled: 1 for a global coordinate,
        ``N/B`` for a local one in the mini-batch, 0 for one outside it, so that
        ``sum_d weights_d f_d`` is unbiased for ``sum_d f_d``. ``None`` otherwise.
    active_dim : int
        Coordinates with a non-zero weight (``D`` when ``weights`` is ``None``).
    statistics : FisherStatistics or None
        A diagonal Gaussian guide's per-coordinate sums over the particles
        (:class:`~pyro_psvi.objective.FisherStatistics`) where a data-parallel engine
        reduced them in place of the ``(S, D)`` scores (then ``None``).
    """

    log_joints: torch.Tensor
    scores: torch.Tensor | None
    param_grads: list[torch.Tensor]
    weights: torch.Tensor | None
    active_dim: int
    statistics: Any = None


def coordinate_weights(
    density: GuideDensity, subsample: dict[str, torch.Tensor], like: torch.Tensor
) -> tuple[torch.Tensor | None, int]:
    """``(weights, active_dim)`` of the flat latent for this pass's plate indices.

    A local latent's coordinate gets ``N/B`` (the product over its subsampled plates)
    when its plate members are in the mini-batch and 0 otherwise; a global one gets 1.
    ``weights`` is ``None`` when no local latent's plate is subsampled.
    """
    blocks, active, subsampled = [], 0, False
    for site in density.sites:
        block = torch.ones(site.shape, dtype=like.dtype, device=like.device)
        size = math.prod(site.shape)
        for plate, dim in site.plates:
            indices, full = subsample[plate], site.shape[dim]
            if len(indices) == full:
                continue
            subsampled = True
            member = torch.zeros(full, dtype=like.dtype, device=like.device)
            member = member.index_fill(0, indices, full / len(indices))
            block = block * member.reshape((full,) + (1,) * (-dim - 1))
            size = size // full * len(indices)
        blocks.append(block.reshape(-1))
        active += size
    if not subsampled:
        return None, density.latent_dim
    return torch.cat(blocks), active


def model_scores(
    model: Callable,
    density: GuideDensity,
    particles: torch.Tensor,
    args: tuple,
    kwargs: dict[str, Any],
    *,
    max_plate_nesting: int,
    vectorize: bool,
    model_params: Sequence[torch.Tensor] = (),
) -> ModelScores:
    """Log joints, scores and model-param gradients at ``particles`` on one fresh mini-batch.

    A local latent's coordinates in the mini-batch come out of the plate-scaled log
    joint ``N/B`` times too large; they are divided by it (see :class:`ModelScores`).
    The mini-batch is that of ``density.plate_indices`` when the guide's draw picked it.
    """
    subsample = {} if density.plate_indices is None else density.plate_indices

    def value_and_grads(u: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        with torch.enable_grad():
            u = u.detach().requires_grad_(True)
            values = log_joints(
                model, density, u, args, kwargs,
                subsample=subsample, max_plate_nesting=max_plate_nesting, vectorize=vectorize,
            )  # fmt: skip
            return values.detach(), torch.autograd.grad(values.sum(), [u, *model_params], allow_unused=True)

    if vectorize:
        values, (scores, *grads) = value_and_grads(particles)
    else:  # one particle's graph alive at a time, as Trace_ELBO's loop over particles
        values, scores = particles.new_empty(len(particles)), torch.empty_like(particles)
        grads = [None] * len(model_params)
        for i in range(len(particles)):
            values[i : i + 1], (scores[i : i + 1], *particle_grads) = value_and_grads(particles[i : i + 1])
            pairs = zip(grads, particle_grads, strict=True)
            grads = [g if a is None else a if g is None else a + g for a, g in pairs]
    param_grads = [
        torch.zeros_like(p) if g is None else g / len(particles)
        for p, g in zip(model_params, grads, strict=True)
    ]
    weights, active_dim = coordinate_weights(density, subsample, particles)
    if weights is not None:
        scores = scores / torch.where(weights > 0, weights, torch.ones_like(weights))
    return ModelScores(values, scores, param_grads, weights, active_dim)


def _same_support(a, b) -> bool:
    """Whether two constraints are the same, tensor-valued bounds included."""
    if type(a) is not type(b):
        return False
    for key, value in vars(a).items():
        other = vars(b).get(key)
        if torch.is_tensor(value):
            if not (torch.is_tensor(other) and value.shape == other.shape and torch.equal(value, other)):
                return False
        elif hasattr(value, "check") and not _same_support(value, other):
            return False
    return True


def latent_shapes(model_trace) -> dict[str, tuple[int, ...]]:
    """``{site name: shape}`` of the continuous latent sites of a trace."""
    sites = model_trace.nodes.items()
    return {name: tuple(site["value"].shape) for name, site in sites if is_continuous_latent(site)}


def autoguide_latent_shapes(prototype, guide_trace) -> dict[str, tuple[int, ...]]:
    """``{site name: shape}`` of the latents an autoguide was built for: those of its
    prototype trace, or, where the prototype keeps only each site's support and batch
    shape (``AutoGaussian``), of its run ``guide_trace`` (its auxiliary site excluded)."""
    if all("value" in site for site in prototype.nodes.values()):
        return latent_shapes(prototype)
    return {
        name: shape
        for name, shape in latent_shapes(guide_trace).items()
        if not guide_trace.nodes[name]["infer"].get("is_auxiliary")
    }


def local_latents(model_trace) -> dict[str, str]:
    """``{site name: plate name}`` of the continuous latent sites inside a subsampled plate."""
    return {
        name: frame.name
        for name, site in model_trace.nodes.items()
        if is_continuous_latent(site)
        for frame in site["cond_indep_stack"]
        if frame.full_size is not None and frame.size != frame.full_size
    }


def has_masked_density(fn: torch.distributions.Distribution) -> bool:
    """Whether ``fn`` is a ``MaskedDistribution`` (through ``Independent`` and
    ``ExpandedDistribution``)."""
    while isinstance(fn, torch.distributions.Independent | ExpandedDistribution):
        fn = fn.base_dist
    return isinstance(fn, MaskedDistribution)


def masked_latents(model_trace) -> tuple[str, ...]:
    """The latent sites whose own log density the model masks (``poutine.mask``, a
    ``MaskedDistribution``, and so ``obs=..., obs_mask=...``'s ``{name}_unobserved``):
    some of their entries may have no density in the model at all
    (:func:`unmodelled_scores`)."""
    return tuple(
        name
        for name, site in model_trace.nodes.items()
        if is_continuous_latent(site) and (site.get("mask") is not None or has_masked_density(site["fn"]))
    )  # fmt: skip


def unmodelled_scores(scores: torch.Tensor, guide_scores: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """``scores`` ``(S, D)`` with each coordinate of a masked site (``masked``, ``(D,)``)
    whose model score is exactly 0 at every particle, i.e. on which the model puts no
    density, given ``q_t``'s own scores ``guide_scores`` instead: with no density the
    score-matching target for it is a flat one, to which the guide's scale would grow
    without bound (as the ELBO's entropy term grows it under SVI); with ``q_t``'s own
    score it has no pull of its own and stays bounded, as the entries of ``obs_mask``'s
    ``{name}_unobserved`` that are observed are never read."""
    unmodelled = masked & torch.all(scores == 0, dim=0)
    return torch.where(unmodelled, guide_scores, scores)


def batch_ratio(model_trace) -> float:
    """The largest ``N/B`` (a plate's size over its subsample size) of a model trace; 1
    when nothing is subsampled."""
    return max(
        (
            frame.full_size / frame.size
            for site in model_trace.nodes.values()
            if site["type"] == "sample"
            for frame in site["cond_indep_stack"]
            if frame.full_size is not None and frame.size != frame.full_size
        ),
        default=1.0,
    )


def guess_max_plate_nesting(model_trace) -> int:
    """Deepest vectorized plate dim used by any site of a model trace."""
    dims = [
        -frame.dim
        for site in model_trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized and frame.dim is not None
    ]
    return max(dims, default=0)


def at_random_values(model: Callable) -> Callable:
    """``model`` with latent values drawn uniformly in (-2, 2) in unconstrained space, not
    from the prior: also works for improper priors (``ImproperUniform``)."""
    return InitMessenger(_uniform_or_prior)(model)


def _uniform_or_prior(site):
    # Discrete sites have no unconstrained space: draw them from the prior (and let
    # check_model say why they cannot be fitted).
    if site["fn"].support.is_discrete:
        return init_to_sample(site)
    try:
        return init_to_uniform(site)
    except NotImplementedError:  # an improper prior (ImproperUniform) has no draws to shape it
        transform = biject_to(site["fn"].support)
        return transform(4 * torch.rand(transform.inverse_shape(site["fn"].shape())) - 2)


def check_model(model: Callable, args: tuple, kwargs: dict):
    """Raise a clear error for models ProximalScoreVI cannot fit; return a prior trace.

    Checks: at least one continuous latent site; no discrete latent site that is not
    marked for parallel enumeration (:mod:`pyro_psvi.enumeration`); no support that
    depends on other latents (two draws are compared); no plate whose
    ``subsample_size`` exceeds its size; finite data.
    (``pyro.param`` sites in the model are learned jointly.)
    """
    with torch.no_grad(), poutine.block(), torch.random.fork_rng(devices=[]):
        model_trace = poutine.trace(at_random_values(model)).get_trace(*args, **kwargs)
        other_trace = poutine.trace(at_random_values(model)).get_trace(*args, **kwargs)
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample" and site_is_subsample(site):
            size, subsample_size = site["fn"].size, site["fn"].subsample_size
            if subsample_size is not None and subsample_size > size:
                raise ValueError(
                    f"Plate {name!r} has subsample_size={subsample_size} larger than its "
                    f"size {size}: the N/B scale would be wrong. Use subsample_size <= {size} "
                    "(or None for the full data)."
                )
    latents, enumerated = [], enumerated_sites(model_trace)
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site) or name in enumerated:
            continue
        if site["fn"].support.is_discrete:
            how = site["infer"].get("enumerate")
            raise ValueError(discrete_latent_message(name, type(site["fn"]).__name__, how, "pyro"))
        if not _same_support(site["fn"].support, other_trace.nodes[name]["fn"].support):
            raise NotImplementedError(
                f"Latent site {name!r} has a support that depends on other latents "
                f"({site['fn'].support}); Pyro's autoguides fix each site's support when they "
                "are set up, so their samples would leave it. Reparameterize (e.g. "
                "x = s * v with v ~ Uniform(-1, 1) instead of x ~ Uniform(-s, s)), or use "
                "numpyro_psvi, whose guides follow dependent supports."
            )
        _check_density_on_support(name, site)
        latents.append(name)
    if not latents:
        raise ValueError(no_latents_message(enumerated))
    _check_data_arguments(model_trace, args, kwargs)
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample" and site["is_observed"] and not site_is_subsample(site):
            value = site["value"]
            if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(
                    f"Observed site {name!r} holds non-finite values (NaN or inf); remove or "
                    "impute them before fitting (or mask them with poutine.mask)."
                )
    return model_trace


def _check_density_on_support(name: str, site: dict) -> None:
    """Raise :func:`psvi.checks.support_density_message` when the site's log density is
    NaN (or its validation raises) at any of 64 points
    (:func:`psvi.checks.support_check_points`) of its declared support (uniform in
    (-2, 2) in the space of ``biject_to(support)``, the space its autoguide lives in);
    ``-inf`` (a density that underflows) passes. Skipped for torch's and Pyro's own
    distributions (:func:`_declares_its_domain`)."""
    if _declares_its_domain(site["fn"]):
        return
    support = site["fn"].support
    try:
        transform = biject_to(support)
    except NotImplementedError:  # no bijection: the guides refuse the site with their own error
        return
    value = site["value"]
    shape = transform.inverse_shape(value.shape)
    count = support_check_points(math.prod(shape))
    uniform = torch.rand((count, *shape), generator=torch.Generator().manual_seed(0), dtype=value.dtype)
    points = transform((4 * uniform - 2).to(value.device))
    try:
        with torch.no_grad():
            finite = not torch.isnan(site["fn"].log_prob(points)).any()
    except ValueError as error:  # Pyro's validation of a NaN reached inside the distribution
        if "Expected value argument" not in str(error):
            return
        finite = False
    except Exception:  # noqa: BLE001 - a distribution these points do not suit: nothing to say
        return
    if not finite:
        raise ValueError(support_density_message(name, support, "torch's biject_to(positive) declares real"))


def _declares_its_domain(fn: torch.distributions.Distribution) -> bool:
    """Whether ``fn`` is one of torch's or Pyro's distributions other than a bare
    ``TransformedDistribution`` (judged through ``Independent``, ``ExpandedDistribution``
    and ``MaskedDistribution``): its density is defined on all of the support it declares.
    A bare ``TransformedDistribution`` declares its last transform's codomain, whatever
    its base's values; a user's own distribution declares what its author wrote."""
    while isinstance(fn, torch.distributions.Independent | ExpandedDistribution | MaskedDistribution):
        fn = fn.base_dist
    module = type(fn).__module__
    library = module.startswith("torch.distributions.") or module.startswith("pyro.distributions.")
    return library and type(fn) not in (torch.distributions.TransformedDistribution, TransformedDistribution)


def _check_data_arguments(model_trace, args: tuple, kwargs: dict) -> None:
    """Half precision data are refused; so are non-finite rows of a data argument that a
    subsampled plate indexes (the observed-site check sees only one mini-batch)."""
    plate_sizes = {
        site["fn"].size
        for site in model_trace.nodes.values()
        if site["type"] == "sample" and site_is_subsample(site)
        and site["fn"].subsample_size is not None and site["fn"].subsample_size < site["fn"].size
    }  # fmt: skip
    for label, value in argument_labels(args, kwargs):
        if not torch.is_tensor(value) or not value.is_floating_point():
            continue
        if value.dtype in (torch.float16, torch.bfloat16):
            raise TypeError(half_precision_message(label, str(value.dtype)))
        if value.dim() and value.shape[0] in plate_sizes:
            finite_rows = torch.isfinite(value.reshape(value.shape[0], -1)).all(-1)
            if not finite_rows.all():
                rows = torch.nonzero(~finite_rows).flatten().tolist()
                raise ValueError(nonfinite_rows_message(label, tuple(value.shape), rows, value.shape[0]))
