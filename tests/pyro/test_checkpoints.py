"""Pyro checkpoints and faults mid-run: safe format, mismatches refused, interrupts
leave the last completed step, periodic checkpoints, bad data refused."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
import warnings
from functools import partial

import numpy as np
import pyro
import pyro.distributions as pdist
import pytest
import torch
from psvi_testing.checkpoints import Payload
from psvi_testing.checkpoints import damage as damage_file
from psvi_testing.regression import regression_data
from pyro.infer.autoguide import (
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
    init_to_value,
)

import pyro_psvi
from psvi import checkpoint
from pyro_psvi.contrib.models import linear_regression

pytestmark = pytest.mark.usefixtures("fresh_pyro")


def _data():
    return tuple(map(torch.as_tensor, regression_data()))


def _model(x, y):
    linear_regression(x, y, subsample_size=20)


def _engine(guide_class=AutoNormal, optim=None, model=_model, **options):
    optim = optim or pyro.optim.Adam({"lr": 1e-2})
    return pyro_psvi.ProximalScoreVI(model, guide_class(model), optim, **options)


def _store() -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in pyro.get_param_store().items()}


def _saved_fit(tmp_path, num_steps=5, **options):
    x, y = _data()
    svi = _engine(**options)
    for _ in range(num_steps):
        svi.step(x, y)
    svi.save(tmp_path / "ckpt")
    pyro.clear_param_store()
    return tmp_path / "ckpt"


# ------------------------------------------------------------------- the format
def test_a_crafted_checkpoint_does_not_run_its_payload(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "ckpt"
    torch.save({"param_store": Payload(str(marker))}, path)  # what load used to unpickle
    with pytest.raises(checkpoint.LegacyCheckpointError, match="refuses.*allow_pickle=True"):
        _engine().load(path)
    path.write_bytes(pickle.dumps(Payload(str(marker))))
    with pytest.raises(checkpoint.LegacyCheckpointError, match="a pickle file"):
        _engine().load(path)
    assert not marker.exists()


def test_a_trusted_legacy_checkpoint_converts_with_allow_pickle(tmp_path):
    """The format psvi wrote before (torch.save of the param store and counters)."""
    x, y = _data()
    svi = _engine()
    for _ in range(3):
        svi.step(x, y)
    store = pyro.get_param_store()
    legacy = {
        "param_store": store.get_state(), "optim": svi.optim.get_state(),
        "rng": pyro.util.get_rng_state(), "num_score_calls": svi.num_score_calls,
        "num_rejected": 0, "consecutive_rejected": 0, "extra": svi._checkpoint_extra(),
    }  # fmt: skip
    torch.save(legacy, tmp_path / "old.pt")
    svi.step(x, y)
    expected = _store()  # the legacy run continued by one step
    pyro.clear_param_store()
    converted = _engine()
    converted.load(tmp_path / "old.pt", allow_pickle=True)
    converted.step(x, y)  # sets up, restores, steps: the same step
    for name, value in _store().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)
    converted.save(tmp_path / "new")
    pyro.clear_param_store()
    again = _engine()
    again.load(tmp_path / "new")
    again.step(x, y)
    assert again.num_score_calls == 5 * again.num_particles


@pytest.mark.parametrize("damage", ["flip_byte", "truncate"])
def test_a_damaged_checkpoint_is_named_as_such(tmp_path, damage):
    path = _saved_fit(tmp_path)
    damage_file(path, damage)
    with pytest.raises(checkpoint.CheckpointError, match=f"not a valid psvi checkpoint: {path}"):
        _engine().load(path)


# ------------------------------------------------------------------- mix-ups
def test_checkpoint_of_another_guide_engine_or_optimizer_is_refused(tmp_path):
    path = _saved_fit(tmp_path)
    with pytest.raises(
        checkpoint.CheckpointMismatch,
        match="guide classes differ.*AutoNormal saved, AutoMultivariateNormal here",
    ):
        _engine(AutoMultivariateNormal).load(path)
    with pytest.raises(
        checkpoint.CheckpointMismatch, match="engine classes differ.*ProximalScoreVI saved, GSM here"
    ):
        pyro_psvi.GSM(_model, AutoMultivariateNormal(_model)).load(path)
    with pytest.raises(
        checkpoint.CheckpointMismatch, match="optimizer classes differ.*Adam saved, ClippedAdam here"
    ):
        _engine(optim=pyro.optim.ClippedAdam({"lr": 1e-2})).load(path)


def test_a_checkpoint_whose_running_averages_do_not_fit_the_engine_is_refused(tmp_path):
    # Saved with the last iterate; the subsampled regression's default averages iterates.
    path = _saved_fit(tmp_path, average_iterates=False)
    engine = _engine()
    engine.load(path)
    # The same error type as NumPyro's (a ValueError too), raised at the first step here.
    match = "without iterate averaging; this engine fits it with"
    with pytest.raises(checkpoint.CheckpointMismatch, match=match):
        engine.step(*_data())


def test_checkpoint_of_another_model_is_refused_at_the_first_step_before_any_change(tmp_path):
    path = _saved_fit(tmp_path)
    x, y = _data()

    def other_model(x, y):  # another site name
        v = pyro.sample("v", pdist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
        with pyro.plate("data", x.shape[0], subsample_size=20) as idx:
            pyro.sample("y", pdist.Normal((x[idx] * v).sum(-1), 1.0), obs=y[idx])

    svi = _engine(model=other_model)
    svi.load(path)
    with pytest.raises(
        checkpoint.CheckpointMismatch,
        match=r"latent sites differ \('v': absent saved, \[3\] here; 'w': \[3\] saved",
    ):
        svi.step(x, y)
    assert svi.num_score_calls == 0


def test_resume_after_steps_and_map_location_continue_the_saved_run(tmp_path):
    x, y = _data()
    svi = _engine()
    for _ in range(10):
        svi.step(x, y)
    whole = _store()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    svi = _engine()
    for _ in range(5):
        svi.step(x, y)
    svi.save(tmp_path / "ckpt")
    svi.step(x, y)  # moves on; load puts it back
    svi.load(tmp_path / "ckpt", map_location="cpu")
    for _ in range(5):
        svi.step(x, y)
    for name, value in _store().items():
        torch.testing.assert_close(value, whole[name], rtol=0, atol=0)
        assert value.device.type == "cpu"


def test_a_checkpoint_saved_without_reshuffling_continues_with_a_fresh_epoch(tmp_path):
    """As a checkpoint written before reshuffling existed: params load as saved."""
    path = _saved_fit(tmp_path, reshuffle=False)
    pyro.set_rng_seed(1)
    svi = _engine()
    svi.load(path)
    x, y = _data()
    svi.step(x, y)
    assert svi.epoch_order.positions["data"] == 20


def test_cuda_rng_state_is_saved_and_restored_when_cuda_is_in_use(tmp_path, monkeypatch):
    """On a CPU machine, CUDA is simulated at torch.cuda's public functions."""
    state = [torch.arange(16, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: state)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    path = _saved_fit(tmp_path)
    svi = _engine()
    svi.load(path)
    svi.step(*_data())
    assert len(restored) == 1
    torch.testing.assert_close(restored[0], state[0])


def test_a_second_guide_with_the_same_param_names_warns(recwarn):
    x, y = _data()
    first = _engine()
    first.step(x, y)
    second = _engine()
    with pytest.warns(UserWarning, match="already in Pyro's param store.*scope"):
        second.step(x, y)


def test_the_same_guide_after_svi_does_not_warn():
    x, y = _data()
    guide = AutoNormal(_model)
    pyro.infer.SVI(_model, guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO()).step(x, y)
    svi = pyro_psvi.ProximalScoreVI(_model, guide, pyro.optim.Adam({"lr": 1e-2}))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*param store.*")
        svi.step(x, y)


# ------------------------------------------------------------------- interrupts
def _interrupt_third_inner_step(patch: pytest.MonkeyPatch) -> None:
    calls = []

    def interrupting(original):
        def interrupted(self, grads):
            calls.append(1)
            if len(calls) == 3:  # the third of the K inner steps' optimizer steps
                raise KeyboardInterrupt
            return original(self, grads)

        return interrupted

    # Per param (a first step) or on the flat tensor (FlatGuideGradient's steps).
    for method in ("step", "step_flat"):
        patch.setattr(
            pyro_psvi._compat.FlatAdamSteps,
            method,
            interrupting(getattr(pyro_psvi._compat.FlatAdamSteps, method)),
        )


def _interrupt_write_back(patch: pytest.MonkeyPatch) -> None:
    # After the params' copy: the store holds the step's values.
    def interrupted(self, moments=True):
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.views["param"])
        raise KeyboardInterrupt

    patch.setattr(pyro_psvi._compat._FlatAdamGroup, "write_back", interrupted)


