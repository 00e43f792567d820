"""The proximal score-matching objective as a small record (backend-free).

Passed to ``ProximalScoreVI`` the way ``Trace_ELBO()`` is passed to ``SVI``; see
docs/algorithm.md for the method.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

WEIGHTINGS = ("covariance", "identity")


class ProximalScoreMatching(NamedTuple):
    """``L_t(lam) = (1/S) sum_s r_s' W_t r_s + prox_weight * KL(q_t || q_lam)``.

    Attributes
    ----------
    prox_weight : float or None
        Weight ``1/eta`` of the proximal term. ``None``: by regime
        (:func:`regime_defaults`), 3 for the closed-form step of a full-covariance or
        low-rank Gaussian guide, ``max(10, 5 N/B)`` with mini-batch scores for a guide the
        split objective does not reach (:func:`generic_prox_weight`), else 10.
    weighting : {"covariance", "identity"}
        ``W_t``: the covariance of ``q_t`` (scale-free, the default) or the identity.
    num_kl_draws : int
        Draws from ``q_t`` for the Monte Carlo KL of guides without a closed form, and
        base draws for a flow guide's displacement (:func:`path_elbo_weight`); they
        cost no score calls.
    curvature_memory : int or None
        Diagonal Gaussian guides: the per-coordinate curvature in the Fisher term is
        averaged over the last ``curvature_memory`` updates (1: this update's alone).
        Longer is less noisy but follows a changing curvature more slowly. ``None``: by
        regime (:func:`regime_defaults`), 1 with mini-batch scores (a network's
        curvature moves while it learns: docs/minibatch.md section 8), 100 with exact
        scores. A local latent's curvature is always averaged over its last few visits
        (updates whose batch held it; :func:`local_curvature_visits`); a global
        coupled to local latents in a subsampled plate (a GLMM's) is right with 1 when
        the particles are drawn in the orthogonal design (the default where
        ``num_particles`` allows, :mod:`psvi.designs`; section 17) and wants 100 with
        independent particles (section 16: with 1 its sd ends 22-33% short).
    """

    prox_weight: float | None = None
    weighting: str = "covariance"
    num_kl_draws: int = 256
    curvature_memory: int | None = None

    def checked(self) -> ProximalScoreMatching:
        """This record, after checking its fields (``ValueError`` naming the bad one)."""
        if self.prox_weight is not None and not self.prox_weight >= 0:
            raise ValueError(f"prox_weight (1/eta) must be >= 0 or None, got {self.prox_weight}.")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}.")
        if int(self.num_kl_draws) < 1:
            raise ValueError(f"num_kl_draws must be a positive integer, got {self.num_kl_draws}.")
        memory = self.curvature_memory
        if memory is not None and int(memory) < 1:
            raise ValueError(f"curvature_memory must be a positive integer or None, got {memory}.")
        return self._replace(
            prox_weight=None if self.prox_weight is None else float(self.prox_weight),
            num_kl_draws=int(self.num_kl_draws),
            curvature_memory=None if memory is None else int(memory),
        )


class RegimeDefaults(NamedTuple):
    """The engine's settings where the user gives none (``None``), by regime.

    With a Gaussian guide (AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal) and a
    model that subsamples a plate (mini-batch scores, ``batch_ratio = N/B > 1``),
    measured in docs/minibatch.md: the last iterate carries the batch's noise (1-4
    posterior sds on the subsampled regression, ~1.8 on the subsampled logistic
    regression with AutoMultivariateNormal), so the guide returned is the averaged
    iterate; and K = 20 inner steps let each update carry a network's weights far on
    that noise, so that the averaged iterates predict badly (digits MLP, 20,000 score
    calls: test NLL 0.61 with K = 20, 0.21 with K = 5), and with a full covariance
    shrink its sds further (0.54-0.70 of NUTS's with K = 20, 0.77-0.89 with K = 5);
    a diagonal guide's curvature is this update's alone, as a network's curvature
    moves while it learns (a 100-update memory left UCI networks and the MNIST MLP in a
    worse basin: MNIST test NLL 0.246 against 0.161, UCI test LL 0.02-0.5 nats lower).
    The closed-form step of a full-covariance Gaussian guide (exact scores,
    :func:`resolve_inner_solver`), measured in docs/gaussian_study.md ("Averaged iterates
    ..."): the proximal weight 3 with the running average of its iterates, restarted while
    the fit progresses (:mod:`psvi.schedules`), reaches the Gaussian study's targets in
    0.50-0.71x the score calls of the weight 10's last iterate at D = 10 and 0.85-1.02x at
    D = 50, far starts in 0.46-1.13x the updates, and wanders less about a non-Gaussian
    posterior (non-centered eight schools in the reference band at 0.62 of the last checks
    against 0.38); while the average restarts (the fit progresses) the weight is 0.5
    with at least ``D / 4`` particles (:data:`CLOSED_FORM_PROGRESS_PROX_WEIGHT`: the D = 10
    targets in 0.78-0.92x the score calls of 3 throughout over five seeds,
    docs/gaussian_study.md, "A lighter weight while the fit progresses").
    The closed-form step of a low-rank guide: the weight 3 and the last iterate
    (docs/lowrank_study.md; averaging a factor the projection re-derives each update is
    not measured). A flow guide (its update is the transport one) with a trust
    region: at most five inner steps, stopped once the map has moved past the trust
    region's budget (:func:`stops_at_trust_region`), and the averaged iterate, with exact
    scores as with mini-batch ones (docs/guides.md, "Inner steps stopped at the budget":
    on a logistic regression NumPyro's AutoIAFNormal reached the posterior in 0.25-0.57x
    the calls of twenty unstopped steps and stayed there 0.80-1.00 of the time against
    0.45-0.75); without a trust region one step with a subsampled plate, else twenty and
    the last iterate. With a subsampled plate (docs/guides.md, "Mini-batch scores: one
    inner step ..." and "... stopped at the budget"): each update's optimum follows the
    batch's noise (the iterates' means jitter 0.5-1.9 posterior sds about the right ones on
    subsampled regressions), and the average of a flow's network weights stands for the
    average of its distributions only while those weights move little per update: with
    K = 20 the averaged flow ended 0.44-1.65 sds off, with one step 0.03-0.29 (NumPyro).
    Five steps without the stop diverged on a seed in six at Adam(1e-2); one step leaves a
    start 24 sds off short of the posterior after 3,000 updates at Adam(1e-3). Pyro's
    AutoIAFNormal diverged with one step on half the seeds until its Fisher term was
    dropped (:func:`transport_fisher_weight`).
    Any other guide with a subsampled plate (a user-written guide of another family, e.g.
    Gamma or Beta sites, an amortized Dirichlet, a Normal user guide with local latents;
    AutoLowRankMultivariateNormal) goes through the generic objective, whose per-update
    optimum absorbs the batch's noise into the guide's shape: on conjugate targets
    (docs/minibatch.md, section 15) its sds ended 0.70-0.78 of the exact ones at N/B = 20
    with the weight 10 (0.90-0.94 at N/B = 5, 0.49-0.53 at 80), a shortfall of roughly
    ``0.1-0.15 (N/B) / prox_weight``; so the weight grows with ``N/B``
    (:func:`generic_prox_weight`: an epoch of updates then moves the guide about as far as
    at ``N/B = 2``) and the guide returned is the averaged iterate (the last iterate's
    means were up to 1.0 sd off). A low-rank Gaussian guide takes five inner steps there,
    as the other Gaussian guides do (a subsampled regression's sds 0.88-0.96 of the exact
    ones at Adam(1e-2) and 0.96-1.14 at Adam(1e-3), against 0.70-0.80 and 0.87-0.95 with
    twenty; docs/minibatch.md section 15).
    Elsewhere (exact scores) the settings the Gaussian study chose.
    """

    inner_steps: int
    average_iterates: bool
    curvature_memory: int
    prox_weight: float
    prox_weight_growth: float = 0.0
    """The weight's growth per update, :func:`psvi.schedules.growing_prox_weight` (the
    exact solve of a guide with linear scores under a subsampled plate; 0 elsewhere)."""
    progress_prox_weight: float | None = None
    """The weight while the fit progresses, :func:`psvi.schedules.progress_prox_weight`
    (the full-covariance closed-form step with averaged iterates; ``None`` elsewhere:
    ``prox_weight`` throughout)."""


def regime_defaults(
    gaussian: bool,
    batch_ratio: float,
    closed_form: bool = False,
    low_rank_step: bool = False,
    transport: bool = False,
    bounded: bool = True,
    low_rank: bool = False,
    linear_solve: bool = False,
    particles_per_dim: float = 0.0,
) -> RegimeDefaults:
    """:class:`RegimeDefaults` for a guide that is (or is not) a diagonal or
    full-covariance Gaussian, a model whose largest plate-to-subsample ratio is
    ``batch_ratio``, whether the updates take the closed-form step of a
    full-covariance Gaussian (``closed_form``; ``inner_steps`` then goes unused) or of a
    low-rank one (``low_rank_step``: the proximal weight 3, the last iterate;
    docs/lowrank_study.md), whether the guide is a flow fitted by the transport
    update (``transport``), and whether the updates have a trust region (``bounded``:
    without one a flow's steps cannot stop at its budget, so it takes the settings
    measured before the stop: one step with mini-batch scores, twenty and the last
    iterate with exact scores), whether it is a low-rank Gaussian (``low_rank``: with
    mini-batch scores the generic objective's weight, and the Gaussian guides' five steps),
    and whether its updates are the exact solve of a guide with linear scores
    (``linear_solve``: with mini-batch scores the weight ``max(10, t)`` at update ``t``,
    :data:`LINEAR_SOLVE_PROX_WEIGHT_GROWTH`), and ``particles_per_dim`` (``S / D``: the
    full-covariance closed-form step's lighter weight while its fit progresses, from
    :data:`CLOSED_FORM_PROGRESS_MIN_PARTICLES_PER_DIM`)."""
    if gaussian and batch_ratio > 1:
        return RegimeDefaults(inner_steps=5, average_iterates=True, curvature_memory=1, prox_weight=10.0)
    if transport and (bounded or batch_ratio > 1):
        return RegimeDefaults(
            inner_steps=5 if stops_at_trust_region(transport, bounded) else 1,
            average_iterates=True,
            curvature_memory=100,
            prox_weight=10.0,
        )
    if low_rank_step:
        return RegimeDefaults(inner_steps=20, average_iterates=False, curvature_memory=100, prox_weight=3.0)
    if closed_form:
        lighter = particles_per_dim >= CLOSED_FORM_PROGRESS_MIN_PARTICLES_PER_DIM
        progress = CLOSED_FORM_PROGRESS_PROX_WEIGHT if lighter else None
        return RegimeDefaults(20, True, 100, prox_weight=3.0, progress_prox_weight=progress)
    if batch_ratio > 1 and linear_solve:
        growth = LINEAR_SOLVE_PROX_WEIGHT_GROWTH
        return RegimeDefaults(20, True, curvature_memory=100, prox_weight=10.0, prox_weight_growth=growth)
    if batch_ratio > 1:
        weight, inner_steps = generic_prox_weight(batch_ratio), 5 if low_rank else 20
        return RegimeDefaults(inner_steps, True, curvature_memory=100, prox_weight=weight)
    return RegimeDefaults(inner_steps=20, average_iterates=False, curvature_memory=100, prox_weight=10.0)


CLOSED_FORM_PROGRESS_PROX_WEIGHT = 0.5
"""The full-covariance closed-form step's proximal weight while its fit progresses (its
average of iterates restarted in the last :data:`psvi.schedules.SETTLED_AFTER` updates),
3 once settled (:func:`psvi.schedules.progress_prox_weight`; docs/gaussian_study.md, "A
lighter weight while the fit progresses"), with at least
:data:`CLOSED_FORM_PROGRESS_MIN_PARTICLES_PER_DIM` particles per dimension."""
CLOSED_FORM_PROGRESS_MIN_PARTICLES_PER_DIM = 0.25
"""The particles per dimension ``S / D`` from which the closed-form step takes the lighter
weight while its fit progresses. Measured on the Gaussian study's ill-conditioned target
(NumPyro, 4,000 score calls): at D = 500 the weight 0.5 ended at KL 5.4 with S = 125 (3
throughout: 12), at KL 0.57 with S = 62 (3 throughout: 0.18); at D = 50 and 100 with
S = D / 8 it was within the seeds' spread; at D = 10 with S = 4 it took 0.78-0.92x the
calls. With fewer particles than that the particles' fit is noisy in most directions, and
the weight 3 damps it."""


# The generic objective's proximal weight per unit of N/B with a subsampled plate.
GENERIC_PROX_WEIGHT_PER_BATCH_RATIO = 5.0


def generic_prox_weight(batch_ratio: float) -> float:
    """The default proximal weight of a guide fitted by the generic objective (neither a
    diagonal or full-covariance Gaussian, whose split objective has its own regime, nor a
    flow) when the model's largest plate-to-subsample ratio is ``batch_ratio``:
    ``max(10, 5 N/B)``, 10 with exact scores.

    Measured on conjugate targets (docs/minibatch.md, section 15; Gamma and Beta guides,
    the averaged iterate): sd ratios 0.93-0.96 at N/B = 5 (weight 25, NumPyro), 0.91-0.99
    at 20 (100, both backends), 0.97-1.09 at 80 (400, NumPyro), against 0.90-0.94,
    0.70-0.78 and 0.49-0.53 with the weight 10 and the last iterate.
    """
    return max(10.0, GENERIC_PROX_WEIGHT_PER_BATCH_RATIO * batch_ratio)


LINEAR_SOLVE_PROX_WEIGHT_GROWTH = 1.0
"""The exact solve's proximal weight with a subsampled plate grows by this much per update
(``max(10, t)`` at update ``t``, :func:`psvi.schedules.growing_prox_weight`). Solved
exactly, an update takes its whole share of the batch's noise, and a constant weight ``w``
leaves a bias of about ``0.7 (N/B) / w`` in the sds (conjugate targets, docs/minibatch.md
"A weight that grows with the updates") while slowing a far start by ``w``; the weight
``t`` makes the update (for a conjugate model, where each batch's solution is the batch's
posterior) nearly the running mean of the batches' solutions, stochastic approximation's
``1/t`` step (Robbins-Monro; Hoffman et al.'s stochastic VI): the bias and the noise fall
with ``t`` and the start is not slowed (sd ratios 0.89-1.01 after 3,000 updates at N/B =
5, 20 and 80 against 0.84-0.97 at ``10 N/B``; growing by ``2t`` forgot the start too
slowly, by ``t / 2`` left more noise)."""


# A diagonal Gaussian guide's per-update KL budget with a subsampled plate, in units of
# the per-dimension ``trust_region``: 0.1 nats per dimension at the default 0.02.
SPLIT_TRUST_REGION_SCALE = 5.0


def amortizes_locals(param_shapes: Iterable[tuple[int, ...]], local_plate_sizes: Iterable[int]) -> bool:
    """Whether a guide with local latents in subsampled plates of full sizes
    ``local_plate_sizes`` amortizes them: none of its params (their shapes,
    ``param_shapes``) has an axis of such a size, so no param holds an entry per member
    of the plate (an encoder network's weights do not; AutoNormal's locs, or a guide's
    own ``loc[idx]``, do). An update of such a guide moves every member's local
    distribution, not only the mini-batch's (:func:`trust_region_scale`). A param whose
    axis happens to equal a plate's size counts as per-member: the budget then stays the
    per-member one, as before this rule."""
    sizes = set(local_plate_sizes)
    return bool(sizes) and not any(size in sizes for shape in param_shapes for size in shape)


def trust_region_scale(
    diagonal: bool, batch_ratio: float, transport: bool = False, amortized: bool = False
) -> float:
    """What an update's KL budget multiplies ``trust_region * D`` by.

    1 with exact scores. With a subsampled plate the batch's noise alone moves an update
    by about ``N/(2B)`` nats per dimension: guides other than a diagonal Gaussian or a
    flow keep ``N/B`` (their updates may follow that noise), while a diagonal Gaussian
    guide (the split objective) gets at most 5: with reshuffled batches, whose noise
    cancels over an epoch, a budget that binds lets the averaged guide settle where
    ``N/B`` let each update chase its batch (UCI test log-likelihood over 5 splits up
    0.02-0.18 nats on five of seven datasets, level on Boston and wine;
    docs/minibatch.md section 10). A flow (``transport``: its budget bounds the
    displacement of its map) keeps 1: its returned guide averages network weights,
    which stands for the average of its distributions only while each update moves them
    little (a subsampled regression, N/B = 20: means 0.10-0.14 sds off with 1, 0.13-0.18
    with 5, 0.48 with N/B; docs/guides.md, "Mini-batch scores"). A guide whose local
    latents are amortized (``amortized``, :func:`amortizes_locals`: an encoder) keeps 1
    too: the KL is measured on the batch's members, but the update moves every member's
    distribution, about ``N/B`` times that KL over the data set, so 1 holds it to the
    exact-score budget of the whole plate. With ``N/B`` (20) an MLP encoder that had
    converged on the factor-analysis target moved the members by up to 1 nat each per
    update (the median over the data set) and ran away (15 posterior sds after 3,000
    updates at Adam(1e-2); docs/guides.md, "Amortized guides against an exact posterior").
    """
    if batch_ratio <= 1 or transport or amortized:
        return 1.0
    return min(SPLIT_TRUST_REGION_SCALE, batch_ratio) if diagonal else batch_ratio


TRANSPORT_FISHER_WEIGHT = 0.1
"""A flow guide's weight on the Fisher term (:func:`path_elbo_weight`'s objective)."""
TRANSPORT_PATH_WEIGHT = 3.0
"""A flow guide's weight on its linearized path ELBO far from the posterior."""


def path_elbo_weight(fisher_t: Any, latent_dim: int) -> Any:
    """The weight of the linearized path ELBO in a flow guide's proximal objective.

    A flow guide's update minimizes ``w * f * F(q) + prox_weight * Disp(q_t, q) + c *
    E_lin(q)``: the weighted Fisher divergence (``w``: :func:`transport_fisher_weight`,
    ``f``: :func:`fisher_fade`), the displacement of the flow's map (its proximal term and
    trust-region measure), and the ``-ELBO`` linearized at ``q_t`` along the map, ``-mean_s
    (g_s - s_t(x_s))' (T(z_s) - x_s)`` from the update's own particles ``x_s = T_t(z_s)`` and
    scores (no extra score call). Far from the posterior the Fisher term alone let flows
    drift (one NumPyro seed in three diverged); the ELBO term is faded out by ``c =
    TRANSPORT_PATH_WEIGHT * r / (1 + r)`` as the whitened Fisher term per dimension ``r =
    F_t / D`` falls below 1, near the posterior where the Fisher term is exact. The
    constants are the best of a grid on a logistic regression and a correlated Gaussian
    (docs/guides.md, "Flows with exact scores"). Works on floats, JAX arrays and torch
    tensors.
    """
    ratio = fisher_t / latent_dim
    return TRANSPORT_PATH_WEIGHT * ratio / (1 + ratio)


def inner_objective_scale(prox_weight: float) -> float:
    """What the optimizer's inner steps multiply the guide's proximal objective by:
    ``1 / (2 + prox_weight)``, which puts the objective on the ``-ELBO``'s scale.

    Near ``q_t`` a Gaussian guide's objective ``F + prox_weight * KL`` has curvature
    ``(2 + prox_weight) / sigma^2`` in its location (the Fisher term's ``2 / sigma^2``
    under the covariance weighting, the KL's ``1 / sigma^2``) and ``8 + 2 prox_weight``
    in its log-scale, where the ``-ELBO`` at the posterior has ``1 / sigma^2`` and 2. So
    a step size that is stable for ``SVI`` is stable for the inner steps: without the
    scale, plain SGD at a rate ``SVI`` fits with diverged (docs/defaults.md, "The
    user's optimizer"). Adam, RMSProp and Adagrad normalize their steps and see only
    their ``eps`` move. The minimizer, the reported loss and the Fisher divergence are
    unchanged; a model param's gradient (the ``-ELBO``'s already) is not scaled.
    """
    return 1.0 / (2.0 + prox_weight)


def fisher_fade(fisher_t: Any, latent_dim: int) -> Any:
    """What a flow guide's Fisher term is weighted by besides
    :func:`transport_fisher_weight`: ``1 / (1 + r)``, ``r = F_t / D`` (the whitened Fisher
    term per dimension at ``q_t``), so that it fades in as the path ELBO's weight
    (:func:`path_elbo_weight`) fades out.

    Far from the posterior the Fisher term held Pyro's AutoIAFNormal (ReLU units, orders
    drawn at random) in place once its inner steps stopped at the trust region's budget:
    a logistic regression with exact scores (Adam(1e-2), seed 0) sat 20-62 posterior sds
    off with sds 7-20x through 1,500 updates, five full steps per update not moving it;
    faded, it reached the means in 200 updates, as without the term, and near the
    posterior (``r`` of 0.05-1 there) the term keeps 50-95% of its weight (docs/guides.md,
    "Flows with exact scores against SVI", "Inner steps stopped at the budget, ...").
    Works on floats, JAX arrays and torch tensors.
    """
    return 1 / (1 + fisher_t / latent_dim)


def transport_fisher_weight(batch_ratio: float) -> float:
    """A flow guide's weight on the Fisher term: :data:`TRANSPORT_FISHER_WEIGHT` with exact
    scores, 0 when the model subsamples a plate (``batch_ratio > 1``).

    With mini-batch scores the Fisher term was not needed and in Pyro it was what failed
    (docs/guides.md, "Mini-batch scores without the Fisher term"): on a logistic
    regression (B = 300 of 3,000, Adam(1e-2), 3,000 updates of one inner step, the
    averaged iterate) Pyro's AutoIAFNormal diverged on three of six seeds with the weight
    0.1 (final mean errors 17-83 posterior sds) and ended within 0.1 sd on all six
    without it, while NumPyro's ended within 0.04-0.26 sd on all six seeds either way.
    The update is then the proximal path ``-ELBO`` step: the map's displacement and the
    ``-ELBO`` linearized at ``q_t`` (:func:`path_elbo_weight`), with no second
    derivatives of the flow.
    """
    return TRANSPORT_FISHER_WEIGHT if batch_ratio <= 1 else 0.0


def stops_at_trust_region(transport: bool, bounded: bool = True) -> bool:
    """Whether an update's inner steps stop at the first iterate whose KL (a flow's
    displacement) from ``q_t`` exceeds the trust region's budget: a flow guide's
    (``transport``) when the updates have a trust region (``bounded``; without one there
    is no budget to stop at).

    The trust region takes a fraction of the fitted step along a line in the
    parameters, so the steps past the budget only bend that line: a flow's linearized
    ``-ELBO`` is unbounded below, and five steps of Adam(1e-2) on a subsampled logistic
    regression (B = 300 of 3,000) carried the map to displacements of 2-1,500 against a
    budget of 0.06, whose halved steps drove the guide's sds up about 1.6% per update
    until it diverged (NumPyro seed 3: 429 posterior sds after 3,000 updates; near-exact
    scores, B = 2,999, did not). Stopped there, the fits took 1.3-1.7 steps per update at
    Adam(1e-2) and 3.4-4.8 at Adam(1e-3), and all 27 benchmark fits (NumPyro's and Pyro's
    AutoIAFNormal, Pyro's affine coupling; both rates) ended in the band, 0.02-0.19 sd
    off, where one step left Pyro's AutoIAFNormal 0.66-0.95 sd off at Adam(1e-3)
    (docs/guides.md, "Mini-batch scores: inner steps stopped at the budget"). With exact
    scores (five steps, the averaged iterate and :func:`fisher_fade`) flows reached the band
    in no more score calls than SVI with the same guide on 32 of the 33 fits of
    benchmarks/flow_fits.py where SVI reaches it (on the first 19, twenty unstopped steps:
    17), in 5-20x less time per fit; with separated modes, which neither fits, the mixture
    study's final KL was worse on 9 of 12 seeds (docs/guides.md, "Flows with exact scores
    against SVI", "Inner steps stopped at the budget, ...").
    """
    return transport and bounded


class TransportPath(NamedTuple):
    """What a flow guide's linearized path ``-ELBO`` (:func:`path_elbo_weight`) reads from
    an update's particles, and how its terms are weighted: JAX arrays in ``numpyro_psvi``,
    torch tensors in ``pyro_psvi`` (``transport_path`` of each backend's ``objective``
    module builds it).

    Attributes
    ----------
    base
        ``(S, D)`` base draws ``z_s = T_t^{-1}(x_s)`` of the particles.
    residuals
        ``(S, D)`` ``g_s - s_t(x_s)``: the model's scores minus ``q_t``'s.
    weight
        The term's weight, :func:`path_elbo_weight` of the Fisher term at ``q_t``.
    fisher_scale
        The Fisher term's factor, :func:`fisher_fade` of the Fisher term at ``q_t``.
    """

    base: Any
    residuals: Any
    weight: Any
    fisher_scale: Any


MAX_TRUST_REGION_GROWTH = 2.0**30
"""A bound that keeps the budget finite in float32; the undo of :func:`grow_trust_region`
is what guards the fit (at 2^10 a Pyro fit of earnings still crawled: docs/posteriordb.md)."""
LOWRANK_DIAG_FLOOR = 1e-3
"""The low-rank closed-form step's floor on each coordinate's own variance ``Psi_ii``, as
a fraction of its variance ``C_ii`` in the new guide: the projection drops the whitened
step's negative components (where it shrinks the covariance), which can take
``diag(C - Lam Lam')`` past zero, and where the factors explain nearly all of a
coordinate (a Heywood case of factor analysis) ``Psi_ii`` would shrink at every update
while that row of ``F = s^{-1} Lam`` grew without bound (centered eight schools: past
1e9 after 670 updates, then not finite). Relative to ``C_ii`` it bounds ``|F_i|^2`` by
``1 / LOWRANK_DIAG_FLOOR``, as R's ``factanal`` bounds uniquenesses (at 0.005)."""
LOWRANK_AXIS_STEP = 0.5
"""The bound on the low-rank step's per-axis precision change (``lowrank_axis_precision``
in both backends): ``e_i`` in ``[-0.5, 1]``, a factor 2 at most in an axis's variance per
update (0.5 and 0.9 measured level in docs/lowrank_study.md)."""
SMALLEST_STEP_FRACTION = 2.0**-120
"""The closed-form step's smallest fraction (float32's smallest normal number is 2^-126):
a start far in the tails (likelihood curvature ~1e17 times the guide's precision) needs
fractions far below 2^-40 to fit the KL budget, and was rejected at every update there."""


class TrustRegionGrowth(NamedTuple):
    """The closed-form step's trust region, grown while its steps pay off
    (:func:`grow_trust_region`), and the iterate to return to when one did not: JAX
    arrays in ``numpyro_psvi``, torch tensors in ``pyro_psvi``.

    Attributes
    ----------
    scale
        The multiple of the default KL budget the last step had (1: the default).
    last_cut
        Whether the trust region cut the last step short (bool).
    last_loss, last_error
        The ``-ELBO`` estimate of the iterate the last step started from, and its
        standard error.
    loc, guide_scale
        The guide the last step started from: its loc and its sds (a diagonal Gaussian),
        Cholesky factor (a full covariance) or ``(cov_factor, scale)`` pair (low rank).
    """

    scale: Any
    last_cut: Any
    last_loss: Any
    last_error: Any
    loc: Any
    guide_scale: Any

    def advanced(
        self,
        taken: Any,
        scale: Any,
        cut: Any,
        loss: Any,
        error: Any,
        loc: Any,
        guide_scale: Any,
        where: Callable,
    ) -> TrustRegionGrowth:
        """The state after an update: where ``taken`` (its step kept), that step's budget
        multiplier ``scale``, whether the trust region ``cut`` it, the ``-ELBO`` estimate
        ``loss`` and its ``error`` and the guide the step started from (``loc``,
        ``guide_scale``); elsewhere the default budget, no cut, and this state's estimates
        and guide. ``where`` is ``jnp.where`` or ``torch.where``."""

        def pick(new: Any, old: Any) -> Any:
            if isinstance(new, tuple):  # a low-rank guide's (cov_factor, scale)
                return tuple(where(taken, a, b) for a, b in zip(new, old, strict=True))
            return where(taken, new, old)

        return TrustRegionGrowth(
            where(taken, scale, 1.0),
            taken & cut,
            where(taken, loss, self.last_loss),
            where(taken, error, self.last_error),
            where(taken, loc, self.loc),
            pick(guide_scale, self.guide_scale),
        )


def grow_trust_region(
    scale: Any, last_cut: Any, last_loss: Any, last_error: Any, loss: Any, error: Any, finite: Any = True
) -> tuple[Any, Any]:
    """The closed-form step's KL budget multiplier for this update, and whether to undo
    the last step instead (JAX arrays or torch tensors, no host sync).

    With exact scores the closed-form step of a full-covariance Gaussian guide is cut to
    ``KL(q_t || q_new) <= trust_region * D``; a fit that starts many of its sds from the
    posterior (data far from unit scale: the guide's sds shrink to the likelihood's
    curvature there) then moves a fraction of an sd per update. A classical trust region
    grows instead while its steps pay off. The ``-ELBO`` estimates of the iterate the
    last step started from (``last_loss``) and of the current one (``loss``, from this
    update's particles), with their standard errors, say whether the step paid off: the
    budget doubles (up to ``MAX_TRUST_REGION_GROWTH`` times the default) when the last
    step was cut and the estimate fell by more than twice the error of the difference;
    it returns to the default when it rose by more, or is not finite, or this update's
    scores or Fisher term are not finite (``finite`` false: the estimate can then stay
    finite with an error as large as itself, and the test above would not see the rise),
    and the last step is then undone if its budget had grown; otherwise it stays.
    Without the undo a grown budget diverged on one PosteriorDB posterior of five (arK);
    a rule without the errors undid good steps on noise (docs/posteriordb.md, "A trust
    region that grows").

    Parameters
    ----------
    scale : array
        The multiplier the last step had (1 at the start).
    last_cut : array
        Whether the trust region cut the last step (bool).
    last_loss, last_error, loss, error : array
        The ``-ELBO`` estimates and their standard errors (``inf`` and 0 at the start).
    finite : array or bool
        Whether this update's scores and Fisher term are finite.

    Returns
    -------
    (array, array)
        This step's multiplier, and whether to undo the last step (bool).
    """
    margin = 2 * (error**2 + last_error**2) ** 0.5
    lower = loss < last_loss - margin
    higher = ~((loss <= last_loss + margin) & finite)  # NaN included
    grown = scale * (1 + lower * last_cut)
    grown = grown - higher * (grown - 1)
    capped = grown - (grown > MAX_TRUST_REGION_GROWTH) * (grown - MAX_TRUST_REGION_GROWTH)
    return capped, (scale > 1) & higher


class DiagonalStepPath(NamedTuple):
    """The closed-form proximal step of a diagonal Gaussian guide as a function of the
    fraction ``f`` taken (:func:`diagonal_step_path`), JAX arrays or torch tensors.

    Attributes
    ----------
    step : callable
        ``step(f) -> (ratio, delta)``: the precision ratio ``p / p_t`` and the location's
        move ``loc - loc_t`` of the fraction ``f``, per coordinate.
    kl : callable
        ``kl(f) -> ()``: ``KL(q_t || q_f)``, ``inf`` where it is not finite.
    """

    step: Callable[[Any], tuple[Any, Any]]
    kl: Callable[[Any], Any]


def diagonal_step_path(
    xp: Any,
    scale_t: Any,
    stats: Any,
    curvature: Any,
    prox_weight: float,
    weighting: str,
    weights: Any = None,
) -> DiagonalStepPath:
    """The split proximal objective of a diagonal Gaussian guide (the backends'
    ``split_diagonal_objective``) solved in closed form, coordinate by coordinate, for
    both backends' ``diagonal_proximal_step`` (``xp``: ``jax.numpy`` or ``torch``;
    ``stats`` and ``curvature``: the backend's ``FisherStatistics`` and
    ``CurvatureStatistics``).

    With ``rho = p / p_t`` the precision's ratio, ``c`` the coordinate's weight
    (``sigma_t^2`` or 1, times ``weights``) and ``A = c spread / (S sigma_t^2)``, the
    precision minimizes ``A (rho - tau)^2 + prox_weight (rho - 1 - log rho) / 2``: the
    positive root of ``2 A rho^2 + (prox_weight / 2 - 2 A tau) rho - prox_weight / 2``.
    The location then minimizes ``c ((delta - v_bar) p - g_bar)^2 + prox_weight p
    delta^2 / 2``: ``delta = 2 c (p v_bar + g_bar) / (2 c p + prox_weight)``. These are
    the fixed points the ``K`` optimizer steps of the other solver approach. The
    fraction ``f`` of the step has ``rho_f = 1 + f (rho - 1)`` and ``f`` times the
    location exact for ``rho_f``, as the full-covariance step's path. ``O(D)`` per
    evaluation.
    """
    variance_t = scale_t**2
    informative = (curvature.spread > 0) & (curvature.cross > 0)
    slope = curvature.cross / xp.where(informative, curvature.spread, 1.0)
    target = xp.where(informative, slope * variance_t, 1.0)
    weight = variance_t if weighting == "covariance" else xp.ones_like(variance_t)
    if weights is not None:
        weight = weight * weights
    fitted = weight * curvature.spread / (stats.count * variance_t)  # A
    linear = prox_weight / 2 - 2 * fitted * target
    root = xp.sqrt(linear**2 + 4 * fitted * prox_weight)
    # The positive root without cancellation: prox_weight / (linear + root) when linear > 0.
    ratio = xp.where(
        linear > 0,
        prox_weight / xp.where(linear > 0, linear + root, 1.0),
        (root - linear) / xp.where(fitted > 0, 4 * fitted, 1.0),
    )
    ratio = xp.where(fitted > 0, ratio, 1.0)
    offset_mean, score_mean = stats.offset / stats.count, stats.score / stats.count

    def step(f: Any) -> tuple[Any, Any]:
        ratio_f = 1 + f * (ratio - 1)
        precision = ratio_f / variance_t
        denominator = 2 * weight * precision + prox_weight
        safe = xp.where(denominator > 0, denominator, 1.0)
        return ratio_f, f * 2 * weight * (precision * offset_mean + score_mean) / safe

    def kl(f: Any) -> Any:
        ratio_f, delta = step(f)
        value = 0.5 * (ratio_f - 1 - xp.log(ratio_f) + ratio_f * delta**2 / variance_t).sum()
        return xp.where(xp.isfinite(value), value, xp.inf)

    return DiagonalStepPath(step, kl)


LOCAL_CURVATURE_VISITS = 8
"""Visits (updates whose batch holds the member) over which a local latent's curvature
statistics are averaged, whatever ``curvature_memory``: more than one, because with the
orthogonal particle design one update's spread of a local is a ``chi^2_1`` (with one visit
the locals' sds grew too slowly at Adam(1e-3)), and few, because a local's curvature
follows the globals, which move while it is out of the batch (docs/minibatch.md section
18: 2 to 16 visits measured at ``N/B = 10``, 32 worse)."""

LOCAL_CURVATURE_SPAN = 100
"""Updates that a local latent's averaged visits may span, about: at ``N/B = 100``,
visits spanning 400 or 800 updates lagged the globals (a GLMM's scale 4.5-7.7 sds off
against 2.8 with one or two visits; docs/minibatch.md section 18)."""


def local_curvature_visits(batch_ratio: float) -> int:
    """How many of its last visits a local latent's curvature averages:
    :data:`LOCAL_CURVATURE_VISITS`, fewer where ``batch_ratio`` (``N/B``, one visit in that
    many updates) would make them span more than :data:`LOCAL_CURVATURE_SPAN` updates, and
    at least one."""
    return int(min(LOCAL_CURVATURE_VISITS, max(1, LOCAL_CURVATURE_SPAN // batch_ratio)))


def curvature_fold_rates(
    xp: Any, seen: Any, updates: Any, memory: int, local_coordinates: Any, local_visits: int
) -> Any:
    """Per coordinate, the share of the way from its running curvature average to this
    update's statistics (``xp``: ``jax.numpy`` or ``torch``): 0 where not ``seen``; else
    ``1 / updates`` (``updates`` counts this one) up to ``memory`` updates and ``1 /
    memory`` after, a plain then an exponential mean; a coordinate of
    ``local_coordinates`` (or ``None``: none) counts its visits against ``local_visits``
    (:func:`local_curvature_visits`) instead."""
    plain = 1.0 / xp.clip(updates, min=1.0)
    rate = xp.clip(plain, min=1.0 / memory)
    if local_coordinates is not None:
        rate = xp.where(local_coordinates, xp.clip(plain, min=1.0 / local_visits), rate)
    return seen * rate


def discounted_updates(xp: Any, updates: Any, loc_t: Any, scale_t: Any, loc: Any, scale: Any) -> Any:
    """The curvature average's effective update counts after a step from ``N(loc_t,
    scale_t^2)`` to ``N(loc, scale^2)`` (diagonal; ``xp``: ``jax.numpy`` or ``torch``): each
    coordinate's count times ``exp(-KL)`` of the step along it. Statistics gathered where
    the guide was far from it (in KL) then weigh little: a closed-form step can travel
    many sds in an update (a far start), where the curvature of the start would otherwise
    linger for ``curvature_memory`` updates (docs/gaussian_study.md, "Diagonal guides")."""
    ratio = (scale_t / scale) ** 2
    kl = 0.5 * (ratio - 1 - xp.log(ratio) + (loc - loc_t) ** 2 / scale**2)
    return updates * xp.exp(-kl)


# The exact solve of a guide with linear scores (the backends' linear_score_solve):
# Newton's iterations at most (Pyro on a CPU, and NumPyro's while_loop, stop once no
# coordinate moves), the step fractions of its line search, and the proximal weights a
# trust region tries (the update's times 2^k).
LINEAR_SOLVE_ITERATIONS = 50
LINEAR_SOLVE_FRACTIONS = tuple(2.0**-k for k in range(20))
LINEAR_SOLVE_WEIGHTS = tuple(2.0**k for k in range(31))


def linear_solve_tolerance(eps: float) -> float:
    """The exact solve's stop, relative to the natural parameters' size: Newton's
    iterations end once the whole step, or the step the line search takes, moves no
    coordinate by more than this, ``max(1e-9, 100 eps)`` for a dtype's ``eps``. Below ``100
    eps`` a step is round-off (float32: the KL's gradient, a difference of digammas of
    size ~7 at args ~1e3, is exact to ~1e-6 of itself), so a float32 solve stopped by
    ``1e-9`` alone ran to :data:`LINEAR_SOLVE_ITERATIONS` on round-off at most updates
    (NumPyro's coin and Poisson rates, docs/guides.md "The exact solve's step cost");
    quadratic convergence leaves an error of about the square of the last step."""
    return max(1e-9, 100.0 * eps)


def linear_solve_value(xp: Any, sums: tuple, fisher: Any, weight: Any, point: tuple, kl: Any) -> Any:
    """The exact solve's objective ``fisher * sum_s (e . phi_s - g_s)^2 + weight * KL``
    at ``point = (e_1, e_2)`` (less a constant), from the particle sums of
    :func:`linear_newton_step` and ``kl``, ``KL(q_t || q)`` there up to a constant; ``inf``
    where it is NaN (outside the family's domain)."""
    s_11, s_12, s_22, s_1g, s_2g = sums
    x_1, x_2 = point
    quadratic = x_1 * (x_1 * s_11 + 2 * x_2 * s_12 - 2 * s_1g) + x_2 * (x_2 * s_22 - 2 * s_2g)
    total = fisher * quadratic + weight * kl
    return xp.where(xp.isnan(total), xp.inf, total)


def linear_newton_step(
    xp: Any,
    sums: tuple,
    fisher: Any,
    weight: Any,
    point: tuple,
    grad_t: tuple,
    derivatives: tuple,
    free: tuple,
) -> tuple[Any, Any, Any]:
    """One Newton direction of the exact solve of a guide with linear scores (both
    backends' ``linear_score_solve``; ``xp``: ``torch`` or ``jax.numpy``): per coordinate,
    the 2 x 2 system of ``fisher * sum_s (e . phi_s - g_s)^2 + weight * KL(q_t || q)`` at
    ``point = (e_1, e_2)``, from the particle sums ``(phi_1^2, phi_1 phi_2, phi_2^2, phi_1 g,
    phi_2 g)``, the log-partition's ``derivatives`` there and its gradient ``grad_t`` at
    ``q_t``; an arg that is not ``free`` (a constant of the guide) held (its row and column
    the identity's). Returns the step and its slope ``grad . step`` (negative where the
    Hessian is positive definite)."""
    s_11, s_12, s_22, s_1g, s_2g = sums
    (e_1, e_2), (free_1, free_2) = point, free
    g_1, g_2, h_11, h_12, h_22 = (weight * part for part in derivatives)
    grad_1 = 2 * fisher * (e_1 * s_11 + e_2 * s_12 - s_1g) + g_1 - weight * grad_t[0]
    grad_2 = 2 * fisher * (e_1 * s_12 + e_2 * s_22 - s_2g) + g_2 - weight * grad_t[1]
    grad_1, grad_2 = xp.where(free_1, grad_1, 0), xp.where(free_2, grad_2, 0)
    h_11 = xp.where(free_1, 2 * fisher * s_11 + h_11, 1)
    h_22 = xp.where(free_2, 2 * fisher * s_22 + h_22, 1)
    h_12 = xp.where(free_1 & free_2, 2 * fisher * s_12 + h_12, 0)
    det = h_11 * h_22 - h_12**2
    step_1, step_2 = -(h_22 * grad_1 - h_12 * grad_2) / det, -(h_11 * grad_2 - h_12 * grad_1) / det
    return step_1, step_2, grad_1 * step_1 + grad_2 * step_2


def splits_full_covariance(batch_ratio: float, num_particles: int) -> bool:
    """Whether a full-covariance Gaussian guide's proximal objective is the split one
    (the precision fitted to the residuals' spread over the ``num_particles``
    particles, the location with it held; one particle has no spread to fit).

    With a subsampled plate (``batch_ratio = N/B > 1``): in the coupled objective the
    precision absorbs the mini-batch's common score shift that the proximal term keeps
    from the location, and a subsampled regression's AutoMultivariateNormal fit ends with
    sds 0.80-0.96 of the exact ones (KL 0.16-0.18) where the split one ends at 0.99-1.00
    (KL 0.002-0.003; docs/minibatch.md section 11). With exact scores there is no common
    shift, and the Gaussian study's targets came out mixed (D = 10 and 50: calls to
    KL < 0.01 level or fewer, final KL at D = 50 higher), so they keep the coupled one.
    """
    return batch_ratio > 1 and num_particles > 1


def resolve_regime(
    gaussian: bool,
    batch_ratio: float,
    inner_steps: int | None,
    average_iterates: bool | None,
    curvature_memory: int | None,
    prox_weight: float | None,
    closed_form: bool = False,
    low_rank_step: bool = False,
    transport: bool = False,
    bounded: bool = True,
    low_rank: bool = False,
    linear_solve: bool = False,
    particles_per_dim: float = 0.0,
) -> RegimeDefaults:
    """The engine's settings: the user's ``inner_steps``, ``average_iterates``,
    ``curvature_memory`` and ``prox_weight`` (a constant weight: no growth, the same while
    the fit progresses), and
    :func:`regime_defaults` for those left ``None``."""
    defaults = regime_defaults(
        gaussian, batch_ratio, closed_form, low_rank_step, transport, bounded, low_rank, linear_solve,
        particles_per_dim,
    )  # fmt: skip
    return RegimeDefaults(
        inner_steps=defaults.inner_steps if inner_steps is None else int(inner_steps),
        average_iterates=defaults.average_iterates if average_iterates is None else bool(average_iterates),
        curvature_memory=defaults.curvature_memory if curvature_memory is None else int(curvature_memory),
        prox_weight=defaults.prox_weight if prox_weight is None else float(prox_weight),
        prox_weight_growth=defaults.prox_weight_growth if prox_weight is None else 0.0,
        progress_prox_weight=defaults.progress_prox_weight if prox_weight is None else None,
    )


LOCAL_LATENT_MEMORY_ADVICE = (
    "The model has local latents in a subsampled plate and the particles are drawn "
    "independently (orthogonal_particles=False, or num_particles not a multiple of the "
    "orthogonal design's group size: 4 for up to three blocks of coordinates, then 8, 16, ...). "
    "A global coupled to those locals (a GLMM's mean or scale, crossed random effects) then ends "
    "with its sd 22-33% short of the posterior's at the default curvature_memory of 1: leave "
    "orthogonal_particles on with num_particles a multiple of its group size, or pass "
    "loss=ProximalScoreMatching(curvature_memory=100) (sds within 5%); pass curvature_memory=1 "
    "to keep this without the warning (docs/minibatch.md sections 16-17)."
)


def local_latent_memory_advice(
    diagonal: bool, batch_ratio: float, local_latents: bool, requested_memory: int | None, orthogonal: bool
) -> str | None:
    """:data:`LOCAL_LATENT_MEMORY_ADVICE` for a diagonal Gaussian guide with local latents in
    a subsampled plate whose particles are drawn independently (not ``orthogonal``,
    :mod:`psvi.designs`) and whose curvature memory the user left to the default; else
    ``None``."""
    if diagonal and batch_ratio > 1 and local_latents and requested_memory is None and not orthogonal:
        return LOCAL_LATENT_MEMORY_ADVICE
    return None


INNER_SOLVERS = ("closed_form", "optimizer")


def check_inner_solver(requested: str | None) -> str | None:
    """``requested``, after checking it is one of :data:`INNER_SOLVERS` or ``None``."""
    if requested not in (None, *INNER_SOLVERS):
        raise ValueError(f"inner_solver must be one of {INNER_SOLVERS} or None, got {requested!r}.")
    return requested


def resolve_antithetic(requested: bool | None, available: bool) -> bool:
    """Whether an engine draws its particles in antithetic pairs (``guides.antithetic``):
    the user's ``antithetic_particles``, off by default; ``available``: the guide's
    density has a Gaussian mean. Raise naming the fix when requested where unavailable."""
    if requested and not available:
        raise ValueError(
            "antithetic_particles=True reflects half the particles about a Gaussian guide's "
            "mean: it needs AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal, "
            "AutoLowRankMultivariateNormal or a mean-field Normal user guide (without local "
            "latents in a subsampled plate). Leave it unset for this guide."
        )
    return bool(requested)


def resolve_inner_solver(
    requested: str | None,
    *,
    gaussian_step: bool,
    full_covariance: bool,
    batch_ratio: float,
    weighting: str,
    num_particles: int,
    inner_steps: int | None,
    has_model_params: bool,
    data_parallel: bool,
    linear_step: bool = False,
) -> str:
    """How each update's proximal problem is solved: ``"closed_form"`` (the backend's
    ``gaussian_proximal_step`` for a full-covariance Gaussian guide, the split objective
    solved in ``q_t``'s whitened coordinates, one ``O(D^3)`` per update;
    ``lowrank_proximal_step`` for a low-rank-plus-diagonal one, the same solution
    projected back onto the family, ``O(D (R + S)^2)``; ``diagonal_proximal_step`` for a
    diagonal one, coordinate by coordinate, ``O(D)``; the backend's
    ``linear_score_solve`` for a guide with linear scores, ``linear_step``: a mean-field
    user guide of Beta, Gamma, InverseGamma, LogNormal or Normal sites whose args are its
    params, solved exactly coordinate by coordinate, each update where its args are read
    one to one from the params, else the optimizer's steps) or ``"optimizer"``
    (``inner_steps`` steps of the user's optimizer).

    It applies to an autoguide Gaussian (``gaussian_step``: AutoNormal,
    AutoDiagonalNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal) with
    exact scores, no model params and one device; a covariance fitted from the
    particles' spread (``full_covariance``: full or low rank) also needs the covariance
    weighting and two or more particles. ``None`` takes it for those where it applies
    and the user set no ``inner_steps``; a diagonal guide takes it on request: scale-free where Adam's
    steps crawl (a start far from unit scale), better on well-conditioned targets, but
    noisier than the damped optimizer steps on rotated ill-conditioned ones (five seeds,
    docs/gaussian_study.md, "Diagonal guides"). With a subsampled plate the optimizer
    path keeps its measured mini-batch settings (docs/minibatch.md); the closed form
    there is not measured. A guide with linear scores takes it where the user set no
    ``inner_steps``: with exact scores (docs/minibatch.md, "An exact inner solve": in place
    after 50-500 updates on the conjugate targets from a far start, where twenty Adam
    steps an update left sds 1.04-8.5x too wide) and with a subsampled plate at the weight
    ``max(10, t)`` (:data:`LINEAR_SOLVE_PROX_WEIGHT_GROWTH`; "A weight that grows with the
    updates": sd ratios 0.95-1.04 after 3,000 updates at any learning rate, where twenty
    Adam(1e-2) steps gave 0.91-0.99 and twenty Adam(1e-3) steps 1.8-2.2; 0.92-1.01 after
    1,000, Adam(1e-2)'s 1.06-1.20). A
    ``"closed_form"`` request where it does not apply is a ``ValueError`` that names the
    reason.
    """
    if check_inner_solver(requested) == "optimizer":
        return "optimizer"
    reasons = [
        (
            not (gaussian_step or linear_step),
            "the guide is not an autoguide Gaussian with closed-form scores "
            "(AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal) "
            "nor a mean-field guide with linear scores (Beta, Gamma, InverseGamma, LogNormal, Normal "
            "sites whose args are its params)",
        ),
        (
            batch_ratio > 1 and not linear_step,
            "the model subsamples a plate (the closed form needs exact scores)",
        ),
        (full_covariance and weighting != "covariance", f'the weighting is {weighting!r}, not "covariance"'),
        (full_covariance and num_particles < 2, "one particle has no spread to fit the covariance to"),
        (has_model_params, "the model has numpyro.param / pyro.param sites"),
        (data_parallel, "the update is data-parallel"),
    ]
    failed = [reason for applies, reason in reasons if applies]
    if requested == "closed_form" and failed:
        raise ValueError(
            f"inner_solver='closed_form' does not apply here: {'; '.join(failed)}. "
            "Pass inner_solver='optimizer' (or leave it None)."
        )
    if failed or (requested is None and (inner_steps is not None or not (full_covariance or linear_step))):
        return "optimizer"
    return "closed_form"


def resolve_objective(
    loss: object, prox_weight: float | None, weighting: str | None
) -> ProximalScoreMatching:
    """The engine's objective from its ``loss`` argument and the ``prox_weight`` /
    ``weighting`` shorthands (which may not be combined with a ``loss`` record)."""
    if loss is None:
        loss = ProximalScoreMatching()
        if prox_weight is not None:
            loss = loss._replace(prox_weight=prox_weight)
        if weighting is not None:
            loss = loss._replace(weighting=weighting)
    elif not isinstance(loss, ProximalScoreMatching):
        # An ELBO object's particle settings are the engine's own keywords: name them.
        settings = ", ".join(
            f"{name}={getattr(loss, name)!r}"
            for name in ("num_particles", "vectorize_particles")
            if getattr(loss, name, None) not in (None, 1, False)
        )
        keywords = f" and pass {settings} to ProximalScoreVI" if settings else ""
        enumeration = (
            " The model's discrete sites marked for parallel enumeration are summed out of its "
            "scores as TraceEnum_ELBO sums them."
            if "Enum" in type(loss).__name__
            else ""
        )
        raise TypeError(
            f"ProximalScoreVI minimizes the proximal score-matching objective, not "
            f"{type(loss).__name__}: drop the loss argument{keywords}, or pass "
            f"psvi.ProximalScoreMatching(prox_weight=..., weighting=...).{enumeration}"
        )
    elif prox_weight is not None or weighting is not None:
        raise ValueError(
            "Pass prox_weight and weighting inside the loss record "
            "(ProximalScoreMatching(prox_weight=..., weighting=...)) or as keywords, not both."
        )
    return loss.checked()
