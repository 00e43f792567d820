"""NumPyro checkpoints and faults mid-run: safe format, mismatches refused, the last
completed state attached to an exception, periodic checkpoints, bad data refused."""

from __future__ import annotations

import pickle
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as ndist
import pytest
from numpyro.infer import init_to_value
from numpyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoMultivariateNormal, AutoNormal
from psvi_testing.checkpoints import Payload
from psvi_testing.checkpoints import damage as damage_file
from psvi_testing.regression import regression_data

import numpyro_psvi
from numpyro_psvi.contrib.models import linear_regression
from numpyro_psvi.engine import _TypedKey
from psvi import checkpoint


def _data():
    return tuple(map(jnp.asarray, regression_data()))


def _model(x, y):
    linear_regression(x, y, subsample_size=20)


def _engine(guide_class=AutoNormal, optim=None, model=_model):
    return numpyro_psvi.ProximalScoreVI(model, guide_class(model), optim or numpyro.optim.Adam(1e-2))


def _saved(tmp_path, num_steps=5):
    x, y = _data()
    svi = _engine()
    result = svi.run(jax.random.PRNGKey(0), num_steps, x, y, progress_bar=False)
    svi.save(tmp_path / "ckpt", result.state)
    return tmp_path / "ckpt", result


def _assert_same_state(a, b):
    for left, right in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jnp.issubdtype(left.dtype, jax.dtypes.prng_key):
            left, right = jax.random.key_data(left), jax.random.key_data(right)
        np.testing.assert_array_equal(left, right)