def _interrupt_moments(patch: pytest.MonkeyPatch) -> None:
    # The update's last act, the Adam states given the step's moments (a deferred write):
    # interrupted inside it after its first moment, then after all of them.
    replace = pyro_psvi._compat._FlatAdamGroup.replace_moments

    def interrupted(self, keep, replaced):
        class FirstThenInterrupt(list):
            def append(self, item):
                replaced.append(item)
                raise KeyboardInterrupt

        replace(self, keep, FirstThenInterrupt())

    patch.setattr(pyro_psvi._compat._FlatAdamGroup, "replace_moments", interrupted)


def _interrupt_after_moments(patch: pytest.MonkeyPatch) -> None:
    replace = pyro_psvi._compat._FlatAdamGroup.replace_moments

    def interrupted(self, keep, replaced):
        replace(self, keep, replaced)
        raise KeyboardInterrupt

    patch.setattr(pyro_psvi._compat._FlatAdamGroup, "replace_moments", interrupted)


@pytest.mark.parametrize(
    "interrupt",
    [_interrupt_third_inner_step, _interrupt_write_back, _interrupt_moments, _interrupt_after_moments],
)
@pytest.mark.parametrize("average_iterates", [True, False])
def test_an_interrupt_inside_a_step_leaves_the_last_completed_step(tmp_path, average_iterates, interrupt):
    x, y = _data()
    optim = pyro.optim.Adam({"lr": 1e-2})
    svi = _engine(optim=optim, average_iterates=average_iterates)
    for _ in range(5):
        svi.step(x, y)
    store, counters = _store(), svi._counters()
    averages, iterate = svi.averages, svi._iterate
    moments = {
        name: {k: v.clone() for k, v in state["state"][0].items()}
        for name, state in optim.get_state().items()
    }
    with pytest.MonkeyPatch.context() as patch:
        interrupt(patch)
        with pytest.raises(KeyboardInterrupt):
            svi.step(x, y)
    for name, value in _store().items():
        torch.testing.assert_close(value, store[name], rtol=0, atol=0)
    for name, state in optim.get_state().items():
        for key, value in state["state"][0].items():
            torch.testing.assert_close(value, moments[name][key], rtol=0, atol=0)
    assert svi._counters() == counters
    assert svi.averages is averages and svi._iterate is iterate
    svi.save(tmp_path / "ckpt")  # what it writes is the completed state
    assert np.isfinite(svi.step(x, y))


