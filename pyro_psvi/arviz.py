"""From a VI fit to ArviZ (Pyro): ``InferenceData`` (ArviZ 0.x) or ``DataTree``
(ArviZ 1.x) and diagnostics.

The twin of ``numpyro_psvi.arviz``. Pyro's plate refuses indices of another length
than its ``subsample_size``, so the FULL data are covered chunk by chunk: the
subsampled plate's indices are set to consecutive blocks of ``subsample_size``
(the last block overlaps the one before), and each observed datum's unscaled log
density (or predictive draw) is kept once. The log joints and scores of the diagnostics
and the export's pointwise log-likelihoods and predictive draws take all draws in one model
pass per block (under a plate left of the model's, as the engine runs its particles) when
the model is broadcast-safe, probed once against one draw at a time.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to

from psvi.checks import enumerated_export_message, unbatched_local_guide_message
from psvi.families import DensityOptions
from psvi.inference_data import (
    add_fit_stats,
    dim_names,
    from_groups,
    pareto_khat,
    pseudo_chains,
    use_datatree,
)
from psvi.modes import ModeCoverage, search_modes, uncovered_message
from pyro_psvi.batches import SharedSubsample
from pyro_psvi.enumeration import enumerated_sites
from pyro_psvi.guides import GuideDensity, guide_family
from pyro_psvi.objective import weighted_fisher
from pyro_psvi.scores import (
    PARTICLE_PLATE,
    UnconstrainedValues,
    at_random_values,
    guess_max_plate_nesting,
    local_plates,
    particle_values,
    per_particle,
    same_log_joints,
)

# Draws per vectorized pass: its memory is this many times one draw's pass over one block
# of the data (a few times the engine's particles; a search's 32 starts are one pass).
DRAWS_PER_PASS = 32


class _Unobserve(Messenger):
    """Sample the observed sites instead of conditioning on them (``pyro.deterministic``
    sites, recorded as observed, keep their values)."""

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] and not site_is_subsample(msg) and not _is_deterministic(msg):
            msg["value"], msg["is_observed"] = None, False


def _subsampled_plate(model_trace) -> tuple[str, int, int] | None:
    """``(name, size, subsample_size)`` of the model's subsampled plate, if any."""
    plates = [
        (name, site["fn"].size, site["fn"].subsample_size)
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample" and site_is_subsample(site)
        and site["fn"].subsample_size is not None and site["fn"].subsample_size < site["fn"].size
    ]  # fmt: skip
    if len(plates) > 1:
        raise NotImplementedError(
            f"Full-data evaluation supports one subsampled plate; the model has {len(plates)}."
        )
    return plates[0] if plates else None


def _chunks(size: int, batch: int):
    """Blocks of ``batch`` indices covering ``range(size)``; with each, the positions
    within the block whose indices appear for the first time."""
    for start in range(0, size, batch):
        first = min(start, size - batch)
        yield torch.arange(first, first + batch), torch.arange(start - first, batch)


def _plate_frame(site, plate):
    """The frame of the chunked plate in a site's plates, if there."""
    return next((f for f in site["cond_indep_stack"] if plate and f.name == plate[0]), None)


def _full_data_sites(model, values, plates, args, kwargs, plate, unobserve: bool, draws=None):
    """One draw over the full data: latent log prior + log|J| and, per observed site,
    its pointwise unscaled log density (or predictive draw when ``unobserve``).
    ``plates``: the local latents' plates (:func:`pyro_psvi.scores.local_plates`).
    ``draws``: ``(number, dim)`` of draws that ``values`` carry left of the model's plates
    (:func:`pyro_psvi.scores.particle_values`): the model runs under a plate of them and
    the log prior is per draw."""
    blocks = [(None, None)] if plate is None else list(_chunks(plate[1], plate[2]))
    prior, pieces = 0.0, {}
    for block, (indices, fresh) in enumerate(blocks):
        subsample = {} if plate is None else {plate[0]: indices}
        handler = UnconstrainedValues(values, plates, subsample)
        draws_plate = (
            contextlib.nullcontext() if draws is None else pyro.plate(PARTICLE_PLATE, draws[0], dim=draws[1])
        )
        with poutine.trace() as tracer, SharedSubsample(subsample), handler, draws_plate:
            if unobserve:
                with _Unobserve():
                    model(*args, **kwargs)
            else:
                model(*args, **kwargs)
        model_trace = tracer.trace
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or name not in values:
                continue
            term = site["fn"].log_prob(site["value"]) + handler.log_abs_det_jacobians[name]
            frame = _plate_frame(site, plate)
            if frame is not None:  # a local latent: this block's new members
                term = term.index_select(frame.dim, fresh)
            elif block:
                continue
            prior = prior + (term.sum() if draws is None else per_particle(name, term, *draws))
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or name in values or site_is_subsample(site):
                continue
            if _is_deterministic(site) and not unobserve:  # a value, not an observation
                continue
            if unobserve:
                value, event_dim = site["value"], _event_dim(site)
            else:
                value = scale_and_mask(site["fn"].log_prob(site["value"]), 1.0, site["mask"])
                event_dim = 0
            frame = _plate_frame(site, plate)
            if frame is None:
                pieces.setdefault(name, (site, [value]))
                continue
            dim = frame.dim - event_dim
            pieces.setdefault(name, (site, []))[1].append(value.index_select(dim, fresh))
    out = {}
    for name, (site, parts) in pieces.items():
        frame = _plate_frame(site, plate)
        if frame is None:
            out[name] = (site, parts[0])
        else:
            event_dim = _event_dim(site) if unobserve else 0
            out[name] = (site, torch.cat(parts, dim=frame.dim - event_dim))
    return prior, out


