"""Input checks both backends share (pure Python)."""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Iterable, Mapping
from typing import NamedTuple

_PACKAGES = ("psvi", "pyro_psvi", "numpyro_psvi", "pyro", "numpyro", "jax", "torch")


def caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning raised by the caller of this function at
    the first frame outside psvi and the libraries it runs in (the user's line)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").split(".")[0] in _PACKAGES:
        frame, level = frame.f_back, level + 1
    return level


def check_latents_match(expected: dict, found: dict, what: str, fix: str) -> None:
    """Raise a ``ValueError`` naming the sites whose presence or shape differs."""
    if expected == found:
        return
    diffs = [
        f"{name!r}: {expected.get(name, 'absent')} vs {found.get(name, 'absent')}"
        for name in sorted(set(expected) | set(found))
        if expected.get(name) != found.get(name)
    ]
    raise ValueError(f"{what} ({'; '.join(diffs)}). {fix}")


MAX_REJECTION_RATE = 0.5
"""``run`` raises when more than this fraction of its updates (at least
:data:`MIN_UPDATES_FOR_RATE` of them) were rejected: the fit is not fitting the model."""
MIN_UPDATES_FOR_RATE = 20

_HARD_CONSTRAINT_ADVICE = (
    "A model that writes a hard constraint as a -inf factor (e.g. factor('c', "
    "where(x > 0, 0., -inf))) rejects every update whose particles cross it, and the guide "
    "keeps the unconstrained distribution: express the support with a constrained "
    "distribution instead (HalfNormal, LogNormal, TruncatedNormal, or a "
    "TransformedDistribution), so that the guide lives on it."
)


def rejection_message(engine: str, num_rejected: int) -> str:
    """The warning after ``num_rejected`` rejected updates (both backends, every engine)."""
    return (
        f"{engine} rejected {num_rejected} update(s) (non-finite scores, objective or "
        "parameters, a covariance that is not positive definite, or a trust-region step "
        "that could not be made small enough); the parameters were kept as they were. "
        "Likely causes: a learning rate too large, a model returning -inf, or badly "
        f"scaled data. {_HARD_CONSTRAINT_ADVICE}"
    )


def check_rejection_rate(engine: str, num_rejected: int, num_updates: int) -> None:
    """Raise when more than :data:`MAX_REJECTION_RATE` of ``num_updates`` (a ``run``'s,
    at least :data:`MIN_UPDATES_FOR_RATE`) were rejected."""
    if num_updates >= MIN_UPDATES_FOR_RATE and num_rejected > MAX_REJECTION_RATE * num_updates:
        raise RuntimeError(
            f"{engine} rejected {num_rejected} of this run's {num_updates} updates (more than "
            f"{MAX_REJECTION_RATE:.0%}): the fit does not follow the model. "
            f"{_HARD_CONSTRAINT_ADVICE} Otherwise lower the learning rate or rescale the "
            "data. The parameters of the last accepted update are intact."
        )


RISING_LOSS_WINDOWS = 10
"""``run`` cuts its losses into this many windows for :func:`rising_loss_message`."""
MIN_LOSSES_FOR_TREND = 50
"""Runs with fewer finite losses are not judged by :func:`rising_loss_message`."""


def rising_loss_message(engine: str, losses: Iterable[float]) -> str | None:
    """The warning after a run whose ``-ELBO`` estimates rose, else ``None``.

    The run's losses (NaN where an update was rejected) are cut into
    :data:`RISING_LOSS_WINDOWS` windows; it warns when the median of the last is above the
    lowest median of the others by more than 1 nat and by more than twice that window's
    spread (1.4826 times its median absolute deviation: the sd of its single estimates,
    for Gaussian noise). A fit that settles does not do this, whatever its noise: its
    windows' medians differ by their standard errors, a fraction ``1/sqrt(window)`` of
    that spread. Runs with fewer than :data:`MIN_LOSSES_FOR_TREND` finite losses are not
    judged."""
    values = [float(loss) for loss in losses]
    if sum(math.isfinite(value) for value in values) < MIN_LOSSES_FOR_TREND:
        return None
    size = len(values) // RISING_LOSS_WINDOWS
    start = len(values) - RISING_LOSS_WINDOWS * size  # the first few go uncounted
    windows = [values[start + i * size : start + (i + 1) * size] for i in range(RISING_LOSS_WINDOWS)]
    finite = [[value for value in window if math.isfinite(value)] for window in windows]
    if any(len(window) < size / 2 for window in finite):  # mostly rejected: run's other checks say so
        return None
    medians = [statistics.median(window) for window in finite]
    best = min(range(RISING_LOSS_WINDOWS - 1), key=medians.__getitem__)
    spread = 1.4826 * statistics.median(abs(value - medians[best]) for value in finite[best])
    rise = medians[-1] - medians[best]
    if rise <= max(1.0, 2.0 * spread):
        return None
    first = start + best * size + 1
    return (
        f"{engine}'s -ELBO estimate rose during this run: its median over the last {size} "
        f"updates is {medians[-1]:.6g}, against {medians[best]:.6g} over updates {first}-"
        f"{first + size - 1} (more than twice the spread of those estimates, {spread:.3g}). "
        "The guide is moving away from the posterior. Check the fit (vi_diagnostics: PSIS "
        "k-hat) before using it; lower the learning rate, or, for a flow guide (known to "
        "drift with few particles, docs/guides.md 'Flows with exact scores against SVI'), "
        "fit it with more particles, with the PPL's SVI, or use AutoMultivariateNormal."
    )


def check_checkpointing(checkpoint_every: int | None, checkpoint_path: object) -> None:
    """Raise a ``ValueError`` unless ``run``'s checkpoint options are both given (a positive
    ``checkpoint_every``) or both omitted."""
    if (checkpoint_every is None) != (checkpoint_path is None):
        raise ValueError("Pass checkpoint_every and checkpoint_path together (or neither).")
    if checkpoint_every is not None and int(checkpoint_every) < 1:
        raise ValueError(f"checkpoint_every must be a positive integer, got {checkpoint_every}.")


def check_rejection_streak(engine: str, streak: int, limit: int | None, unit: str) -> None:
    """Raise once ``streak`` rejected ``unit`` ("updates", "steps") in a row reach
    ``limit`` (``None``: never)."""
    if limit is not None and streak >= limit:
        raise RuntimeError(
            f"{engine} rejected the last {streak} {unit} in a row "
            f"(max_consecutive_rejections={limit}): the fit is stuck. Likely causes: a "
            "learning rate too large, a model returning -inf or NaN where the guide puts "
            "mass, or badly scaled data. The parameters and optimizer state before them "
            "are intact."
        )


def argument_labels(args: tuple, kwargs: dict) -> Iterable[tuple[str, object]]:
    """``(label, value)`` of each top-level model argument, labelled for error messages."""
    yield from ((f"positional argument {i}", value) for i, value in enumerate(args))
    yield from ((f"keyword argument {name!r}", value) for name, value in kwargs.items())


def nonfinite_rows_message(label: str, shape: tuple, rows: list[int], plate_size: int) -> str:
    """The error for a data argument with non-finite rows that a subsampled plate may draw."""
    return (
        f"The model's {label} (shape {shape}) holds non-finite values (NaN or inf) in rows "
        f"{rows[:5]}{' ...' if len(rows) > 5 else ''}. The model subsamples a plate of size "
        f"{plate_size}: mini-batches drawing those rows would have a non-finite log joint and "
        "be rejected, the others not, so the fit would depend on which rows a batch draws. "
        "Remove or impute them before fitting."
    )


def check_same_rows(x_shape: tuple, y_shape: tuple | None) -> None:
    """Raise a ``ValueError`` when a bundled model's ``x`` and ``y`` differ in length (a
    plate over ``x``'s rows would index past ``y``; JAX clamps such indices silently)."""
    if y_shape is not None and tuple(y_shape)[:1] != tuple(x_shape)[:1]:
        raise ValueError(
            f"x has {x_shape[0]} rows and y has {y_shape[0] if len(y_shape) else 'no'} rows: "
            "each observation needs one row of inputs. Pass x and y of the same length."
        )


def half_precision_message(label: str, dtype: str) -> str:
    """The error for data in half precision."""
    return (
        f"The model's {label} is {dtype}: score-based VI needs float32 or float64 data (half "
        "precision scores overflow and underflow, and the updates would be rejected). "
        "Convert it, e.g. x.float(); the guide's params follow the data's precision."
    )


def full_covariance_advice(dim: int, num_particles: int) -> str | None:
    """The warning for a full-covariance guide fitted by the optimizer's inner steps with
    too few particles for its dimension (docs/gaussian_targets.md), or ``None``."""
    if dim <= 16 * num_particles:
        return None
    return (
        f"Full-covariance guide with D={dim} latent dimensions and only "
        f"num_particles={num_particles}, fitted by the optimizer's inner steps: such fits "
        "diverged at lr 1e-2 and converged at "
        "3e-3 or with more particles (docs/gaussian_targets.md). Use a smaller step size "
        f"or num_particles >= {-(-dim // 8)}."
    )


# AutoLowRankMultivariateNormal fitted by the optimizer's inner steps (docs/lowrank_study.md,
# rank 10, exact scores): fits converged at D = 50, 70 (S = 8) and 100 (S = 16), stalled
# at D = 100 with S = 8 and diverged at D = 1000 with S = 8 and 125. The closed-form step
# (the default with exact scores) has no such limit; the engines warn only for the
# optimizer path.
LOWRANK_MAX_DIM = 100
LOWRANK_MAX_DIMS_PER_PARTICLE = 10


def lowrank_advice(dim: int, num_particles: int) -> str | None:
    """The warning for a low-rank-plus-diagonal guide fitted by the optimizer's inner
    steps above :data:`LOWRANK_MAX_DIM` latent dimensions or
    :data:`LOWRANK_MAX_DIMS_PER_PARTICLE` per particle, or ``None``."""
    if dim <= min(LOWRANK_MAX_DIM, LOWRANK_MAX_DIMS_PER_PARTICLE * num_particles):
        return None
    return (
        f"AutoLowRankMultivariateNormal with D={dim} latent dimensions and "
        f"num_particles={num_particles}, fitted by the optimizer's inner steps (the closed-form "
        "step needs exact scores, num_particles >= 2, the covariance weighting, no model params "
        "and no inner_steps): on low-rank-plus-diagonal Gaussian targets, such fits converged "
        "up to D=100 with D <= 10 num_particles, stalled at D=100 with S=8 (KL 135 where SVI "
        "reached 7.9) and diverged at D=1000 with S=8 and S=125 (docs/lowrank_study.md). Use "
        "the closed-form step where it applies, AutoMultivariateNormal or AutoNormal, or SVI "
        "for this guide"
        + (
            f"; up to D=100, num_particles >= {-(-dim // LOWRANK_MAX_DIMS_PER_PARTICLE)}."
            if dim <= LOWRANK_MAX_DIM
            else "."
        )
    )


AUTOREGRESSIVE_FLOW_MAX_DIM = 32


def autoregressive_flow_advice(dim: int) -> str | None:
    """The warning for an inverse autoregressive flow guide above
    :data:`AUTOREGRESSIVE_FLOW_MAX_DIM` latent dimensions (docs/guides.md), or ``None``."""
    if dim <= AUTOREGRESSIVE_FLOW_MAX_DIM:
        return None
    return (
        f"Inverse autoregressive flow guide with D={dim} latent dimensions: its density at "
        f"a given point needs its inverse, {dim} sequential network passes, at every inner "
        "step, and that dominates the step (measured on a CPU, at most five inner steps: Pyro "
        "0.23 s/step at D=16 and 1.3 s at D=64, against 0.07 and 0.04 s for an affine "
        "coupling flow; NumPyro 0.06 s at D=64; docs/guides.md). Use a coupling flow (Pyro's "
        "AutoNormalizingFlow with affine_coupling layers, one pass to invert) or "
        "AutoMultivariateNormal."
    )


INNER_COST_MAX_RATIO = 10.0


def inner_cost_advice(inner_steps: int, inner_seconds: float, score_seconds: float) -> str | None:
    """The warning for a guide whose ``K`` inner steps (each re-evaluating its density)
    took more than :data:`INNER_COST_MAX_RATIO` times the score phase, or ``None``."""
    if inner_steps <= 1 or inner_seconds <= INNER_COST_MAX_RATIO * score_seconds:
        return None
    score_seconds = max(score_seconds, 1e-9)  # a clock's tick
    return (
        f"The guide's density dominates the step: its {inner_steps} inner steps, each "
        f"running the guide again, took {inner_seconds / score_seconds:.0f}x the score "
        f"phase ({1e3 * inner_seconds:.0f} ms against {1e3 * score_seconds:.0f} ms) on the "
        "second update. Fewer inner steps cut the step's cost nearly in proportion "
        f"(e.g. inner_steps={max(1, inner_steps // 4)}), at some progress per score call; on a "
        "cheap model the PPL's SVI may also fit faster per second (docs/guides.md, 'Cost of "
        "hand-written guides')."
    )


def check_proximal_options(inner_steps: int | None, trust_region: float | None) -> None:
    """Raise a ``ValueError`` naming a bad ``inner_steps`` or ``trust_region``."""
    if inner_steps is not None and int(inner_steps) < 1:
        raise ValueError(f"inner_steps must be a positive integer, got {inner_steps}.")
    if trust_region is not None and not trust_region > 0:
        raise ValueError(f"trust_region must be positive or None, got {trust_region}.")


def baseline_local_latent_message(engine: str, name: str, plate: str) -> str:
    """The error for a local latent in a subsampled plate under GSM or BaM."""
    return (
        f"Latent site {name!r} is local to the subsampled plate {plate!r}; {engine} fits one "
        "full-covariance Gaussian over all latents and cannot subsample them. Use "
        "ProximalScoreVI with AutoNormal, or the full plate (subsample_size=None)."
    )


def local_latent_message(name: str, plate: str, guide_name: str) -> str:
    """The error for a local latent in a subsampled plate under a guide (or an
    AutoGuideList's part) other than AutoNormal."""
    return (
        f"Latent site {name!r} is local to the subsampled plate {plate!r}: {guide_name} would "
        "reuse one set of values for every mini-batch. Use AutoNormal (the whole guide, or the "
        "AutoGuideList's part for the local sites), whose params span the plate's full size and "
        "are sliced by its indices, a guide function that indexes its own params by its plate's "
        "indices, or the full plate (subsample_size=None)."
    )


def discrete_latent_message(name: str, family: str, how: object, ppl: str) -> str:
    """The error for a discrete latent site that is not marked for parallel enumeration
    (``how``: its ``infer["enumerate"]``)."""
    handlers = "poutine" if ppl == "pyro" else "handlers"
    marked = (
        f"is marked infer={{'enumerate': {how!r}}}; only 'parallel' enumeration is supported"
        if how is not None
        else "is not marked for enumeration"
    )
    return (
        f"Latent site {name!r} is discrete ({family}) and {marked}. ProximalScoreVI sums "
        "discrete latents out of the log joint exactly, as TraceEnum_ELBO does: mark the "
        f"site infer={{'enumerate': 'parallel'}} (or decorate the model with "
        f"{ppl}{'.contrib.funsor' if ppl == 'numpyro' else '.infer'}.config_enumerate) and "
        f"leave it out of the guide (e.g. AutoNormal({handlers}.block(model, hide=[{name!r}]))); "
        "or marginalize it in the model (a mixture via MixtureSameFamily)."
    )


def no_latents_message(enumerated: tuple[str, ...]) -> str:
    """The error for a model without a continuous latent site (``enumerated``: its
    discrete sites summed out)."""
    if enumerated:
        return (
            f"The model has no continuous latent sites: its discrete sites {list(enumerated)} "
            "are summed out exactly, so there is no guide to fit. Compute their posterior "
            "with infer_discrete, or give the model continuous parameters as latent sites."
        )
    return (
        "The model has no latent sample sites: there is no posterior to fit. "
        "Check that the observed sites carry obs= and that some site has none."
    )


class EnumerationError(ValueError):
    """A model's enumerated discrete sites cannot be summed out as the model is written."""


def enumerated_export_message(names: tuple[str, ...]) -> str:
    """The error for an ArviZ export or diagnostic of a model with enumerated sites."""
    return (
        f"The model's discrete sites {list(names)} are enumerated: the fit sums them out, but "
        "the ArviZ export and the VI diagnostics evaluate the model with every latent drawn, "
        "which they cannot do for these (their log-likelihoods would hold one draw of them, "
        "not the sum). Draw the guide's latents with Predictive (and the discrete ones "
        "with infer_discrete) instead."
    )


def enumerated_scan_message(name: str) -> str:
    """The error for a scaled site inside NumPyro's ``scan`` over enumerated latents."""
    return (
        f"Site {name!r} is inside numpyro.contrib.control_flow.scan over enumerated discrete "
        "latents and has a scale (a subsampled plate's N/B or handlers.scale): scan's "
        "contraction would apply it inside the sum over them. Write the chain as a Python "
        "loop, `for t in numpyro.contrib.funsor.markov(range(T)):`, whose sums take the "
        "scale outside, or do not subsample around the chain."
    )


def enumeration_scale_message(names: list[str], ppl: str) -> str:
    """The error for enumerated sites and their dependents under different scales."""
    handlers = "poutine" if ppl == "pyro" else "handlers"
    return (
        f"The sites {names} are summed over the same enumerated latents but have different "
        f"scales (a subsampled plate's N/B or {handlers}.scale): a plate's N/B must multiply "
        "each data point's sum over its discrete latents, so every site in such a sum needs "
        "one scale, as TraceEnum_ELBO requires. Put the discrete latent and the sites that "
        "depend on it in the same plates, or do not subsample those plates."
    )


def unbatched_local_guide_message(name: str, plate: str) -> str:
    """The error for a user-written guide's local latent evaluated without a mini-batch
    (e.g. a full-data export)."""
    return (
        f"Latent site {name!r} of this user-written guide is local to the subsampled plate "
        f"{plate!r}: its density is only defined on a mini-batch of the plate, so it cannot "
        "give draws over the full data. For ArviZ export and full-data diagnostics use "
        "AutoNormal, or the full plate (subsample_size=None); for predictions use "
        "Predictive(model, guide=guide) per mini-batch."
    )


def data_parallel_local_message(name: str, plate: str, unit: str) -> str:
    """The error for a local latent under data parallelism (``unit``: "rank" or "device")."""
    return (
        f"Data-parallel fitting does not support local latents yet: site {name!r} lies in "
        f"plate {plate!r}, which the {unit}s split. Fit it on one {unit} "
        "(data_parallel=False), or make the site global."
    )


def check_global_batch(plate: str, size: int, subsample_size: int, world_size: int, unit: str) -> None:
    """Raise ``ValueError`` when ``world_size`` batches of ``subsample_size`` (one per
    ``unit``: "rank" or "device") exceed the ``size`` members of ``plate``."""
    batch = world_size * subsample_size
    if batch > size:
        raise ValueError(
            f"Plate {plate!r}: {world_size} {unit}s of subsample_size={subsample_size} need a "
            f"global batch of {batch} from its {size} members; use subsample_size <= "
            f"{size // world_size}."
        )


def no_mini_batch_message(ppl: str, unit: str) -> str:
    """The error for a data-parallel model that subsamples no plate (``ppl``: "pyro" or
    "numpyro"; ``unit``: "rank" or "device")."""
    given = " or pass each rank's own indices with subsample=." if ppl == "pyro" else "."
    return (
        f"Data-parallel fitting gives each {unit} its own mini-batch of a subsampled plate, "
        f"and this model subsamples none, so every {unit} would score all the data. Write the "
        f"data plate as {ppl}.plate('data', N, subsample_size=B) with B the batch of one "
        f"{unit} (B = N / {unit}s for exact scores){given}"
    )


class GuideSite(NamedTuple):
    """What :func:`check_user_guide_sites` needs to know of one guide sample site."""

    point_mass: bool
    discrete: bool
    supports_agree: bool
    support: str
    model_support: str
    shape: tuple[int, ...] = ()
    model_shape: tuple[int, ...] = ()
    auxiliary: bool = False  # marked ``infer={"is_auxiliary": True}`` (EasyGuide's group.sample)


def drop_leading_ones(shape: Iterable[int], keep: int = 0) -> tuple[int, ...]:
    """``shape`` without its leading size-1 dims, keeping at least ``keep`` dims.

    A model's arithmetic can give a latent site's own draws a size-1 dim left of its
    plates (``z @ w.reshape(-1, k, m)`` makes ``(1, n, m)`` from ``(n, k)``), which a
    user-written guide's draws need not have: ``SVI`` replays the guide's values into
    the model, where they broadcast. Such shapes hold the same values."""
    shape = tuple(shape)
    start = 0
    while len(shape) - start > keep and shape[start] == 1:
        start += 1
    return shape[start:]


SUPPORT_CHECK_ENTRIES = 2**20
"""The most values the support check draws for one latent site (64 points of it, fewer
for a site this large: one point of a network's flat weight vector)."""


def support_check_points(size: int) -> int:
    """How many points of a latent site of ``size`` values the support check draws."""
    return max(1, min(64, SUPPORT_CHECK_ENTRIES // max(size, 1)))


def support_density_message(name: str, support: object, example: str) -> str:
    """The error for a latent site whose log density is NaN at values inside the support
    it declares (what its autoguide draws over, through ``biject_to(support)``)."""
    return (
        f"Latent site {name!r}: its log density is NaN at values inside its declared support "
        f"{support}, which is where its guide draws. A TransformedDistribution declares its "
        f"last transform's codomain, which can be wider than the set its values lie in ({example}); "
        "SVI fails on such a site too. Sample the site through a transform whose codomain is "
        "that set, or with a distribution on it, and apply further transforms in the model."
    )


def check_user_guide_sites(
    latent_names: Iterable[str], sites: Mapping[str, GuideSite], mixture_class: str
) -> None:
    """Raise a ``ValueError`` naming the problem and the fix when a user-written guide's
    density cannot be evaluated at the model's latent values: its sample sites must be
    exactly the model's latent sites (``latent_names``), continuous, not point masses,
    each on its model site's support. ``mixture_class``: the PPL's MixtureSameFamily."""
    latents = set(latent_names)
    extra = sorted(set(sites) - latents)
    auxiliary = [name for name in extra if sites[name].auxiliary]
    if auxiliary:
        raise ValueError(
            f"The guide samples the auxiliary sites {auxiliary} and sets the model's latents "
            "from them (as Pyro's EasyGuide group.sample does): its density over the model's "
            "latents has no closed form to match scores with. Use AutoMultivariateNormal (a "
            "joint Normal over all latents, what group.sample of a Normal fits) or "
            "AutoLowRankMultivariateNormal, or sample each latent site of the model directly."
        )
    if extra:
        raise ValueError(
            f"The guide samples {extra}, which are not latent sites of the model; its density "
            "over the model's latents would need them integrated out. Write a mixture as one "
            f"site ({mixture_class}) instead of sampling its component."
        )
    missing = sorted(latents - set(sites))
    if missing:
        raise ValueError(f"The guide has no sample site for the model's latent sites {missing}.")
    for name, site in sites.items():
        if site.point_mass:
            raise ValueError(
                f"The guide's site {name!r} is a point mass (Delta): it has no density to match "
                "scores with. Give it a continuous distribution (e.g. Normal)."
            )
        if site.discrete:
            raise ValueError(f"The guide's site {name!r} is discrete; score-based VI needs densities.")
        if drop_leading_ones(site.shape) != drop_leading_ones(site.model_shape):
            raise ValueError(
                f"The guide's site {name!r} draws values of shape {site.shape}, the model's "
                f"{site.model_shape}: each guide site must draw the model site's shape (leading "
                "size-1 dims aside), as SVI replays the guide's values into the model. Expand "
                "the guide's distribution (e.g. .expand(shape) or a plate) to the model's shape."
            )
        if not site.supports_agree:
            raise ValueError(
                f"The guide's site {name!r} has support {site.support}, the model's "
                f"{site.model_support}: the guide's density must live on the model's support "
                "(e.g. LogNormal for a positive site, or TransformedDistribution(base, "
                "biject_to(support)))."
            )