def test_run_writes_periodic_checkpoints_and_one_at_the_end(tmp_path, monkeypatch):
    x, y = _data()
    svi = _engine()
    written = []
    save = svi.save
    monkeypatch.setattr(svi, "save", lambda path: (written.append(svi.num_score_calls), save(path)))
    svi.run(10, x, y, progress_bar=True, checkpoint_every=4, checkpoint_path=tmp_path / "ckpt")
    assert written == [4 * svi.num_particles, 8 * svi.num_particles, 10 * svi.num_particles]
    pyro.clear_param_store()
    resumed = _engine()
    resumed.load(tmp_path / "ckpt")
    resumed.step(x, y)
    assert resumed.num_score_calls == 11 * resumed.num_particles
    with pytest.raises(ValueError, match="together"):
        svi.run(2, x, y, checkpoint_every=4)


# ------------------------------------------------------------------- bad input
def test_half_precision_data_is_refused():
    x, y = _data()
    with pytest.raises(TypeError, match="positional argument 0 is torch.float16.*float32"):
        _engine().step(x.half(), y.half())


def test_a_nonfinite_row_is_refused_whichever_rows_the_first_batch_draws():
    x, y = _data()
    y = y.clone()
    y[7] = float("nan")
    for seed in range(3):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        with pytest.raises(ValueError, match=r"positional argument 1 .* rows \[7\]"):
            _engine().step(x, y)


def test_bundled_models_refuse_x_and_y_of_different_lengths():
    x, y = _data()
    with pytest.raises(ValueError, match="x has 60 rows and y has 57"):
        _engine().step(x, y[:-3])