def _is_deterministic(site) -> bool:
    """A ``pyro.deterministic`` site (Pyro records it as an observed sample site)."""
    return bool(site["infer"].get("_deterministic"))


def _event_dim(site) -> int:
    """A site's event dims; a deterministic site's ``event_dim`` defaults to all of its
    value's dims, its plates' included, so there it is what its plates leave over."""
    if not _is_deterministic(site):
        return site["fn"].event_dim
    plate_dims = [
        -frame.dim for frame in site["cond_indep_stack"] if frame.vectorized and frame.dim is not None
    ]
    return max(0, site["value"].dim() - max(plate_dims, default=0))


def _site_dims(site, name: str, ndim: int, event_dim: int) -> list[str]:
    plates = {frame.dim: frame.name for frame in site["cond_indep_stack"] if frame.dim is not None}
    return dim_names(name, ndim, event_dim, plates)


def _density(model: Callable, guide: Any, args: tuple, kwargs: dict) -> tuple[GuideDensity, dict]:
    """The fitted guide's density, built by its family (a user-written guide is run with
    the model's arguments), and its params (constrained, read from the guide's trace, so
    module-local params too); draws nothing from torch's random stream."""
    family = guide_family(guide)
    family.check_supported()
    with torch.no_grad(), poutine.block(), torch.random.fork_rng(devices=[]):
        model_trace = poutine.trace(at_random_values(model)).get_trace(*args, **kwargs)
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    enumerated = enumerated_sites(model_trace)
    if enumerated:
        raise NotImplementedError(enumerated_export_message(enumerated))
    options = DensityOptions(max_plate_nesting=guess_max_plate_nesting(model_trace))
    density = family.setup(guide, model_trace, guide_trace, args, kwargs, options)(args, kwargs)
    local = next((site for site in density.sites if site.plates), None)
    if density.plate_indices is not None and local is not None:  # a user guide draws one batch
        raise NotImplementedError(unbatched_local_guide_message(local.name, local.plates[0][0]))
    params = {name: guide_trace.nodes[name]["value"].detach() for name in density.param_names}
    return density, params


def _constrained(density: GuideDensity, model_trace, u: torch.Tensor) -> dict[str, torch.Tensor]:
    nodes = model_trace.nodes
    return {name: biject_to(nodes[name]["fn"].support)(value) for name, value in density.unpack(u).items()}