def test_a_crafted_checkpoint_does_not_run_its_payload(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "ckpt"
    path.write_bytes(pickle.dumps(Payload(str(marker))))  # what load_state used to unpickle
    with pytest.raises(checkpoint.LegacyCheckpointError, match="refuses.*allow_pickle=True"):
        _engine(model=_never_run).load(path, *_data())
    assert not marker.exists()


def test_a_trusted_legacy_state_converts_with_allow_pickle(tmp_path):
    """The format psvi wrote before: a pickled state with keys as _TypedKey."""
    x, y = _data()
    svi = _engine()
    result = svi.run(jax.random.PRNGKey(0), 5, x, y, progress_bar=False)

    def to_host(leaf):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return _TypedKey(np.asarray(jax.random.key_data(leaf)), str(jax.random.key_impl(leaf)))
        return np.asarray(leaf)

    (tmp_path / "old.pkl").write_bytes(pickle.dumps(jax.tree.map(to_host, result.state)))
    state = _engine().load(tmp_path / "old.pkl", x, y, allow_pickle=True)
    _assert_same_state(state, result.state)
    svi.save(tmp_path / "new", state)
    _assert_same_state(_engine().load(tmp_path / "new", x, y), result.state)


def test_a_state_saved_without_reshuffling_continues_with_a_fresh_epoch(tmp_path):
    """As a checkpoint written before reshuffling existed: its other leaves load as saved."""
    x, y = _data()
    plain = numpyro_psvi.ProximalScoreVI(
        _model, AutoNormal(_model), numpyro.optim.Adam(1e-2), reshuffle=False
    )
    result = plain.run(jax.random.PRNGKey(0), 5, x, y, progress_bar=False)
    plain.save(tmp_path / "ckpt", result.state)
    svi = _engine()
    state = svi.load(tmp_path / "ckpt", x, y)
    _assert_same_state(state._replace(epoch_order=None), result.state)
    assert int(state.epoch_order.positions["data"]) == 0
    svi.run(None, 2, x, y, init_state=state, progress_bar=False)


@pytest.mark.parametrize("damage", ["flip_byte", "truncate"])
def test_a_damaged_checkpoint_is_named_as_such(tmp_path, damage):
    path, _ = _saved(tmp_path)
    damage_file(path, damage)
    with pytest.raises(checkpoint.CheckpointError, match=f"not a valid psvi checkpoint: {path}"):
        _engine(model=_never_run).load(path, *_data())


def _never_run(x, y):
    raise AssertionError("the model ran")


def test_checkpoint_of_another_guide_engine_optimizer_or_model_is_refused(tmp_path):
    """Another class is refused before the model runs; another model after set-up."""
    path, _ = _saved(tmp_path)
    x, y = _data()
    fits = "does not fit this engine: its"
    with pytest.raises(
        checkpoint.CheckpointMismatch,
        match=f"{fits} guide classes.*AutoNormal saved, AutoMultivariateNormal here",
    ):
        _engine(AutoMultivariateNormal, model=_never_run).load(path, x, y)
    with pytest.raises(
        checkpoint.CheckpointMismatch, match=f"{fits} engine classes.*ProximalScoreVI saved, GSM here"
    ):
        numpyro_psvi.GSM(_never_run, AutoMultivariateNormal(_never_run)).load(path, x, y)
    with pytest.raises(
        checkpoint.CheckpointMismatch, match=f"{fits} optimizer classes.*Adam saved, SGD here"
    ):
        _engine(optim=numpyro.optim.SGD(1e-2), model=_never_run).load(path, x, y)
    with pytest.raises(
        checkpoint.CheckpointMismatch, match=rf"{fits} latent sites.*'w': \[3\] saved, \[2\] here"
    ):
        _engine().load(path, x[:, :2], y)


def test_run_attaches_the_last_completed_state_to_an_exception_and_resumes_from_it(tmp_path, monkeypatch):
    x, y = _data()
    whole = _engine().run(jax.random.PRNGKey(1), 12, x, y, progress_bar=False)
    svi = _engine()
    saves = []

    def interrupted_save(path, state):
        saves.append(state)
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(svi, "save", interrupted_save)
    for progress_bar in (False, True):
        saves.clear()
        with pytest.raises(KeyboardInterrupt) as caught:
            svi.run(jax.random.PRNGKey(1), 12, x, y, progress_bar=progress_bar, checkpoint_every=4,
                    checkpoint_path=tmp_path / "ckpt")  # fmt: skip
        last = caught.value.last_state
        assert int(last.num_score_calls) == 8 * svi.num_particles
        assert "error.last_state" in str(caught.value.__notes__)
        rest = svi.run(None, 4, x, y, progress_bar=False, init_state=last)
        _assert_same_state(rest.state, whole.state)


def test_run_writes_periodic_checkpoints_and_one_at_the_end(tmp_path):
    x, y = _data()
    svi = _engine()
    result = svi.run(jax.random.PRNGKey(1), 10, x, y, progress_bar=False, checkpoint_every=4,
                     checkpoint_path=tmp_path / "c")  # fmt: skip
    _assert_same_state(svi.load(tmp_path / "c", x, y), result.state)
    with pytest.raises(ValueError, match="together"):
        svi.run(None, 2, x, y, init_state=result.state, checkpoint_path=tmp_path / "c")


@pytest.mark.parametrize("engine", ["GSM", "BaM"])
@pytest.mark.parametrize("progress_bar", [True, False])
def test_baselines_run_takes_progress_bar_and_checkpoints(tmp_path, engine, progress_bar):
    def model():
        numpyro.sample("x", ndist.MultivariateNormal(jnp.zeros(2), jnp.eye(2)))

    svi = getattr(numpyro_psvi, engine)(model, AutoMultivariateNormal(model))
    result = svi.run(jax.random.PRNGKey(0), 6, progress_bar=progress_bar, checkpoint_every=3,
                     checkpoint_path=tmp_path / "c")  # fmt: skip
    _assert_same_state(svi.load(tmp_path / "c"), result.state)


def test_half_precision_data_is_refused():
    x, y = _data()
    with pytest.raises(TypeError, match="positional argument 0 is float16.*float32"):
        _engine().init(jax.random.PRNGKey(0), x.astype(jnp.float16), y.astype(jnp.float16))


def test_a_nonfinite_row_is_refused_whichever_rows_the_first_batch_draws():
    x, y = _data()
    y = y.at[7].set(jnp.nan)
    for seed in range(3):
        with pytest.raises(ValueError, match=r"positional argument 1 .* rows \[7\]"):
            _engine().init(jax.random.PRNGKey(seed), x, y)


def test_bundled_models_refuse_x_and_y_of_different_lengths():
    x, y = _data()
    with pytest.raises(ValueError, match="x has 60 rows and y has 57"):
        _engine().init(jax.random.PRNGKey(0), x, y[:-3])


def test_a_run_rejecting_most_updates_raises_with_advice_on_hard_constraints():
    def model():
        x = numpyro.sample("x", ndist.Normal(0.0, 1.0))
        numpyro.factor("band", jnp.where(jnp.abs(x - 0.5) < 0.05, 0.0, -jnp.inf))

    # Particles of the initial guide N(0.5, 0.1^2) fall in the band with probability 0.38,
    # all four of an update with 0.02: nearly every update is rejected.
    guide = AutoNormal(model, init_loc_fn=init_to_value(values={"x": 0.5}), init_scale=0.1)
    svi = numpyro_psvi.ProximalScoreVI(model, guide, numpyro.optim.Adam(1e-2),
                                       max_consecutive_rejections=None)  # fmt: skip
    with pytest.raises(
        RuntimeError, match=r"of this run's 30 updates.*-inf factor.*constrained distribution"
    ):
        svi.run(jax.random.PRNGKey(0), 30, progress_bar=False)


def _assert_same_fit(state, other) -> None:
    """The two states' optimizer states and running averages are equal."""
    for part in ("optim_state", "averages"):
        pairs = zip(jax.tree.leaves(getattr(state, part)), jax.tree.leaves(getattr(other, part)), strict=True)
        for a, b in pairs:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "guide_cls",
    # The low-rank case slow (suite time): the default run keeps AutoMultivariateNormal's.
    [
        AutoMultivariateNormal,
        pytest.param(partial(AutoLowRankMultivariateNormal, rank=2), marks=pytest.mark.slow),
    ],
)
def test_the_closed_form_steps_grown_trust_region_resumes_exactly(tmp_path, guide_cls):
    """The growth of the closed-form step's KL budget is part of the state (for a low-rank
    guide with the ``(cov_factor, scale)`` pair it would return to): a run saved while the
    budget has grown continues exactly as the uninterrupted one."""
    from numpyro_psvi.contrib.models import gaussian_target

    model = gaussian_target(np.array([100.0, -50.0, 30.0]), np.diag([0.01, 0.04, 0.0025]))
    init = init_to_value(values={"x": jnp.zeros(3)})
    guide = guide_cls(model, init_loc_fn=init, init_scale=1.0)
    # Averaged iterates: the average and the window of its -ELBO estimates are state too.
    svi = numpyro_psvi.ProximalScoreVI(
        model, guide, numpyro.optim.Adam(1e-2), num_particles=4, average_iterates=True
    )
    update = jax.jit(svi.update)
    state = svi.init(jax.random.PRNGKey(0))
    for _ in range(100):  # until the budget has grown (from update 30 or so)
        state, _ = update(state)
        if float(state.averages.trust.scale) > 1:
            break
    assert float(state.averages.trust.scale) > 1  # the state saved holds a grown budget
    svi.save(tmp_path / "ckpt", state)
    whole = state
    for _ in range(5):
        whole, _ = update(whole)
    resumed = svi.load(tmp_path / "ckpt")
    for _ in range(5):
        resumed, _ = update(resumed)
    _assert_same_fit(whole, resumed)