def test_a_run_rejecting_most_steps_raises_with_advice_on_hard_constraints():
    def model():
        x = pyro.sample("x", pdist.Normal(0.0, 1.0))
        pyro.factor("band", torch.where((x - 0.5).abs() < 0.05, 0.0, -float("inf")))

    # Particles of the initial guide N(0.5, 0.1^2) fall in the band with probability 0.38,
    # all four of a step with 0.02: nearly every step is rejected.
    guide = AutoNormal(model, init_loc_fn=init_to_value(values={"x": torch.tensor(0.5)}), init_scale=0.1)

    svi = pyro_psvi.ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 1e-2}),
                                    max_consecutive_rejections=None)  # fmt: skip
    with pytest.raises(
        RuntimeError, match=r"of this run's 30 updates.*-inf factor.*constrained distribution"
    ):
        svi.run(30)


def test_a_save_that_fails_midway_keeps_the_last_checkpoint(tmp_path):
    """The second save hits the file-size limit (as on a full disk), in a subprocess."""
    path = tmp_path / "ckpt"
    script = textwrap.dedent(f"""
        import resource, signal
        import pyro, pyro.distributions as dist, torch
        from pyro.infer.autoguide import AutoNormal
        import pyro_psvi

        def model():
            pyro.sample("w", dist.Normal(torch.zeros(50), 1.0).to_event(1))

        svi = pyro_psvi.ProximalScoreVI(model, AutoNormal(model), pyro.optim.Adam({{"lr": 1e-2}}))
        svi.step()
        svi.save({str(path)!r})
        svi.step()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit raises EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
        try:
            svi.save({str(path)!r})
        except OSError as error:
            print("failed:", error)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "failed:" in result.stdout

    def model():
        pyro.sample("w", pdist.Normal(torch.zeros(50), 1.0).to_event(1))

    svi = pyro_psvi.ProximalScoreVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 1e-2}))
    svi.load(path)
    svi.step()
    assert svi.num_score_calls == 2 * svi.num_particles  # the first save's step, then this one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize(
    "guide_cls", [AutoMultivariateNormal, partial(AutoLowRankMultivariateNormal, rank=2)]
)
def test_the_closed_form_steps_grown_trust_region_resumes_exactly(tmp_path, guide_cls):
    """The growth of the closed-form step's KL budget is saved (for a low-rank guide with
    the ``(cov_factor, scale)`` pair it would return to): a run saved while the budget has
    grown continues exactly as the uninterrupted one."""
    from pyro_psvi.contrib.models import gaussian_target

    model = gaussian_target(np.array([100.0, -50.0, 30.0]), np.diag([0.01, 0.04, 0.0025]))

    def engine():
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = guide_cls(model, init_loc_fn=init_to_value(values={"x": torch.zeros(3)}))
        optim = pyro.optim.Adam({"lr": 1e-2})  # averaged: the window of -ELBO estimates is saved too
        return pyro_psvi.ProximalScoreVI(model, guide, optim, num_particles=4, average_iterates=True)

    svi = engine()
    for _ in range(30):
        svi.step()
    assert float(svi.averages.trust.scale) > 1  # the checkpoint holds a grown budget
    svi.save(tmp_path / "ckpt")
    for _ in range(5):
        svi.step()
    whole = _store()
    whole_window = svi.averages.window  # the -ELBO estimates of the averaged iterates
    svi = engine()
    svi.load(tmp_path / "ckpt")
    for _ in range(5):
        svi.step()
    for name, value in _store().items():
        torch.testing.assert_close(value, whole[name], rtol=0, atol=0)
    torch.testing.assert_close(tuple(svi.averages.window), tuple(whole_window), rtol=0, atol=0)


def test_a_checkpoint_of_another_inner_objective_scale_loads_with_a_warning(tmp_path):
    # Saved before the inner steps scaled their objective (no inner_objective_scale among
    # the engine's extras): restored, with a warning at the first step (where Pyro checks
    # and restores a checkpoint loaded before it) that the optimizer's moments are 12x
    # those of the gradients to come; one saved now is silent.
    path = _saved_fit(tmp_path)
    header, arrays = checkpoint.read(path)
    extra = dict(header["state"]["dict"])["extra"]["dict"]
    kept = [item for item in extra if item[0] != "inner_objective_scale"]
    assert len(kept) == len(extra) - 1
    extra[:] = kept
    checkpoint.write(tmp_path / "old", header, arrays)
    engine = _engine()
    engine.load(tmp_path / "old")
    with pytest.warns(RuntimeWarning, match="scaled by 1; this engine scales it by 0.08333.* 12x"):
        engine.step(*_data())
    pyro.clear_param_store()
    engine = _engine()
    engine.load(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        engine.step(*_data())