def to_inference_data(
    model: Callable,
    guide: Any,
    *args: Any,
    num_samples: int = 1000,
    num_chains: int = 4,
    losses: Any = None,
    num_score_calls: int | None = None,
    diagnostics: bool = True,
    datatree: bool | None = None,
    **kwargs: Any,
) -> Any:
    """An ArviZ export (``InferenceData`` or ``DataTree``) of a fitted guide, its params
    as the guide reads them.

    Parameters
    ----------
    model, guide
        The model and its fitted autoguide.
    *args, **kwargs
        The model's arguments, as given to the engine (data included).
    num_samples : int
        Draws from the guide (torch's RNG).
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
        ``posterior`` (latent and ``pyro.deterministic`` sites), ``posterior_predictive``
        and ``log_likelihood`` (observed sites, pointwise over the full data, no ``N/B``
        scale), ``observed_data`` and ``sample_stats``; dims named after the model's plates.
    """
    datatree = use_datatree(datatree)  # before the draws: a missing ArviZ loses no work
    density, params = _density(model, guide, args, kwargs)
    with torch.no_grad():
        draws = density.sample(params, num_samples)
        model_trace = poutine.trace(at_random_values(model)).get_trace(*args, **kwargs)
        plate = _subsampled_plate(model_trace)
        plates = local_plates(density)
        latents: dict[str, list] = {}
        for u in draws:
            for name, value in _constrained(density, model_trace, u).items():
                latents.setdefault(name, []).append(value.detach().cpu().numpy())
        posterior = {name: np.stack(values) for name, values in latents.items()}
        logs, preds = _observed_sites(model, density, args, kwargs, model_trace)(draws)
        pointwise = {name: value.detach().cpu().numpy() for name, (_, value) in logs.items()}
        predictive: dict[str, np.ndarray] = {}
        dims: dict[str, list[str]] = {}
        for name, (site, value) in preds.items():  # deterministic sites go with the latents
            group = posterior if _is_deterministic(site) else predictive
            group[name] = value.detach().cpu().numpy()
            dims[name] = _site_dims(site, name, value.dim() - 1, _event_dim(site))
        first = density.unpack(draws[0])
        observed = _observed_values(model, first, plates, args, kwargs, plate, list(predictive))
    for name, site in model_trace.nodes.items():
        if name in posterior and name not in dims:
            dims[name] = _site_dims(site, name, site["value"].dim(), _event_dim(site))
    coords = {
        frame.name: np.arange(frame.full_size or frame.size)
        for site in model_trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    }
    groups = {
        "posterior": pseudo_chains(posterior, num_chains),
        "posterior_predictive": pseudo_chains(predictive, num_chains),
        "log_likelihood": pseudo_chains(pointwise, num_chains),
        "observed_data": observed,
    }
    idata = from_groups(groups, coords, dims, datatree)
    fit = _diagnostics(model, density, params, args, kwargs, num_samples) if diagnostics else None
    add_fit_stats(idata, losses, num_score_calls, fit)
    return idata


def _per_draw(value: torch.Tensor, number: int, shape: torch.Size) -> torch.Tensor:
    """A site's value from the draws' plate as ``(number, *shape)``, ``shape`` being its
    value for one draw: the draws' dim leads, with dims of size 1 between it and the
    model's; a value without it (one that no latent moves) is the same for every draw.
    Any other layout is a ``ValueError`` (the model is not broadcast-safe)."""
    lead, trailing = value.shape[: value.dim() - len(shape)], value.shape[value.dim() - len(shape) :]
    if (
        value.dim() < len(shape)
        or trailing != shape
        or lead[:1] not in ((), (1,), (number,))
        or any(size != 1 for size in lead[1:])
    ):
        raise ValueError(f"a value of shape {tuple(value.shape)} for {number} draws of {tuple(shape)}")
    return value.reshape(-1, *shape).expand(number, *shape)


def _joined(parts: list[tuple[dict, dict]], join: Callable) -> tuple[dict, dict]:
    """Each site's values in ``parts`` (pairs of ``{name: (site, values)}``) joined by
    ``join`` (``torch.stack`` or ``torch.cat``), with the sites of the first part."""
    return tuple(
        {name: (site, join([part[kind][name][1] for part in parts])) for name, (site, _) in sites.items()}
        for kind, sites in enumerate(parts[0])
    )


