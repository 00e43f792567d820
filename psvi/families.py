"""What an engine needs to know about a guide family (backend-free).

Each backend keeps one registry, ``guide_family`` in its ``guides`` module (a
:func:`functools.singledispatch` over the guide's class), that maps a guide to a
:class:`GuideFamily`. Adding a guide family is one registration there: the engines
ask the record, never the guide's class.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

from psvi.checks import autoregressive_flow_advice


class DensityOptions(NamedTuple):
    """How an engine wants a guide's density built.

    Attributes
    ----------
    score_method : {"closed_form", "autodiff"}
        Analytic Gaussian scores, or autodiff of the guide's log density.
    num_kl_draws : int
        Draws for the Monte Carlo KL of guides without a closed form.
    max_plate_nesting : int or None
        The model's plate nesting (Pyro: user-written guides run under a draws plate
        left of it).
    """

    score_method: str = "closed_form"
    num_kl_draws: int = 256
    max_plate_nesting: int | None = None


class SiteClosedForms(NamedTuple):
    """Which Monte Carlo terms of a user-written guide have closed forms site by site.

    Only for a mean-field guide (no site's distribution reads another site's value),
    whose density is the product of its sites' and whose covariance is diagonal.
    """

    mean_field: bool  # the density is the product of the sites' (one guide pass gives it)
    kl: bool  # KL(q0 || q1) is the sum of the sites' closed-form KLs
    variance: bool  # every site's value has a closed-form variance in the unconstrained space
    # Every site's value is Normal in the unconstrained space (unscaled, unmasked): the
    # guide is a diagonal Gaussian there, fitted as AutoNormal is (its loc and scale read
    # from one run of the guide).
    normal: bool = False
    # Every site's score in the unconstrained space is linear in two functions of its two
    # args (Beta, Gamma, InverseGamma, LogNormal, Normal; unscaled, unmasked): the guide's
    # updates have an exact solve (both backends) and, in Pyro, its inner steps a
    # closed-form gradient.
    linear: bool = False


def by_family(where: Callable, rules: list, owner: Any, part: str, *args: Any) -> Any:
    """The linear-score rules' ``part`` (``"kl_gradient"``, ``"natural"``,
    ``"natural_pullback"``, ``"log_partition_derivatives"``, ``"from_natural"``: tuples;
    ``"log_partition"``: an array) of flat ``args``, coordinate ``i`` by
    ``rules[owner[i]]`` (``owner`` ``None``: one rule), a ``None`` part passing the last
    two args through; ``where``: ``torch.where`` or ``jnp.where`` (both backends'
    ``LinearScoreRule``)."""
    results = []
    for rule in rules:
        fn = getattr(rule, part)
        result = args[-2:] if fn is None else fn(*args)
        results.append(result if isinstance(result, tuple) else (result,))
    outputs = list(results[0])
    for position, result in enumerate(results[1:], start=1):
        mine = owner == position
        outputs = [where(mine, one, out) for one, out in zip(result, outputs, strict=True)]
    return outputs[0] if part == "log_partition" else tuple(outputs)


def holds_a_natural_pair_constant(rules: list, owner: Any, free: tuple) -> bool:
    """Whether a coordinate whose rule's natural coordinates are not its args (a Normal's
    ``(loc / scale^2, 1 / scale^2)``) has an arg that is a constant of the guide (not
    ``free``): both its natural coordinates would move together, which the exact solve
    does not handle. ``owner`` and ``free`` as :func:`by_family` reads them (torch or
    NumPy)."""
    fixed = ~(free[0] & free[1])
    for position, rule in enumerate(rules):
        if rule.natural is not None and bool((fixed if owner is None else fixed & (owner == position)).any()):
            return True
    return False


NO_CLOSED_FORMS = SiteClosedForms(mean_field=False, kl=False, variance=False)


# Var(log X) for the positive families whose log is a location-scale shift of a fixed
# law (X = scale * X0): Exponential trigamma(1) = pi^2/6, HalfNormal (log|Z|) pi^2/8,
# HalfCauchy (log|C|, a hyperbolic-secant law) pi^2/4. By class name, the same in both PPLs.
LOG_VARIANCE_OF_SCALE_FAMILY = {
    "Exponential": math.pi**2 / 6,
    "HalfNormal": math.pi**2 / 8,
    "HalfCauchy": math.pi**2 / 4,
}


def bijection_kind(parts: list[Any], kinds: dict[type, str]) -> str | None:
    """The name the closed-form registries key a model site's bijection by, from its
    elementwise ``parts`` (identity maps dropped): ``"identity"`` for none, the kind
    ``kinds`` gives a single part's type (``"log"``, ``"logit"``), else ``None``."""
    if not parts:
        return "identity"
    return kinds.get(type(parts[0])) if len(parts) == 1 else None


