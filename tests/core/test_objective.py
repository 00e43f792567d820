"""The objective record and the guide-family record (backend-free)."""

import pytest

from psvi import ProximalScoreMatching
from psvi.families import GuideFamily, refused
from psvi.objective import (
    CLOSED_FORM_PROGRESS_MIN_PARTICLES_PER_DIM,
    CLOSED_FORM_PROGRESS_PROX_WEIGHT,
    TRANSPORT_FISHER_WEIGHT,
    TRANSPORT_PATH_WEIGHT,
    amortizes_locals,
    fisher_fade,
    local_curvature_visits,
    path_elbo_weight,
    regime_defaults,
    resolve_objective,
    resolve_regime,
    splits_full_covariance,
    stops_at_trust_region,
    transport_fisher_weight,
    trust_region_scale,
)
from psvi.schedules import SETTLED_AFTER, growing_prox_weight, progress_prox_weight


def test_defaults_and_shorthands():
    assert resolve_objective(None, None, None) == ProximalScoreMatching(None, "covariance", 256)  # by regime
    assert resolve_objective(None, 3, "identity") == ProximalScoreMatching(3.0, "identity", 256)
    record = ProximalScoreMatching(prox_weight=1.0, num_kl_draws=64)
    assert resolve_objective(record, None, None) == record


@pytest.mark.parametrize(
    ("loss", "prox_weight", "weighting", "error", "match"),
    [
        (None, -1.0, None, ValueError, "prox_weight"),
        (None, None, "euclidean", ValueError, "weighting must be one of"),
        (ProximalScoreMatching(num_kl_draws=0), None, None, ValueError, "num_kl_draws"),
        (ProximalScoreMatching(curvature_memory=0), None, None, ValueError, "curvature_memory"),
        (ProximalScoreMatching(), 1.0, None, ValueError, "not both"),
        ("Trace_ELBO()", None, None, TypeError, "not str: drop the loss argument"),
    ],
)
def test_bad_objectives_name_the_problem(loss, prox_weight, weighting, error, match):
    with pytest.raises(error, match=match):
        resolve_objective(loss, prox_weight, weighting)


def test_a_refused_family_says_why():
    with pytest.raises(TypeError, match="ProximalScoreVI cannot fit AutoDelta: it is a point mass."):
        refused("AutoDelta", "it is a point mass.").check_supported()
    GuideFamily("AutoNormal", setup=None).check_supported()  # no refusal: nothing raised


def test_mini_batch_defaults_apply_to_gaussian_guides_with_a_subsampled_plate_only():
    assert regime_defaults(gaussian=True, batch_ratio=20.0) == (5, True, 1, 10.0, 0.0, None)
    for gaussian, ratio in ((True, 1.0), (False, 1.0)):
        assert regime_defaults(gaussian, ratio) == (20, False, 100, 10.0, 0.0, None)
    # Other guides with a subsampled plate: the generic objective's (test_minibatch_families.py).
    assert regime_defaults(False, 20.0) == (20, True, 100, 100.0, 0.0, None)
    # The exact solve of a guide with linear scores: the weight max(10, t) at update t with
    # a subsampled plate (docs/minibatch.md), 10 with exact scores; a weight the user sets
    # stays constant.
    assert regime_defaults(False, 20.0, linear_solve=True) == (20, True, 100, 10.0, 1.0, None)
    assert regime_defaults(False, 1.0, linear_solve=True) == (20, False, 100, 10.0, 0.0, None)
    user_weight = resolve_regime(False, 20.0, None, None, None, 50.0, linear_solve=True)
    assert user_weight == (20, True, 100, 50.0, 0.0, None)
    assert [growing_prox_weight(10.0, 1.0, t) for t in (0, 9, 10, 11, 500)] == [10.0, 10.0, 10.0, 11.0, 500.0]
    assert growing_prox_weight(10.0, 0.0, 500) == 10.0