def _observed_sites(
    model: Callable, density: GuideDensity, args: tuple, kwargs: dict, model_trace
) -> Callable:
    """``draws (m, D) -> (pointwise log-likelihoods, predictive draws)``, each
    ``{site name: (site, (m, ...) values)}`` over the full data (:func:`_full_data_sites`;
    the sites as one draw's pass records them). All draws in one model pass per block of
    the subsampled plate when the model is broadcast-safe: decided at the first call by
    the first four draws, whose log-likelihoods and deterministic values must be those of
    one draw at a time and whose predictive draws must have the same shapes (else one
    draw at a time, as written)."""
    plate = _subsampled_plate(model_trace)
    plates = local_plates(density)
    max_plate_nesting = guess_max_plate_nesting(model_trace)

    def one_draw(u: torch.Tensor) -> tuple[dict, dict]:  # (D,) -> one draw's sites
        values = density.unpack(u)
        return tuple(
            _full_data_sites(model, values, plates, args, kwargs, plate, unobserve=unobserve)[1]
            for unobserve in (False, True)
        )

    def one_at_a_time(block: torch.Tensor, first: tuple[dict, dict] | None = None) -> tuple[dict, dict]:
        """``first``: the first draw's sites, when already computed."""
        runs = [one_draw(u) for u in block[first is not None :]]
        return _joined(runs if first is None else [first, *runs], torch.stack)

    def at_once(block: torch.Tensor, reference: tuple[dict, dict]) -> tuple[dict, dict]:
        passes = []
        for unobserve, sites in zip((False, True), reference, strict=True):
            (_, values), _ = _sites_at_once(
                model, density, block, plates, args, kwargs, plate, max_plate_nesting, unobserve
            )
            passes.append(
                {
                    name: (sites[name][0], _per_draw(value, len(block), sites[name][1].shape))
                    for name, (_, value) in values.items()
                }
            )
        return tuple(passes)

    def broadcast_safe(block: torch.Tensor, reference: tuple[dict, dict]) -> bool:
        try:
            logs, preds = at_once(block, reference)
        # Model code may fail in any way under the extra dimension (as in the engine's probe).
        except Exception:  # noqa: BLE001
            return False
        expected_logs, expected_preds = one_at_a_time(block, reference)
        deterministic = [name for name, (site, _) in expected_preds.items() if _is_deterministic(site)]
        fixed = [(logs, expected_logs, name) for name in expected_logs]
        fixed += [(preds, expected_preds, name) for name in deterministic]
        return (
            logs.keys() == expected_logs.keys()
            and preds.keys() == expected_preds.keys()
            and all(same_log_joints(got[name][1], expected[name][1]) for got, expected, name in fixed)
        )

    def observed_sites(draws: torch.Tensor) -> tuple[dict, dict]:
        reference = one_draw(draws[0])
        if len(draws) < 2 or not broadcast_safe(draws[:4], reference):
            return one_at_a_time(draws, reference)
        return _joined([at_once(block, reference) for block in draws.split(DRAWS_PER_PASS)], torch.cat)

    return observed_sites


def _observed_values(model, values, plates, args, kwargs, plate, site_names) -> dict[str, np.ndarray]:
    """The observed values of the sites ``site_names`` over the full data: one model pass
    per block of the subsampled plate, a site outside it read from the first."""
    if not site_names:
        return {}
    blocks = [(None, None)] if plate is None else list(_chunks(plate[1], plate[2]))
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in site_names}
    dims: dict[str, int | None] = {}  # where a site's blocks join; None: outside the plate
    for indices, fresh in blocks:
        subsample = {} if plate is None else {plate[0]: indices}
        handler = UnconstrainedValues(values, plates, subsample)
        with poutine.trace() as tracer, SharedSubsample(subsample), handler:
            model(*args, **kwargs)
        for name in site_names:
            site = tracer.trace.nodes[name]
            frame = _plate_frame(site, plate)
            dims[name] = None if frame is None else frame.dim - site["fn"].event_dim
            if dims[name] is not None:
                parts[name].append(site["value"].index_select(dims[name], fresh))
            elif not parts[name]:
                parts[name].append(site["value"])
        if all(dim is None for dim in dims.values()):
            break
    return {
        name: (pieces[0] if dims[name] is None else torch.cat(pieces, dim=dims[name])).detach().cpu().numpy()
        for name, pieces in parts.items()
    }


def _sites_at_once(model, density, u, plates, args, kwargs, plate, max_plate_nesting, unobserve: bool):
    """:func:`_full_data_sites` of draws ``u (m, D)``, all in one model pass per block of the
    subsampled plate, under a plate of the draws left of the model's; and that plate's
    ``(m, dim)``."""
    draws = (u.shape[0], -(max_plate_nesting + 1))
    values = particle_values(density, u, max_plate_nesting)
    return _full_data_sites(model, values, plates, args, kwargs, plate, unobserve, draws=draws), draws


def _log_joints_at_once(model, density, u, plates, args, kwargs, plate, max_plate_nesting) -> torch.Tensor:
    """The full-data log joints of draws ``u (m, D)``, shape ``(m,)``."""
    (prior, logs), draws = _sites_at_once(
        model, density, u, plates, args, kwargs, plate, max_plate_nesting, unobserve=False
    )
    return prior + sum(per_particle(name, value, *draws) for name, (_, value) in logs.items())