def has_closed_form(fn_of: Callable[[Any], Any], fn: Any) -> bool:
    """Whether ``fn_of(fn)`` exists for the distribution ``fn`` (a PPL raises
    ``NotImplementedError`` where it has no rule, e.g. no KL or no variance)."""
    try:
        fn_of(fn)
    except NotImplementedError:
        return False
    return True


class GuideFamily(NamedTuple):
    """One guide family as the engines see it.

    Attributes
    ----------
    name : str
        Shown in errors and warnings.
    setup : callable or None
        Backend-specific: sets a guide up against the model and returns
        ``build(args, kwargs) -> GuideDensity`` (autoguides return one density for
        every call; user-written guides are run with each call's arguments).
        ``None`` for a refused family.
    local_latents : bool
        Whether its params can span a subsampled plate's full size (local latents).
    full_covariance : bool
        A full-covariance Gaussian over all latents, laid out as
        ``AutoMultivariateNormal`` (what GSM and BaM fit).
    advice : callable or None
        ``advice(latent_dim, num_particles) -> str | None``: a warning at set-up.
    init_params : callable or None
        Backend-specific fix-up of the initial params (e.g. a random low-rank factor).
    refusal : str or None
        Why the engines cannot fit this family, and what to use instead.
    """

    name: str
    setup: Callable[..., Callable[[tuple, dict], Any]] | None
    local_latents: bool = False
    full_covariance: bool = False
    advice: Callable[[int, int], str | None] | None = None
    init_params: Callable[..., Any] | None = None
    refusal: str | None = None

    def check_supported(self) -> None:
        """Raise a ``TypeError`` with the reason and the fix for a refused family."""
        if self.refusal is not None:
            raise TypeError(f"ProximalScoreVI cannot fit {self.name}: {self.refusal}")


def refused(name: str, why: str) -> GuideFamily:
    """The record of a family the engines refuse."""
    return GuideFamily(name, None, refusal=why)


def autoregressive_family_advice(latent_dim: int, num_particles: int) -> str | None:
    """:func:`psvi.checks.autoregressive_flow_advice` as a family's ``advice``."""
    return autoregressive_flow_advice(latent_dim)


POINT_MASS = (
    "it is a point mass and has no density to match scores with. Use AutoNormal "
    "(mean field) or AutoMultivariateNormal instead; for a MAP estimate keep SVI "
    "with Trace_ELBO."
)
LAPLACE = (
    "it is a point mass while it is fitted (its covariance comes from the Hessian "
    "afterwards), so it has no density to match scores with. Use "
    "AutoMultivariateNormal instead."
)


GUIDE_LIST_FLOW = (
    "beside other parts a flow cannot be fitted: its update measures its map's displacement, "
    "not a KL. Fit the flow over all latent sites instead."
)


GUIDE_LIST_FUNCTION = (
    "a function appended to an AutoGuideList (which wraps it so) has no density the engine "
    "reads beside other parts. Write one guide function for the whole model (sampling the "
    "other parts' sites too, e.g. a Normal per site for AutoDiagonalNormal's), or give this "
    "part an autoguide."
)


def guide_list_part_refusal(index: int, name: str, why: str | None) -> str:
    """The refusal of an AutoGuideList's part ``index`` (``name``: its family) and why
    (``None``: it is not an autoguide)."""
    why = why or "a part must be an autoguide (or write one guide for the whole model)."
    return f"ProximalScoreVI cannot fit the AutoGuideList's part {index} ({name}): {why}"