def test_a_flow_steps_to_its_budget_and_averages_its_iterates():
    for ratio in (20.0, 1.0):  # mini-batch and exact scores
        assert regime_defaults(False, ratio, transport=True) == (5, True, 100, 10.0, 0.0, None)
    # Without a trust region its steps cannot stop at the budget: one step with mini-batch
    # scores, twenty unaveraged with exact scores, as before the stop.
    assert regime_defaults(False, 20.0, transport=True, bounded=False) == (1, True, 100, 10.0, 0.0, None)
    assert regime_defaults(False, 1.0, transport=True, bounded=False) == (20, False, 100, 10.0, 0.0, None)
    assert resolve_regime(False, 20.0, 2, None, None, None, transport=True) == (2, True, 100, 10.0, 0.0, None)
    # Its inner steps stop once past the trust region's budget; no other guide's do.
    assert stops_at_trust_region(True)
    assert not stops_at_trust_region(False) and not stops_at_trust_region(True, bounded=False)
    # Its Fisher term goes with mini-batch scores (the proximal path -ELBO step remains).
    assert transport_fisher_weight(20.0) == 0.0
    assert transport_fisher_weight(1.0) == TRANSPORT_FISHER_WEIGHT > 0


def test_a_flows_fisher_term_fades_in_as_its_path_elbo_fades_out():
    # r = F_t / D: the Fisher term keeps 1 / (1 + r) of its weight, the path -ELBO term
    # takes 3 r / (1 + r), so the two factors sum to one in units of their largest weights.
    for fisher_t, dim, fade in ((0.0, 3, 1.0), (3.0, 3, 0.5), (3e5, 3, 1 / (1 + 1e5))):
        assert fisher_fade(fisher_t, dim) == pytest.approx(fade, rel=1e-12)
        assert fisher_fade(fisher_t, dim) + path_elbo_weight(fisher_t, dim) / TRANSPORT_PATH_WEIGHT == (
            pytest.approx(1.0, rel=1e-12)
        )


def test_the_closed_form_step_of_a_full_covariance_averages_its_iterates_at_weight_3():
    # The weight 3 once settled, 0.5 while the fit progresses where S >= D / 4 (S = 4 at
    # D = 10 in the Gaussian study), 3 throughout with fewer particles (S = 62 at D = 500).
    defaults = (20, True, 100, 3.0, 0.0, CLOSED_FORM_PROGRESS_PROX_WEIGHT)
    assert (
        regime_defaults(gaussian=True, batch_ratio=1.0, closed_form=True, particles_per_dim=0.4) == defaults
    )
    few = regime_defaults(gaussian=True, batch_ratio=1.0, closed_form=True, particles_per_dim=62 / 500)
    assert few == (20, True, 100, 3.0, 0.0, None)
    assert CLOSED_FORM_PROGRESS_PROX_WEIGHT == 0.5 and CLOSED_FORM_PROGRESS_MIN_PARTICLES_PER_DIM == 0.25
    # What the user sets is kept (a weight the user sets holds throughout); the rest comes
    # from the regime.
    user_settings = resolve_regime(
        True, 1.0, None, False, None, 10.0, closed_form=True, particles_per_dim=1.0
    )
    assert user_settings == (20, False, 100, 10.0, 0.0, None)
    assert (
        resolve_regime(True, 1.0, None, None, None, None, closed_form=True, particles_per_dim=1.0) == defaults
    )
    user_weight = resolve_regime(True, 1.0, None, None, None, 3.0, closed_form=True, particles_per_dim=1.0)
    assert user_weight == (20, True, 100, 3.0, 0.0, None)
    # The weight while the average has restarted in the last SETTLED_AFTER updates.
    weights = [progress_prox_weight(n, 3.0, 0.5) for n in (0, SETTLED_AFTER, SETTLED_AFTER + 1, 100)]
    assert weights == [0.5, 0.5, 3.0, 3.0]
    assert resolve_regime(True, 1.0, None, None, None, None) == (20, False, 100, 10.0, 0.0, None)


def test_the_trust_region_scale_by_regime():
    """Exact scores: 1; a subsampled plate: 5 for a diagonal Gaussian guide, never more
    than ``N/B``, 1 for a flow, and ``N/B`` for other guides."""
    assert trust_region_scale(diagonal=True, batch_ratio=1.0) == 1.0
    assert trust_region_scale(diagonal=True, batch_ratio=20.0) == 5.0
    assert trust_region_scale(diagonal=True, batch_ratio=4.0) == 4.0
    assert trust_region_scale(diagonal=False, batch_ratio=20.0) == 20.0
    assert trust_region_scale(diagonal=False, batch_ratio=1.0) == 1.0
    assert trust_region_scale(diagonal=False, batch_ratio=20.0, transport=True) == 1.0
    assert trust_region_scale(diagonal=False, batch_ratio=20.0, amortized=True) == 1.0