def _with_scores(
    log_joints: Callable[[torch.Tensor], torch.Tensor], u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log_joints(u)`` and its gradient in ``u``."""
    with torch.enable_grad():
        u = u.detach().requires_grad_(True)
        values = log_joints(u)
        return values.detach(), torch.autograd.grad(values.sum(), u)[0]


def _full_data_log_joints(model: Callable, density: GuideDensity, args: tuple, kwargs: dict) -> Callable:
    """``u (m, D) -> (log p (m,), scores (m, D))``: the full-data log joint in
    unconstrained space and its gradient. All draws at once when the model is
    broadcast-safe: decided at the first call with two draws or more, whose first four
    are evaluated both ways (a model that fails or differs under the draws' plate is run
    one draw at a time, as written)."""
    with torch.no_grad(), poutine.block(), torch.random.fork_rng(devices=[]):
        model_trace = poutine.trace(at_random_values(model)).get_trace(*args, **kwargs)
    plate = _subsampled_plate(model_trace)
    plates = local_plates(density)
    max_plate_nesting = guess_max_plate_nesting(model_trace)

    def one_draw(u: torch.Tensor) -> torch.Tensor:  # (1, D) -> (1,)
        values = density.unpack(u[0])
        prior, logs = _full_data_sites(model, values, plates, args, kwargs, plate, unobserve=False)
        return (prior + sum(value.sum() for _, value in logs.values())).reshape(1)

    def at_once(u: torch.Tensor) -> torch.Tensor:
        return _log_joints_at_once(model, density, u, plates, args, kwargs, plate, max_plate_nesting)

    def broadcast_safe(draws: torch.Tensor) -> bool:
        with torch.no_grad():
            try:
                vectorized = at_once(draws[:4])
            # Model code may fail in any way under the extra dimension (as in the engine's probe).
            except Exception:  # noqa: BLE001
                return False
            return same_log_joints(vectorized, torch.cat([one_draw(u) for u in draws[:4].split(1)]))

    vectorize: bool | None = None  # decided at the first call with two draws or more

    def log_joints_and_scores(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal vectorize
        if vectorize is None and len(draws) > 1:
            vectorize = broadcast_safe(draws)
        if vectorize:
            parts = [_with_scores(at_once, block) for block in draws.split(DRAWS_PER_PASS)]
        else:
            parts = [_with_scores(one_draw, u) for u in draws.split(1)]
        log_joints, scores = zip(*parts, strict=True)
        return torch.cat(log_joints), torch.cat(scores)

    return log_joints_and_scores


def vi_diagnostics(
    model: Callable, guide: Any, *args: Any, num_samples: int = 1000, **kwargs: Any
) -> dict[str, float]:
    """PSIS k-hat, ELBO and covariance-weighted Fisher divergence of the fitted guide
    against the full-data posterior (see ``numpyro_psvi.arviz.vi_diagnostics``)."""
    density, params = _density(model, guide, args, kwargs)
    return _diagnostics(model, density, params, args, kwargs, num_samples)


def _diagnostics(
    model: Callable, density: GuideDensity, params: dict, args: tuple, kwargs: dict, num_samples: int
) -> dict[str, float]:
    """:func:`vi_diagnostics` of a density already built (``to_inference_data`` has one)."""
    with torch.no_grad():
        draws = density.sample(params, num_samples)
    log_joints, scores = _full_data_log_joints(model, density, args, kwargs)(draws)
    with torch.no_grad():
        log_w = (log_joints - density.log_prob(params, draws)).double().cpu().numpy()
        fisher = weighted_fisher(density, params, params, draws, scores, "covariance")
    return {"khat": pareto_khat(log_w), "elbo": float(np.mean(log_w)), "fisher": float(fisher)}


def mode_coverage(
    model: Callable,
    guide: Any,
    *args: Any,
    num_searches: int = 32,
    num_steps: int = 300,
    num_draws: int = 1000,
    **kwargs: Any,
) -> ModeCoverage:
    """Search the full-data posterior for mass the fitted guide misses and warn when some
    is found (see ``numpyro_psvi.arviz.mode_coverage``; draws use torch's RNG)."""
    density, params = _density(model, guide, args, kwargs)
    with torch.no_grad():
        draws = density.sample(params, num_draws)
    log_joints_and_scores = _full_data_log_joints(model, density, args, kwargs)

    def log_p_and_score(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        log_p, score = log_joints_and_scores(torch.as_tensor(u, dtype=draws.dtype, device=draws.device))
        return log_p.double().cpu().numpy(), score.double().cpu().numpy()

    def log_q(u: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            u = torch.as_tensor(u, dtype=draws.dtype, device=draws.device)
            return density.log_prob(params, u).double().cpu().numpy()

    report = search_modes(
        draws.double().cpu().numpy(), log_q, log_p_and_score, num_searches=num_searches, num_steps=num_steps
    )
    if report.num_uncovered:
        warnings.warn(uncovered_message(report, type(guide).__name__), UserWarning, stacklevel=2)
    return report