def test_a_checkpoint_without_iterate_averaging_is_refused_by_an_engine_with_it(tmp_path):
    """A run saved with the last iterate loads into an engine built as it was and is
    refused, naming the setting, by one that averages its iterates."""
    from numpyro_psvi.contrib.models import gaussian_target

    model = gaussian_target(np.array([1.0, -2.0]), np.diag([0.5, 2.0]))

    def engine(**options):
        guide = AutoMultivariateNormal(model)
        return numpyro_psvi.ProximalScoreVI(model, guide, numpyro.optim.Adam(1e-2), **options)

    last_iterate = engine(average_iterates=False)
    state, _ = last_iterate.update(last_iterate.init(jax.random.PRNGKey(0)))
    last_iterate.save(tmp_path / "ckpt", state)
    _assert_same_fit(state, engine(average_iterates=False).load(tmp_path / "ckpt"))
    match = "iterate averaging settings differ [(]False saved, True here[)].*saved run's average_iterates"
    with pytest.raises(checkpoint.CheckpointMismatch, match=match):
        engine(average_iterates=True).load(tmp_path / "ckpt")


def test_a_checkpoint_saved_before_the_growths_guide_scale_was_renamed_loads(tmp_path):
    """The growth's guide scale was ``.averages.trust.scale_tril`` until the diagonal
    guides' closed-form step shared it: such a checkpoint loads to the same state."""
    from numpyro_psvi.contrib.models import gaussian_target
    from psvi import checkpoint

    model = gaussian_target(np.array([1.0, -2.0]), np.diag([0.5, 2.0]))
    svi = numpyro_psvi.ProximalScoreVI(model, AutoMultivariateNormal(model), numpyro.optim.Adam(1e-2))
    state = svi.init(jax.random.PRNGKey(0))
    state, _ = svi.update(state)
    svi.save(tmp_path / "ckpt", state)
    header, arrays = checkpoint.read(tmp_path / "ckpt")

    def old(key):
        return key.replace(".averages.trust.guide_scale", ".averages.trust.scale_tril")

    assert any(key != old(key) for key in header["state"])
    header["state"] = {old(key): spec for key, spec in header["state"].items()}
    header["leaves"] = [(old(key), *rest) for key, *rest in header["leaves"]]
    checkpoint.write(tmp_path / "old", header, arrays)
    loaded = svi.load(tmp_path / "old")
    for a, b in zip(jax.tree.leaves(state.averages), jax.tree.leaves(loaded.averages), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_checkpoint_of_another_inner_objective_scale_loads_with_a_warning(tmp_path):
    """A run saved before the inner steps scaled their objective (the header has no
    ``inner_objective_scale``) loads to the same state and warns that its optimizer's
    moments are 12x those of the gradients to come; one saved now loads silently."""
    path, result = _saved(tmp_path)
    x, y = _data()
    header, arrays = checkpoint.read(path)
    assert header.pop("inner_objective_scale") == pytest.approx(1 / 12)
    checkpoint.write(tmp_path / "old", header, arrays)
    with pytest.warns(RuntimeWarning, match="scaled by 1; this engine scales it by 0.08333.* 12x"):
        loaded = _engine().load(tmp_path / "old", x, y)
    _assert_same_state(result.state, loaded)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _engine().load(path, x, y)