def test_amortized_locals_are_those_without_a_per_member_param():
    """An encoder's weights have no axis of the plate's full size (2,000); AutoNormal's
    locs, or a guide's own ``loc[idx]``, have one; no local latents, nothing amortized."""
    encoder = [(10, 32), (32,), (32, 6), (6,)]
    assert amortizes_locals(encoder, [2000])
    assert not amortizes_locals([*encoder, (2000, 3)], [2000])
    assert not amortizes_locals([(3, 2000)], [2000, 50])
    assert not amortizes_locals(encoder, [])


def test_the_full_covariance_split_by_regime():
    """The split objective for full-covariance guides with a subsampled plate and more than
    one particle (one particle has no spread); the coupled one otherwise."""
    assert splits_full_covariance(batch_ratio=20.0, num_particles=4)
    assert not splits_full_covariance(batch_ratio=1.0, num_particles=4)
    assert not splits_full_covariance(batch_ratio=20.0, num_particles=1)


def _grow(scale, last_cut, last_loss, last_error, loss, error, finite=True):
    """``grow_trust_region`` on 0-dim NumPy arrays (its arithmetic is that of JAX and torch)."""
    import numpy as np

    from psvi.objective import grow_trust_region

    args = (scale, last_cut, last_loss, last_error, loss, error, finite)
    new_scale, undo = grow_trust_region(*(np.asarray(a) for a in args))
    return float(new_scale), bool(undo)


def test_trust_region_grows_only_after_a_cut_step_that_clearly_paid_off():
    # The margin is twice the difference's standard error: 2 * sqrt(3^2 + 4^2) = 10.
    assert _grow(4.0, True, 100.0, 3.0, 89.0, 4.0) == (8.0, False)  # fell by 11 > 10, cut: doubles
    assert _grow(4.0, False, 100.0, 3.0, 89.0, 4.0) == (4.0, False)  # not cut: stays
    assert _grow(4.0, True, 100.0, 3.0, 91.0, 4.0) == (4.0, False)  # fell within the noise: stays
    assert _grow(4.0, True, 100.0, 3.0, 109.0, 4.0) == (4.0, False)  # rose within the noise: stays


def test_trust_region_resets_and_undoes_a_grown_step_that_clearly_did_not_pay_off():
    assert _grow(4.0, True, 100.0, 3.0, 111.0, 4.0) == (1.0, True)  # rose by 11 > 10
    assert _grow(4.0, True, 100.0, 3.0, float("nan"), 4.0) == (1.0, True)  # not finite
    assert _grow(4.0, True, 100.0, 3.0, float("inf"), 4.0) == (1.0, True)
    # Non-finite scores or Fisher term: a rise, whatever the estimate and its error say.
    assert _grow(4.0, True, 100.0, 3.0, 1e29, 1e29, finite=False) == (1.0, True)
    assert _grow(4.0, True, 100.0, 3.0, 1e29, 1e29) == (4.0, False)  # the rule's test alone
    # The default budget's step is never undone (it is what the engine took before).
    assert _grow(1.0, True, 100.0, 3.0, 111.0, 4.0) == (1.0, False)


def test_trust_region_growth_starts_at_the_default_and_is_capped():
    from psvi.objective import MAX_TRUST_REGION_GROWTH

    assert _grow(1.0, False, float("inf"), 0.0, 5.0, 1.0) == (1.0, False)  # the first update
    assert _grow(MAX_TRUST_REGION_GROWTH, True, 100.0, 0.0, 0.0, 0.0) == (MAX_TRUST_REGION_GROWTH, False)


def test_a_local_latents_curvature_averages_at_most_eight_visits_spanning_about_100_updates():
    # One visit in N/B updates: 8 visits while they span <= 100 updates, fewer beyond, and
    # always at least the last one (the whole batch each update: no local latents to count).
    ratios = (1.0, 4.0, 10.0, 12.5, 14.2, 34.0, 60.0, 100.0, 1e4)
    assert [local_curvature_visits(ratio) for ratio in ratios] == [8, 8, 8, 8, 7, 2, 1, 1, 1]
